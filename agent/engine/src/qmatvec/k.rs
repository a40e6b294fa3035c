//! The 256-value superblock formats (GGUF's "K" quants Q4_K, Q5_K and Q6_K, those of the Q4_K_M
//! and Q5_K_M files people download), multiplied from their block bytes as stored. (A stage's
//! matrices are repacked and multiplied in [`packed`](super::packed); these kernels serve the
//! shapes it does not take.)
//!
//! Each input row is quantized once per product to 8-bit superblocks with the sums of each
//! 16 values (llama.cpp's and candle's Q8_K, the same integers candle computes), so that a
//! sub-block's offset or centre costs one multiplication by a precomputed sum rather than one
//! per value. A superblock's products are summed as exact integers in AVX2 registers, its
//! sub-block scales applied as integers too; the float steps are a fused multiply-add per
//! superblock into eight lanes (and one for the offsets into four), the lanes added at the end
//! of the row. candle's own kernels for
//! these formats differ by CPU (AVX2, AVX-VNNI, AVX-512 VNNI on repacked copies of the weights,
//! NEON) in the order of their float sums, so a stage here is bounded against candle's products
//! rather than equal to their bits.
//!
//! Why not candle's products: on x86 candle repacks a Q4_K matrix (and a Q6_K one on its first
//! product of several rows, a Q8_0 one where the CPU has VNNI) into a second, larger copy the
//! first time it multiplies it, and keeps both: a Q4_K_M stage held 2.3-2.6x its weights' bytes
//! after its first token. Here the stage holds the file's bytes and nothing else.

use super::{Format, half_at};

/// Values per superblock.
pub(crate) const SUPER: usize = 256;

/// One superblock of an input row in 8 bits: the values, the sum of each 16 of them and of
/// each 32 (a Q4_K sub-block, whose offset multiplies it), and the scale (an f32).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct InputSuper {
    pub(crate) qs: [i8; SUPER],
    pub(crate) sums: [i16; SUPER / 16],
    pub(crate) subs: [i16; SUPER / 32],
    pub(crate) d: f32,
}

impl InputSuper {
    pub(crate) const ZERO: Self = Self {
        qs: [0; SUPER],
        sums: [0; SUPER / 16],
        subs: [0; SUPER / 32],
        d: 0.0,
    };
}

/// Quantizes one input row as candle's `BlockQ8K::from_float` does: the value of greatest
/// magnitude maps to -127 (so values of the other sign may reach 128, clamped to 127), the
/// others by the same step, rounded half away from zero.
pub(crate) fn quantize_row(x: &[f32], out: &mut [InputSuper]) {
    for (xs, block) in x.chunks_exact(SUPER).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *block = InputSuper::ZERO;
            continue;
        }
        let iscale = -127f32 / max;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
        }
        for (sum, qs) in block.sums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        for (sub, pair) in block.subs.iter_mut().zip(block.sums.chunks_exact(2)) {
            *sub = pair[0] + pair[1];
        }
        block.d = 1.0 / iscale;
    }
}

