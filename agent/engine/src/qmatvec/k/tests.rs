use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::super::{rows_times_blocks, supports};
use super::*;

pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            // Some superblocks all zero, some with one large value among small ones.
            match (i / SUPER) % 5 {
                3 => 0.0,
                4 if i % 97 == 0 => 7.5,
                _ => (state % 20_001) as f32 / 10_000.0 - 1.0,
            }
        })
        .collect()
}

/// Q4_K, Q5_K and Q6_K, 1 to 16 rows, several outputs and widths, one thread and two: the
/// kernel is within float rounding of the scalar reference (same integers, float sums in
/// another order), and the result is within what rounding the
/// input to 8 bits can move of the f64 product of the dequantized weights, and of
/// candle's own product of the same blocks (which differs only in the order of its float
/// sums).
#[test]
fn superblock_formats_match_their_reference_and_candle_within_rounding() {
    for (dtype, outputs, width) in [
        (GgmlDType::Q4K, 51, 512),
        (GgmlDType::Q4K, 203, 1024),
        (GgmlDType::Q5K, 51, 512),
        (GgmlDType::Q5K, 203, 1024),
        (GgmlDType::Q6K, 51, 512),
        (GgmlDType::Q6K, 203, 1024),
    ] {
        let format = Format::of(dtype).unwrap();
        if !supports(format, outputs, width) {
            // CI's machines have AVX2; elsewhere the skip is said, never silent.
            cluster_fixtures::skip(&format!("{dtype:?}: this CPU has no AVX2 and FMA"));
            continue;
        }
        let w =
            Tensor::from_vec(values(outputs * width, 7), (outputs, width), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let bytes = q.data().unwrap().into_owned();
        let dequantized: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mm = QMatMul::from_qtensor(q).unwrap();
        let mut worst_vs_candle = 0f64;
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
                    let mut input = vec![InputSuper::ZERO; width / SUPER];
                    quantize_row(xs, &mut input);
                    let row = Tensor::from_slice(xs, (1, width), &Device::Cpu).unwrap();
                    let theirs: Vec<f32> = mm
                        .forward(&row)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let row_bytes = bytes.len() / outputs;
                    for o in 0..outputs {
                        let got = ours[r * outputs + o];
                        let w_row = &bytes[o * row_bytes..(o + 1) * row_bytes];
                        let reference = dot_scalar(format, w_row, &input);
                        let ws = &dequantized[o * width..(o + 1) * width];
                        let scale = ws
                            .iter()
                            .zip(xs)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum::<f64>()
                            .max(1e-6);
                        assert!(
                            (got as f64 - reference as f64).abs() <= 1e-6 * scale,
                            "{dtype:?} rows {rows} row {r} output {o} ({threads} threads): \
                             {got} vs the scalar reference {reference}"
                        );
                        // A row's result does not depend on the rows it came with.
                        if r == 0 && rows > 1 {
                            let mut alone = vec![0f32; outputs];
                            rows_times_blocks(format, xs, 1, &bytes, width, &mut alone);
                            assert_eq!(got.to_bits(), alone[o].to_bits());
                        }
                        let (mut exact, mut bound) = (0f64, 1e-6);
                        for (wb, xb) in ws.chunks(SUPER).zip(xs.chunks(SUPER)) {
                            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                            let (mut wsum, mut magnitude) = (0f64, 0f64);
                            for (a, b) in wb.iter().zip(xb) {
                                let (a, b) = (*a as f64, *b as f64);
                                exact += a * b;
                                magnitude += (a * b).abs();
                                wsum += a.abs();
                            }
                            // Each input value moves by at most half a step (amax / 127).
                            bound += wsum * amax / 254.0 + 1e-5 * magnitude;
                        }
                        assert!(
                            (got as f64 - exact).abs() <= bound,
                            "{dtype:?} rows {rows} row {r} output {o}: {got} vs the \
                             dequantized weights' {exact} (bound {bound})"
                        );
                        let vs_candle = (got as f64 - theirs[o] as f64).abs() / scale;
                        worst_vs_candle = worst_vs_candle.max(vs_candle);
                        assert!(
                            vs_candle <= 1e-5,
                            "{dtype:?} rows {rows} row {r} output {o}: {got} vs candle's {} \
                             ({vs_candle:e} of the products' magnitude)",
                            theirs[o]
                        );
                    }
                }
            }
        }
        eprintln!(
            "{dtype:?} {outputs}x{width}: at most {worst_vs_candle:e} of the products' magnitude from candle's"
        );
    }
}
