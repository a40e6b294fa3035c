//! The input rows quantized to 8-bit blocks in SIMD registers: the same integers and scales as
//! the scalar [`super::quantize_row`] and [`super::k::quantize_row`] (which follow candle's
//! `BlockQ8_0`/`BlockQ8_1`/`BlockQ8K::from_float`), eight values an instruction.
//!
//! The scalar loops rounded each value with a call to `roundf`: 8% of a one-sequence decode
//! pass of a Q4_0 model and 15% of a four-sequence one, every product quantizing its input
//! afresh. Rounding half away from zero is not an instruction of its own (AVX rounds half to
//! even), so it is built exactly: the value truncated toward zero, plus one away from zero
//! where the part cut off is at least a half. That part, `p - trunc(p)`, is exact in floating
//! point, so the result is the scalar one for every input, ties included.

use pulp::bytemuck::cast;
use pulp::x86::V3;
use pulp::{Simd, WithSimd};
use std::arch::x86_64::{__m256, __m256i};

use half::f16;

use super::k::{InputSuper, SUPER};
use super::{BLOCK, InputBlock};

/// Quantizes `x` (whole rows of whole blocks) into `out` as [`super::quantize_row`] does.
pub(super) fn rows32(simd: V3, x: &[f32], with_sums: bool, out: &mut [InputBlock]) {
    pulp::Simd::vectorize(
        simd,
        Rows32 {
            simd,
            x,
            with_sums,
            out,
        },
    );
}

/// Quantizes `x` (whole superblocks) into `out` as [`super::k::quantize_row`] does.
pub(super) fn rows_super(simd: V3, x: &[f32], out: &mut [InputSuper]) {
    pulp::Simd::vectorize(simd, RowsSuper { simd, x, out });
}

struct Rows32<'a> {
    simd: V3,
    x: &'a [f32],
    with_sums: bool,
    out: &'a mut [InputBlock],
}

struct RowsSuper<'a> {
    simd: V3,
    x: &'a [f32],
    out: &'a mut [InputSuper],
}

/// Eight values from `x[at..at + 8]`.
#[inline(always)]
fn load(x: &[f32], at: usize) -> __m256 {
    let mut a = [0f32; 8];
    a.copy_from_slice(&x[at..at + 8]);
    cast(a)
}

/// `p` rounded half away from zero (see the module's comment).
#[inline(always)]
fn round_away(s: V3, p: __m256) -> __m256 {
    let sign = s.avx._mm256_set1_ps(-0.0);
    // _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC
    let t = s.avx._mm256_round_ps::<0x0b>(p);
    let cut = s.avx._mm256_andnot_ps(sign, s.avx._mm256_sub_ps(p, t));
    // _CMP_GE_OQ
    let up = s.avx._mm256_cmp_ps::<0x1d>(cut, s.avx._mm256_set1_ps(0.5));
    let one = s
        .avx
        ._mm256_or_ps(s.avx._mm256_and_ps(p, sign), s.avx._mm256_set1_ps(1.0));
    s.avx._mm256_add_ps(t, s.avx._mm256_and_ps(up, one))
}

/// The largest lane.
#[inline(always)]
fn max_lane(v: __m256) -> f32 {
    let a: [f32; 8] = cast(v);
    a.into_iter().fold(0f32, f32::max)
}

/// The sum of the lanes, integers of small magnitude, so exact in any order.
#[inline(always)]
fn sum_lanes(v: __m256) -> i32 {
    let a: [f32; 8] = cast(v);
    a.into_iter().sum::<f32>() as i32
}

/// 32 integral values in `r` (each within -128..=127 after saturation) as bytes, in order.
#[inline(always)]
fn bytes32(s: V3, r: [__m256; 4]) -> [i8; 32] {
    let ab = s.avx2._mm256_packs_epi32(
        s.avx._mm256_cvtps_epi32(r[0]),
        s.avx._mm256_cvtps_epi32(r[1]),
    );
    let cd = s.avx2._mm256_packs_epi32(
        s.avx._mm256_cvtps_epi32(r[2]),
        s.avx._mm256_cvtps_epi32(r[3]),
    );
    let packed = s.avx2._mm256_packs_epi16(ab, cd);
    // The packs interleave 128-bit halves: dwords come out as a0 b0 c0 d0 a1 b1 c1 d1.
    let order = s.avx._mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let v: __m256i = s.avx2._mm256_permutevar8x32_epi32(packed, order);
    cast(v)
}

