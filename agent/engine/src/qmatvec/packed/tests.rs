use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::super::tests::values;
use super::*;

/// Whether this CPU runs the packed kernels; where it does not, the skip is said (and fails
/// under CI, whose machines have AVX2).
fn runs_here(format: Format, outputs: usize, width: usize) -> bool {
    if packs(format, outputs, width) {
        return true;
    }
    cluster_fixtures::skip("this CPU has no AVX2 and FMA");
    false
}

/// Every block type a stage holds packed.
pub(super) const PACKED: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
];

/// `weights` (`outputs` rows) quantized by candle to `dtype`: the bytes a GGUF file holds.
pub(super) fn quantized(weights: &[f32], outputs: usize, dtype: GgmlDType) -> QTensor {
    let width = weights.len() / outputs;
    let w = Tensor::from_slice(weights, (outputs, width), &Device::Cpu).unwrap();
    QTensor::quantize(&w, dtype).unwrap()
}

/// Packed matrices give, row for row, the bits of candle's scalar reference kernel on the
/// blocks as stored: 1 to 16 input rows, one thread and two, several groups per task.
fn check<T: GgmlType>(dtype: GgmlDType) {
    let format = Format::of(dtype).unwrap();
    let (outputs, width) = (1000, 320);
    if !runs_here(format, outputs, width) {
        return;
    }
    let weights = values(outputs * width, 5);
    let bytes = quantized(&weights, outputs, dtype)
        .data()
        .unwrap()
        .into_owned();
    let packed = pack(format, &bytes, width).unwrap();
    assert_eq!(packed.len(), bytes.len());
    if !fifth(format) {
        let mut sorted = packed.clone();
        sorted.sort_unstable();
        let mut original = bytes.clone();
        original.sort_unstable();
        assert_eq!(sorted, original, "packing only moves bytes");
    }
    assert!(pack(format, &bytes[..bytes.len() / outputs * 999], width).is_none());
    let blocks = width / BLOCK;
    let stored: Vec<Vec<T>> = weights
        .chunks_exact(width)
        .map(|row| {
            let mut b = vec![T::zeros(); blocks];
            T::from_float(row, &mut b);
            b
        })
        .collect();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for rows in [1, 2, 3, 16] {
            let x = values(rows * width, rows as u32 + 3);
            let mut ours = vec![0f32; rows * outputs];
            pool.install(|| rows_times_packed(format, &x, rows, &packed, width, &mut ours));
            for r in 0..rows {
                let mut xb = vec![T::VecDotType::zeros(); blocks];
                T::VecDotType::from_float(&x[r * width..(r + 1) * width], &mut xb);
                for (o, w) in stored.iter().enumerate() {
                    let theirs = T::vec_dot_unopt(width, w, &xb);
                    let got = ours[r * outputs + o];
                    assert_eq!(
                        got.to_bits(),
                        theirs.to_bits(),
                        "{dtype:?} rows {rows} row {r} output {o} ({threads} threads): \
                         {got} vs candle's reference {theirs}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_q4_0_gives_candles_reference_bits() {
    check::<BlockQ4_0>(GgmlDType::Q4_0);
}

#[test]
fn packed_q4_1_gives_candles_reference_bits() {
    check::<BlockQ4_1>(GgmlDType::Q4_1);
}

#[test]
fn packed_q5_0_gives_candles_reference_bits() {
    check::<BlockQ5_0>(GgmlDType::Q5_0);
}

#[test]
fn packed_q5_1_gives_candles_reference_bits() {
    check::<BlockQ5_1>(GgmlDType::Q5_1);
}

#[test]
fn packed_q8_0_gives_candles_reference_bits() {
    check::<BlockQ8_0>(GgmlDType::Q8_0);
}

/// Q4_K, Q5_K and Q6_K packed: within float rounding of the scalar reference on the blocks
/// as stored (the same integer sums, the float steps in another order) and of the kernel
/// for stored blocks; a row's result the same in any batch; 1 to 16 rows, one thread and
/// two, superblocks of zeros and of one large value among small ones.
#[test]
fn packed_superblocks_match_their_reference_within_rounding() {
    use super::super::k::{InputSuper, SUPER, dot_scalar, quantize_row};
    use super::super::rows_times_blocks;
    for dtype in [
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
    ] {
        let format = Format::of(dtype).unwrap();
        let (outputs, width) = (136, 1024);
        if !runs_here(format, outputs, width) {
            return;
        }
        assert!(!packs(format, outputs - 4, width) && !packs(format, outputs, width - 32));
        let weights = super::super::k::tests::values(outputs * width, 7);
        let q = quantized(&weights, outputs, dtype);
        let bytes = q.data().unwrap().into_owned();
        let dequantized: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let packed = pack(format, &bytes, width).unwrap();
        assert_eq!(packed.len(), outputs * row_bytes(format, width));
        if matches!(format, Format::Q6K | Format::Q2K) {
            let mut sorted = packed.clone();
            sorted.sort_unstable();
            let mut original = bytes.clone();
            original.sort_unstable();
            assert_eq!(sorted, original, "packing {dtype:?} only moves bytes");
        }
        let row = bytes.len() / outputs;
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for rows in [1, 2, 3, 16] {
                let x = super::super::k::tests::values(rows * width, rows as u32 + 11);
                let mut ours = vec![0f32; rows * outputs];
                let mut stored = vec![0f32; rows * outputs];
                pool.install(|| {
                    rows_times_packed(format, &x, rows, &packed, width, &mut ours);
                    if super::super::supports(format, outputs, width) {
                        rows_times_blocks(format, &x, rows, &bytes, width, &mut stored);
                    }
                });
                for r in 0..rows {
                    let xs = &x[r * width..(r + 1) * width];
                    let mut input = vec![InputSuper::ZERO; width / SUPER];
                    quantize_row(xs, &mut input);
                    let mut alone = vec![0f32; outputs];
                    if r == 0 && rows > 1 {
                        rows_times_packed(format, xs, 1, &packed, width, &mut alone);
                    }
                    for o in 0..outputs {
                        let got = ours[r * outputs + o];
                        let w_row = &bytes[o * row..(o + 1) * row];
                        // Q2_K and Q3_K against candle's scalar reference kernel itself.
                        let w_f32 = &weights[o * width..(o + 1) * width];
                        let reference = match dtype {
                            GgmlDType::Q2K => candle_reference::<BlockQ2K>(w_f32, xs),
                            GgmlDType::Q3K => candle_reference::<BlockQ3K>(w_f32, xs),
                            _ => dot_scalar(format, w_row, &input),
                        };
                        let scale = dequantized[o * width..(o + 1) * width]
                            .iter()
                            .zip(xs)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum::<f64>()
                            .max(1e-6);
                        let mut references = vec![(reference, "the scalar reference")];
                        if super::super::supports(format, outputs, width) {
                            references.push((stored[r * outputs + o], "the stored kernel"));
                        }
                        for (theirs, what) in references {
                            assert!(
                                (got as f64 - theirs as f64).abs() <= 1e-6 * scale,
                                "{dtype:?} rows {rows} row {r} output {o} ({threads} \
                                 threads): {got} vs {what}'s {theirs}"
                            );
                        }
                        if r == 0 && rows > 1 {
                            assert_eq!(got.to_bits(), alone[o].to_bits(), "{dtype:?} output {o}");
                        }
                    }
                }
            }
        }
    }
}

/// candle's scalar reference kernel on weight row `w` quantized as candle quantizes it (the
/// very blocks `QTensor::quantize` stores) and input row `x`, quantized likewise.
fn candle_reference<T: GgmlType>(w: &[f32], x: &[f32]) -> f32 {
    let mut wb = vec![T::zeros(); w.len() / T::BLCK_SIZE];
    T::from_float(w, &mut wb);
    let mut xb = vec![T::VecDotType::zeros(); x.len() / T::BLCK_SIZE];
    T::VecDotType::from_float(x, &mut xb);
    T::vec_dot_unopt(x.len(), &wb, &xb)
}

/// Every row of a packed matrix comes back as the file stored it, in every format packed.
#[test]
fn every_packed_row_comes_back_as_stored() {
    for dtype in PACKED {
        let format = Format::of(dtype).unwrap();
        let (outputs, width) = (24, 512);
        if !runs_here(format, outputs, width) {
            return;
        }
        let weights = super::super::k::tests::values(outputs * width, 3);
        let bytes = quantized(&weights, outputs, dtype)
            .data()
            .unwrap()
            .into_owned();
        let packed = pack(format, &bytes, width).unwrap();
        let row = stored_row_bytes(format, width);
        for (o, stored) in bytes.chunks_exact(row).enumerate() {
            let mut back = Vec::new();
            stored_row(format, &packed, width, o, &mut back);
            assert!(
                back == stored,
                "{dtype:?} row {o} did not come back as stored"
            );
        }
    }
}
