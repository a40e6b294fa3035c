//! Helpers shared by the oracle tests: splits, running chunks through stages, comparisons.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use cluster_api::LayerSplit;
use cluster_engine::stage::{Stage, StageInput, StageOutput, StageSpec};
use cluster_engine::{ModelFolder, SeqId};

/// Every way of cutting `layers` layers into contiguous stages, as split strings.
pub fn all_splits(layers: usize) -> Vec<String> {
    (0..1u32 << (layers - 1))
        .map(|cuts| {
            let mut ranges = Vec::new();
            let mut first = 0;
            for layer in 0..layers {
                let cut_after = layer + 1 == layers || cuts & (1 << layer) != 0;
                if cut_after {
                    ranges.push(format!("{first}-{layer}"));
                    first = layer + 1;
                }
            }
            ranges.join(",")
        })
        .collect()
}

pub fn run_stages(stages: &[Stage], seq: SeqId, position: usize, tokens: &[u32]) -> Vec<f32> {
    let mut input = StageInput::Tokens(tokens.to_vec());
    for stage in stages {
        match stage.forward(seq, position, input).unwrap() {
            StageOutput::Hidden(h) => input = StageInput::Hidden(h),
            StageOutput::Logits(l) => return l.to_vec1().unwrap(),
        }
    }
    panic!("no stage produced logits");
}

/// One decode step of several sequences through every stage, batched at each stage.
pub fn run_stages_batched(stages: &[Stage], steps: &[(SeqId, usize, u32)]) -> Vec<Vec<f32>> {
    let mut inputs: Vec<StageInput> = steps
        .iter()
        .map(|s| StageInput::Tokens(vec![s.2]))
        .collect();
    for stage in stages {
        let items = steps
            .iter()
            .zip(inputs)
            .map(|(s, input)| (s.0, s.1, input))
            .collect();
        let outputs: Vec<StageOutput> = stage
            .forward_batch(items)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        if let StageOutput::Logits(_) = outputs[0] {
            return outputs
                .into_iter()
                .map(|o| match o {
                    StageOutput::Logits(l) => l.to_vec1().unwrap(),
                    StageOutput::Hidden(_) => panic!("mixed outputs"),
                })
                .collect();
        }
        inputs = outputs
            .into_iter()
            .map(|o| match o {
                StageOutput::Hidden(h) => StageInput::Hidden(h),
                StageOutput::Logits(_) => panic!("mixed outputs"),
            })
            .collect();
    }
    panic!("no stage produced logits");
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

pub fn load_split(folder: &ModelFolder, split: &str) -> Vec<Stage> {
    let split = LayerSplit::parse(split, folder.config.num_hidden_layers).unwrap();
    let n = split.ranges().len();
    split
        .ranges()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let spec = StageSpec {
                config: folder.config.clone(),
                weights: &folder.weights,
                range: *r,
                first: i == 0,
                last: i + 1 == n,
                device: Device::Cpu,
                dtype: DType::F32,
            };
            Stage::load(spec, &mut |_, _| {}).unwrap()
        })
        .collect()
}

/// Asserts two logit vectors agree within `tolerance` and pick the same greedy token.
pub fn assert_close(ours: &[f32], oracle: &[f32], tolerance: f32, what: &str) {
    assert_eq!(ours.len(), oracle.len(), "{what}: vocabulary sizes differ");
    let worst = ours
        .iter()
        .zip(oracle)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tolerance,
        "{what}: logits differ by {worst:e} (> {tolerance:e})"
    );
    assert_eq!(argmax(ours), argmax(oracle), "{what}: greedy tokens differ");
}

/// `../shared/data` beside the repository (or `$CLUSTER_SHARED_DATA`). CI always has it, so a
/// missing folder fails there; elsewhere the test says it was skipped.
pub fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("CLUSTER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    if dir.join("qwen-tokenizer/tokenizer.json").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "shared data not found at {}",
        dir.display()
    );
    eprintln!(
        "SKIPPED: shared data not found at {} (set CLUSTER_SHARED_DATA)",
        dir.display()
    );
    None
}
