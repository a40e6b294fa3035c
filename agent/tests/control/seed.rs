//! The seed's own case, at its real size: a model of Qwen3-1.7B's shape in bf16 (28 layers,
//! hidden 2048, 151,936 embedding rows, 3.4 GB, the real Qwen tokenizer) split 0-13 / 14-27 over
//! two agents on this machine's CPU. `apply --wait` returns once the pipeline serves; five
//! completions in a row all answer, the first with the one-process text; and each agent's peak
//! resident memory stays within 1.10x its share of the weights plus 300 MB.
//!
//! The model is written once (12 s, 3.4 GB) under the target directory and reused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

const MB: f64 = 1e6;

/// The seed-shaped model, written on first use. A marker written last tells a complete model
/// from one a killed run left half-written.
fn seed_model(data: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seed-qwen3-1.7b-bf16-v1");
    let done = dir.join("written");
    if done.is_file() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let started = Instant::now();
    let tokenizer = data.join("qwen-tokenizer");
    let out = Command::new(env!("CARGO_BIN_EXE_clusteragent"))
        .args([
            "make-model",
            "--out",
            dir.to_str().unwrap(),
            "--arch",
            "qwen3",
        ])
        .args([
            "--layers",
            "28",
            "--hidden",
            "2048",
            "--intermediate",
            "6144",
        ])
        .args(["--heads", "16", "--kv-heads", "8", "--head-dim", "128"])
        .args(["--bf16", "--max-position", "40960", "--shards", "2"])
        .args(["--tokenizer-from", tokenizer.to_str().unwrap()])
        .args(["--vocab-size", "151936"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&done, b"").unwrap();
    eprintln!(
        "wrote the seed-shaped model in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    dir
}

/// The most resident memory process `pid` has had (`VmHWM`), in bytes.
fn peak_resident(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024.0
}

#[test]
#[cfg(target_os = "linux")]
fn the_seeds_shape_serves_five_requests_in_a_row_within_its_memory_bound() {
    let Some(data) = shared_data() else { return };
    let model = seed_model(&data);
    let c = Cluster::start(2, &[]);
    let port = free_port();
    let manifest = format!(
        "{}{}",
        c.nodes_yaml(),
        pipeline_yaml(&model, &[("node-0", "0-13"), ("node-1", "14-27")], port)
    );
    let started = Instant::now();
    let out = c.apply_wait_within(0, "seed.yaml", &manifest, 600);
    assert!(out.contains("pipeline/tiny-pipe ready"), "{out}");
    let ready = started.elapsed();

    let prompt = "The two machines on the shelf share one model";
    let reference = one_process_json(&model, prompt, 4, false);
    let agent = http_client(Duration::from_secs(300));
    let mut times = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let mut resp = agent
            .post(&format!("http://127.0.0.1:{port}/v1/completions"))
            .send_json(
                json!({"model": "tiny-pipe", "prompt": prompt, "max_tokens": 4, "temperature": 0}),
            )
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.body_mut().read_json().unwrap();
        assert_eq!(status, 200, "request {i}: {body}\n{}", c.logs());
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
        assert_eq!(
            body["choices"][0]["text"], reference["text"],
            "request {i} differs from the one-process text"
        );
        times.push(t.elapsed().as_secs_f64());
    }

    let status = c.get(0, "/api/v1/pipelines/tiny-pipe");
    let mut report = Vec::new();
    for i in 0..2 {
        let share = status["status"]["stages"][i]["memoryBytes"]
            .as_f64()
            .unwrap();
        let peak = peak_resident(c.pid(i));
        let bound = 1.10 * share + 300.0 * MB;
        report.push(format!(
            "stage {i}: share {:.0} MB, peak resident {:.0} MB, bound {:.0} MB",
            share / MB,
            peak / MB,
            bound / MB
        ));
        assert!(
            share > 1500.0 * MB,
            "stage {i} holds only {share} bytes: not the seed's shape"
        );
        assert!(peak <= bound, "{}", report.join("; "));
    }
    eprintln!(
        "seed's shape, 2 agents: Ready in {:.1} s; 5 completions of 4 tokens in {:?} s; {}",
        ready.as_secs_f64(),
        times.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>(),
        report.join("; ")
    );
}
