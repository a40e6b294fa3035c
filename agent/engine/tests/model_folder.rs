//! Model folders as users have them: sharded checkpoints, both transformers config layouts,
//! bf16 weights, EOS lists, and every kind of broken folder, each with a clear error.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::path::Path;

mod common;

use common::load_pipeline as load;

use candle_core::{DType, Device};
use cluster_api::{DeviceKind, FinishReason, LayerRange, WeightDType};
use cluster_engine::{
    EngineError, GenerateOptions, LoadOptions, LocalPipeline, ModelFolder, Stage, StageInput,
    StageOutput, StageSpec,
};
use cluster_fixtures::{ConfigStyle, TinyModel};

fn write(model: &TinyModel) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    model.write(dir.path()).unwrap();
    dir
}

fn greedy(p: &LocalPipeline, prompt: &str, max_tokens: usize) -> cluster_engine::Generation {
    let ids = p.encode_text(prompt).unwrap();
    let options = GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    };
    p.generate(1, &ids, &options, &mut |_| {}).unwrap()
}

fn load_stage(folder: &ModelFolder, range: &str) -> Result<Stage, EngineError> {
    let range: LayerRange = range.parse().unwrap();
    Stage::load(
        StageSpec {
            config: folder.config.clone(),
            weights: &folder.weights,
            range,
            first: range.first == 0,
            last: range.last + 1 == folder.config.num_hidden_layers,
            device: Device::Cpu,
            dtype: DType::F32,
        },
        &mut |_, _| {},
    )
}

#[test]
fn sharded_checkpoint_gives_the_same_tokens_and_stages_open_only_their_shards() {
    let single = write(&TinyModel::qwen3());
    let sharded = write(&TinyModel {
        shards: 3,
        ..TinyModel::qwen3()
    });
    assert!(
        sharded
            .path()
            .join("model.safetensors.index.json")
            .is_file()
    );
    let a = greedy(
        &load(single.path(), None).unwrap(),
        "The river ran quickly",
        12,
    );
    let b = greedy(
        &load(sharded.path(), Some("0-1,2-3")).unwrap(),
        "The river ran quickly",
        12,
    );
    assert_eq!(a.token_ids, b.token_ids);

    // Shards are filled in checkpoint order: the first holds the embedding and layer 0, the last
    // holds layer 3 and the final norm. A stage of layer 0 must not open the last shard.
    let folder = ModelFolder::open(sharded.path()).unwrap();
    let stage = load_stage(&folder, "0-0").unwrap();
    let names: Vec<String> = stage
        .files()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.contains(&"model-00003-of-00003.safetensors".to_string()),
        "{names:?}"
    );

    // With that shard gone, the first stage still loads; the last one names the missing file.
    std::fs::remove_file(sharded.path().join("model-00003-of-00003.safetensors")).unwrap();
    let folder = ModelFolder::open(sharded.path()).unwrap();
    load_stage(&folder, "0-0").unwrap();
    let err = load_stage(&folder, "3-3").err().unwrap().to_string();
    assert!(
        err.contains("model-00003-of-00003.safetensors") && err.contains("not found"),
        "{err}"
    );
    assert!(err.contains("model.safetensors.index.json"), "{err}");
}

#[test]
fn transformers_4_and_5_configs_give_the_same_model() {
    for base in [TinyModel::llama(), TinyModel::qwen3()] {
        let v4 = write(&base);
        let v5 = write(&TinyModel {
            style: ConfigStyle::Transformers5,
            ..base.clone()
        });
        let a = ModelFolder::open(v4.path()).unwrap();
        let b = ModelFolder::open(v5.path()).unwrap();
        assert_eq!(a.config, b.config);
        assert_eq!(
            greedy(&load(v4.path(), None).unwrap(), "Numbers: 1 2 3", 8).token_ids,
            greedy(&load(v5.path(), None).unwrap(), "Numbers: 1 2 3", 8).token_ids
        );
    }
}

