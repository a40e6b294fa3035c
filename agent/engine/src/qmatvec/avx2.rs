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
                let sumi = self.sum_lanes_i32(self.block_products::<$signed>(self.$values(b), x))
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
        let magnitude = s
            .avx2
            ._mm256_slli_epi32::<13>(s.avx2._mm256_and_si256(h, s.avx._mm256_set1_epi32(0x7fff)));
        let sign = s
            .avx2
            ._mm256_slli_epi32::<16>(s.avx2._mm256_and_si256(h, s.avx._mm256_set1_epi32(0x8000)));
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
