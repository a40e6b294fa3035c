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
//! says no and the caller keeps candle's kernels. Where the CPU also has AVX-512 VNNI, the
//! packed matrices go through kernels of their own with the same results (`packed/vnni.rs`).
//! The products' inputs are quantized in AVX2 registers (`quantize.rs`), to the same bits.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

mod k;
pub mod packed;
#[cfg(target_arch = "x86_64")]
mod quantize;

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
        && width.is_multiple_of(format.block_values())
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
    debug_assert!(width.is_multiple_of(BLOCK) && x.len().is_multiple_of(width));
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        quantize::rows32(simd, x, format.with_sums(), &mut input);
        return input;
    }
    for (x, q) in x
        .chunks_exact(width)
        .zip(input.chunks_exact_mut(width / BLOCK))
    {
        quantize_row(x, format.with_sums(), q);
    }
    input
}

/// The rows of `x` (each `width` values, whole superblocks) quantized for a product with
/// weights in a superblock format, a row's superblocks after another's.
fn quantize_rows_super(x: &[f32], width: usize) -> Vec<k::InputSuper> {
    let mut input = vec![k::InputSuper::ZERO; x.len() / k::SUPER];
    debug_assert!(width.is_multiple_of(k::SUPER) && x.len().is_multiple_of(width));
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        quantize::rows_super(simd, x, &mut input);
        return input;
    }
    for (x, q) in x
        .chunks_exact(width)
        .zip(input.chunks_exact_mut(width / k::SUPER))
    {
        k::quantize_row(x, q);
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
        width.is_multiple_of(format.block_values()) && w.len().is_multiple_of(row_bytes),
        "w is not outputs × width blocks"
    );
    let outputs = w.len() / row_bytes;
    assert_eq!(out.len(), rows * outputs, "out is not rows × outputs");
    if rows == 0 || outputs == 0 {
        return;
    }
    if matches!(format, Format::Q4K | Format::Q5K | Format::Q6K) {
        let input = quantize_rows_super(x, width);
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
    // Whole pairs of groups of eight weight rows per task (the VNNI kernel takes two groups
    // at once), so that only the last task has groups or rows alone.
    let per_task = outputs
        .div_ceil(2 * threads)
        .max(MIN_TASK_BYTES.div_ceil(row_bytes))
        .next_multiple_of(16);
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
pub(crate) mod avx2;

#[cfg(test)]
mod tests;
