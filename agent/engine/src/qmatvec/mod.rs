//! Products `x · Wᵀ` against weights in GGUF's block formats, from the blocks as stored: the
//! 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) here, the 256-value superblock formats
//! (Q4_K, Q5_K, Q6_K) in [`k`], a few input rows at a time, with integer dot products in AVX2
//! registers.
//!
//! candle multiplies Q4_1, Q5_0 and Q5_1 one scalar value at a time (its `vec_dot_unopt`), and
//! everything one input row at a time; on a real Q4_1 model that was 80% of a decode step and a
//! seventh of llama.cpp's speed. Here each input row is quantized once per product to 8-bit
//! blocks (Q8_0, or Q8_1 for the formats with an offset), exactly as candle quantizes it, and
//! each block's products are summed as integers in SIMD registers: 32 multiplications in a few
//! instructions. For the formats candle multiplies in scalar code, eight weight rows go together:
//! their eight blocks' integer sums are added across lanes into one register and scaled by the
//! eight rows' scales at once, each lane taking the very float steps candle's scalar kernel
//! takes for its row, so that no block pays for a horizontal sum or a scalar f16 conversion.
//! Q4_0 and Q8_0 keep eight float lanes per row and add them at the end, as candle's AVX2
//! kernels do. Either way the results have the bits of the candle kernel a stage would
//! otherwise run, which matters more than it seems: the next product rounds its input to 8
//! bits, and a last-bit difference that flips one rounding grows into a visible one (0.03-0.16
//! in a random model's logits), so the oracle tests compare these formats against
//! candle-transformers' quantized models logit for logit where candle runs those kernels,
//! within a stated bound where it runs others (its VNNI path for Q8_0, its superblock kernels).
//!
//! A stage on the CPU holds its matrices in these formats and in Q2_K to Q6_K repacked, eight
//! rows interleaved so that a register's lanes are rows ([`packed`]: the same bytes rearranged,
//! for the 32-value formats the same bits as candle's scalar reference kernels, about twice the
//! speed from memory), a tied head's embedding table included; the kernels here serve matrices
//! of other shapes (outputs not a multiple of 8).
//!
//! Every product of these formats goes through here, prefill chunks included (16 rows at a
//! time): candle's first product of a Q4_K, Q6_K or (with VNNI) Q8_0 matrix makes a repacked
//! copy of it, 1.0-1.5x its size, and keeps both.
//!
//! A weight row is read from memory once per product, whatever the number of input rows: the
//! rows after the first find it in the L1 cache. As with [`matvec`](crate::matvec), a row's
//! result does not depend on the rows travelling with it.
//!
//! Only x86-64 with AVX2 and FMA takes this path (chosen at run time); elsewhere [`supports`]
//! says no and the caller keeps candle's kernels.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

mod k;
pub mod packed;

/// Values per block, in every format here.
const BLOCK: usize = 32;

/// The most input rows one product takes; callers give a prefill chunk this many rows at a
/// time (each pass reads the weights once).
pub const MAX_ROWS: usize = 16;

/// The least weight bytes per parallel task: handing a task to rayon's pool and waiting for it
/// costs microseconds, reading this much from memory about ten.
const MIN_TASK_BYTES: usize = 64 << 10;

/// A block format this kernel multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 4-bit values around 8, one f16 scale per block.
    Q4_0,
    /// 4-bit values, an f16 scale and an f16 offset per block.
    Q4_1,
    /// 5-bit values around 16, one f16 scale per block.
    Q5_0,
    /// 5-bit values, an f16 scale and an f16 offset per block.
    Q5_1,
    /// 8-bit values, one f16 scale per block.
    Q8_0,
    /// 256-value superblocks of 4-bit values in eight sub-blocks of 32, each with a 6-bit scale
    /// and a 6-bit offset; f16 scales of those.
    Q4K,
    /// Q4_K's superblocks with a fifth bit per value.
    Q5K,
    /// 256-value superblocks of 6-bit values around 32 in sixteen sub-blocks of 16, each with
    /// an 8-bit scale; one f16 scale of those.
    Q6K,
    /// 256-value superblocks of 2-bit values in sixteen sub-blocks of 16, each with a 4-bit
    /// scale and a 4-bit offset; f16 scales of those. Repacked only ([`packed`]).
    Q2K,
    /// 256-value superblocks of 3-bit values around 4 (two bits, and a third in a bit plane)
    /// in sixteen sub-blocks of 16, each with a 6-bit scale around 32; one f16 scale of those.
    /// Repacked only ([`packed`]).
    Q3K,
}

impl Format {
    /// The format of a GGUF block type, when it is one of these.
    pub fn of(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q5_1 => Format::Q5_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q5K => Format::Q5K,
            GgmlDType::Q6K => Format::Q6K,
            GgmlDType::Q2K => Format::Q2K,
            GgmlDType::Q3K => Format::Q3K,
            _ => return None,
        })
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q8_0 => 34,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
            Format::Q2K => 84,
            Format::Q3K => 110,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Format::Q4K | Format::Q5K | Format::Q6K | Format::Q2K | Format::Q3K => k::SUPER,
            _ => BLOCK,
        }
    }

    /// Whether the input is quantized with the sum of each block (Q8_1), which the formats with
    /// an offset need.
    fn with_sums(self) -> bool {
        matches!(self, Format::Q4_1 | Format::Q5_1)
    }
}

