//! Why batched decode multiplies small batches row by row: times candle's general product, the
//! transposed product `W · Xᵀ`, and one matrix-vector product per row, for 1 to 8 rows against
//! 40 weight matrices of 2048 × 768 f32 (250 MB, so weights come from memory as in a real model).
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p cluster-engine --example small_batch_matmul
//! ```

use std::time::Instant;

use candle_nn::{Linear, Module};
use cluster_engine::candle_core::{Device, Result, Tensor};

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let weights: Vec<Tensor> = (0..40)
        .map(|_| Tensor::randn(0f32, 1.0, (2048, 768), &dev))
        .collect::<Result<_>>()?;
    let layers: Vec<Linear> = weights
        .iter()
        .map(|w| Linear::new(w.clone(), None))
        .collect();
    let rounds = 5;
    let per_call = |t: Instant| t.elapsed().as_secs_f64() / (rounds * weights.len()) as f64 * 1e3;
    for rows in [1usize, 2, 3, 4, 6, 8] {
        let x = Tensor::randn(0f32, 1.0, (rows, 1, 768), &dev)?;
        let t = Instant::now();
        for _ in 0..rounds {
            for l in &layers {
                l.forward(&x)?;
            }
        }
        let general = per_call(t);
        let t = Instant::now();
        for _ in 0..rounds {
            for w in &weights {
                let xt = x.reshape((rows, 768))?.t()?.contiguous()?;
                w.matmul(&xt)?.t()?.contiguous()?;
            }
        }
        let transposed = per_call(t);
        let t = Instant::now();
        for _ in 0..rounds {
            for l in &layers {
                for i in 0..rows {
                    l.forward(&x.narrow(0, i, 1)?)?;
                }
            }
        }
        let by_row = per_call(t);
        println!(
            "{rows} rows: general {general:.3} ms, W·Xᵀ {transposed:.3} ms, row by row {by_row:.3} ms"
        );
    }
    Ok(())
}