#[test]
fn bf16_checkpoints_load_in_their_own_precision_or_as_f32() {
    let dir = write(&TinyModel {
        bf16: true,
        ..TinyModel::qwen2()
    });
    let folder = ModelFolder::open(dir.path()).unwrap();
    assert_eq!(folder.config.dtype, Some(WeightDType::Bf16));
    let native = LocalPipeline::load(
        dir.path(),
        &LoadOptions {
            split: None,
            device: DeviceKind::Cpu,
            dtype: None,
        },
    )
    .unwrap();
    assert_eq!(native.stages[0].dtype(), DType::BF16);
    let f32_stage = load(dir.path(), None).unwrap();
    assert_eq!(f32_stage.stages[0].dtype(), DType::F32);
    // Half the bytes per weight.
    assert_eq!(
        native.stages.iter().map(|s| s.weight_bytes()).sum::<u64>() * 2,
        f32_stage.stages[0].weight_bytes()
    );
    let g = greedy(&native, "Hello", 6);
    assert_eq!(g.token_ids.len(), 6);
}

#[test]
fn generation_stops_on_any_eos_id_the_model_lists() {
    let model = TinyModel::llama();
    let dir = write(&model);
    let free = greedy(&load(dir.path(), None).unwrap(), "Good tools tell you", 10);
    assert_eq!(free.finish_reason, FinishReason::Length);
    // Declare the 4th generated token an EOS id in generation_config.json (beside the real one).
    let stop_at = free.token_ids[3];
    let first = free.token_ids.iter().position(|&t| t == stop_at).unwrap();
    let gen_path = dir.path().join("generation_config.json");
    let mut gen_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    gen_cfg["eos_token_id"]
        .as_array_mut()
        .unwrap()
        .push(stop_at.into());
    std::fs::write(&gen_path, gen_cfg.to_string()).unwrap();
    let stopped = greedy(&load(dir.path(), None).unwrap(), "Good tools tell you", 10);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.token_ids, free.token_ids[..=first].to_vec());
    // ignore_eos runs to the limit regardless.
    let p = load(dir.path(), None).unwrap();
    let ids = p.encode_text("Good tools tell you").unwrap();
    let options = GenerateOptions {
        max_tokens: 10,
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let all = p.generate(2, &ids, &options, &mut |_| {}).unwrap();
    assert_eq!(all.token_ids, free.token_ids);
}

#[test]
fn a_missing_config_names_the_file() {
    let dir = write(&TinyModel::qwen2());
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load(dir.path(), None).err().unwrap().to_string();
    assert!(
        err.contains("config.json") && err.contains("not found"),
        "{err}"
    );
}

