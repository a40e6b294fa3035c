//! Stages, split every way, against candle-transformers' whole-model forward on the same weights.
//!
//! For each family (Llama, Mistral, Qwen2, Qwen3, Phi-3) a 4-layer model is split into 1, 2, 3 and 4 stages in every possible way; two
//! sequences are prefilled (one in chunks) and decoded for 16 steps, interleaved. At every step the
//! last stage's logits must equal the oracle's within 1e-5 and the greedy tokens must agree. Half
//! of the splits decode the two sequences as one batch at every stage.
//!
//! Half-precision checkpoints (bf16, f16) are held in their precision and widened as they are
//! multiplied, so their oracle is the whole model with the same weights widened to f32.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::path::Path;

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, phi3, qwen2, qwen3};
use cluster_engine::ModelFolder;
use cluster_fixtures::TinyModel;
use common::{all_splits, argmax, check_every_split_in};

const TOLERANCE: f32 = 1e-5;
const DECODE_STEPS: usize = 16;

/// One sequence's whole-model oracle: each keeps its own KV cache.
enum Oracle {
    Llama(Box<llama::Llama>, Box<llama::Cache>),
    Mistral(Box<mistral::Model>),
    Qwen2(Box<qwen2::ModelForCausalLM>),
    Qwen3(Box<qwen3::ModelForCausalLM>),
    Phi3(Box<phi3::Model>),
}

impl Oracle {
    fn load(dir: &Path, family: cluster_engine::Family) -> Oracle {
        let dev = Device::Cpu;
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &dev).unwrap();
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        use cluster_engine::Family::*;
        match family {
            Llama => {
                let cfg: llama::LlamaConfig = serde_json::from_str(&config).unwrap();
                let cfg = cfg.into_config(false);
                let cache = llama::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
                Oracle::Llama(
                    Box::new(llama::Llama::load(vb, &cfg).unwrap()),
                    Box::new(cache),
                )
            }
            Mistral => {
                let cfg: mistral::Config = serde_json::from_str(&config).unwrap();
                Oracle::Mistral(Box::new(mistral::Model::new(&cfg, vb).unwrap()))
            }
            Qwen2 => {
                let cfg: qwen2::Config = serde_json::from_str(&config).unwrap();
                Oracle::Qwen2(Box::new(qwen2::ModelForCausalLM::new(&cfg, vb).unwrap()))
            }
            Qwen3 => {
                let cfg: qwen3::Config = serde_json::from_str(&config).unwrap();
                Oracle::Qwen3(Box::new(qwen3::ModelForCausalLM::new(&cfg, vb).unwrap()))
            }
            Phi3 => {
                let cfg: phi3::Config = serde_json::from_str(&config).unwrap();
                Oracle::Phi3(Box::new(phi3::Model::new(&cfg, vb).unwrap()))
            }
        }
    }

    /// Logits of the last position of `tokens`, which start at `position`.
    fn forward(&mut self, tokens: &[u32], position: usize) -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = match self {
            Oracle::Llama(m, cache) => m.forward(&input, position, cache).unwrap(),
            Oracle::Mistral(m) => m.forward(&input, position).unwrap(),
            Oracle::Qwen2(m) => m.forward(&input, position).unwrap(),
            Oracle::Qwen3(m) => m.forward(&input, position).unwrap(),
            Oracle::Phi3(m) => m.forward(&input, position).unwrap(),
        };
        logits.flatten_all().unwrap().to_vec1().unwrap()
    }
}

fn check_family(model: TinyModel) {
    check_family_in(model, DType::F32, 3);
}

/// Checks every split with the stages' weights in `dtype` (the oracle computes in f32 from the
/// same file) and prompt A prefilled in chunks of `chunk_a` tokens.
fn check_family_in(model: TinyModel, dtype: DType, chunk_a: usize) {
    let dir = tempfile::tempdir().unwrap();
    model.write(dir.path()).unwrap();
    let folder = ModelFolder::open(dir.path()).unwrap();
    let family = folder.config.family;
    // Long enough that decoding passes the 64 positions a stage's cache holds at first.
    let prompt_a = folder
        .tokenizer
        .encode(
            &"The two machines sat side by side on the shelf. ".repeat(6),
            true,
        )
        .unwrap();
    let prompt_b = folder
        .tokenizer
        .encode("What is the capital of France?", true)
        .unwrap();
    assert!(
        prompt_a.len() + DECODE_STEPS > 64 && prompt_b.len() >= 4,
        "prompts too short: {prompt_a:?} {prompt_b:?}"
    );

    // The oracle's tokens and logits, computed once: two independent whole models.
    let mut oracle_a = Oracle::load(dir.path(), family);
    let mut oracle_b = Oracle::load(dir.path(), family);
    let mut expected: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    let (mut ta, mut tb) = (
        oracle_a.forward(&prompt_a, 0),
        oracle_b.forward(&prompt_b, 0),
    );
    expected.push((ta.clone(), tb.clone()));
    for step in 0..DECODE_STEPS {
        ta = oracle_a.forward(&[argmax(&ta)], prompt_a.len() + step);
        tb = oracle_b.forward(&[argmax(&tb)], prompt_b.len() + step);
        expected.push((ta.clone(), tb.clone()));
    }

    assert_eq!(all_splits(folder.config.num_hidden_layers).len(), 8);
    // Sequence A is prefilled in chunks, B in one go.
    check_every_split_in(
        &folder,
        &prompt_a,
        &prompt_b,
        chunk_a,
        &expected,
        TOLERANCE,
        &format!("{family:?} in {dtype:?}"),
        dtype,
    );
}

#[test]
fn llama_stages_match_the_whole_model() {
    check_family(TinyModel::llama());
}

#[test]
fn mistral_stages_match_the_whole_model() {
    check_family(TinyModel::mistral());
}

#[test]
fn qwen2_stages_match_the_whole_model() {
    check_family(TinyModel::qwen2());
}

#[test]
fn qwen3_stages_match_the_whole_model() {
    check_family(TinyModel::qwen3());
}

#[test]
fn phi3_stages_match_the_whole_model() {
    check_family(TinyModel::phi3());
}

#[test]
fn qwen3_untied_stages_match_the_whole_model() {
    check_family(TinyModel {
        tied: false,
        seed: 5,
        ..TinyModel::qwen3()
    });
}

#[test]
fn bf16_stages_widening_their_weights_match_the_whole_model() {
    // Chunks of 20 tokens: past the rows the kernel takes, so prefill goes through the blocks
    // of widened weights; decode steps and prompt B through the kernel.
    for model in [TinyModel::qwen3(), TinyModel::llama()] {
        check_family_in(
            TinyModel {
                bf16: true,
                ..model
            },
            DType::BF16,
            20,
        );
    }
}

#[test]
fn f16_stages_widening_their_weights_match_the_whole_model() {
    check_family_in(
        TinyModel {
            f16: true,
            ..TinyModel::qwen2()
        },
        DType::F16,
        20,
    );
}

#[test]
fn splits_cover_every_composition() {
    assert_eq!(all_splits(1), vec!["0-0"]);
    let mut s = all_splits(3);
    s.sort();
    assert_eq!(s, vec!["0-0,1-1,2-2", "0-0,1-2", "0-1,2-2", "0-2"]);
}