impl WithSimd for Rows32<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let s = self.simd;
        let sign = s.avx._mm256_set1_ps(-0.0);
        for (xs, block) in self.x.chunks_exact(BLOCK).zip(self.out.iter_mut()) {
            let v = [load(xs, 0), load(xs, 8), load(xs, 16), load(xs, 24)];
            let mut m = s.avx._mm256_setzero_ps();
            for v in v {
                m = s.avx._mm256_max_ps(m, s.avx._mm256_andnot_ps(sign, v));
            }
            let amax = max_lane(m);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let d16 = f16::from_f32(d);
            let scale = s.avx._mm256_set1_ps(id);
            let mut r = v;
            for r in &mut r {
                *r = round_away(s, s.avx._mm256_mul_ps(*r, scale));
            }
            block.qs = bytes32(s, r);
            let sum = sum_lanes(s.avx._mm256_add_ps(
                s.avx._mm256_add_ps(r[0], r[1]),
                s.avx._mm256_add_ps(r[2], r[3]),
            ));
            block.d = d16.to_f32();
            block.sum = sum;
            block.s = if self.with_sums {
                (f16::from_f32(sum as f32) * d16).to_f32()
            } else {
                0.0
            };
        }
    }
}

impl WithSimd for RowsSuper<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let s = self.simd;
        let sign = s.avx._mm256_set1_ps(-0.0);
        for (xs, block) in self.x.chunks_exact(SUPER).zip(self.out.iter_mut()) {
            let mut m = s.avx._mm256_setzero_ps();
            for at in (0..SUPER).step_by(8) {
                m = s
                    .avx
                    ._mm256_max_ps(m, s.avx._mm256_andnot_ps(sign, load(xs, at)));
            }
            let amax = max_lane(m);
            if amax == 0.0 {
                *block = InputSuper::ZERO;
                continue;
            }
            // The first value of that magnitude gives the sign, as in the scalar loop.
            let Some(&max) = xs.iter().find(|v| v.abs() == amax) else {
                unreachable!("amax is the magnitude of one of the values")
            };
            let iscale = -127f32 / max;
            let scale = s.avx._mm256_set1_ps(iscale);
            for (c, qs) in block.qs.chunks_exact_mut(32).enumerate() {
                let mut r = [s.avx._mm256_setzero_ps(); 4];
                for (k, r) in r.iter_mut().enumerate() {
                    *r = round_away(s, s.avx._mm256_mul_ps(load(xs, 32 * c + 8 * k), scale));
                }
                qs.copy_from_slice(&bytes32(s, r));
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::values;
    use super::*;

    fn blank() -> InputBlock {
        InputBlock {
            qs: [0; BLOCK],
            d: 0.0,
            s: 0.0,
            sum: 0,
        }
    }

    /// Random rows, rows with exact halves (a block whose largest magnitude is 127 scales by
    /// one), with values that saturate, and all-zero blocks: the scalar quantizers' integers
    /// and scales, bit for bit.
    #[test]
    fn simd_quantizers_give_the_scalar_ones_bits() {
        let Some(simd) = V3::try_new() else {
            cluster_fixtures::skip("this CPU has no AVX2 and FMA");
            return;
        };
        let mut rows: Vec<Vec<f32>> = (0..40).map(|seed| values(512, seed)).collect();
        let mut ties = vec![127.0f32; 512];
        for (i, v) in ties.iter_mut().enumerate().skip(1) {
            let magnitude = (i % 254) as f32 / 2.0;
            *v = if i % 3 == 0 { -magnitude } else { magnitude };
        }
        ties[256] = -127.0;
        rows.push(ties);
        // Scaled rows: tiny, huge and mixed magnitudes, and a lone negative maximum.
        rows.push(values(512, 7).into_iter().map(|v| v * 1e-30).collect());
        rows.push(values(512, 8).into_iter().map(|v| v * 3e30).collect());
        let mut lone = values(512, 9);
        lone[300] = -4.0;
        lone[301] = 4.0;
        rows.push(lone);
        for (n, x) in rows.iter().enumerate() {
            for with_sums in [false, true] {
                let mut ours = vec![blank(); x.len() / BLOCK];
                let mut theirs = ours.clone();
                rows32(simd, x, with_sums, &mut ours);
                super::super::quantize_row(x, with_sums, &mut theirs);
                for (b, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(o.qs, t.qs, "row {n} block {b}");
                    assert_eq!(o.sum, t.sum, "row {n} block {b}");
                    assert_eq!(o.d.to_bits(), t.d.to_bits(), "row {n} block {b}");
                    assert_eq!(o.s.to_bits(), t.s.to_bits(), "row {n} block {b}");
                }
            }
            let mut ours = vec![InputSuper::ZERO; x.len() / SUPER];
            let mut theirs = ours.clone();
            rows_super(simd, x, &mut ours);
            super::super::k::quantize_row(x, &mut theirs);
            for (b, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(o.qs, t.qs, "row {n} superblock {b}");
                assert_eq!(o.sums, t.sums, "row {n} superblock {b}");
                assert_eq!(o.subs, t.subs, "row {n} superblock {b}");
                assert_eq!(o.d.to_bits(), t.d.to_bits(), "row {n} superblock {b}");
            }
        }
    }
}
