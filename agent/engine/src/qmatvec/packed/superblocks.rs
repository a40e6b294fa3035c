//! The superblock formats (Q2_K to Q6_K) repacked like the 32-value formats of the parent
//! module: eight rows interleaved superblock by superblock, one 32-bit lane a row.
//!
//! A superblock of eight rows becomes, for Q4_K and Q5_K: the rows' eight f16 scales (16
//! bytes) and eight f16 offset scales (16 bytes); their 6-bit sub-block scales decoded to a
//! byte each, sub-block by sub-block (64 bytes, `[sub-block][row]`); their 6-bit sub-block
//! offsets decoded likewise, by pairs of sub-blocks (64 bytes, `[pair][row][2]`, the order a
//! 16-bit multiply-add pairs them with the input's sums); for Q5_K the fifth bits as eight
//! runs of 32 bytes (run `m` holds bytes `4m..4m+4` of each row's 32 bytes of fifth bits,
//! which carry the bits of all eight sub-blocks for those four positions); then 32 runs of
//! nibbles, run `8c + m` holding bytes `32c + 4m..32c + 4m + 4` of each row's 128 (low nibbles
//! values `64c + 4m..` of sub-block `2c`, high nibbles of sub-block `2c + 1`).
//!
//! For Q6_K: the rows' f16 scales (16 bytes); their sixteen 8-bit sub-block scales by pairs of
//! sub-blocks (128 bytes, `[pair][row][2]`); then for each half `h` of the superblock and each
//! `n` of 0..8 three runs of 32 bytes, bytes `4n..4n+4` of each row's `ql[64h..]`, of its
//! `ql[64h + 32..]` and of its `qh[32h..]`: together the four 6-bit values of positions
//! `4n..4n+4` in each of the half's four quarters.
//!
//! Q2_K and Q3_K follow Q6_K's plan: the rows' f16 scales (for Q2_K then their f16 offset
//! scales), their sub-block scales by pairs (Q2_K's bytes as stored, a 4-bit scale and a 4-bit
//! offset each; Q3_K's 6-bit scales decoded to a byte each, 128 bytes for 96), for Q3_K its
//! bit plane as eight runs of 32 bytes (bytes `4n..4n+4` of each row's 32, the third bits of
//! positions `4n..4n+4` of all eight 32-value steps), then sixteen runs of 32 bytes, bytes
//! `32h + 4n..` of each row's 64 bytes of 2-bit values (positions `4n..4n+4` of the four steps
//! of half `h`).
//!
//! Q4_K, Q5_K and Q3_K grow by the decoded scales, 32 bytes per superblock of eight rows (2.8%,
//! 2.3% and 3.6%); Q6_K and Q2_K keep their size, and everything else is the file's bytes
//! moved. The integer sums are exact, as in [`k`](crate::qmatvec::k); the float steps per
//! superblock (its integer sum times its scale times the input's, its offsets' likewise) are
//! those of the scalar references (that module's, candle's `vec_dot_unopt` for Q2_K and Q3_K)
//! in another order, one float lane per row, so results are bounded against them, not equal.

use super::super::k::{
    InputSuper, Q4K_QS, Q4K_SCALES, Q5K_QH, Q5K_QS, Q6K_D, Q6K_QH, Q6K_SCALES, SUPER, q4k_scales,
};
use super::super::{Format, MAX_ROWS};
use super::GROUP;

/// Offsets within a packed Q4_K or Q5_K superblock of eight rows.
const D: usize = 0;
const DMIN: usize = 16;
const SCALES: usize = 32;
const MINS: usize = 96;
const FIFTH: usize = 160;
/// Where Q4_K's nibbles start; Q5_K's start 256 bytes of fifth bits later.
const Q4K_RUNS: usize = 160;
const Q5K_RUNS: usize = FIFTH + 256;
/// Offsets within a packed Q6_K superblock of eight rows (Q3_K's scales too).
const Q6_SCALES: usize = 16;
const Q6_RUNS: usize = 144;
/// Offsets within a packed Q2_K superblock of eight rows (its scales at `DMIN`).
const Q2_SCALES: usize = 32;
const Q2_RUNS: usize = 160;
/// Offsets within a packed Q3_K superblock of eight rows.
const Q3_BITS: usize = 144;
const Q3_RUNS: usize = 400;
/// Byte offsets within a Q2_K superblock as stored: 16 bytes of scales, 64 of values, then
/// the f16 scale and offset scale.
const Q2K_QS: usize = 16;
const Q2K_D: usize = 80;
/// Byte offsets within a Q3_K superblock as stored: 32 bytes of bit plane, 64 of 2-bit
/// values, 12 of scales, then the f16 scale.
const Q3K_QS: usize = 32;
const Q3K_SCALES: usize = 96;
const Q3K_D: usize = 108;

