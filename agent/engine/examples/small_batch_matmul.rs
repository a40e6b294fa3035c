//! Why decode steps multiply through `matvec`: times candle's general product, one
//! matrix-vector product per row, and `matvec::rows_times_weights`, for 1 to 8 rows against 40
//! weight matrices of `OUT` × `IN` f32 (environment variables; 2048 × 768 by default, 250 MB,
//! so weights come from memory as in a real model), and `matvec` on the same weights in bf16
//! (half the bytes to read).
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p cluster-engine --example small_batch_matmul
//! OUT=768 IN=2048 RAYON_NUM_THREADS=1 cargo run --release -p cluster-engine --example small_batch_matmul
//! ROWS=8,16,32,64 RAYON_NUM_THREADS=1 cargo run --release -p cluster-engine --example small_batch_matmul
//! ```

use std::time::Instant;

use candle_nn::{Linear, Module};
use cluster_engine::candle_core::{Device, Result, Tensor};
use cluster_engine::matvec::rows_times_weights;

fn main() -> Result<()> {
    let outputs: usize = std::env::var("OUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let width: usize = std::env::var("IN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(768);
    let dev = Device::Cpu;
    let weights: Vec<Tensor> = (0..40)
        .map(|_| Tensor::randn(0f32, 1.0, (outputs, width), &dev))
        .collect::<Result<_>>()?;
    let layers: Vec<Linear> = weights
        .iter()
        .map(|w| Linear::new(w.clone(), None))
        .collect();
    let flat: Vec<Vec<f32>> = weights
        .iter()
        .map(|w| w.flatten_all()?.to_vec1::<f32>())
        .collect::<Result<_>>()?;
    let flat_bf16: Vec<Vec<half::bf16>> = flat
        .iter()
        .map(|w| w.iter().map(|&v| half::bf16::from_f32(v)).collect())
        .collect();
    let rounds = 5;
    let per_call = |t: Instant| t.elapsed().as_secs_f64() / (rounds * weights.len()) as f64 * 1e3;
    let mut one_row = None;
    let counts: Vec<usize> = match std::env::var("ROWS") {
        Ok(v) => v.split(',').filter_map(|r| r.trim().parse().ok()).collect(),
        Err(_) => vec![1, 2, 3, 4, 6, 8],
    };
    for rows in counts {
        let x = Tensor::randn(0f32, 1.0, (rows, 1, width), &dev)?;
        let t = Instant::now();
        for _ in 0..rounds {
            for l in &layers {
                l.forward(&x)?;
            }
        }
        let general = per_call(t);
        let t = Instant::now();
        for _ in 0..rounds {
            for l in &layers {
                for i in 0..rows {
                    l.forward(&x.narrow(0, i, 1)?)?;
                }
            }
        }
        let by_row = per_call(t);
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; rows * outputs];
        let t = Instant::now();
        for _ in 0..rounds {
            for w in &flat {
                rows_times_weights(&xs, rows, w, width, &mut out);
            }
        }
        let fused = per_call(t);
        let t = Instant::now();
        for _ in 0..rounds {
            for w in &flat_bf16 {
                rows_times_weights(&xs, rows, w, width, &mut out);
            }
        }
        let fused_bf16 = per_call(t);
        let base = *one_row.get_or_insert(by_row);
        println!(
            "{rows} rows: general {general:.3} ms, row by row {by_row:.3} ms, matvec {fused:.3} ms \
             ({:.2}x one row by candle), matvec on bf16 {fused_bf16:.3} ms ({:.2}x as fast as f32)",
            fused / base,
            fused / fused_bf16
        );
    }
    Ok(())
}