/// A model path that is a file, a loop of links or absent gets three different answers (the
/// first two were "not found").
#[test]
fn a_model_path_that_is_a_file_or_a_loop_of_links_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::write(&file, "root:x:0:0\n").unwrap();
    let err = ModelFolder::open(&file).err().unwrap().to_string();
    assert!(
        err.contains("passwd") && err.contains("not a folder"),
        "{err}"
    );
    #[cfg(unix)]
    {
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let err = ModelFolder::open(&a).err().unwrap().to_string();
        assert!(
            err.contains("symbolic links") && !err.contains("not found"),
            "{err}"
        );
    }
    let err = ModelFolder::open(&dir.path().join("absent"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not found (model folder)"), "{err}");
}

#[test]
fn missing_weights_are_named() {
    let dir = write(&TinyModel::qwen2());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load(dir.path(), None).err().unwrap().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("model.safetensors.index.json"),
        "{err}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let dir = write(&TinyModel::llama());
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["intermediate_size"] = 96.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load(dir.path(), None).err().unwrap().to_string();
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight"), "{err}");
    assert!(
        err.contains("[128, 64]") && err.contains("[96, 64]"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn a_truncated_weights_file_is_reported_not_read_past_its_end() {
    let dir = write(&TinyModel::qwen3());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load(dir.path(), None).err().unwrap().to_string();
    assert!(
        err.contains("truncated") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn an_unknown_architecture_is_named_and_ours_are_listed() {
    let dir = write(&TinyModel::qwen2());
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GemmaForCausalLM"]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load(dir.path(), None).err().unwrap().to_string();
    assert!(
        err.contains("\"GemmaForCausalLM\" is not supported"),
        "{err}"
    );
    for arch in [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
    ] {
        assert!(err.contains(arch), "{err}");
    }
}

#[test]
fn a_layer_range_past_the_end_is_refused() {
    let dir = write(&TinyModel::qwen3());
    let err = load(dir.path(), Some("0-1,2-4")).err().unwrap().to_string();
    assert_eq!(err, "layer range 2-4 runs past the model's 4 layers (0-3)");
    let folder = ModelFolder::open(dir.path()).unwrap();
    let err = load_stage(&folder, "3-5").err().unwrap().to_string();
    assert!(err.contains("3-5") && err.contains("4 layers"), "{err}");
    let err = load(dir.path(), Some("0-1,3-3")).err().unwrap().to_string();
    assert!(err.contains("should start at layer 2"), "{err}");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let dir = write(&TinyModel {
        max_position: 16,
        ..TinyModel::qwen3()
    });
    let p = load(dir.path(), None).unwrap();
    let ids = p
        .encode_text(
            "The weather was cold that morning. The river ran quickly under the old stone bridge.",
        )
        .unwrap();
    assert!(ids.len() > 16);
    let err = p
        .generate(1, &ids, &GenerateOptions::default(), &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("{} tokens", ids.len() + 1)) && err.contains("context length of 16"),
        "{err}"
    );
    // A prompt that fits stops at the context length with finish_reason "length".
    let short = p.encode_text("The weather").unwrap();
    let options = GenerateOptions {
        max_tokens: 100,
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let g = p.generate(2, &short, &options, &mut |_| {}).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(
        short.len() + g.token_ids.len(),
        17,
        "the last token is sampled at position 16"
    );
}

#[test]
fn stages_refuse_inputs_that_do_not_fit_them() {
    let dir = write(&TinyModel::qwen3());
    let folder = ModelFolder::open(dir.path()).unwrap();
    let first = load_stage(&folder, "0-1").unwrap();
    let second = load_stage(&folder, "2-3").unwrap();
    let err = second
        .forward(1, 0, StageInput::Tokens(vec![1, 2]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("stage 2-3") && err.contains("token ids"),
        "{err}"
    );
    let err = first
        .forward(1, 0, StageInput::Tokens(vec![100_000]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("token id 100000"), "{err}");
    let err = first
        .forward(9, 5, StageInput::Tokens(vec![1]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("sequence 9") && err.contains("no cache"),
        "{err}"
    );
    let StageOutput::Hidden(h) = first
        .forward(3, 0, StageInput::Tokens(vec![1, 2, 3]))
        .unwrap()
    else {
        panic!("first stage of two must output hidden states");
    };
    let err = second
        .forward(3, 1, StageInput::Hidden(h.clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sequence 3"), "{err}");
    let wrong = h.narrow(2, 0, 8).unwrap();
    let err = second
        .forward(3, 0, StageInput::Hidden(wrong))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("[1, 3, 8]") && err.contains("64"), "{err}");
    assert!(matches!(
        second.forward(3, 0, StageInput::Hidden(h)).unwrap(),
        StageOutput::Logits(_)
    ));
}

#[test]
fn a_sliding_window_hides_keys_older_than_the_window() {
    // With one layer and rotary positions (which only see relative distances), a query that can
    // see the last 4 tokens gives the same logits as a fresh sequence of just those 4 tokens.
    let dir = write(&TinyModel {
        layers: 1,
        sliding_window: Some(4),
        ..TinyModel::mistral()
    });
    let p = load(dir.path(), None).unwrap();
    let ids = p
        .encode_text("The weather was cold that morning by the river")
        .unwrap();
    assert!(ids.len() > 8, "{ids:?}");
    let stage = &p.stages[0];
    let logits = |seq: u64, tokens: &[u32]| -> Vec<f32> {
        match stage
            .forward(seq, 0, StageInput::Tokens(tokens.to_vec()))
            .unwrap()
        {
            StageOutput::Logits(l) => l.to_vec1().unwrap(),
            StageOutput::Hidden(_) => panic!("a one-stage model returns logits"),
        }
    };
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let whole = logits(1, &ids);
    let last4 = logits(2, &ids[ids.len() - 4..]);
    let last3 = logits(3, &ids[ids.len() - 3..]);
    assert!(
        close(&whole, &last4) < 1e-4,
        "window of 4: {}",
        close(&whole, &last4)
    );
    assert!(
        close(&whole, &last3) > 1e-3,
        "the 4th token back must still be inside the window"
    );
    // The same holds one decode step later, through the cache.
    let next = 17u32;
    let step = |seq: u64, pos: usize| match stage
        .forward(seq, pos, StageInput::Tokens(vec![next]))
        .unwrap()
    {
        StageOutput::Logits(l) => l.to_vec1::<f32>().unwrap(),
        StageOutput::Hidden(_) => panic!(),
    };
    let a = step(1, ids.len());
    let b = step(2, 4);
    assert!(
        close(&a, &b) < 1e-4,
        "decode with window: {}",
        close(&a, &b)
    );
}

#[test]
fn placement_sizes_every_stage_as_it_loads() {
    // Tied and untied heads, safetensors and GGUF: the byte profile that placement uses gives
    // each stage's weight bytes exactly as loading it does.
    for model in [TinyModel::qwen3(), TinyModel::llama()] {
        let dir = tempfile::tempdir().unwrap();
        let gguf = model
            .write_gguf(dir.path(), candle_core::quantized::GgmlDType::Q8_0)
            .unwrap();
        for path in [dir.path().to_path_buf(), gguf] {
            let folder = ModelFolder::open(&path).unwrap();
            let profile = folder.byte_profile(Some(WeightDType::F32));
            let n = folder.config.num_hidden_layers;
            assert_eq!(profile.layers(), n);
            for first in 0..n {
                for last in first..n {
                    let range = format!("{first}-{last}");
                    let stage = load_stage(&folder, &range).unwrap();
                    let r = stage.range();
                    assert_eq!(
                        profile.stage_bytes(r, r.first == 0, r.last + 1 == n),
                        stage.weight_bytes(),
                        "{} layers {range}",
                        path.display()
                    );
                }
            }
        }
    }
}

/// Opens `dir` on another thread; a reader that blocks (a FIFO) must not hang the caller.
fn open_within(dir: &Path, seconds: u64) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(
            ModelFolder::open(&owned)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        );
    });
    match rx.recv_timeout(std::time::Duration::from_secs(seconds)) {
        Ok(Err(e)) => e,
        Ok(Ok(())) => panic!("{}: opened", dir.display()),
        Err(_) => panic!("{}: opening hung for {seconds} s", dir.display()),
    }
}

#[test]
fn a_fifo_or_a_device_in_place_of_a_file_is_refused_at_once() {
    for (file, how) in [
        ("config.json", "fifo"),
        ("config.json", "zero"),
        ("tokenizer.json", "fifo"),
        ("model.safetensors", "fifo"),
        ("model.safetensors", "zero"),
    ] {
        let dir = write(&TinyModel::llama());
        let path = dir.path().join(file);
        std::fs::remove_file(&path).unwrap();
        if how == "fifo" {
            let ok = std::process::Command::new("mkfifo")
                .arg(&path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mkfifo");
        } else {
            std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        }
        let err = open_within(dir.path(), 10);
        assert!(
            err.contains(file) && err.contains("not a regular file"),
            "{file} as a {how}: {err}"
        );
    }
}
