//! The seed's promise: a host holding half the layers holds half the weights, not the whole
//! model. Loads stages of a generated ~220 MB model in separate processes and compares the
//! weights each reports and the resident memory each process gains while loading.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn agent(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clusteragent"))
        .args(args)
        .output()
        .expect("clusteragent runs");
    assert!(
        out.status.success(),
        "clusteragent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const MB: f64 = 1e6;

/// `inspect-stage` of `model` for `layers`, as JSON.
fn inspect(model: &str, layers: &str) -> serde_json::Value {
    serde_json::from_str(&agent(&[
        "inspect-stage",
        "--model",
        model,
        "--layers",
        layers,
        "--device",
        "cpu",
    ]))
    .unwrap()
}

/// A random-weight Llama-shaped model in `dir`: layers, hidden, intermediate, heads, kv heads.
fn make_llama(dir: &str, shape: [usize; 5], extra: &[&str]) {
    let shape = shape.map(|n| n.to_string());
    let mut args = vec!["make-model", "--out", dir, "--arch", "llama"];
    for (flag, value) in [
        "--layers",
        "--hidden",
        "--intermediate",
        "--heads",
        "--kv-heads",
    ]
    .into_iter()
    .zip(&shape)
    {
        args.extend([flag, value.as_str()]);
    }
    args.extend(extra);
    agent(&args);
}

/// Bytes of weights a stage reports holding.
fn bytes(v: &serde_json::Value) -> f64 {
    v["weight_bytes"].as_u64().unwrap() as f64
}

/// Resident memory the stage's process gained while loading it.
fn gained(v: &serde_json::Value) -> f64 {
    v["resident_bytes_after_load"].as_u64().unwrap() as f64
        - v["resident_bytes_before_load"].as_u64().unwrap() as f64
}

#[test]
fn half_the_layers_hold_half_the_weights_and_half_the_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let m = model.to_str().unwrap();
    make_llama(m, [16, 512, 1536, 8, 8], &["--shards", "4"]);
    let file_bytes: u64 = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        file_bytes as f64 > 200.0 * MB,
        "model is only {file_bytes} bytes"
    );
    let whole = inspect(m, "0-15");
    let first = inspect(m, "0-7");
    let second = inspect(m, "8-15");
    // Each half holds half the layers plus its end of the model (embedding or head).
    let embedding = 400.0 * 512.0 * 4.0;
    for half in [&first, &second] {
        let share = bytes(half) / bytes(&whole);
        assert!(
            (0.48..0.52).contains(&share),
            "a half stage holds {share:.3} of the weights"
        );
        assert!((bytes(half) - bytes(&whole) / 2.0).abs() < 2.0 * embedding);
        // Resident memory: its own weights plus a small overhead, far from the whole model.
        let overhead = gained(half) - bytes(half);
        assert!(
            overhead < 40.0 * MB,
            "half stage gained {:.0} MB for {:.0} MB of weights",
            gained(half) / MB,
            bytes(half) / MB
        );
        assert!(
            gained(half) < 0.65 * bytes(&whole),
            "half stage gained {:.0} MB",
            gained(half) / MB
        );
    }
    eprintln!(
        "memory: model {:.0} MB on disk; whole stage {:.0} MB weights, +{:.0} MB resident; \
         layers 0-7 {:.0} MB weights, +{:.0} MB resident; layers 8-15 {:.0} MB weights, +{:.0} MB resident",
        file_bytes as f64 / MB,
        bytes(&whole) / MB,
        gained(&whole) / MB,
        bytes(&first) / MB,
        gained(&first) / MB,
        bytes(&second) / MB,
        gained(&second) / MB,
    );
    // On Linux the report says how much sits in huge pages (see the stage test below for what
    // it should be); elsewhere it says nothing rather than 0.
    assert_eq!(
        whole["huge_page_bytes_after_load"].is_u64(),
        cfg!(target_os = "linux"),
        "{whole}"
    );
    // Only the shards holding a stage's tensors are opened.
    let files = |v: &serde_json::Value| v["files"].as_array().unwrap().len();
    assert_eq!(files(&whole), 4);
    assert!(
        files(&first) <= 3 && files(&second) <= 3,
        "{first} {second}"
    );
}

#[test]
fn half_the_layers_of_a_q4_k_gguf_hold_half_its_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let m = model.to_str().unwrap();
    make_llama(m, [16, 512, 1536, 8, 8], &["--gguf", "q4_k"]);
    let gguf = model.join("model.gguf");
    let g = gguf.to_str().unwrap();
    let file_bytes = std::fs::metadata(&gguf).unwrap().len() as f64;
    let whole = inspect(g, "0-15");
    let first = inspect(g, "0-7");
    // Quantized weights are held at their size in the file (the small embedding is dequantized).
    assert!(
        bytes(&whole) < 1.1 * file_bytes,
        "whole stage holds {} for a {file_bytes}-byte file",
        bytes(&whole)
    );
    let share = bytes(&first) / bytes(&whole);
    assert!(
        (0.45..0.55).contains(&share),
        "half the layers hold {share:.3} of the bytes"
    );
    assert!(
        gained(&first) < bytes(&first) + 40.0 * MB,
        "gained {:.1} MB for {:.1} MB",
        gained(&first) / MB,
        bytes(&first) / MB
    );
    eprintln!(
        "memory (Q4_K GGUF, {:.0} MB file): whole stage {:.1} MB held, +{:.1} MB resident; layers 0-7 {:.1} MB held, +{:.1} MB resident",
        file_bytes / MB,
        bytes(&whole) / MB,
        gained(&whole) / MB,
        bytes(&first) / MB,
        gained(&first) / MB
    );
}