/// Whether this CPU runs the kernel for blocks of `format` as stored on a `(outputs, width)`
/// matrix (Q2_K and Q3_K have only [`packed`] kernels).
pub fn supports(format: Format, outputs: usize, width: usize) -> bool {
    let _ = outputs;
    width > 0
        && width % format.block_values() == 0
        && !matches!(format, Format::Q2K | Format::Q3K)
        && simd()
}

/// Whether this CPU has what the kernels here and in [`packed`] take: x86-64 with AVX2 and FMA.
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        pulp::x86::V3::try_new().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One block of an input row in 8 bits: its scale as stored (an f16, here widened), for Q8_1
/// the block's sum times the scale (also stored as an f16), the values, and their sum (for
/// the formats whose values are stored with an offset: see [`avx2`]).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct InputBlock {
    qs: [i8; BLOCK],
    d: f32,
    s: f32,
    sum: i32,
}

/// Quantizes one input row as candle's `BlockQ8_0::from_float` / `BlockQ8_1::from_float` do,
/// so that the products below see the very integers candle's would.
fn quantize_row(x: &[f32], with_sums: bool, out: &mut [InputBlock]) {
    for (xs, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d);
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = f32::round(v * id) as i8;
            sum += *q as i32;
        }
        block.d = d16.to_f32();
        block.sum = sum;
        block.s = if with_sums {
            (f16::from_f32(sum as f32) * d16).to_f32()
        } else {
            0.0
        };
    }
}

/// The rows of `x` (each `width` values) quantized for a product with weights in a 32-value
/// `format`, a row's blocks after another's.
fn quantize_rows(format: Format, x: &[f32], width: usize) -> Vec<InputBlock> {
    let blank = InputBlock {
        qs: [0; BLOCK],
        d: 0.0,
        s: 0.0,
        sum: 0,
    };
    let mut input = vec![blank; x.len() / BLOCK];
    for (x, q) in x
        .chunks_exact(width)
        .zip(input.chunks_exact_mut(width / BLOCK))
    {
        quantize_row(x, format.with_sums(), q);
    }
    input
}

/// `out = x · wᵀ` for `x` of `rows × width` f32 values (`rows` at most [`MAX_ROWS`]), `w` the
/// bytes of an `outputs × width` matrix in `format`, `out` of `rows × outputs`. Callers check
/// [`supports`] first.
///
/// # Panics
/// When the lengths disagree with the shape, or [`supports`] would have said no.
pub fn rows_times_blocks(
    format: Format,
    x: &[f32],
    rows: usize,
    w: &[u8],
    width: usize,
    out: &mut [f32],
) {
    assert!(
        rows <= MAX_ROWS && x.len() == rows * width,
        "x is not rows × width"
    );
    let blocks = width / format.block_values();
    let row_bytes = blocks * format.block_bytes();
    assert!(
        width % format.block_values() == 0 && w.len() % row_bytes == 0,
        "w is not outputs × width blocks"
    );
    let outputs = w.len() / row_bytes;
    assert_eq!(out.len(), rows * outputs, "out is not rows × outputs");
    if rows == 0 || outputs == 0 {
        return;
    }
    if matches!(format, Format::Q4K | Format::Q5K | Format::Q6K) {
        let mut input = vec![k::InputSuper::ZERO; rows * blocks];
        for (x, q) in x.chunks_exact(width).zip(input.chunks_exact_mut(blocks)) {
            k::quantize_row(x, q);
        }
        spread(w, row_bytes, rows, out, |w, dst| {
            products(format, w, row_bytes, &input, blocks, dst)
        });
        return;
    }
    let input = quantize_rows(format, x, width);
    spread(w, row_bytes, rows, out, |w, dst| {
        products(format, w, row_bytes, &input, blocks, dst)
    });
}

/// Runs `task` over the weight rows of `w` (rows of `row_bytes`), split over the pool's
/// threads, each task writing its rows' results output-major; then writes `out` row-major
/// (`rows × outputs`).
fn spread(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    out: &mut [f32],
    task: impl Fn(&[u8], &mut [f32]) + Sync,
) {
    let outputs = w.len() / row_bytes;
    // Tasks write output-major (one weight row's results for every input row together), so
    // each task's writes are contiguous; one transpose at the end gives row-major.
    let mut by_output = vec![0f32; outputs * rows];
    let threads = rayon::current_num_threads();
    // Whole groups of eight weight rows per task, so that only the last task has rows alone.
    let per_task = outputs
        .div_ceil(2 * threads)
        .max(MIN_TASK_BYTES.div_ceil(row_bytes))
        .next_multiple_of(8);
    if threads == 1 || outputs <= per_task {
        task(w, &mut by_output);
    } else {
        w.par_chunks(per_task * row_bytes)
            .zip(by_output.par_chunks_mut(per_task * rows))
            .for_each(|(w, dst)| task(w, dst));
    }
    for (o, results) in by_output.chunks_exact(rows).enumerate() {
        for (r, v) in results.iter().enumerate() {
            out[r * outputs + o] = *v;
        }
    }
}

