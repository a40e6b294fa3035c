//! `clusteragent inspect-stage`: loads one stage and reports what it holds, as JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use cluster_api::{DeviceKind, LayerRange, WeightDType};
use cluster_engine::device::{choose_dtype, device_name, open_device};
use cluster_engine::{ModelFolder, Stage, StageSpec};
use serde_json::json;

use crate::memory::{huge_page_bytes, resident_bytes};

/// Flags of `clusteragent inspect-stage`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Inclusive layer range of the stage, e.g. 0-13.
    #[arg(long)]
    pub layers: LayerRange,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceKind,
    /// Weight precision (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<WeightDType>,
}

/// Tokens of the prefill run after loading, and decode steps after it.
const PROBE_PROMPT: usize = 32;
const PROBE_STEPS: usize = 4;

/// Runs `clusteragent inspect-stage`: loads the stage, runs a short prefill and a few decode
/// steps through it, and reports what it holds.
pub fn run(args: InspectArgs) -> Result<()> {
    let folder = ModelFolder::open(&args.model)
        .with_context(|| format!("opening {}", args.model.display()))?;
    let device = open_device(args.device)?;
    let dtype = choose_dtype(args.dtype, folder.config.dtype);
    let layers = folder.config.num_hidden_layers;
    let before = resident_bytes();
    let start = Instant::now();
    let stage = Stage::load(
        StageSpec {
            config: folder.config.clone(),
            weights: &folder.weights,
            range: args.layers,
            first: args.layers.first == 0,
            last: args.layers.last + 1 == layers,
            device: device.clone(),
            dtype,
        },
        &mut |_, _| {},
    )?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let after = resident_bytes();
    // A short prefill and a few decode steps: what a stage allocates on its first products
    // (candle, for one, repacks some block formats then) shows up here, not after loading.
    let hidden = folder.config.hidden_size;
    let input = |n: usize| -> Result<cluster_engine::StageInput> {
        Ok(if stage.is_first() {
            cluster_engine::StageInput::Tokens((0..n as u32).collect())
        } else {
            cluster_engine::StageInput::Hidden(cluster_engine::candle_core::Tensor::zeros(
                (1, n, hidden),
                cluster_engine::candle_core::DType::F32,
                &device,
            )?)
        })
    };
    stage.forward(1, 0, input(PROBE_PROMPT)?)?;
    for step in 0..PROBE_STEPS {
        stage.forward(1, PROBE_PROMPT + step, input(1)?)?;
    }
    stage.release(1);
    let after_forward = resident_bytes();
    let report = json!({
        "model": args.model,
        "layers": args.layers.to_string(),
        "model_layers": layers,
        "first": stage.is_first(),
        "last": stage.is_last(),
        "device": device_name(&device),
        "dtype": format!("{:?}", stage.dtype()).to_lowercase(),
        "weight_bytes": stage.weight_bytes(),
        "files": stage.files(),
        "resident_bytes_before_load": before,
        "resident_bytes_after_load": after,
        "resident_bytes_after_forward": after_forward,
        "huge_page_bytes_after_load": huge_page_bytes(),
        "load_ms": load_ms,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