/// A quantized stage holds its blocks once: its first products (a prefill, decode steps) add
/// no copy of them. candle repacked Q4_K, Q6_K (on a product of several rows) and, with VNNI,
/// Q8_0 matrices into a second copy 1.0-1.5x their size the first time it multiplied them. A
/// stage repacks its matrices at load instead (every format here, Q3_K growing by its decoded
/// scales), which must not keep the file's blocks beside the repacked ones.
#[test]
fn a_quantized_stage_holds_its_blocks_once_after_its_first_products() {
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["q4_k", "q6_k", "q8_0", "q4_0", "q5_1", "q3_k"] {
        let model = tmp.path().join(kind);
        let m = model.to_str().unwrap();
        make_llama(m, [8, 1024, 2816, 8, 8], &["--gguf", kind]);
        let gguf = model.join("model.gguf");
        let v = inspect(gguf.to_str().unwrap(), "0-7");
        let held = bytes(&v);
        let forward = v["resident_bytes_after_forward"].as_u64().unwrap() as f64
            - v["resident_bytes_after_load"].as_u64().unwrap() as f64;
        eprintln!(
            "{kind}: {:.1} MB of weights held, +{:.1} MB resident after loading; the first \
             products added {:.1} MB resident",
            held / MB,
            gained(&v) / MB,
            forward / MB
        );
        // A second copy of the blocks would add as much again as is held (58-110 MB here).
        assert!(
            gained(&v) < held + 40.0 * MB,
            "{kind}: loading gained {:.1} MB for {:.1} MB of weights",
            gained(&v) / MB,
            held / MB
        );
        // The KV cache of 36 positions, activations and scratch: a few MB.
        assert!(
            forward < 0.1 * held + 16.0 * MB,
            "{kind}: the first products added {:.1} MB to a stage of {:.1} MB of weights",
            forward / MB,
            held / MB
        );
    }
}

/// A field of `/proc/PID/smaps_rollup`, in bytes.
#[cfg(target_os = "linux")]
fn smaps_bytes(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A stage process, started as a user starts one, holds its weights in huge pages when the
/// kernel offers them on request (`madvise`, as most distributions ship): a decode step reads
/// every weight, and with 4 KiB pages it was 40% slower on this project's VM. The stage loads
/// its weights on a worker thread (whose allocations must land in the advised heap too); with
/// `CLUSTERAGENT_HUGE_PAGES=off` the same process gets none, which shows what gave them.
#[cfg(target_os = "linux")]
#[test]
fn a_stage_holds_its_weights_in_huge_pages_when_the_kernel_offers_them() {
    use std::time::{Duration, Instant};

    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let m = model.to_str().unwrap();
    make_llama(m, [4, 768, 2048, 12, 4], &[]);
    let weights = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = tmp.path().join("ring.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "pipeline": "huge", "generation": 1, "model": m, "device": "cpu", "dtype": "f32",
            "token": "t", "stages": [{"node": "a", "address": format!("127.0.0.1:{port}"), "layers": "0-3"}],
        })
        .to_string(),
    )
    .unwrap();
    let held = |off: bool| -> u64 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clusteragent"));
        cmd.args([
            "stage",
            "--config",
            config.to_str().unwrap(),
            "--index",
            "0",
        ])
        .env_remove("GLIBC_TUNABLES")
        .stderr(std::process::Stdio::null());
        if off {
            cmd.env("CLUSTERAGENT_HUGE_PAGES", "off");
        }
        let mut child = cmd.spawn().unwrap();
        let started = Instant::now();
        while smaps_bytes(child.id(), "Rss") < weights * 9 / 10 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the stage did not load its {weights} bytes of weights within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let huge = smaps_bytes(child.id(), "AnonHugePages");
        let _ = child.kill();
        let _ = child.wait();
        huge
    };
    let (on, off) = (held(false), held(true));
    eprintln!(
        "huge pages ({}): {:.0} MB of {:.0} MB of weights, {:.0} MB with CLUSTERAGENT_HUGE_PAGES=off",
        mode.trim(),
        on as f64 / MB,
        weights as f64 / MB,
        off as f64 / MB
    );
    if mode.contains("[madvise]") {
        assert!(
            on >= weights / 2,
            "only {on} of {weights} bytes in huge pages"
        );
        assert!(
            off < weights / 10,
            "{off} bytes in huge pages with the advice turned off"
        );
    } else if mode.contains("[always]") {
        assert!(
            on >= weights / 2,
            "only {on} of {weights} bytes in huge pages"
        );
    } else {
        assert_eq!(
            on, 0,
            "huge pages in use although the kernel's mode is {mode:?}"
        );
    }
}
