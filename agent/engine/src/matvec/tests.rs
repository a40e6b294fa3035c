use super::rows_times_weights;

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}

#[test]
fn matches_a_plain_product() {
    // Widths around the vector size and its multiples, outputs around the task size.
    for (rows, width, outputs) in [(1, 1, 1), (3, 7, 5), (5, 33, 130), (9, 64, 64), (4, 100, 3)] {
        let x = pseudo_random(rows * width, 1);
        let w = pseudo_random(outputs * width, 2);
        let mut out = vec![0f32; rows * outputs];
        rows_times_weights(&x, rows, &w, width, &mut out);
        for r in 0..rows {
            for o in 0..outputs {
                let want: f64 = (0..width)
                    .map(|i| x[r * width + i] as f64 * w[o * width + i] as f64)
                    .sum();
                let got = out[r * outputs + o] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "{rows}×{width}·{outputs}: [{r},{o}] = {got}, want {want}"
                );
            }
        }
    }
}

#[test]
fn decode_attention_matches_a_plain_softmax_over_each_group() {
    use super::{HeadBlocks, ScoreScale, decode_attention};
    // Three query heads per key/value head, a head size with a tail past the vectors.
    let (heads, kv_heads, d, len) = (6, 2, 20, 37);
    let q = pseudo_random(heads * d, 7);
    let k = pseudo_random(kv_heads * len * d, 8);
    let v = pseudo_random(kv_heads * len * d, 9);
    let scale = (d as f32).sqrt();
    // The heads' blocks sit apart, as in a cache with room to grow.
    let stride = (len + 3) * d;
    let spread = |x: &[f32]| {
        let mut s = vec![f32::NAN; kv_heads * stride];
        for g in 0..kv_heads {
            s[g * stride..g * stride + len * d].copy_from_slice(&x[g * len * d..(g + 1) * len * d]);
        }
        s
    };
    let (ks, vs) = (spread(&k), spread(&v));
    let cache = HeadBlocks {
        k: &ks,
        v: &vs,
        stride,
        len,
    };
    let mut out = vec![0f32; heads * d];
    decode_attention(
        &q,
        cache,
        heads,
        kv_heads,
        d,
        ScoreScale::Divide(scale),
        &mut out,
    );
    for h in 0..heads {
        let g = h / (heads / kv_heads);
        let scores: Vec<f64> = (0..len)
            .map(|t| {
                (0..d)
                    .map(|i| q[h * d + i] as f64 * k[(g * len + t) * d + i] as f64)
                    .sum::<f64>()
                    / scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        for i in 0..d {
            let want: f64 = (0..len)
                .map(|t| exps[t] / sum * v[(g * len + t) * d + i] as f64)
                .sum();
            let got = out[h * d + i] as f64;
            assert!(
                (got - want).abs() < 1e-5,
                "head {h}, [{i}] = {got}, want {want}"
            );
        }
    }
    // Multiplying by the inverse gives the same up to rounding.
    let mut other = vec![0f32; heads * d];
    let inverse = ScoreScale::Multiply(1.0 / scale);
    decode_attention(&q, cache, heads, kv_heads, d, inverse, &mut other);
    for (a, b) in out.iter().zip(&other) {
        assert!((a - b).abs() < 1e-5);
    }
}

/// `rows_times_weights` over `w` (already in its format) against a plain f64 product of the
/// values it holds, and a row's bits alone, in a batch and on one thread or three; f16
/// widened in registers and, where the CPU has F16C, by it.
fn check_half<W: super::WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    widened: &[f32],
    width: usize,
) {
    for hardware in [false, true] {
        if hardware && !super::f16c::available() {
            // CI's machines are x86-64 with F16C, as with AVX2 for the packed kernels.
            cluster_fixtures::skip("the F16C path: this CPU does not have it");
            continue;
        }
        check_half_path(x, rows, w, widened, width, hardware);
    }
}

fn check_half_path<W: super::WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    widened: &[f32],
    width: usize,
    hardware: bool,
) {
    let outputs = w.len() / width;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let run = |r: usize| {
        let mut out = vec![0f32; r * outputs];
        pool.install(|| super::product(&x[..r * width], r, w, width, &mut out, hardware));
        out
    };
    let all = run(rows);
    for r in 0..rows {
        for o in 0..outputs {
            let want: f64 = (0..width)
                .map(|i| x[r * width + i] as f64 * widened[o * width + i] as f64)
                .sum();
            let got = all[r * outputs + o] as f64;
            assert!(
                (got - want).abs() < 1e-4,
                "width {width}: [{r},{o}] {got} vs {want}"
            );
        }
    }
    assert_eq!(run(1), all[..outputs], "width {width}: a row alone");
    let mut one_thread = vec![0f32; rows * outputs];
    super::product(x, rows, w, width, &mut one_thread, hardware);
    assert_eq!(one_thread, all, "width {width}: one thread");
}

