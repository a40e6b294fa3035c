//! A decode step's attention on the CPU: one query position of every head over a layer's
//! cached keys and values, read in place.

use pulp::{Arch, Simd, WithSimd};

use super::rows_times_weights;

/// How a head's attention scores are scaled by `1 / √head_dim`: divided or multiplied by the
/// inverse, as the family's reference does ([`crate::family::Numerics`]) and as
/// [`crate::stage`]'s general path does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreScale {
    /// `score / sqrt`.
    Divide(f32),
    /// `score * inverse`.
    Multiply(f32),
}

/// A layer's cached keys and values, head by head: head `g`'s `len` positions of
/// `head_dim` floats start at `g * stride` in `k` and in `v`.
#[derive(Debug, Clone, Copy)]
pub struct HeadBlocks<'a> {
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Floats from one head's block to the next's (at least `len * head_dim`).
    pub stride: usize,
    /// Positions cached.
    pub len: usize,
}

/// One query position attending over every cached position, every head: `out[h] =
/// softmax(scale(q[h] · K[g]ᵀ)) · V[g]` where `g = h / (heads / kv_heads)` is the head's key and
/// value group. `q` and `out` are `heads × head_dim`. No mask: a decode step sees every cached
/// position.
///
/// The heads of a group share their keys and values, so their scores are one
/// [`rows_times_weights`] over the group's keys (each key read once), and their outputs one
/// pass over the group's values; candle's path copies the keys and values once per head and
/// multiplies one row at a time through its general product.
///
/// # Panics
/// When the slices are shorter than those shapes need or `heads` is not a multiple of
/// `kv_heads`.
pub fn decode_attention(
    q: &[f32],
    cache: HeadBlocks<'_>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: ScoreScale,
    out: &mut [f32],
) {
    let HeadBlocks { k, v, stride, len } = cache;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "heads not in groups"
    );
    assert_eq!(q.len(), heads * head_dim, "q is not heads × head_dim");
    assert!(stride >= len * head_dim, "head blocks overlap");
    let span = (kv_heads - 1) * stride + len * head_dim;
    assert!(
        k.len() >= span && v.len() >= span,
        "the cache is shorter than its heads"
    );
    assert_eq!(out.len(), q.len(), "out is not heads × head_dim");
    if len == 0 || head_dim == 0 {
        out.fill(0.0);
        return;
    }
    let group = heads / kv_heads;
    let mut scores = vec![0f32; group * len];
    let arch = Arch::new();
    for g in 0..kv_heads {
        let block = g * stride..g * stride + len * head_dim;
        let heads_q = &q[g * group * head_dim..(g + 1) * group * head_dim];
        rows_times_weights(heads_q, group, &k[block.clone()], head_dim, &mut scores);
        for row in scores.chunks_exact_mut(len) {
            let mut max = f32::NEG_INFINITY;
            for s in row.iter_mut() {
                *s = match scale {
                    ScoreScale::Divide(d) => *s / d,
                    ScoreScale::Multiply(m) => *s * m,
                };
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
        arch.dispatch(WeightedRows {
            p: &scores,
            v: &v[block],
            head_dim,
            out: &mut out[g * group * head_dim..(g + 1) * group * head_dim],
        });
    }
}

/// `out[r] = Σ_t p[r][t] · v[t]`: each value row read once for every row of `p`.
struct WeightedRows<'a> {
    p: &'a [f32],
    v: &'a [f32],
    head_dim: usize,
    out: &'a mut [f32],
}

impl WithSimd for WeightedRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let WeightedRows {
            p,
            v,
            head_dim,
            out,
        } = self;
        out.fill(0.0);
        let len = v.len() / head_dim;
        for (t, v_row) in v.chunks_exact(head_dim).enumerate() {
            let (v_vec, v_tail) = S::as_simd_f32s(v_row);
            for (r, out_row) in out.chunks_exact_mut(head_dim).enumerate() {
                let weight = p[r * len + t];
                let w = simd.splat_f32s(weight);
                let (o_vec, o_tail) = S::as_mut_simd_f32s(out_row);
                for (o, x) in o_vec.iter_mut().zip(v_vec) {
                    *o = simd.mul_add_e_f32s(w, *x, *o);
                }
                for (o, x) in o_tail.iter_mut().zip(v_tail) {
                    *o += weight * x;
                }
            }
        }
    }
}
