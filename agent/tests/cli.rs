//! `clusteragent` as a user runs it: the real binary, real model folders on disk.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clusteragent"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("clusteragent runs")
}

fn ok(args: &[&str]) -> String {
    let out = agent(args);
    assert!(
        out.status.success(),
        "clusteragent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn make_model(dir: &Path, extra: &[&str]) {
    let mut args = vec!["make-model", "--out", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(&args);
}

#[test]
fn generate_through_split_stages_gives_the_one_stage_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    make_model(&model, &["--arch", "llama", "--shards", "2"]);
    let m = model.to_str().unwrap();
    let run = |split: Option<&str>| -> serde_json::Value {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max-tokens",
            "20",
            "--ignore-eos",
            "--json",
            "--device",
            "cpu",
        ];
        if let Some(s) = split {
            args.extend_from_slice(&["--split", s]);
        }
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let whole = run(None);
    assert_eq!(whole["token_ids"].as_array().unwrap().len(), 20);
    assert_eq!(whole["finish_reason"], "length");
    for key in [
        "prompt_tokens_per_s",
        "decode_tokens_per_s",
        "time_to_first_token_ms",
    ] {
        assert!(
            whole["timings"][key].as_f64().unwrap() > 0.0,
            "{key}: {whole}"
        );
    }
    for split in ["0-1,2-3", "0-0,1-1,2-2,3-3", "0-2,3-3"] {
        let v = run(Some(split));
        assert_eq!(v["token_ids"], whole["token_ids"], "split {split}");
        assert_eq!(v["prompt_token_ids"], whole["prompt_token_ids"]);
        assert_eq!(
            v["stages"].as_array().unwrap().len(),
            split.split(',').count()
        );
    }
    // Streaming prints the same text the JSON reports.
    let streamed = ok(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-tokens",
        "20",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    assert_eq!(
        streamed.trim_end_matches('\n'),
        whole["text"].as_str().unwrap()
    );
}

#[test]
fn errors_name_the_problem_and_set_the_exit_code() {
    let out = agent(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model") && err.contains("not found"),
        "{err}"
    );

    let out = agent(&[
        "generate", "--model", "x", "--prompt", "hi", "--device", "tpu",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"tpu\""));

    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    make_model(&model, &[]);
    let m = model.to_str().unwrap();
    let out = agent(&[
        "generate", "--model", m, "--prompt", "hi", "--split", "0-1,2-5",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("layer range 2-5 runs past the model's 4 layers (0-3)"),
        "{err}"
    );

    let out = agent(&[
        "generate", "--model", m, "--prompt", "hi", "--device", "cuda",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("built without the `cuda` feature"));

    let out = agent(&["make-model", "--out", m]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));
}

#[test]
fn the_committed_demo_model_answers_in_the_words_of_the_docs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("demo/model");
    let out = ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What does the ring do?",
        "--max-tokens",
        "48",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(!text.contains('\u{fffd}'), "{text}");
    // Legible: words, most of which the documentation uses (random weights give neither).
    let docs = std::fs::read_to_string(root.join("README.md")).unwrap();
    let words: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| w.len() >= 4)
        .collect();
    let known = words.iter().filter(|w| docs.contains(*w)).count();
    assert!(words.len() >= 8 && known * 10 >= words.len() * 8, "{text}");
}