/// Bytes of one superblock of eight rows, packed.
pub(super) fn group_bytes(format: Format) -> usize {
    match format {
        Format::Q4K => Q4K_RUNS + 1024,
        Format::Q5K => Q5K_RUNS + 1024,
        Format::Q6K => Q6_RUNS + 1536,
        Format::Q2K => Q2_RUNS + 512,
        Format::Q3K => Q3_RUNS + 512,
        _ => unreachable!("{format:?} is not a superblock format"),
    }
}

/// The sixteen 6-bit scales of a Q3_K superblock (before their centre 32 is taken off), from
/// its 12 bytes: the low four bits of scales 0-7 in the low nibbles of bytes 0-7 and of 8-15
/// in their high nibbles; the top two bits in bytes 8-11, scale `4k + i` at bits `2k` of byte
/// `8 + i`.
fn q3k_scales(b: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { b[j] & 0x0f } else { b[j - 8] >> 4 };
        let high = (b[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = low | high << 4;
    }
    out
}

/// [`q3k_scales`]' 12 bytes from the sixteen scales.
fn q3k_scale_bytes(sc: &[u8; 16]) -> [u8; 12] {
    let mut b = [0u8; 12];
    for j in 0..16 {
        if j < 8 {
            b[j] |= sc[j] & 0x0f;
        } else {
            b[j - 8] |= (sc[j] & 0x0f) << 4;
        }
        b[8 + j % 4] |= (sc[j] >> 4) << (2 * (j / 4));
    }
    b
}

/// Appends the packed superblock of eight rows whose superblocks `block(r)` gives.
pub(super) fn pack_superblock<'a>(
    format: Format,
    block: impl Fn(usize) -> &'a [u8],
    out: &mut Vec<u8>,
) {
    // Bytes `at..at + n` of each row's superblock, one row after another: four of the values,
    // two of an f16 or of a pair of scales.
    let each = |out: &mut Vec<u8>, at: usize, n: usize| {
        for r in 0..GROUP {
            out.extend_from_slice(&block(r)[at..at + n]);
        }
    };
    let run = |out: &mut Vec<u8>, at: usize| each(out, at, 4);
    if format == Format::Q2K {
        for at in [Q2K_D, Q2K_D + 2] {
            each(out, at, 2);
        }
        for pair in 0..8 {
            each(out, 2 * pair, 2);
        }
        for at in 0..16 {
            run(out, Q2K_QS + 4 * at);
        }
        return;
    }
    if format == Format::Q3K {
        each(out, Q3K_D, 2);
        let decoded: Vec<[u8; 16]> = (0..GROUP)
            .map(|r| q3k_scales(&block(r)[Q3K_SCALES..Q3K_SCALES + 12]))
            .collect();
        for pair in 0..8 {
            for sc in &decoded {
                // Signed, around the centre 32 the format stores them above.
                out.extend_from_slice(&[
                    sc[2 * pair].wrapping_sub(32),
                    sc[2 * pair + 1].wrapping_sub(32),
                ]);
            }
        }
        for n in 0..8 {
            run(out, 4 * n);
        }
        for at in 0..16 {
            run(out, Q3K_QS + 4 * at);
        }
        return;
    }
    if format == Format::Q6K {
        each(out, Q6K_D, 2);
        for pair in 0..8 {
            each(out, Q6K_SCALES + 2 * pair, 2);
        }
        for h in 0..2 {
            for n in 0..8 {
                run(out, 64 * h + 4 * n);
                run(out, 64 * h + 32 + 4 * n);
                run(out, Q6K_QH + 32 * h + 4 * n);
            }
        }
        return;
    }
    let five = format == Format::Q5K;
    let decoded: Vec<([u8; 8], [u8; 8])> = (0..GROUP)
        .map(|r| q4k_scales(&block(r)[Q4K_SCALES..Q4K_QS]))
        .collect();
    // Each row's f16 scale of scales, then of offsets (bytes 0 and 2 of its superblock).
    for at in [0, 2] {
        each(out, at, 2);
    }
    for j in 0..8 {
        for (sc, _) in &decoded {
            out.push(sc[j]);
        }
    }
    for c in 0..4 {
        for (_, m) in &decoded {
            out.extend_from_slice(&[m[2 * c], m[2 * c + 1]]);
        }
    }
    if five {
        for m in 0..8 {
            run(out, Q5K_QH + 4 * m);
        }
    }
    let qs = if five { Q5K_QS } else { Q4K_QS };
    for c in 0..4 {
        for m in 0..8 {
            run(out, qs + 32 * c + 4 * m);
        }
    }
}

