//! Helpers shared by the oracle tests: splits, running chunks through stages, comparisons.

#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{DType, Device};
use cluster_api::LayerSplit;
use cluster_engine::stage::{Stage, StageInput, StageOutput};
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
    load_split_in(folder, split, DType::F32)
}

/// [`load_split`] with the weights in `dtype`.
pub fn load_split_in(folder: &ModelFolder, split: &str, dtype: DType) -> Vec<Stage> {
    let split = LayerSplit::parse(split, folder.config.num_hidden_layers).unwrap();
    cluster_engine::generate::load_stages(folder, &split, &Device::Cpu, dtype).unwrap()
}

/// Logits the oracle gave for two sequences: after their prompts, then after each decode step.
pub type Expected = Vec<(Vec<f32>, Vec<f32>)>;

/// Splits `folder` every way, runs prompts `a` and `b` (a in chunks of `chunk_a` tokens) and
/// `expected.len() - 1` interleaved decode steps through the stages (both sequences batched at
/// every stage in every other split), and compares each step's logits with `expected`.
pub fn check_every_split(
    folder: &ModelFolder,
    a: &[u32],
    b: &[u32],
    chunk_a: usize,
    expected: &Expected,
    tolerance: f32,
    name: &str,
) {
    check_every_split_in(folder, a, b, chunk_a, expected, tolerance, name, DType::F32)
}

/// [`check_every_split`] with the stages' weights in `dtype`.
#[allow(clippy::too_many_arguments)]
pub fn check_every_split_in(
    folder: &ModelFolder,
    a: &[u32],
    b: &[u32],
    chunk_a: usize,
    expected: &Expected,
    tolerance: f32,
    name: &str,
    dtype: DType,
) {
    let splits = all_splits(folder.config.num_hidden_layers);
    for (n, split) in splits.iter().enumerate() {
        let batched = n % 2 == 1;
        let stages = load_split_in(folder, split, dtype);
        let what = |part: &str| format!("{name} split {split}: {part}");
        let (seq_a, seq_b) = (7, 11);
        let mut la = Vec::new();
        for (i, chunk) in a.chunks(chunk_a).enumerate() {
            la = run_stages(&stages, seq_a, i * chunk_a, chunk);
        }
        let mut lb = run_stages(&stages, seq_b, 0, b);
        assert_close(&la, &expected[0].0, tolerance, &what("prefill A"));
        assert_close(&lb, &expected[0].1, tolerance, &what("prefill B"));
        for step in 0..expected.len() - 1 {
            // The oracle's tokens go in (equal to ours wherever the oracle's choice is clear),
            // so that each step compares logits for the same input.
            let (ta, tb) = (argmax(&expected[step].0), argmax(&expected[step].1));
            if batched {
                let mut both = run_stages_batched(
                    &stages,
                    &[(seq_a, a.len() + step, ta), (seq_b, b.len() + step, tb)],
                );
                lb = both.pop().unwrap();
                la = both.pop().unwrap();
            } else {
                la = run_stages(&stages, seq_a, a.len() + step, &[ta]);
                lb = run_stages(&stages, seq_b, b.len() + step, &[tb]);
            }
            assert_close(
                &la,
                &expected[step + 1].0,
                tolerance,
                &what(&format!("decode A step {step}")),
            );
            assert_close(
                &lb,
                &expected[step + 1].1,
                tolerance,
                &what(&format!("decode B step {step}")),
            );
        }
        for stage in &stages {
            assert_eq!(stage.sequences(), 2);
            assert!(stage.release(seq_a) && stage.release(seq_b));
            assert_eq!(stage.sequences(), 0);
        }
    }
}

/// Asserts two logit vectors agree within `tolerance` and pick the same greedy token wherever
/// the oracle's best two are further apart than twice the tolerance (closer, either may win).
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
    let best = argmax(oracle);
    let runner_up = oracle
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != best as usize)
        .map(|(_, v)| *v)
        .fold(f32::MIN, f32::max);
    if oracle[best as usize] - runner_up > 2.0 * tolerance {
        assert_eq!(argmax(ours), best, "{what}: greedy tokens differ");
    }
}

/// The model in `dir` in f32 on the CPU, in one process, split as `split` (whole without).
pub fn load_pipeline(
    dir: &std::path::Path,
    split: Option<&str>,
) -> cluster_engine::Result<cluster_engine::LocalPipeline> {
    cluster_engine::LocalPipeline::load(
        dir,
        &cluster_engine::LoadOptions {
            split: split.map(str::to_string),
            device: cluster_api::DeviceKind::Cpu,
            dtype: Some(cluster_api::WeightDType::F32),
        },
    )
}