/// The eight 6-bit scales and eight 6-bit offsets of a Q4_K superblock, from its 12 bytes:
/// the first four of each in the low six bits of bytes 0-3 and 4-7, the last four in the
/// nibbles of bytes 8-11 with their top two bits in the top bits of bytes 0-7.
pub(crate) fn q4k_scales(b: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = b[j] & 63;
        m[j] = b[j + 4] & 63;
        sc[j + 4] = (b[j + 8] & 0x0f) | ((b[j] >> 6) << 4);
        m[j + 4] = (b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// Byte offsets within a superblock. Q5_K is Q4_K's layout with 32 bytes of fifth bits
/// between the scales and the nibbles (bit `j` of byte `l` for value `l` of sub-block `j`).
pub(crate) const Q4K_SCALES: usize = 4;
pub(crate) const Q4K_QS: usize = 16;
pub(crate) const Q5K_QH: usize = 16;
pub(crate) const Q5K_QS: usize = 48;
pub(crate) const Q6K_QH: usize = 128;
pub(crate) const Q6K_SCALES: usize = 192;
pub(crate) const Q6K_D: usize = 208;

/// The 6-bit value `i` (0..256) of a Q6_K superblock, before its centre 32 is taken off: the
/// low four bits from `ql` (values 64n..64n+32 and 64n+32..64n+64 of each half share bytes,
/// low and high nibbles), the top two from `qh` (four values a byte).
#[cfg(test)]
pub(crate) fn q6k_value(b: &[u8], i: usize) -> u8 {
    let (half, at) = (i / 128, i % 128);
    let (quarter, l) = (at / 32, at % 32);
    let ql = b[64 * half + l + 32 * (quarter % 2)];
    let low = if quarter < 2 { ql & 0x0f } else { ql >> 4 };
    let high = (b[Q6K_QH + 32 * half + l] >> (2 * quarter)) & 3;
    low | (high << 4)
}

/// One weight row times one input row, value by value, with the SIMD kernels' integer sums
/// (exact, so equal) and a superblock's float steps added in order, where the kernels add them
/// in eight lanes: the reference they are tested against.
#[cfg(test)]
pub(crate) fn dot_scalar(format: Format, w: &[u8], xs: &[InputSuper]) -> f32 {
    let mut sum = 0f32;
    match format {
        Format::Q4K | Format::Q5K => {
            let five = format == Format::Q5K;
            let (bytes, qs_at) = if five { (176, Q5K_QS) } else { (144, Q4K_QS) };
            for (b, x) in w.chunks_exact(bytes).zip(xs) {
                let (sc, m) = q4k_scales(&b[Q4K_SCALES..Q4K_QS]);
                let qs = &b[qs_at..];
                let (mut isum, mut msum) = (0i32, 0i32);
                for j in 0..8 {
                    let (chunk, high) = (j / 2, j % 2 == 1);
                    let mut sub = 0i32;
                    for l in 0..32 {
                        let byte = qs[32 * chunk + l];
                        let mut q = if high { byte >> 4 } else { byte & 0x0f };
                        if five {
                            q |= ((b[Q5K_QH + l] >> j) & 1) << 4;
                        }
                        sub += q as i32 * x.qs[32 * j + l] as i32;
                    }
                    isum += sc[j] as i32 * sub;
                    msum += m[j] as i32 * (x.sums[2 * j] as i32 + x.sums[2 * j + 1] as i32);
                }
                sum += half_at(b, 0) * x.d * isum as f32 - half_at(b, 2) * x.d * msum as f32;
            }
        }
        Format::Q6K => {
            for (b, x) in w.chunks_exact(210).zip(xs) {
                let mut isum = 0i32;
                for sub in 0..16 {
                    let scale = b[Q6K_SCALES + sub] as i8 as i32;
                    let mut part = 0i32;
                    for i in 16 * sub..16 * sub + 16 {
                        part += q6k_value(b, i) as i32 * x.qs[i] as i32;
                    }
                    isum += scale * (part - 32 * x.sums[sub] as i32);
                }
                sum += half_at(b, Q6K_D) * x.d * isum as f32;
            }
        }
        _ => unreachable!("not a superblock format"),
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The superblock products through pulp's AVX2 token, as in the parent module: written
    //! out per format inside `with_simd`, so that every intrinsic is inlined into code compiled
    //! for AVX2.

    use pulp::bytemuck::cast;
    use pulp::{Simd, WithSimd};
    use std::arch::x86_64::{__m128, __m128i, __m256, __m256i};

    use super::{
        Format, InputSuper, Q4K_QS, Q4K_SCALES, Q5K_QH, Q5K_QS, Q6K_D, Q6K_QH, Q6K_SCALES, half_at,
    };
    use crate::qmatvec::avx2::{Avx2, Products, array};

    impl WithSimd for Products<'_, InputSuper> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let avx = Avx2 { simd: self.simd };
            let rows = self.input.len() / self.blocks;
            // A weight row at a time, times every input row: each superblock is unpacked once
            // and multiplied with each row's superblock while it sits in registers.
            macro_rules! each {
                ($dot:expr, $rows:expr) => {{
                    for (w_row, dst) in self
                        .w
                        .chunks_exact(self.row_bytes)
                        .zip(self.dst.chunks_exact_mut(rows))
                    {
                        if rows == 1 {
                            dst[0] = $dot(avx, w_row, self.input);
                        } else {
                            $rows(avx, w_row, self.input, self.blocks, dst);
                        }
                    }
                }};
            }
            match self.format {
                Format::Q4K => each!(dot_q4k::<false>, rows_q4k::<false>),
                Format::Q5K => each!(dot_q4k::<true>, rows_q4k::<true>),
                Format::Q6K => each!(dot_q6k, rows_q6k),
                _ => unreachable!("not a superblock format"),
            }
        }
    }

    #[inline(always)]
    fn load(bytes: &[u8]) -> __m256i {
        cast(array::<32>(bytes))
    }

    #[inline(always)]
    fn load_i8(values: &[i8]) -> __m256i {
        let mut a = [0i8; 32];
        a.copy_from_slice(&values[..32]);
        cast(a)
    }

    /// For each of the eight sub-blocks of a superblock, the shuffle that copies its 16-bit
    /// value (of eight in a 128-bit half) into every 16-bit lane.
    #[inline(always)]
    fn broadcast_mask(avx: Avx2, lane: i16) -> __m256i {
        avx.simd
            .avx
            ._mm256_set1_epi16(((2 * lane + 1) << 8) | (2 * lane))
    }

    /// The shuffle that copies 16-bit value `lane` (of eight in a 128-bit half) into the low
    /// eight 16-bit lanes and value `lane + 1` into the high eight.
    #[inline(always)]
    fn pair_mask(avx: Avx2, lane: i16) -> __m256i {
        let (a, b) = (
            ((2 * lane + 1) << 8) | (2 * lane),
            ((2 * lane + 3) << 8) | (2 * lane + 2),
        );
        avx.simd
            .avx
            ._mm256_setr_epi16(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
    }

    /// A Q4_K or Q5_K superblock unpacked: its values (eight registers of 32, in sub-block
    /// order), its eight scales as 16-bit lanes in both halves of a register, its eight offsets
    /// as 16-bit lanes, and its two f16 scales widened.
    struct Q4k {
        values: [__m256i; 8],
        scales: __m256i,
        mins: __m128i,
        d: f32,
        dmin: f32,
    }

    /// A Q4_K superblock unpacked, or where `FIVE` a Q5_K one: the same but for the fifth bit
    /// of each value, which stays below 32, so that the products stay exact in 16 bits.
    #[inline(always)]
    fn unpack_q4k<const FIVE: bool>(avx: Avx2, b: &[u8]) -> Q4k {
        let s = avx.simd;
        let low = s.avx._mm256_set1_epi8(0x0f);
        let wide = s.avx2._mm256_cvtepu8_epi16(cast(q4k_scales_packed(b)));
        let mut values = [s.avx._mm256_setzero_si256(); 8];
        let qs = if FIVE { Q5K_QS } else { Q4K_QS };
        for chunk in 0..4 {
            let v = load(&b[qs + 32 * chunk..]);
            values[2 * chunk] = s.avx2._mm256_and_si256(v, low);
            values[2 * chunk + 1] = s
                .avx2
                ._mm256_and_si256(s.avx2._mm256_srli_epi16::<4>(v), low);
        }
        if FIVE {
            let qh = load(&b[Q5K_QH..]);
            let sixteen = s.avx._mm256_set1_epi8(0x10);
            for (j, v) in values.iter_mut().enumerate() {
                let bit = s.avx._mm256_set1_epi8(1 << j);
                let set = s
                    .avx2
                    ._mm256_cmpeq_epi8(s.avx2._mm256_and_si256(qh, bit), bit);
                *v = s
                    .avx2
                    ._mm256_or_si256(*v, s.avx2._mm256_and_si256(set, sixteen));
            }
        }
        Q4k {
            values,
            scales: s.avx2._mm256_permute2x128_si256::<0x00>(wide, wide),
            mins: s.avx2._mm256_extracti128_si256::<1>(wide),
            d: half_at(b, 0),
            dmin: half_at(b, 2),
        }
    }

    /// One unpacked superblock times one input superblock, added to a row's accumulators:
    /// the integer sums stay in eight 32-bit lanes, turned to floats and added with a fused
    /// multiply-add of the superblock's scale; the offsets' sums take four lanes the same way.
    #[inline(always)]
    fn step_q4k(avx: Avx2, w: &Q4k, x: &InputSuper, acc: &mut __m256, offsets: &mut __m128) {
        let s = avx.simd;
        let mut sums = s.avx._mm256_setzero_si256();
        for (j, q) in w.values.iter().enumerate() {
            sums = s.avx2._mm256_add_epi32(
                sums,
                s.avx2._mm256_madd_epi16(
                    s.avx2._mm256_maddubs_epi16(*q, load_i8(&x.qs[32 * j..])),
                    s.avx2
                        ._mm256_shuffle_epi8(w.scales, broadcast_mask(avx, j as i16)),
                ),
            );
        }
        *acc = s.fma._mm256_fmadd_ps(
            s.avx._mm256_set1_ps(w.d * x.d),
            s.avx._mm256_cvtepi32_ps(sums),
            *acc,
        );
        // Sums of the input's sub-blocks (pairs of its 16-value sums) times the offsets.
        let pairs = s.ssse3._mm_hadd_epi16(
            cast(array_i16::<8>(&x.sums[..8])),
            cast(array_i16::<8>(&x.sums[8..])),
        );
        *offsets = s.fma._mm_fmadd_ps(
            s.sse._mm_set1_ps(w.dmin * x.d),
            s.sse2._mm_cvtepi32_ps(s.sse2._mm_madd_epi16(w.mins, pairs)),
            *offsets,
        );
    }

    /// A row's result from its accumulators: the lanes are added once, at the end of the row.
    #[inline(always)]
    fn finish_q4k(avx: Avx2, acc: __m256, offsets: __m128) -> f32 {
        let s = avx.simd;
        let o = s
            .sse
            ._mm_add_ps(offsets, s.sse._mm_movehl_ps(offsets, offsets));
        let o = s.sse._mm_add_ss(o, s.sse3._mm_movehdup_ps(o));
        avx.sum_lanes_f32(acc) - s.sse._mm_cvtss_f32(o)
    }

    /// One weight row (`w`) times each input row of `xs` (rows of `blocks` superblocks), into
    /// `dst`: each superblock unpacked once for all the rows. A row's steps do not depend on
    /// the rows beside it. Q4_K, or Q5_K where `FIVE`.
    #[inline(always)]
    fn rows_q4k<const FIVE: bool>(
        avx: Avx2,
        w: &[u8],
        xs: &[InputSuper],
        blocks: usize,
        dst: &mut [f32],
    ) {
        let s = avx.simd;
        let rows = dst.len();
        let mut acc = [s.avx._mm256_setzero_ps(); super::super::MAX_ROWS];
        let mut offsets = [s.sse._mm_setzero_ps(); super::super::MAX_ROWS];
        for (i, b) in w.chunks_exact(if FIVE { 176 } else { 144 }).enumerate() {
            let unpacked = unpack_q4k::<FIVE>(avx, b);
            for r in 0..rows {
                step_q4k(
                    avx,
                    &unpacked,
                    &xs[r * blocks + i],
                    &mut acc[r],
                    &mut offsets[r],
                );
            }
        }
        for r in 0..rows {
            dst[r] = finish_q4k(avx, acc[r], offsets[r]);
        }
    }

    /// [`rows_q4k`] for one input row, its accumulators in registers (the arrays of several
    /// rows' live in memory, which costs a single row a third of its speed); the same steps.
    #[inline(always)]
    fn dot_q4k<const FIVE: bool>(avx: Avx2, w: &[u8], xs: &[InputSuper]) -> f32 {
        let s = avx.simd;
        let mut acc = s.avx._mm256_setzero_ps();
        let mut offsets = s.sse._mm_setzero_ps();
        for (b, x) in w.chunks_exact(if FIVE { 176 } else { 144 }).zip(xs) {
            step_q4k(avx, &unpack_q4k::<FIVE>(avx, b), x, &mut acc, &mut offsets);
        }
        finish_q4k(avx, acc, offsets)
    }

    /// A Q6_K superblock unpacked: its 6-bit values (eight registers of 32), its sixteen scales
    /// as 16-bit lanes, each 128-bit half of those in both halves of a register, and its f16
    /// scale widened.
    struct Q6k {
        values: [__m256i; 8],
        wide: __m256i,
        halves: [__m256i; 2],
        d: f32,
    }

    /// The top two bits of four values a byte, in place above the low four.
    #[inline(always)]
    fn top_bits(avx: Avx2, shifted: __m256i) -> __m256i {
        let s = avx.simd;
        s.avx2
            ._mm256_slli_epi16::<4>(s.avx2._mm256_and_si256(shifted, s.avx._mm256_set1_epi8(3)))
    }

    #[inline(always)]
    fn unpack_q6k(avx: Avx2, b: &[u8]) -> Q6k {
        let s = avx.simd;
        let low = s.avx._mm256_set1_epi8(0x0f);
        let raw: [u8; 16] = array::<16>(&b[Q6K_SCALES..]);
        let wide = s.avx2._mm256_cvtepi8_epi16(cast(raw));
        let mut values = [s.avx._mm256_setzero_si256(); 8];
        for half in 0..2 {
            let a = load(&b[64 * half..]);
            let c = load(&b[64 * half + 32..]);
            let h = load(&b[Q6K_QH + 32 * half..]);
            values[4 * half] = s
                .avx2
                ._mm256_or_si256(s.avx2._mm256_and_si256(a, low), top_bits(avx, h));
            values[4 * half + 1] = s.avx2._mm256_or_si256(
                s.avx2._mm256_and_si256(c, low),
                top_bits(avx, s.avx2._mm256_srli_epi16::<2>(h)),
            );
            values[4 * half + 2] = s.avx2._mm256_or_si256(
                s.avx2
                    ._mm256_and_si256(s.avx2._mm256_srli_epi16::<4>(a), low),
                top_bits(avx, s.avx2._mm256_srli_epi16::<4>(h)),
            );
            values[4 * half + 3] = s.avx2._mm256_or_si256(
                s.avx2
                    ._mm256_and_si256(s.avx2._mm256_srli_epi16::<4>(c), low),
                top_bits(avx, s.avx2._mm256_srli_epi16::<6>(h)),
            );
        }
        Q6k {
            values,
            wide,
            halves: [
                s.avx2._mm256_permute2x128_si256::<0x00>(wide, wide),
                s.avx2._mm256_permute2x128_si256::<0x11>(wide, wide),
            ],
            d: half_at(b, Q6K_D),
        }
    }

    /// One unpacked superblock times one input superblock, added to a row's accumulator.
    #[inline(always)]
    fn step_q6k(avx: Avx2, w: &Q6k, x: &InputSuper, acc: &mut __m256) {
        let s = avx.simd;
        let mut sums = s.avx._mm256_setzero_si256();
        for (k, v) in w.values.iter().enumerate() {
            let (half, quarter) = (k / 4, k % 4);
            sums = s.avx2._mm256_add_epi32(
                sums,
                s.avx2._mm256_madd_epi16(
                    s.avx2._mm256_maddubs_epi16(*v, load_i8(&x.qs[32 * k..])),
                    s.avx2
                        ._mm256_shuffle_epi8(w.halves[half], pair_mask(avx, 2 * quarter as i16)),
                ),
            );
        }
        // The values' centre 32, through the input's sums of 16 values.
        let centre = s
            .avx2
            ._mm256_madd_epi16(w.wide, cast(array_i16::<16>(&x.sums)));
        let sums = s
            .avx2
            ._mm256_sub_epi32(sums, s.avx2._mm256_slli_epi32::<5>(centre));
        *acc = s.fma._mm256_fmadd_ps(
            s.avx._mm256_set1_ps(w.d * x.d),
            s.avx._mm256_cvtepi32_ps(sums),
            *acc,
        );
    }

    /// [`rows_q4k`] for Q6_K.
    #[inline(always)]
    fn rows_q6k(avx: Avx2, w: &[u8], xs: &[InputSuper], blocks: usize, dst: &mut [f32]) {
        let s = avx.simd;
        let rows = dst.len();
        let mut acc = [s.avx._mm256_setzero_ps(); super::super::MAX_ROWS];
        for (i, b) in w.chunks_exact(210).enumerate() {
            let unpacked = unpack_q6k(avx, b);
            for r in 0..rows {
                step_q6k(avx, &unpacked, &xs[r * blocks + i], &mut acc[r]);
            }
        }
        for r in 0..rows {
            dst[r] = avx.sum_lanes_f32(acc[r]);
        }
    }

    /// [`dot_q4k`] for Q6_K.
    #[inline(always)]
    fn dot_q6k(avx: Avx2, w: &[u8], xs: &[InputSuper]) -> f32 {
        let mut acc = avx.simd.avx._mm256_setzero_ps();
        for (b, x) in w.chunks_exact(210).zip(xs) {
            step_q6k(avx, &unpack_q6k(avx, b), x, &mut acc);
        }
        avx.sum_lanes_f32(acc)
    }

    /// The scalar reference's `q4k_scales` four bytes at a time: the eight scales then the eight offsets, as the
    /// bytes of four u32.
    #[inline(always)]
    fn q4k_scales_packed(b: &[u8]) -> [u32; 4] {
        let word = |at: usize| u32::from_le_bytes(array::<4>(&b[Q4K_SCALES + at..]));
        let (u0, u1, u2) = (word(0), word(4), word(8));
        let (six, four, two) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
        [
            u0 & six,
            (u2 & four) | (((u0 >> 6) & two) << 4),
            u1 & six,
            ((u2 >> 4) & four) | (((u1 >> 6) & two) << 4),
        ]
    }

    fn array_i16<const N: usize>(v: &[i16]) -> [i16; N] {
        let mut a = [0i16; N];
        a.copy_from_slice(&v[..N]);
        a
    }
}

#[cfg(test)]
pub(crate) mod tests;