/// Appends row `r`'s superblock, as the file stores it, from the packed superblock of its
/// eight rows `b`: the inverse of [`pack_superblock`] for one row.
pub(super) fn stored_superblock(format: Format, b: &[u8], r: usize, out: &mut Vec<u8>) {
    let four = |at: usize| &b[at + 4 * r..at + 4 * r + 4];
    if format == Format::Q2K {
        for pair in 0..8 {
            out.extend_from_slice(&b[Q2_SCALES + 16 * pair + 2 * r..][..2]);
        }
        for at in 0..16 {
            out.extend_from_slice(four(Q2_RUNS + 32 * at));
        }
        out.extend_from_slice(&b[2 * r..2 * r + 2]);
        out.extend_from_slice(&b[DMIN + 2 * r..DMIN + 2 * r + 2]);
        return;
    }
    if format == Format::Q3K {
        for n in 0..8 {
            out.extend_from_slice(four(Q3_BITS + 32 * n));
        }
        for at in 0..16 {
            out.extend_from_slice(four(Q3_RUNS + 32 * at));
        }
        let mut sc = [0u8; 16];
        for (j, sc) in sc.iter_mut().enumerate() {
            *sc = b[Q6_SCALES + 16 * (j / 2) + 2 * r + j % 2].wrapping_add(32);
        }
        out.extend_from_slice(&q3k_scale_bytes(&sc));
        out.extend_from_slice(&b[2 * r..2 * r + 2]);
        return;
    }
    if format == Format::Q6K {
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for h in 0..2 {
            for n in 0..8 {
                let at = Q6_RUNS + 96 * (8 * h + n);
                ql[64 * h + 4 * n..][..4].copy_from_slice(four(at));
                ql[64 * h + 32 + 4 * n..][..4].copy_from_slice(four(at + 32));
                qh[32 * h + 4 * n..][..4].copy_from_slice(four(at + 64));
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        for pair in 0..8 {
            out.extend_from_slice(&b[Q6_SCALES + 16 * pair + 2 * r..][..2]);
        }
        out.extend_from_slice(&b[2 * r..2 * r + 2]);
        return;
    }
    out.extend_from_slice(&b[D + 2 * r..D + 2 * r + 2]);
    out.extend_from_slice(&b[DMIN + 2 * r..DMIN + 2 * r + 2]);
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        sc[j] = b[SCALES + GROUP * j + r];
        m[j] = b[MINS + 16 * (j / 2) + 2 * r + j % 2];
    }
    // The 12 bytes of six-bit scales and offsets, as `q4k_scales` reads them.
    for j in 0..4 {
        out.push(sc[j] | (sc[j + 4] >> 4) << 6);
    }
    for j in 0..4 {
        out.push(m[j] | (m[j + 4] >> 4) << 6);
    }
    for j in 0..4 {
        out.push((sc[j + 4] & 0x0f) | (m[j + 4] & 0x0f) << 4);
    }
    let runs_at = if format == Format::Q5K {
        for m in 0..8 {
            out.extend_from_slice(four(FIFTH + 32 * m));
        }
        Q5K_RUNS
    } else {
        Q4K_RUNS
    };
    for c in 0..4 {
        for m in 0..8 {
            out.extend_from_slice(four(runs_at + 256 * c + 32 * m));
        }
    }
}

/// Every packed group of eight rows of `w` (in `format`, `supers` superblocks a row) times
/// every input row of `input` (rows of `supers` superblocks), into `dst` output-major.
#[cfg(target_arch = "x86_64")]
pub(super) fn products(
    format: Format,
    w: &[u8],
    input: &[InputSuper],
    supers: usize,
    dst: &mut [f32],
) {
    let Some(simd) = pulp::x86::V3::try_new() else {
        unreachable!("qmatvec::packs checked AVX2 and FMA")
    };
    let args = avx2::Packed {
        simd,
        w,
        input,
        supers,
        dst,
    };
    // One input row gets code of its own, where the compiler knows the row count: its sums
    // stay in registers rather than in arrays for sixteen rows.
    let one = input.len() == supers;
    match (format, one) {
        (Format::Q4K, true) => pulp::Simd::vectorize(simd, avx2::Q4k::<false, true>(args)),
        (Format::Q4K, false) => pulp::Simd::vectorize(simd, avx2::Q4k::<false, false>(args)),
        (Format::Q5K, true) => pulp::Simd::vectorize(simd, avx2::Q4k::<true, true>(args)),
        (Format::Q5K, false) => pulp::Simd::vectorize(simd, avx2::Q4k::<true, false>(args)),
        (Format::Q6K, true) => pulp::Simd::vectorize(simd, avx2::Sixteens::<6, true>(args)),
        (Format::Q6K, false) => pulp::Simd::vectorize(simd, avx2::Sixteens::<6, false>(args)),
        (Format::Q2K, true) => pulp::Simd::vectorize(simd, avx2::Sixteens::<2, true>(args)),
        (Format::Q2K, false) => pulp::Simd::vectorize(simd, avx2::Sixteens::<2, false>(args)),
        (Format::Q3K, true) => pulp::Simd::vectorize(simd, avx2::Sixteens::<3, true>(args)),
        (Format::Q3K, false) => pulp::Simd::vectorize(simd, avx2::Sixteens::<3, false>(args)),
        _ => unreachable!("{format:?} is not a superblock format"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn products(_: Format, _: &[u8], _: &[InputSuper], _: usize, _: &mut [f32]) {
    unreachable!("qmatvec::packs is false off x86-64")
}

/// The input rows quantized to superblocks, a row's after another's.
pub(super) fn quantize_rows(x: &[f32], width: usize) -> Vec<InputSuper> {
    let mut input = vec![InputSuper::ZERO; x.len() / SUPER];
    for (x, q) in x
        .chunks_exact(width)
        .zip(input.chunks_exact_mut(width / SUPER))
    {
        super::super::k::quantize_row(x, q);
    }
    input
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The packed superblock products through pulp's AVX2 token, written out inside
    //! `with_simd` (a closure would be compiled without AVX2).

    use pulp::bytemuck::cast;
    use pulp::x86::V3;
    use pulp::{Simd, WithSimd};
    use std::arch::x86_64::{__m128i, __m256, __m256i};

    use super::super::super::avx2::{Avx2, array, prefetch};
    use super::super::avx2::{four, sixteen_where};
    use super::{
        D, DMIN, FIFTH, GROUP, InputSuper, MAX_ROWS, MINS, Q2_RUNS, Q2_SCALES, Q3_BITS, Q3_RUNS,
        Q4K_RUNS, Q5K_RUNS, Q6_RUNS, Q6_SCALES, SCALES,
    };

    pub(in super::super) struct Packed<'a> {
        pub(in super::super) simd: V3,
        pub(in super::super) w: &'a [u8],
        pub(in super::super) input: &'a [InputSuper],
        pub(in super::super) supers: usize,
        pub(in super::super) dst: &'a mut [f32],
    }

    /// Packed Q4_K products, or Q5_K where `FIVE`; `ONE` where there is one input row.
    pub(in super::super) struct Q4k<'a, const FIVE: bool, const ONE: bool>(
        pub(in super::super) Packed<'a>,
    );

    /// Packed Q6_K (`BITS` 6), Q2_K (2) or Q3_K (3) products; `ONE` where there is one input
    /// row.
    pub(in super::super) struct Sixteens<'a, const BITS: u8, const ONE: bool>(
        pub(in super::super) Packed<'a>,
    );

    impl<const FIVE: bool, const ONE: bool> WithSimd for Q4k<'_, FIVE, ONE> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            self.0.q4k::<FIVE, ONE>();
        }
    }

    impl<const BITS: u8, const ONE: bool> WithSimd for Sixteens<'_, BITS, ONE> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            self.0.sixteens::<BITS, ONE>();
        }
    }

    /// Two adjacent i16 sums from `at`, as one 32-bit lane.
    #[inline(always)]
    fn pair(sums: &[i16], at: usize) -> i32 {
        (sums[at] as u16 as u32 | ((sums[at + 1] as u16 as u32) << 16)) as i32
    }

    /// Eight f16s from `at`, widened.
    #[inline(always)]
    fn halves(avx: Avx2, b: &[u8], at: usize) -> __m256 {
        avx.halves(cast(array::<16>(&b[at..])))
    }

    #[inline(always)]
    fn load(b: &[u8], at: usize) -> __m256i {
        cast(array::<32>(&b[at..]))
    }

    /// The eight bytes from `at` in both halves of each 128-bit half of a register.
    #[inline(always)]
    fn eight(s: V3, b: &[u8], at: usize) -> __m256i {
        s.avx
            ._mm256_set1_epi64x(u64::from_le_bytes(array::<8>(&b[at..])) as i64)
    }

    /// Each row's eight float lanes written out, output-major.
    #[inline(always)]
    fn write(acc: &[__m256; MAX_ROWS], rows: usize, dst: &mut [f32]) {
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let v: [f32; GROUP] = cast(*acc);
            for (o, v) in v.into_iter().enumerate() {
                dst[o * rows + r] = v;
            }
        }
    }

    impl Packed<'_> {
        #[inline(always)]
        fn q4k<const FIVE: bool, const ONE: bool>(self) {
            let avx = Avx2 { simd: self.simd };
            let s = self.simd;
            let rows = if ONE {
                1
            } else {
                self.input.len() / self.supers
            };
            let runs_at = if FIVE { Q5K_RUNS } else { Q4K_RUNS };
            let bytes = runs_at + 1024;
            let low = s.avx._mm256_set1_epi8(0x0f);
            let sixteen = s.avx._mm256_set1_epi8(0x10);
            // Byte `r` of eight (a sub-block's scales) into both 16-bit halves of lane `r`.
            let dup = s.avx._mm256_setr_epi8(
                0, -128, 0, -128, 1, -128, 1, -128, 2, -128, 2, -128, 3, -128, 3, -128, 4, -128, 4,
                -128, 5, -128, 5, -128, 6, -128, 6, -128, 7, -128, 7, -128,
            );
            // Pairs of products summed in 16 bits: eight runs of at most 2 · 15 · 127 each
            // (four of 2 · 31 · 127 for Q5_K) stay below 2^15.
            let per = if FIVE { 4 } else { 8 };
            for (group, dst) in self
                .w
                .chunks_exact(self.supers * bytes)
                .zip(self.dst.chunks_exact_mut(GROUP * rows))
            {
                let mut acc = [s.avx._mm256_setzero_ps(); MAX_ROWS];
                for (i, b) in group.chunks_exact(bytes).enumerate() {
                    prefetch(s, b, bytes);
                    let mut isum = [s.avx._mm256_setzero_si256(); MAX_ROWS];
                    let mut msum = [s.avx._mm256_setzero_si256(); MAX_ROWS];
                    for c in 0..4 {
                        let mut lo = [s.avx._mm256_setzero_si256(); 8];
                        let mut hi = [s.avx._mm256_setzero_si256(); 8];
                        for m in 0..8 {
                            let run = load(b, runs_at + 256 * c + 32 * m);
                            lo[m] = s.avx2._mm256_and_si256(run, low);
                            hi[m] = s
                                .avx2
                                ._mm256_and_si256(s.avx2._mm256_srli_epi16::<4>(run), low);
                            if FIVE {
                                let bits = load(b, FIFTH + 32 * m);
                                let (bit_lo, bit_hi) = (
                                    s.avx._mm256_set1_epi8(1 << (2 * c)),
                                    s.avx._mm256_set1_epi8((1u8 << (2 * c + 1)) as i8),
                                );
                                lo[m] = s.avx2._mm256_or_si256(
                                    lo[m],
                                    sixteen_where(s, bits, bit_lo, sixteen),
                                );
                                hi[m] = s.avx2._mm256_or_si256(
                                    hi[m],
                                    sixteen_where(s, bits, bit_hi, sixteen),
                                );
                            }
                        }
                        let sc_lo = s
                            .avx2
                            ._mm256_shuffle_epi8(eight(s, b, SCALES + 16 * c), dup);
                        let sc_hi = s
                            .avx2
                            ._mm256_shuffle_epi8(eight(s, b, SCALES + 16 * c + 8), dup);
                        let mins: __m128i = cast(array::<16>(&b[MINS + 16 * c..]));
                        let mins = s.avx2._mm256_cvtepu8_epi16(mins);
                        for r in 0..rows {
                            let x = &self.input[r * self.supers + i];
                            let mut sums = s.avx._mm256_setzero_si256();
                            for part in 0..8 / per {
                                let mut pl = s.avx._mm256_setzero_si256();
                                let mut ph = s.avx._mm256_setzero_si256();
                                for m in per * part..per * (part + 1) {
                                    let at = 64 * c + 4 * m;
                                    pl = s.avx2._mm256_add_epi16(
                                        pl,
                                        s.avx2._mm256_maddubs_epi16(
                                            lo[m],
                                            s.avx._mm256_set1_epi32(four(&x.qs, at)),
                                        ),
                                    );
                                    ph = s.avx2._mm256_add_epi16(
                                        ph,
                                        s.avx2._mm256_maddubs_epi16(
                                            hi[m],
                                            s.avx._mm256_set1_epi32(four(&x.qs, at + 32)),
                                        ),
                                    );
                                }
                                sums = s.avx2._mm256_add_epi32(
                                    sums,
                                    s.avx2._mm256_add_epi32(
                                        s.avx2._mm256_madd_epi16(pl, sc_lo),
                                        s.avx2._mm256_madd_epi16(ph, sc_hi),
                                    ),
                                );
                            }
                            isum[r] = s.avx2._mm256_add_epi32(isum[r], sums);
                            msum[r] = s.avx2._mm256_add_epi32(
                                msum[r],
                                s.avx2._mm256_madd_epi16(
                                    mins,
                                    s.avx._mm256_set1_epi32(pair(&x.subs, 2 * c)),
                                ),
                            );
                        }
                    }
                    let d = halves(avx, b, D);
                    let dmin = halves(avx, b, DMIN);
                    for r in 0..rows {
                        let xd = s.avx._mm256_set1_ps(self.input[r * self.supers + i].d);
                        acc[r] = s.fma._mm256_fmadd_ps(
                            s.avx._mm256_mul_ps(d, xd),
                            s.avx._mm256_cvtepi32_ps(isum[r]),
                            acc[r],
                        );
                        acc[r] = s.fma._mm256_fnmadd_ps(
                            s.avx._mm256_mul_ps(dmin, xd),
                            s.avx._mm256_cvtepi32_ps(msum[r]),
                            acc[r],
                        );
                    }
                }
                write(&acc, rows, dst);
            }
        }

        /// The formats of sixteen sub-blocks of 16 values, scales by pairs: Q6_K (`BITS` 6),
        /// Q2_K (2) and Q3_K (3).
        #[inline(always)]
        fn sixteens<const BITS: u8, const ONE: bool>(self) {
            let avx = Avx2 { simd: self.simd };
            let s = self.simd;
            let rows = if ONE {
                1
            } else {
                self.input.len() / self.supers
            };
            let bytes = match BITS {
                6 => Q6_RUNS + 1536,
                2 => Q2_RUNS + 512,
                _ => Q3_RUNS + 512,
            };
            let low = s.avx._mm256_set1_epi8(0x0f);
            let top = s.avx._mm256_set1_epi8(0x30);
            let three = s.avx._mm256_set1_epi8(3);
            let four_v = s.avx._mm256_set1_epi8(4);
            // From a pair of sub-blocks' scales (16 bits each in lane `r`, see `pairs` below),
            // the first's or the second's in both halves of every lane.
            let first = s.avx._mm256_setr_epi8(
                0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5, 8, 9,
                8, 9, 12, 13, 12, 13,
            );
            let second = s.avx2._mm256_add_epi8(first, s.avx._mm256_set1_epi8(2));
            for (group, dst) in self
                .w
                .chunks_exact(self.supers * bytes)
                .zip(self.dst.chunks_exact_mut(GROUP * rows))
            {
                let mut acc = [s.avx._mm256_setzero_ps(); MAX_ROWS];
                for (i, b) in group.chunks_exact(bytes).enumerate() {
                    prefetch(s, b, bytes);
                    // Lane `r` of pairs[u]: the scales of sub-blocks 2u and 2u + 1 of row `r`
                    // in 16 bits (signed for Q6_K and Q3_K); for Q2_K, mins[u] their offsets.
                    let mut pairs = [s.avx._mm256_setzero_si256(); 8];
                    let mut mins = [s.avx._mm256_setzero_si256(); 8];
                    for (u, (p, m)) in pairs.iter_mut().zip(&mut mins).enumerate() {
                        if BITS == 2 {
                            let raw: __m128i = cast(array::<16>(&b[Q2_SCALES + 16 * u..]));
                            let nibble = s.sse2._mm_set1_epi8(0x0f);
                            *p = s
                                .avx2
                                ._mm256_cvtepu8_epi16(s.sse2._mm_and_si128(raw, nibble));
                            *m = s.avx2._mm256_cvtepu8_epi16(
                                s.sse2
                                    ._mm_and_si128(s.sse2._mm_srli_epi16::<4>(raw), nibble),
                            );
                        } else {
                            *p = s
                                .avx2
                                ._mm256_cvtepi8_epi16(cast(array::<16>(&b[Q6_SCALES + 16 * u..])));
                        }
                    }
                    let mut isum = [s.avx._mm256_setzero_si256(); MAX_ROWS];
                    for h in 0..2 {
                        for t in 0..2 {
                            // v[k][q]: positions 16t + 4k.. of quarter (or step) q of half h,
                            // every row, as unsigned values.
                            let mut v = [[s.avx._mm256_setzero_si256(); 4]; 4];
                            for (k, v) in v.iter_mut().enumerate() {
                                let n = 4 * t + k;
                                if BITS == 6 {
                                    let at = Q6_RUNS + 96 * (8 * h + n);
                                    let (a, c, hh) =
                                        (load(b, at), load(b, at + 32), load(b, at + 64));
                                    let a_high = s.avx2._mm256_srli_epi16::<4>(a);
                                    let c_high = s.avx2._mm256_srli_epi16::<4>(c);
                                    v[0] = s.avx2._mm256_or_si256(
                                        s.avx2._mm256_and_si256(a, low),
                                        s.avx2._mm256_and_si256(
                                            s.avx2._mm256_slli_epi16::<4>(hh),
                                            top,
                                        ),
                                    );
                                    v[1] = s.avx2._mm256_or_si256(
                                        s.avx2._mm256_and_si256(c, low),
                                        s.avx2._mm256_and_si256(
                                            s.avx2._mm256_slli_epi16::<2>(hh),
                                            top,
                                        ),
                                    );
                                    v[2] = s.avx2._mm256_or_si256(
                                        s.avx2._mm256_and_si256(a_high, low),
                                        s.avx2._mm256_and_si256(hh, top),
                                    );
                                    v[3] = s.avx2._mm256_or_si256(
                                        s.avx2._mm256_and_si256(c_high, low),
                                        s.avx2._mm256_and_si256(
                                            s.avx2._mm256_srli_epi16::<2>(hh),
                                            top,
                                        ),
                                    );
                                } else {
                                    let runs = if BITS == 2 { Q2_RUNS } else { Q3_RUNS };
                                    let q = load(b, runs + 32 * (8 * h + n));
                                    v[0] = s.avx2._mm256_and_si256(q, three);
                                    v[1] = s
                                        .avx2
                                        ._mm256_and_si256(s.avx2._mm256_srli_epi16::<2>(q), three);
                                    v[2] = s
                                        .avx2
                                        ._mm256_and_si256(s.avx2._mm256_srli_epi16::<4>(q), three);
                                    v[3] = s
                                        .avx2
                                        ._mm256_and_si256(s.avx2._mm256_srli_epi16::<6>(q), three);
                                    if BITS == 3 {
                                        // Step 4h + q's third bit, as 4.
                                        let bits = load(b, Q3_BITS + 32 * n);
                                        for (q, v) in v.iter_mut().enumerate() {
                                            let bit =
                                                s.avx._mm256_set1_epi8((1u8 << (4 * h + q)) as i8);
                                            *v = s.avx2._mm256_or_si256(
                                                *v,
                                                sixteen_where(s, bits, bit, four_v),
                                            );
                                        }
                                    }
                                }
                            }
                            // Quarter q's sub-block here is 8h + 2q + t: of pair 4h + q.
                            let mut scales = [s.avx._mm256_setzero_si256(); 4];
                            for (q, sc) in scales.iter_mut().enumerate() {
                                *sc = s.avx2._mm256_shuffle_epi8(
                                    pairs[4 * h + q],
                                    if t == 0 { first } else { second },
                                );
                            }
                            for (r, isum) in isum.iter_mut().enumerate().take(rows) {
                                let x = &self.input[r * self.supers + i];
                                let mut sums = s.avx._mm256_setzero_si256();
                                for (q, sc) in scales.iter().enumerate() {
                                    let base = 128 * h + 32 * q + 16 * t;
                                    let mut p = [s.avx._mm256_setzero_si256(); 2];
                                    for (half, p) in p.iter_mut().enumerate() {
                                        let k = 2 * half;
                                        *p = s.avx2._mm256_add_epi16(
                                            s.avx2._mm256_maddubs_epi16(
                                                v[k][q],
                                                s.avx._mm256_set1_epi32(four(&x.qs, base + 4 * k)),
                                            ),
                                            s.avx2._mm256_maddubs_epi16(
                                                v[k + 1][q],
                                                s.avx._mm256_set1_epi32(four(
                                                    &x.qs,
                                                    base + 4 * k + 4,
                                                )),
                                            ),
                                        );
                                    }
                                    // Two runs of Q6_K's pairs, at most 2 · 2 · 63 · 127, fit
                                    // 16 bits; four of Q2_K's or Q3_K's (4 · 2 · 7 · 127) too.
                                    let products = if BITS == 6 {
                                        s.avx2._mm256_add_epi32(
                                            s.avx2._mm256_madd_epi16(p[0], *sc),
                                            s.avx2._mm256_madd_epi16(p[1], *sc),
                                        )
                                    } else {
                                        s.avx2._mm256_madd_epi16(
                                            s.avx2._mm256_add_epi16(p[0], p[1]),
                                            *sc,
                                        )
                                    };
                                    sums = s.avx2._mm256_add_epi32(sums, products);
                                }
                                *isum = s.avx2._mm256_add_epi32(*isum, sums);
                            }
                        }
                    }
                    // Each sub-block's scale (or for Q2_K its offset) times the input's sum of
                    // its 16 values, two sub-blocks per 16-bit multiply-add: the values' centre
                    // (32 for Q6_K, 4 for Q3_K), or Q2_K's offsets.
                    let d = halves(avx, b, 0);
                    let dmin = halves(avx, b, DMIN);
                    for r in 0..rows {
                        let x = &self.input[r * self.supers + i];
                        let by = if BITS == 2 { &mins } else { &pairs };
                        let mut centre = s.avx._mm256_setzero_si256();
                        for (u, p) in by.iter().enumerate() {
                            centre = s.avx2._mm256_add_epi32(
                                centre,
                                s.avx2._mm256_madd_epi16(
                                    *p,
                                    s.avx._mm256_set1_epi32(pair(&x.sums, 2 * u)),
                                ),
                            );
                        }
                        let xd = s.avx._mm256_set1_ps(x.d);
                        let sums = match BITS {
                            6 => s
                                .avx2
                                ._mm256_sub_epi32(isum[r], s.avx2._mm256_slli_epi32::<5>(centre)),
                            3 => s
                                .avx2
                                ._mm256_sub_epi32(isum[r], s.avx2._mm256_slli_epi32::<2>(centre)),
                            _ => isum[r],
                        };
                        acc[r] = s.fma._mm256_fmadd_ps(
                            s.avx._mm256_mul_ps(d, xd),
                            s.avx._mm256_cvtepi32_ps(sums),
                            acc[r],
                        );
                        if BITS == 2 {
                            acc[r] = s.fma._mm256_fnmadd_ps(
                                s.avx._mm256_mul_ps(dmin, xd),
                                s.avx._mm256_cvtepi32_ps(centre),
                                acc[r],
                            );
                        }
                    }
                }
                write(&acc, rows, dst);
            }
        }
    }
}