/// Every weight row of `w` (rows of `row_bytes`) times every quantized input row of `input`
/// (rows of `blocks` blocks: [`InputBlock`]s, or [`k::InputSuper`]s for the superblock
/// formats), into `dst` output-major.
#[cfg(target_arch = "x86_64")]
fn products<'a, I>(
    format: Format,
    w: &'a [u8],
    row_bytes: usize,
    input: &'a [I],
    blocks: usize,
    dst: &'a mut [f32],
) where
    avx2::Products<'a, I>: pulp::WithSimd<Output = ()>,
{
    let Some(simd) = pulp::x86::V3::try_new() else {
        unreachable!("qmatvec::supports checked AVX2 and FMA")
    };
    pulp::Simd::vectorize(
        simd,
        avx2::Products {
            simd,
            format,
            w,
            row_bytes,
            input,
            blocks,
            dst,
        },
    );
}

#[cfg(not(target_arch = "x86_64"))]
fn products<I>(_: Format, _: &[u8], _: usize, _: &[I], _: usize, _: &mut [f32]) {
    unreachable!("qmatvec::supports is false off x86-64")
}

/// The f16 at `bytes[at..at + 2]`, widened exactly, in inline arithmetic rather than
/// `half`'s conversion, which is a call (and a CPU feature check) per block, a tenth of a Q8_0
/// block's time. A normal value's exponent is rebased from f16's bias to f32's; a subnormal one
/// (a small model's K-quant scales often are) is `(1 + m/1024)·2^-14 - 2^-14 = m·2^-24`, so that
/// no subnormal f32 is ever an operand (a microcode assist each). Without branches: normal and
/// subnormal scales alternate at random from block to block, and a mispredicted branch per
/// scale halved a Q4_K product's speed. Infinities and NaNs (never a real scale) take `half`'s
/// conversion.
#[inline(always)]
fn half_at(bytes: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    if h & 0x7c00 == 0x7c00 {
        return f16::from_bits(h).to_f32();
    }
    let shifted = ((h & 0x7fff) as u32) << 13;
    let normal = shifted + ((127 - 15) << 23);
    let subnormal =
        (f32::from_bits(shifted + ((127 - 14) << 23)) - f32::from_bits((127 - 14) << 23)).to_bits();
    let is_subnormal = (((h & 0x7c00) == 0) as u32).wrapping_neg();
    let magnitude = (subnormal & is_subnormal) | (normal & !is_subnormal);
    f32::from_bits(magnitude | (((h & 0x8000) as u32) << 16))
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! The products, block by block, through pulp's AVX2 token (safe intrinsics, run inside
    //! `V3::vectorize` so that they compile to AVX2 instructions). Q4_0 and Q8_0 accumulate
    //! eight float lanes with fused multiply-adds and add the lanes at the end, as candle's AVX2
    //! kernels do; the others add each block's integer sum to one float, as candle's scalar
    //! kernels do.

    use pulp::bytemuck::cast;
    use pulp::x86::V3;
    use pulp::{Simd, WithSimd};
    use std::arch::x86_64::{__m128i, __m256, __m256i};

    use super::{BLOCK, Format, InputBlock, half_at};

    /// The arguments of [`super::products`], run inside `V3::vectorize`. The loops are written
    /// out per format rather than through a closure: a closure's body is a function of its own,
    /// compiled without the vector instructions `with_simd` gets, and every intrinsic inlined
    /// into it would become a call (20x slower in test builds; release builds happened to
    /// inline it).
    /// `I` is the input's block type: [`InputBlock`] here, the superblock formats' in `k`.
    pub(crate) struct Products<'a, I> {
        pub(crate) simd: V3,
        pub(crate) format: Format,
        pub(crate) w: &'a [u8],
        pub(crate) row_bytes: usize,
        pub(crate) input: &'a [I],
        pub(crate) blocks: usize,
        pub(crate) dst: &'a mut [f32],
    }

    impl WithSimd for Products<'_, InputBlock> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let avx = Avx2 { simd: self.simd };
            let rows = self.input.len() / self.blocks;
            macro_rules! single {
                ($dot:ident, $rows:ident) => {{
                    for (w_row, dst) in self
                        .w
                        .chunks_exact(self.row_bytes)
                        .zip(self.dst.chunks_exact_mut(rows))
                    {
                        // One row keeps its accumulator in a register; several keep theirs
                        // in an array in memory. The same steps either way.
                        if rows == 1 {
                            dst[0] = avx.$dot(w_row, self.input);
                        } else {
                            avx.$rows(w_row, self.input, self.blocks, dst);
                        }
                    }
                }};
            }
            macro_rules! grouped {
                ($dot8:ident, $dot:ident) => {{
                    let grouped = self.w.len() / (GROUP * self.row_bytes) * GROUP;
                    let (w_groups, w_tail) = self.w.split_at(grouped * self.row_bytes);
                    let (d_groups, d_tail) = self.dst.split_at_mut(grouped * rows);
                    for (w, dst) in w_groups
                        .chunks_exact(GROUP * self.row_bytes)
                        .zip(d_groups.chunks_exact_mut(GROUP * rows))
                    {
                        if rows == 1 {
                            avx.$dot8::<true>(w, self.row_bytes, self.input, self.blocks, dst);
                        } else {
                            avx.$dot8::<false>(w, self.row_bytes, self.input, self.blocks, dst);
                        }
                    }
                    for (w_row, dst) in w_tail
                        .chunks_exact(self.row_bytes)
                        .zip(d_tail.chunks_exact_mut(rows))
                    {
                        for (x, d) in self.input.chunks_exact(self.blocks).zip(dst.iter_mut()) {
                            *d = avx.$dot(w_row, x);
                        }
                    }
                }};
            }
            // Q4_0 and Q8_0 follow candle's AVX2 kernels, which keep eight float lanes per row
            // and add them at the end; they go row by row, as Q5_0 does in candle's scalar
            // order. Grouped, these three ran at a third to half the speed (2048 x 768 from
            // memory, GB/s one row at a time / grouped: Q4_0 10.4 / 4.5, Q5_0 8.5 / 3.7, Q8_0
            // 19.5 / 5), their loads of weights stalling, while Q4_1 and Q5_1 grouped run at 9
            // and 11.8, faster than one at a time. Those two have blocks of 20 and 24 bytes,
            // these of 18, 22 and 34; why eight rows of such blocks at once defeat this CPU's
            // prefetching (a load of each row 256 bytes ahead did not help) is not known. (A
            // stage's matrices are mostly repacked instead, see `packed`; these kernels serve
            // the shapes it does not take and a GGUF's embedding table.)
            match self.format {
                Format::Q4_0 => single!(dot_q4_0, rows_q4_0),
                Format::Q4_1 => grouped!(dot8_q4_1, dot_q4_1),
                Format::Q5_0 => single!(dot_q5_0, rows_q5_0),
                Format::Q5_1 => grouped!(dot8_q5_1, dot_q5_1),
                Format::Q8_0 => single!(dot_q8_0, rows_q8_0),
                Format::Q4K | Format::Q5K | Format::Q6K | Format::Q2K | Format::Q3K => {
                    unreachable!("superblock formats go through k")
                }
            }
        }
    }

    /// Weight rows multiplied together: their eight sums fill one register.
    const GROUP: usize = 8;

    /// Candle's scalar kernels' float steps for a format whose block `b` holds the f16 scale at
    /// 0, the f16 offset at 2 where `$min`, and whose `$values(b)` gives the block's 32 weight
    /// values as bytes, `$bytes` a block: signed where `$signed`, else unsigned and `$bias`
    /// above the values they stand for (Q4_0 stores -8..7 as 0..15), which the integer sum
    /// takes back exactly as `$bias` times the input block's sum. (An unsigned operand is what
    /// `maddubs` takes: two sign instructions per block fewer than a signed one.) `$one`: one
    /// weight row times one input row, per block (sum * d_w) * d_x, plus m_w * s_x, added to
    /// the row's sum. `$eight`: eight weight rows, `row_bytes` apart from `w`, times every input
    /// row of `xs` (rows of `blocks` blocks) into `dst` (output-major): each block of the
    /// eight rows unpacked once for all the input rows, its eight integer sums with one input
    /// block added across lanes into one register, each lane then taking the steps of `$one`
    /// for its row, so that a row's result has the same bits either way and in any batch.
    macro_rules! scalar_order {
        (
            $one:ident,
            $rows:ident,
            $eight:ident,
            $values:ident,
            $signed:expr,
            $bias:expr,
            $bytes:expr,
            $min:expr
        ) => {
            #[inline(always)]
            pub(super) fn $one(self, w: &[u8], xs: &[InputBlock]) -> f32 {
                let mut sum = 0f32;
                for (b, x) in w.chunks_exact($bytes).zip(xs) {
                    let sumi = self
                        .sum_lanes_i32(self.block_products::<$signed>(self.$values(b), x))
                        - $bias * x.sum;
                    let mut term = sumi as f32 * half_at(b, 0) * x.d;
                    if $min {
                        term += half_at(b, 2) * x.s;
                    }
                    sum += term;
                }
                sum
            }

            /// `$one` for one weight row and each input row of `xs` (rows of `blocks`
            /// blocks), into `dst`: each block's values unpacked once for all the rows. (Each
            /// format uses this or `$eight`, whichever its dispatch above names.)
            #[allow(dead_code)]
            #[inline(always)]
            pub(super) fn $rows(self, w: &[u8], xs: &[InputBlock], blocks: usize, dst: &mut [f32]) {
                let rows = dst.len();
                let mut sum = [0f32; super::MAX_ROWS];
                for (i, b) in w.chunks_exact($bytes).enumerate() {
                    let values = self.$values(b);
                    let (d, m) = (half_at(b, 0), if $min { half_at(b, 2) } else { 0.0 });
                    for (r, sum) in sum.iter_mut().enumerate().take(rows) {
                        let x = &xs[r * blocks + i];
                        let sumi = self.sum_lanes_i32(self.block_products::<$signed>(values, x))
                            - $bias * x.sum;
                        let mut term = sumi as f32 * d * x.d;
                        if $min {
                            term += m * x.s;
                        }
                        *sum += term;
                    }
                }
                dst.copy_from_slice(&sum[..rows]);
            }

            /// (`ONE`: `xs` is one input row, whose accumulator then stays in a register; the
            /// array of several rows' lives in memory, which cost one row 5-13% of its speed.)
            #[allow(dead_code)]
            #[inline(always)]
            pub(super) fn $eight<const ONE: bool>(
                self,
                w: &[u8],
                row_bytes: usize,
                xs: &[InputBlock],
                blocks: usize,
                dst: &mut [f32],
            ) {
                let s = self.simd;
                let rows = if ONE { 1 } else { xs.len() / blocks };
                let mut acc = [s.avx._mm256_setzero_ps(); super::MAX_ROWS];
                for i in 0..blocks {
                    let at = i * $bytes;
                    let mut values = [s.avx._mm256_setzero_si256(); GROUP];
                    let mut d = [0u16; GROUP];
                    let mut m = [0u16; GROUP];
                    for (r, values) in values.iter_mut().enumerate() {
                        let b = &w[r * row_bytes + at..r * row_bytes + at + $bytes];
                        // One input row: its products at once, eight registers fewer live.
                        *values = if ONE {
                            self.block_products::<$signed>(self.$values(b), &xs[i])
                        } else {
                            self.$values(b)
                        };
                        d[r] = u16::from_le_bytes([b[0], b[1]]);
                        if $min {
                            m[r] = u16::from_le_bytes([b[2], b[3]]);
                        }
                    }
                    let scales = self.halves(d);
                    let offsets = self.halves(m);
                    for (row, acc) in acc.iter_mut().enumerate().take(rows) {
                        let x = &xs[row * blocks + i];
                        // A loop, not `values.map`: a closure would be compiled without AVX2.
                        let mut lanes = values;
                        if !ONE {
                            for lanes in lanes.iter_mut() {
                                *lanes = self.block_products::<$signed>(*lanes, x);
                            }
                        }
                        let sums = s.avx2._mm256_sub_epi32(
                            self.across(lanes),
                            s.avx._mm256_set1_epi32($bias * x.sum),
                        );
                        let sums = s.avx._mm256_cvtepi32_ps(sums);
                        let mut term = s.avx._mm256_mul_ps(
                            s.avx._mm256_mul_ps(sums, scales),
                            s.avx._mm256_set1_ps(x.d),
                        );
                        if $min {
                            term = s.avx._mm256_add_ps(
                                term,
                                s.avx._mm256_mul_ps(offsets, s.avx._mm256_set1_ps(x.s)),
                            );
                        }
                        *acc = s.avx._mm256_add_ps(*acc, term);
                    }
                }
                for (row, acc) in acc.iter().enumerate().take(rows) {
                    let v: [f32; GROUP] = cast(*acc);
                    for (o, v) in v.into_iter().enumerate() {
                        dst[o * rows + row] = v;
                    }
                }
            }
        };
    }

    impl Avx2 {
        scalar_order!(
            dot_q4_1,
            rows_q4_1,
            dot8_q4_1,
            values_q4_1,
            false,
            0,
            20,
            true
        );
        scalar_order!(
            dot_q5_0,
            rows_q5_0,
            dot8_q5_0,
            values_q5_0,
            false,
            16,
            22,
            false
        );
        scalar_order!(
            dot_q5_1,
            rows_q5_1,
            dot8_q5_1,
            values_q5_1,
            false,
            0,
            24,
            true
        );

        /// A block's 32 weight values (as bytes: signed where `SIGNED`, else unsigned) times an
        /// input block's, in eight integer lanes of four products each.
        #[inline(always)]
        fn block_products<const SIGNED: bool>(self, v: __m256i, x: &InputBlock) -> __m256i {
            if SIGNED {
                self.products_i8_i8(v, self.input_values(x))
            } else {
                self.products_u8_i8(v, self.input_values(x))
            }
        }

        /// A Q4_1 block's values, 0 to 15.
        #[inline(always)]
        fn values_q4_1(self, b: &[u8]) -> __m256i {
            self.nibbles(&b[4..])
        }

        /// A Q5_0 block's values as stored, 0 to 31 for -16 to 15.
        #[inline(always)]
        fn values_q5_0(self, b: &[u8]) -> __m256i {
            let s = self.simd;
            let qh = u32::from_le_bytes(array::<4>(&b[2..]));
            s.avx2
                ._mm256_or_si256(self.nibbles(&b[6..]), self.fifth_bits(qh))
        }

        /// A Q5_1 block's values, 0 to 31.
        #[inline(always)]
        fn values_q5_1(self, b: &[u8]) -> __m256i {
            let s = self.simd;
            let qh = u32::from_le_bytes(array::<4>(&b[4..]));
            s.avx2
                ._mm256_or_si256(self.nibbles(&b[8..]), self.fifth_bits(qh))
        }

        /// The sums of the eight lanes of each of eight registers, in one register.
        #[inline(always)]
        pub(super) fn across(self, v: [__m256i; GROUP]) -> __m256i {
            let s = self.simd;
            // hadd pairs lanes within each 128-bit half: two rounds leave, in each half, a
            // quarter sum of each of four registers; the halves are then added.
            let h01 = s.avx2._mm256_hadd_epi32(v[0], v[1]);
            let h23 = s.avx2._mm256_hadd_epi32(v[2], v[3]);
            let h45 = s.avx2._mm256_hadd_epi32(v[4], v[5]);
            let h67 = s.avx2._mm256_hadd_epi32(v[6], v[7]);
            let h03 = s.avx2._mm256_hadd_epi32(h01, h23);
            let h47 = s.avx2._mm256_hadd_epi32(h45, h67);
            s.avx2._mm256_add_epi32(
                s.avx2._mm256_permute2x128_si256::<0x20>(h03, h47),
                s.avx2._mm256_permute2x128_si256::<0x31>(h03, h47),
            )
        }

        /// Eight f16 values widened, exactly: the magnitude's bits moved into an f32's place
        /// and scaled by 2^112 (the difference of the two exponent biases), the sign put back.
        /// Scales are finite, so infinities and NaNs need no case.
        #[inline(always)]
        pub(super) fn halves(self, h: [u16; GROUP]) -> __m256 {
            let s = self.simd;
            let h = s.avx2._mm256_cvtepu16_epi32(cast(h));
            let magnitude = s.avx2._mm256_slli_epi32::<13>(
                s.avx2._mm256_and_si256(h, s.avx._mm256_set1_epi32(0x7fff)),
            );
            let sign = s.avx2._mm256_slli_epi32::<16>(
                s.avx2._mm256_and_si256(h, s.avx._mm256_set1_epi32(0x8000)),
            );
            let value = s.avx._mm256_mul_ps(
                s.avx._mm256_castsi256_ps(magnitude),
                s.avx._mm256_set1_ps(f32::from_bits(0x7780_0000)),
            );
            s.avx._mm256_or_ps(value, s.avx._mm256_castsi256_ps(sign))
        }
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Avx2 {
        pub(super) simd: V3,
    }

    /// How far ahead of the block being multiplied the kernels ask for weights. The blocks
    /// are read in order, yet the CPU's own prefetching left the kernels waiting on memory:
    /// asking for the lines 4 KiB ahead made Q6_K decode 1.2x faster here.
    const AHEAD: usize = 4096;

    /// Asks for the cache lines `AHEAD` bytes past each of the `bytes` bytes from `b`'s start
    /// (a hint: an address past the weights is never read).
    #[inline(always)]
    pub(super) fn prefetch(s: V3, b: &[u8], bytes: usize) {
        let ahead = b.as_ptr().wrapping_add(AHEAD);
        for line in (0..bytes).step_by(64) {
            s.sse
                ._mm_prefetch::<3>(ahead.wrapping_add(line).cast::<i8>());
        }
    }

    pub(super) fn array<const N: usize>(b: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        a
    }

    impl Avx2 {
        /// The 32 nibbles of a 16-byte block as bytes: low nibbles first, then high nibbles,
        /// the order in which Q4 and Q5 blocks pair their values with the input's.
        #[inline(always)]
        fn nibbles(self, qs: &[u8]) -> __m256i {
            let s = self.simd;
            let low: __m128i = cast(array::<16>(qs));
            let both = s.avx._mm256_insertf128_si256::<1>(
                s.avx._mm256_castsi128_si256(low),
                s.sse2._mm_srli_epi16::<4>(low),
            );
            s.avx2._mm256_and_si256(both, s.avx._mm256_set1_epi8(0x0F))
        }

        /// 0x10 in byte `i` where bit `i` of `qh` is set: the fifth bit of each Q5 value.
        #[inline(always)]
        fn fifth_bits(self, qh: u32) -> __m256i {
            let s = self.simd;
            // Byte i takes byte i / 8 of qh, then keeps bit i % 8 of it.
            let spread = s.avx2._mm256_shuffle_epi8(
                s.avx._mm256_set1_epi32(qh as i32),
                s.avx._mm256_setr_epi64x(
                    0,
                    0x0101_0101_0101_0101,
                    0x0202_0202_0202_0202,
                    0x0303_0303_0303_0303,
                ),
            );
            let bit = s.avx._mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let set = s
                .avx2
                ._mm256_cmpeq_epi8(s.avx2._mm256_and_si256(spread, bit), bit);
            s.avx2._mm256_and_si256(set, s.avx._mm256_set1_epi8(0x10))
        }

        /// Sums of four adjacent products of unsigned bytes `u` and signed bytes `v`, in eight
        /// 32-bit lanes. Exact: every pair of products fits 16 bits for the value ranges here.
        #[inline(always)]
        pub(super) fn products_u8_i8(self, u: __m256i, v: __m256i) -> __m256i {
            let s = self.simd;
            s.avx2._mm256_madd_epi16(
                s.avx2._mm256_maddubs_epi16(u, v),
                s.avx._mm256_set1_epi16(1),
            )
        }

        /// [`Avx2::products_u8_i8`] for two signed operands: the sign of `a` moves onto `b`.
        #[inline(always)]
        fn products_i8_i8(self, a: __m256i, b: __m256i) -> __m256i {
            let s = self.simd;
            self.products_u8_i8(s.avx2._mm256_sign_epi8(a, a), s.avx2._mm256_sign_epi8(b, a))
        }

        #[inline(always)]
        pub(super) fn sum_lanes_i32(self, v: __m256i) -> i32 {
            let s = self.simd;
            let v = s.sse2._mm_add_epi32(
                s.avx._mm256_castsi256_si128(v),
                s.avx2._mm256_extracti128_si256::<1>(v),
            );
            let v = s.sse2._mm_add_epi32(v, s.sse2._mm_unpackhi_epi64(v, v));
            let v = s.sse2._mm_add_epi32(v, s.sse2._mm_shuffle_epi32::<0b01>(v));
            s.sse2._mm_cvtsi128_si32(v)
        }

        /// The eight lanes added as candle's `hsum_float_8` adds them.
        #[inline(always)]
        pub(super) fn sum_lanes_f32(self, x: __m256) -> f32 {
            let s = self.simd;
            let v = s.sse._mm_add_ps(
                s.avx._mm256_extractf128_ps::<1>(x),
                s.avx._mm256_castps256_ps128(x),
            );
            let v = s.sse._mm_add_ps(v, s.sse._mm_movehl_ps(v, v));
            let v = s.sse._mm_add_ss(v, s.sse3._mm_movehdup_ps(v));
            s.sse._mm_cvtss_f32(v)
        }

        #[inline(always)]
        fn input_values(self, x: &InputBlock) -> __m256i {
            cast(x.qs)
        }

        /// A float per block scaled into eight lanes, added as candle's AVX2 kernels add them.
        #[inline(always)]
        fn scaled(self, acc: __m256, d: f32, sums: __m256i) -> __m256 {
            let s = self.simd;
            s.fma
                ._mm256_fmadd_ps(s.avx._mm256_set1_ps(d), s.avx._mm256_cvtepi32_ps(sums), acc)
        }

        /// One weight row (`w`, Q8_0 blocks, or Q4_0 where `Q4` is set) times each input row of
        /// `xs` (rows of `blocks` blocks), into `dst`, with the
        /// float steps of candle's AVX2 kernels for each row: eight lanes per row, a fused
        /// multiply-add per block, the lanes added at the end. A block's values are read and
        /// their magnitudes taken once for all the rows. (No closure picks the format: a
        /// closure is compiled without AVX2, see [`Products`].)
        #[inline(always)]
        fn rows_signed<const Q4: bool>(
            self,
            w: &[u8],
            xs: &[InputBlock],
            blocks: usize,
            dst: &mut [f32],
        ) {
            let s = self.simd;
            let rows = dst.len();
            let mut acc = [s.avx._mm256_setzero_ps(); super::MAX_ROWS];
            let bytes = if Q4 { 18 } else { 34 };
            for (i, b) in w.chunks_exact(bytes).enumerate() {
                let v = if Q4 {
                    s.avx2
                        ._mm256_sub_epi8(self.nibbles(&b[2..]), s.avx._mm256_set1_epi8(8))
                } else {
                    cast(array::<32>(&b[2..]))
                };
                let magnitudes = s.avx2._mm256_sign_epi8(v, v);
                let d = half_at(b, 0);
                for r in 0..rows {
                    let x = &xs[r * blocks + i];
                    let signed = s.avx2._mm256_sign_epi8(self.input_values(x), v);
                    let sums = self.products_u8_i8(magnitudes, signed);
                    acc[r] = self.scaled(acc[r], d * x.d, sums);
                }
            }
            for r in 0..rows {
                dst[r] = self.sum_lanes_f32(acc[r]);
            }
        }

        /// [`Avx2::rows_signed`] for one input row (Q4_0), its accumulator in a register.
        #[inline(always)]
        pub(super) fn dot_q4_0(self, w: &[u8], x: &[InputBlock]) -> f32 {
            let s = self.simd;
            let mut acc = s.avx._mm256_setzero_ps();
            for (b, x) in w.chunks_exact(18).zip(x) {
                let v = s
                    .avx2
                    ._mm256_sub_epi8(self.nibbles(&b[2..]), s.avx._mm256_set1_epi8(8));
                let sums = self.products_i8_i8(v, self.input_values(x));
                acc = self.scaled(acc, half_at(b, 0) * x.d, sums);
            }
            self.sum_lanes_f32(acc)
        }

        /// [`Avx2::rows_signed`] for one input row (Q8_0), its accumulator in a register.
        #[inline(always)]
        pub(super) fn dot_q8_0(self, w: &[u8], x: &[InputBlock]) -> f32 {
            let s = self.simd;
            let mut acc = s.avx._mm256_setzero_ps();
            for (b, x) in w.chunks_exact(34).zip(x) {
                let v: __m256i = cast(array::<32>(&b[2..]));
                let sums = self.products_i8_i8(v, self.input_values(x));
                acc = self.scaled(acc, half_at(b, 0) * x.d, sums);
            }
            self.sum_lanes_f32(acc)
        }

        #[inline(always)]
        pub(super) fn rows_q4_0(self, w: &[u8], xs: &[InputBlock], blocks: usize, dst: &mut [f32]) {
            self.rows_signed::<true>(w, xs, blocks, dst);
        }

        #[inline(always)]
        pub(super) fn rows_q8_0(self, w: &[u8], xs: &[InputBlock], blocks: usize, dst: &mut [f32]) {
            self.rows_signed::<false>(w, xs, blocks, dst);
        }
    }

    const _: () = assert!(BLOCK == 32);
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::{
        BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, GgmlType,
    };
    use candle_core::quantized::{GgmlDType, QTensor};

    /// Every one of the 65536 f16 values widens to `half`'s own f32 (bit for bit; NaNs stay
    /// NaNs).
    #[test]
    fn scales_widen_exactly() {
        for h in 0..=u16::MAX {
            let ours = half_at(&h.to_le_bytes(), 0);
            let theirs = f16::from_bits(h).to_f32();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{h:#06x}: {ours} vs {theirs}"
            );
        }
    }
    use candle_core::{Device, Tensor};

    use super::*;

    /// A cheap deterministic spread of magnitudes and signs, some blocks all zero (also the
    /// packed kernels' test data).
    pub(super) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                if (i / BLOCK) % 7 == 3 {
                    0.0
                } else {
                    (state % 20_001) as f32 / 10_000.0 - 1.0
                }
            })
            .collect()
    }

    /// candle's product of one weight row and one input row, each quantized by candle's own
    /// code, in block type `T`: its kernel for this CPU (`vec_dot`: AVX2 for Q4_0 and Q8_0, the
    /// scalar reference for the others), or where `UNOPT` its scalar reference
    /// (`vec_dot_unopt`).
    fn reference<T: GgmlType, const UNOPT: bool>(w: &[f32], x: &[f32]) -> f32 {
        let mut wb = vec![T::zeros(); w.len() / T::BLCK_SIZE];
        T::from_float(w, &mut wb);
        let mut xb = vec![T::VecDotType::zeros(); x.len() / T::VecDotType::BLCK_SIZE];
        T::VecDotType::from_float(x, &mut xb);
        if UNOPT {
            T::vec_dot_unopt(w.len(), &wb, &xb)
        } else {
            T::vec_dot(w.len(), &wb, &xb)
        }
    }

    /// Every format, 1 to 16 rows, 51 and 1003 outputs, one thread and two: the bits of candle's
    /// product of the same blocks on this CPU (its AVX2 kernels for Q4_0 and Q8_0, its scalar
    /// reference `vec_dot_unopt` for the others), and the f32 product of the dequantized
    /// weights within what rounding the input to 8-bit blocks can move it.
    #[test]
    fn every_format_gives_candles_bits_near_the_dequantized_product() {
        let width = 320;
        // 1003 outputs split over several tasks, each of whole groups but the last.
        for (outputs, dtype) in [51, 1003].into_iter().flat_map(|o| {
            [
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
                GgmlDType::Q5_0,
                GgmlDType::Q5_1,
                GgmlDType::Q8_0,
            ]
            .map(move |d| (o, d))
        }) {
            let format = Format::of(dtype).unwrap();
            if !supports(format, outputs, width) {
                // CI's machines have AVX2; elsewhere the skip is said, never silent.
                cluster_fixtures::skip(&format!("{dtype:?}: this CPU has no AVX2 and FMA"));
                continue;
            }
            let weights = values(outputs * width, 7);
            let w = Tensor::from_slice(&weights, (outputs, width), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let dequantized: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let reference = match dtype {
                GgmlDType::Q4_0 => reference::<BlockQ4_0, false>,
                GgmlDType::Q4_1 => reference::<BlockQ4_1, true>,
                GgmlDType::Q5_0 => reference::<BlockQ5_0, true>,
                GgmlDType::Q5_1 => reference::<BlockQ5_1, true>,
                _ => reference::<BlockQ8_0, false>,
            };
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for rows in [1, 2, 3, 5, 16] {
                    let x = values(rows * width, rows as u32 + 11);
                    let mut ours = vec![0f32; rows * outputs];
                    pool.install(|| rows_times_blocks(format, &x, rows, &bytes, width, &mut ours));
                    for r in 0..rows {
                        let xs = &x[r * width..(r + 1) * width];
                        for o in 0..outputs {
                            let got = ours[r * outputs + o];
                            let theirs = reference(&weights[o * width..(o + 1) * width], xs);
                            assert_eq!(
                                got.to_bits(),
                                theirs.to_bits(),
                                "{dtype:?} rows {rows} row {r} output {o} ({threads} threads): \
                                 {got} vs candle's {theirs}"
                            );
                            let ws = &dequantized[o * width..(o + 1) * width];
                            let (mut exact, mut bound) = (0f64, 1e-6);
                            for (wb, xb) in ws.chunks(BLOCK).zip(xs.chunks(BLOCK)) {
                                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                                let wmax = wb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                                let (mut wsum, mut xsum, mut magnitude) = (0f64, 0f64, 0f64);
                                for (a, b) in wb.iter().zip(xb) {
                                    let (a, b) = (*a as f64, *b as f64);
                                    exact += a * b;
                                    magnitude += (a * b).abs();
                                    wsum += a.abs();
                                    xsum += b.abs();
                                }
                                // An input value moves by at most half a step of its block's
                                // scale, which is itself an f16 (2^-11 of it, 127 steps); an
                                // offset format's block sum is an f16 too; float sums of these
                                // terms in any order.
                                bound += wsum * amax / 127.0 * (0.5 + 127.0 / 2048.0)
                                    + wmax * xsum / 1024.0
                                    + 1e-5 * magnitude;
                            }
                            assert!(
                                (got as f64 - exact).abs() <= bound,
                                "{dtype:?} rows {rows} row {r} output {o}: {got} vs the \
                                 dequantized weights' {exact} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }
}
