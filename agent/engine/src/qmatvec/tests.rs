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
