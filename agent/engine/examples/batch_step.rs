//! What a batched decode pass costs against one sequence's: times `Stage::forward_batch` over a
//! whole model folder with 1, 2 and 4 sequences (or the counts given), after a prompt of
//! `PROMPT` tokens each (20 by default; long prompts show the attention's share), on the CPU in
//! f32.
//!
//! ```sh
//! cargo run --release -p clusteragent -- make-model --out /tmp/m --arch llama --layers 8 \
//!     --hidden 768 --intermediate 2048
//! RAYON_NUM_THREADS=1 cargo run --release -p cluster-engine --example batch_step -- /tmp/m 1 2 4
//! PROMPT=1500 RAYON_NUM_THREADS=1 cargo run --release -p cluster-engine --example batch_step -- /tmp/m
//! ```

use std::path::PathBuf;
use std::time::Instant;

use cluster_api::LayerSplit;
use cluster_engine::candle_core::{DType, Device};
use cluster_engine::{ModelFolder, StageInput};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: batch_step MODEL_DIR [SEQUENCES...]")?,
    );
    let mut counts: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    if counts.is_empty() {
        counts = vec![1, 2, 4];
    }
    let folder = ModelFolder::open(&dir)?;
    let split = LayerSplit::whole(folder.config.num_hidden_layers)?;
    let stages = cluster_engine::generate::load_stages(&folder, &split, &Device::Cpu, DType::F32)?;
    let stage = &stages[0];
    let prompt: usize = std::env::var("PROMPT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let steps = 60;
    for (round, n) in counts.into_iter().enumerate() {
        let seqs: Vec<u64> = (0..n as u64).map(|s| ((round as u64) << 32) | s).collect();
        for &s in &seqs {
            stage.forward(s, 0, StageInput::Tokens(vec![1; prompt]))?;
        }
        let started = Instant::now();
        for p in 0..steps {
            let items = seqs
                .iter()
                .map(|&s| (s, prompt + p, StageInput::Tokens(vec![5])))
                .collect();
            for r in stage.forward_batch(items) {
                r?;
            }
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!(
            "{n} sequences: {ms:.3} ms per pass, {:.3} ms per sequence",
            ms / n as f64
        );
        for s in seqs {
            stage.release(s);
        }
    }
    Ok(())
}