#[test]
fn half_precision_weights_match_a_plain_product_and_keep_a_rows_bits_in_any_batch() {
    use half::{bf16, f16};
    // An even width reads the weights two by two in registers; an odd one widens blocks.
    // Wide enough for several cache blocks and threads, with tails past the vectors; f16
    // values past its normal range (subnormals) included.
    for width in [1030, 1031, 1048, 1054] {
        let (rows, outputs) = (5, 300);
        let x = pseudo_random(rows * width, 11);
        let mut w = pseudo_random(outputs * width, 12);
        w[7] = 3e-6;
        w[8] = -1e-7;
        let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let back_bf16: Vec<f32> = w_bf16.iter().map(|v| v.to_f32()).collect();
        let back_f16: Vec<f32> = w_f16.iter().map(|v| v.to_f32()).collect();
        check_half(&x, rows, &w_bf16, &back_bf16, width);
        check_half(&x, rows, &w_f16, &back_f16, width);
    }
}

/// Widens every word of `words` with [`super::PairWiden::widen_pairs`], in vectors.
struct WidenAll<'a, P> {
    words: &'a [u32],
    out: &'a mut Vec<(f32, f32)>,
    format: std::marker::PhantomData<P>,
}

impl<P: super::PairWiden> pulp::WithSimd for WidenAll<'_, P> {
    type Output = ();

    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let (vecs, tail) = S::as_simd_u32s(self.words);
        for &v in vecs {
            let (even, odd) = P::widen_pairs(simd, v);
            let even: Vec<f32> = bytemuck::cast_slice(std::slice::from_ref(&even)).to_vec();
            let odd: Vec<f32> = bytemuck::cast_slice(std::slice::from_ref(&odd)).to_vec();
            self.out.extend(even.into_iter().zip(odd));
        }
        self.out.extend(tail.iter().map(|&w| P::widen_pair(w)));
    }
}

#[test]
fn every_half_value_widens_exactly_in_vectors_and_alone() {
    use half::{bf16, f16};
    // Every 16-bit pattern, as the low element of one word and the high one of another.
    let words: Vec<u32> = (0..=u16::MAX as u32)
        .map(|b| b | ((b ^ 0x5a5a) << 16))
        .collect();
    let same =
        |got: f32, want: f32| got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
    let mut out = Vec::new();
    pulp::Arch::new().dispatch(WidenAll::<f16> {
        words: &words,
        out: &mut out,
        format: Default::default(),
    });
    for (&w, &(even, odd)) in words.iter().zip(&out) {
        let (e, o) = (
            f16::from_bits(w as u16).to_f32(),
            f16::from_bits((w >> 16) as u16).to_f32(),
        );
        assert!(
            same(even, e) && same(odd, o),
            "f16 word {w:#010x}: {even} {odd}, want {e} {o}"
        );
        assert_eq!(
            <f16 as super::PairWiden>::widen_pair(w).0.to_bits(),
            even.to_bits()
        );
    }
    out.clear();
    pulp::Arch::new().dispatch(WidenAll::<bf16> {
        words: &words,
        out: &mut out,
        format: Default::default(),
    });
    for (&w, &(even, odd)) in words.iter().zip(&out) {
        let (e, o) = (
            bf16::from_bits(w as u16).to_f32(),
            bf16::from_bits((w >> 16) as u16).to_f32(),
        );
        assert!(same(even, e) && same(odd, o), "bf16 word {w:#010x}");
    }
}

#[test]
fn every_f16_widens_to_its_exact_value() {
    for bits in 0..=u16::MAX {
        let want = half::f16::from_bits(bits).to_f32();
        let got = super::f16_to_f32(bits);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{bits:#06x}: {got} ({:#010x}), want {want} ({:#010x})",
            got.to_bits(),
            want.to_bits()
        );
    }
}

#[test]
fn threads_split_the_work_without_changing_a_bit() {
    let (rows, width, outputs) = (3, 100, 1000);
    let w = pseudo_random(outputs * width, 5);
    let x = pseudo_random(rows * width, 6);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut out = vec![0f32; rows * outputs];
        pool.install(|| rows_times_weights(&x, rows, &w, width, &mut out));
        out
    };
    let one = run(1);
    assert_eq!(run(3), one);
    assert_eq!(run(8), one);
}

#[test]
fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
    let (width, outputs) = (200, 70);
    let w = pseudo_random(outputs * width, 3);
    let x = pseudo_random(9 * width, 4);
    let alone: Vec<Vec<f32>> = (0..9)
        .map(|r| {
            let mut out = vec![0f32; outputs];
            rows_times_weights(&x[r * width..(r + 1) * width], 1, &w, width, &mut out);
            out
        })
        .collect();
    for rows in 2..=9 {
        let mut out = vec![0f32; rows * outputs];
        rows_times_weights(&x[..rows * width], rows, &w, width, &mut out);
        for (r, want) in alone.iter().take(rows).enumerate() {
            assert_eq!(
                &out[r * outputs..(r + 1) * outputs],
                want.as_slice(),
                "row {r} of {rows}"
            );
        }
    }
}
