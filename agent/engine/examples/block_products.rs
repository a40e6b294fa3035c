//! Our block kernels against candle's products, side by side, on weights that come from memory
//! as in a real model: 1 to 4 input rows against 24 matrices of `OUT` × `IN` (2048 × 768 by
//! default) in each block format of `KINDS` (default `q4_k q6_k q8_0`; also q2_k to q5_k and
//! q4_0 to q5_1): the stored blocks' kernel where there is one, the repacked matrices as a stage
//! holds them, candle's product first on a copy of the same blocks (so that its repacking, where
//! it repacks, has happened), then interleaved rounds. Prints GB/s of weights read and the ratio. Weights are N(0, `SCALE`)
//! (0.02 by default, as in small real models).
//!
//! ```sh
//! RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 taskset -c 0 \
//!     cargo run --release -p cluster-engine --example block_products
//! ```

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use cluster_engine::qmatvec::packed::{pack, rows_times_packed};
use cluster_engine::qmatvec::{Format, rows_times_blocks, supports};

fn main() -> Result<()> {
    let var = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (outputs, width) = (var("OUT", 2048), var("IN", 768));
    // Weights of a real model are small: 0.02 makes small models' K-quant scales subnormal f16.
    let scale: f64 = std::env::var("SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.02);
    let kinds = std::env::var("KINDS").unwrap_or_else(|_| "q4_k q6_k q8_0".into());
    let dev = Device::Cpu;
    for kind in kinds.split_whitespace() {
        let dtype = match kind {
            "q4_0" => GgmlDType::Q4_0,
            "q4_1" => GgmlDType::Q4_1,
            "q5_0" => GgmlDType::Q5_0,
            "q5_1" => GgmlDType::Q5_1,
            "q8_0" => GgmlDType::Q8_0,
            "q4_k" => GgmlDType::Q4K,
            "q5_k" => GgmlDType::Q5K,
            "q6_k" => GgmlDType::Q6K,
            "q2_k" => GgmlDType::Q2K,
            "q3_k" => GgmlDType::Q3K,
            other => panic!("no block format {other}"),
        };
        let format = Format::of(dtype).expect("a format of ours");
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..24 {
            let w = (Tensor::randn(0f32, 1.0, (outputs, width), &dev)? * scale)?;
            let q = QTensor::quantize(&w, dtype)?;
            ours.push(q.data()?.into_owned());
            theirs.push(QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?);
        }
        let bytes: usize = ours.iter().map(Vec::len).sum();
        // Also as a stage holds them: repacked eight rows at a time (Q2_K and Q3_K only so).
        let packed: Vec<Vec<u8>> = ours.iter().filter_map(|w| pack(format, w, width)).collect();
        let stored = supports(format, outputs, width);
        for rows in [1, 4] {
            let x = Tensor::randn(0f32, 1.0, (rows, width), &dev)?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut out = vec![0f32; rows * outputs];
            for m in &theirs {
                m.forward(&x)?;
            }
            let (mut t_ours, mut t_theirs, mut t_packed) = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..7 {
                if !packed.is_empty() {
                    let t = Instant::now();
                    for w in &packed {
                        rows_times_packed(format, &xs, rows, w, width, &mut out);
                    }
                    t_packed = t_packed.min(t.elapsed().as_secs_f64());
                }
                if stored {
                    let t = Instant::now();
                    for w in &ours {
                        rows_times_blocks(format, &xs, rows, w, width, &mut out);
                    }
                    t_ours = t_ours.min(t.elapsed().as_secs_f64());
                }
                let t = Instant::now();
                for m in &theirs {
                    m.forward(&x)?;
                }
                t_theirs = t_theirs.min(t.elapsed().as_secs_f64());
            }
            if stored {
                println!(
                    "{kind} {outputs}x{width}, {rows} row(s): ours {:.1} GB/s, candle {:.1} GB/s, ratio {:.2}",
                    bytes as f64 / t_ours / 1e9,
                    bytes as f64 / t_theirs / 1e9,
                    t_theirs / t_ours
                );
            } else {
                println!(
                    "{kind} {outputs}x{width}, {rows} row(s): candle {:.1} GB/s",
                    bytes as f64 / t_theirs / 1e9
                );
            }
            if !packed.is_empty() {
                println!(
                    "{kind} {outputs}x{width}, {rows} row(s): packed {:.1} GB/s, ratio to candle {:.2}",
                    bytes as f64 / t_packed / 1e9,
                    t_theirs / t_packed
                );
            }
        }
    }
    Ok(())
}
