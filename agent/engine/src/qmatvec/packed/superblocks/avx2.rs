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
                            lo[m] = s
                                .avx2
                                ._mm256_or_si256(lo[m], sixteen_where(s, bits, bit_lo, sixteen));
                            hi[m] = s
                                .avx2
                                ._mm256_or_si256(hi[m], sixteen_where(s, bits, bit_hi, sixteen));
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
            0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9,
            12, 13, 12, 13,
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
                                let (a, c, hh) = (load(b, at), load(b, at + 32), load(b, at + 64));
                                let a_high = s.avx2._mm256_srli_epi16::<4>(a);
                                let c_high = s.avx2._mm256_srli_epi16::<4>(c);
                                v[0] = s.avx2._mm256_or_si256(
                                    s.avx2._mm256_and_si256(a, low),
                                    s.avx2
                                        ._mm256_and_si256(s.avx2._mm256_slli_epi16::<4>(hh), top),
                                );
                                v[1] = s.avx2._mm256_or_si256(
                                    s.avx2._mm256_and_si256(c, low),
                                    s.avx2
                                        ._mm256_and_si256(s.avx2._mm256_slli_epi16::<2>(hh), top),
                                );
                                v[2] = s.avx2._mm256_or_si256(
                                    s.avx2._mm256_and_si256(a_high, low),
                                    s.avx2._mm256_and_si256(hh, top),
                                );
                                v[3] = s.avx2._mm256_or_si256(
                                    s.avx2._mm256_and_si256(c_high, low),
                                    s.avx2
                                        ._mm256_and_si256(s.avx2._mm256_srli_epi16::<2>(hh), top),
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
                                            s.avx._mm256_set1_epi32(four(&x.qs, base + 4 * k + 4)),
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
                                    s.avx2
                                        ._mm256_madd_epi16(s.avx2._mm256_add_epi16(p[0], p[1]), *sc)
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
