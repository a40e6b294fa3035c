//! The stage's own pieces against plain references: the KV cache, batched products.

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module};

use super::kv::LayerKv;
use super::linear::{Proj, ROWS_AS_GEMM, linear};

#[test]
fn the_kv_cache_grows_in_place_and_returns_every_position_in_order() {
    let dev = Device::Cpu;
    let mut kv = LayerKv::default();
    let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
    // A prefill chunk, then single steps past the first capacity and past its double.
    for n in std::iter::once(50).chain(std::iter::repeat_n(1, 90)) {
        let k = Tensor::randn(0f32, 1.0, (1, 2, n, 8), &dev).unwrap();
        // Values arrive transposed from the projection, as in `Attention::project`.
        let v = Tensor::randn(0f32, 1.0, (1, n, 2, 8), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let (ck, cv) = kv.append(&k, &v).unwrap();
        all_k.push(k);
        all_v.push(v);
        let want_k = Tensor::cat(&all_k, 2).unwrap();
        let want_v = Tensor::cat(&all_v, 2).unwrap();
        assert_eq!(ck.dims(), want_k.dims());
        let same = |a: &Tensor, b: &Tensor| {
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&ck, &want_k) && same(&cv, &want_v), "at {}", kv.len);
    }
    assert_eq!(kv.len, 140);
    // 64 positions at first, doubled at 65 and at 129.
    assert_eq!(kv.k.as_ref().unwrap().dim(2).unwrap(), 256);
}

#[test]
fn batched_rows_equal_one_row_at_a_time() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (48, 37), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
    let lin = Linear::new(w, Some(b));
    let proj = Proj::Dense(lin.clone());
    for rows in [2, ROWS_AS_GEMM - 1, ROWS_AS_GEMM, 9] {
        let x = Tensor::randn(0f32, 1.0, (rows, 1, 37), &dev).unwrap();
        let batched = linear(&proj, &x).unwrap();
        assert_eq!(batched.dims(), &[rows, 1, 48]);
        for i in 0..rows {
            // A sequence's result is the same whether it came alone or in a batch.
            let alone = linear(&proj, &x.narrow(0, i, 1).unwrap()).unwrap();
            let row = batched.narrow(0, i, 1).unwrap();
            assert_eq!(
                row.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{rows} rows: row {i}"
            );
            // And within rounding of candle's own product.
            let one = lin.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
            let diff = (batched.narrow(0, i, 1).unwrap() - one)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{rows} rows: row {i} differs by {diff}");
        }
    }
}
