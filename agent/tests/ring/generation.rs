//! Rings of 2 and 3 processes generate exactly the one-process engine's greedy tokens, one
//! sequence at a time and eight at once.

use std::path::Path;

use serde_json::json;

use crate::common::python_has;
use crate::harness::{Ring, make_model, make_model_with, one_process};

const PROMPTS: [&str; 4] = [
    "Hi",
    "What is the capital of France?",
    "The two machines sat side by side on the shelf, joined by a short cable. Each one held half of the model.",
    "Questions and answers: How many days are in a week? There are seven days in a week. Which number comes after nine?",
];

fn check_ring(model: &Path, split: &[&str]) {
    // A prefill chunk of 8 tokens splits the longer prompts into several chunks.
    let ring = Ring::start(model, split, 8);
    for prompt in PROMPTS {
        let expected = one_process(model, prompt, 24);
        let (ids, last) = ring.generate(&json!({"prompt": prompt, "max_tokens": 24}));
        assert_eq!(ids, expected, "split {split:?}, prompt {prompt:?}");
        assert_eq!(last["event"], "done", "{last}");
        assert_eq!(last["completion_tokens"], expected.len());
    }
}

#[test]
fn a_two_stage_ring_generates_the_one_process_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "llama");
    check_ring(&model, &["0-1", "2-3"]);
}

/// Between requests a ring costs its hosts nothing: the compute threads poll for work only in
/// the few milliseconds after a step, not after each probe that passes every 200 ms (which
/// once kept each idle stage busy a tenth of the time).
#[cfg(target_os = "linux")]
#[test]
fn an_idle_ring_leaves_the_cpu_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "llama");
    let ring = Ring::start(&model, &["0-1", "2-3"], 8);
    let (ids, _) = ring.generate(&json!({"prompt": "Hi", "max_tokens": 8}));
    assert_eq!(ids, one_process(&model, "Hi", 8));
    ring.wait_idle();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = [ring.cpu_seconds(0), ring.cpu_seconds(1)];
    std::thread::sleep(std::time::Duration::from_secs(3));
    for (i, was) in before.into_iter().enumerate() {
        let used = ring.cpu_seconds(i) - was;
        assert!(
            used < 0.12,
            "idle stage {i} used {used:.2} s of CPU in 3 s (probes pass every 200 ms)"
        );
    }
}

#[test]
fn a_three_stage_ring_generates_the_one_process_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "qwen3");
    check_ring(&model, &["0-0", "1-2", "3-3"]);
}

#[test]
fn sixteen_concurrent_sequences_each_match_their_one_process_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "qwen2");
    let ring = Ring::start(&model, &["0-1", "2-3"], 16);
    // Batches of up to 16 decode steps: past 4 rows a pass leaves `matvec` for the general
    // product, and every sequence must still get exactly its one-process tokens.
    let cases: Vec<(String, usize)> = (0..16)
        .map(|i| {
            let prompt = format!(
                "{} {}",
                PROMPTS[i % 4],
                "and then some more words ".repeat(i % 8)
            );
            (prompt, 10 + 3 * i)
        })
        .collect();
    let expected: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, n)| one_process(&model, p, *n))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(prompt, n)| {
                let ring = &ring;
                s.spawn(move || ring.generate(&json!({"prompt": prompt, "max_tokens": n})).0)
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), expected[i], "sequence {i}");
        }
    });
    let health = ring.health().unwrap();
    assert_eq!(health["sequences"], 0, "{health}");
    // Stage 0 groups the sequences' decode steps into batched passes (one pass per chunk or
    // per group); one step per pass would mean every sequence went alone.
    let metrics = &health["metrics"];
    let (passes, steps) = (
        metrics["compute_passes"].as_f64().unwrap(),
        metrics["compute_steps"].as_f64().unwrap(),
    );
    assert!(
        steps >= 1.5 * passes,
        "{steps} steps in {passes} passes: {health}"
    );
}

#[test]
fn a_caller_that_goes_away_cancels_its_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "llama");
    let ring = Ring::start(&model, &["0-1", "2-3"], 64);
    let (status, mut lines) =
        ring.stream(&json!({"prompt": "Hi", "max_tokens": 4000, "ignore_eos": true}));
    assert_eq!(status, 200);
    for _ in 0..5 {
        assert_eq!(lines.next().unwrap()["event"], "token");
    }
    let during = ring.health().unwrap();
    assert_eq!(during["sequences"], 1, "{during}");
    assert_eq!(during["cached_sequences"], 1, "{during}");
    drop(lines); // closes the connection
    let start = std::time::Instant::now();
    loop {
        let h = ring.health().unwrap();
        if h["sequences"] == 0 && h["cached_sequences"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(3),
            "sequence not cancelled: {h}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The ring serves the next caller as before.
    let (ids, _) = ring.generate(&json!({"prompt": "Hi", "max_tokens": 8}));
    assert_eq!(ids, one_process(&model, "Hi", 8));
}

#[test]
fn bad_requests_are_refused_and_a_full_ring_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "qwen3");
    let mut ring = Ring::start_with(&model, &["0-1", "2-3"], 64, 1);
    let refused = |body: serde_json::Value| -> (u16, String) {
        let (status, mut lines) = ring.stream(&body);
        let first = lines.next().unwrap_or_default();
        (
            status,
            first["error"].as_str().unwrap_or_default().to_string(),
        )
    };
    let (s, m) = refused(json!({"prompt": "", "max_tokens": 4}));
    assert_eq!((s, m.contains("empty")), (400, true), "{m}");
    let (s, m) = refused(json!({"prompt": "a", "prompt_ids": [1], "max_tokens": 4}));
    assert_eq!((s, m.contains("exactly one")), (400, true), "{m}");
    let (s, m) = refused(json!({"prompt": "a", "max_tokens": 0}));
    assert_eq!((s, m.contains("max_tokens")), (400, true), "{m}");
    let (s, m) = refused(json!({"prompt": "a", "sampling": {"temperature": -1}}));
    assert_eq!((s, m.contains("temperature")), (400, true), "{m}");
    let (s, m) = refused(json!({"prompt": "a", "max_tokenz": 3}));
    assert_eq!((s, m.contains("max_tokenz")), (400, true), "{m}");

    // A token the model does not have fails in stage 0's compute: the error names the stage.
    let (status, lines) = ring.stream(&json!({"prompt_ids": [1, 999_999], "max_tokens": 4}));
    assert_eq!(status, 200);
    let events: Vec<_> = lines.collect();
    let message = events.last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("stage 0 (node-0 at") && message.contains("999999"),
        "{message}"
    );

    // maxSequences is 1: while one sequence runs, the next is refused with 429.
    let (status, mut running) =
        ring.stream(&json!({"prompt": "Hi", "max_tokens": 4000, "ignore_eos": true}));
    assert_eq!(status, 200);
    assert_eq!(running.next().unwrap()["event"], "token");
    let (s, m) = refused(json!({"prompt": "Hi", "max_tokens": 4}));
    assert_eq!((s, m.contains("limit of 1 sequences")), (429, true), "{m}");
    drop(running);
    ring.wait_idle();
    let (ids, _) = ring.generate(&json!({"prompt": "Hi", "max_tokens": 6}));
    assert_eq!(ids, one_process(&model, "Hi", 6));
    ring.kill_stage(1);
}

#[test]
fn a_gguf_model_runs_through_the_ring_as_in_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make_model_with(
        &dir,
        "qwen2",
        &["--hidden", "256", "--intermediate", "512", "--gguf", "q4_k"],
    );
    let gguf = dir.join("model.gguf");
    let ring = Ring::start(&gguf, &["0-1", "2-3"], 64);
    for prompt in ["Hi", "What is the capital of France?"] {
        let (ids, last) = ring.generate(&json!({"prompt": prompt, "max_tokens": 16}));
        assert_eq!(last["event"], "done", "{last}");
        assert_eq!(ids, one_process(&gguf, prompt, 16), "prompt {prompt:?}");
    }
}

#[test]
fn a_gguf_written_by_llama_cpps_own_writer_runs_through_the_ring() {
    if !python_has("gguf") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make_model_with(&dir, "llama", &["--hidden", "256", "--intermediate", "512"]);
    let gguf = dir.join("llamacpp-q8_0.gguf");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tools/hf_to_gguf.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([dir.to_str().unwrap(), gguf.to_str().unwrap(), "q8_0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ring = Ring::start(&gguf, &["0-1", "2-3"], 64);
    for prompt in ["Hi", "The river ran quickly under the old stone bridge."] {
        let expected = crate::harness::one_process_with(&gguf, prompt, 16, true);
        assert_eq!(expected.len(), 16);
        let (ids, _) =
            ring.generate(&json!({"prompt": prompt, "max_tokens": 16, "ignore_eos": true}));
        assert_eq!(ids, expected, "prompt {prompt:?}");
    }
}

/// A long prompt admitted while other sequences decode does not stop them: stage 0 runs a
/// decode pass of theirs between two chunks of its prefill, and sizes the chunks by their pass
/// time. Every sequence, the long one included, still gets the one-process tokens (a prompt's
/// logits do not depend on where its chunks end).
#[test]
fn a_long_prompt_admitted_while_others_decode_lets_them_and_a_later_prompt_go_on() {
    use std::time::Instant;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model_with(
        &model,
        "llama",
        &["--hidden", "128", "--intermediate", "256"],
    );
    let ring = Ring::start(&model, &["0-1", "2-3"], 128);
    let long_prompt = "The two machines sat side by side on the shelf. ".repeat(80);
    let short: Vec<String> = (0..3).map(|i| format!("{} {i}", PROMPTS[i])).collect();
    let expected_short: Vec<Vec<u32>> = short
        .iter()
        .map(|p| crate::harness::one_process_with(&model, p, 1500, true))
        .collect();
    let expected_long = one_process(&model, &long_prompt, 6);
    let late_prompt = PROMPTS[3];
    let expected_late = one_process(&model, late_prompt, 4);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let streams: Vec<_> = short
            .iter()
            .map(|prompt| {
                let (status, lines) =
                    ring.stream(&json!({"prompt": prompt, "max_tokens": 1500, "ignore_eos": true}));
                assert_eq!(status, 200);
                let tx = tx.clone();
                s.spawn(move || {
                    let mut ids = Vec::new();
                    let mut times = Vec::new();
                    for event in lines {
                        if event["event"] != "token" {
                            break;
                        }
                        ids.push(event["id"].as_u64().unwrap() as u32);
                        times.push(Instant::now());
                        if ids.len() == 20 {
                            tx.send(()).unwrap();
                        }
                    }
                    (ids, times)
                })
            })
            .collect();
        for _ in 0..3 {
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .expect("every stream decodes");
        }
        let sent = Instant::now();
        let (status, lines) = ring.stream(&json!({"prompt": long_prompt, "max_tokens": 6}));
        assert_eq!(status, 200);
        // A short prompt that comes while the long one is prefilled takes turns with its
        // chunks: it does not wait for the whole prefill.
        let late = s.spawn(|| {
            let (status, lines) = ring.stream(&json!({"prompt": late_prompt, "max_tokens": 4}));
            assert_eq!(status, 200);
            let sent = Instant::now();
            let mut ids = Vec::new();
            let mut first = None;
            for event in lines {
                if event["event"] != "token" {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                ids.push(event["id"].as_u64().unwrap() as u32);
            }
            (sent, first.expect("the late prompt's first token"), ids)
        });
        let mut long_ids = Vec::new();
        let mut first_token = None;
        let mut prompt_tokens = 0;
        for event in lines {
            match event["event"].as_str() {
                Some("token") => {
                    first_token.get_or_insert_with(Instant::now);
                    long_ids.push(event["id"].as_u64().unwrap() as u32);
                }
                Some("done") => {
                    prompt_tokens = event["prompt_tokens"].as_u64().unwrap_or(0);
                    break;
                }
                _ => panic!("the long prompt failed: {event}"),
            }
        }
        let first_token = first_token.expect("the long prompt's first token");
        assert_eq!(long_ids, expected_long, "the long prompt's tokens");
        let (late_sent, late_first, late_ids) = late.join().unwrap();
        assert_eq!(late_ids, expected_late, "the late prompt's tokens");
        assert!(
            late_sent < first_token,
            "the long prompt's prefill ended before the late prompt was admitted: this test needs a longer prompt"
        );
        eprintln!(
            "late prompt: first token after {:?}; the long prompt's after {:?} more",
            late_first - late_sent,
            first_token.saturating_duration_since(late_first)
        );
        assert!(
            late_first < first_token,
            "a short prompt admitted during a {prompt_tokens}-token prefill got its first token {:?} after the long prompt's: it waited for the whole prefill",
            late_first - first_token
        );
        for (i, h) in streams.into_iter().enumerate() {
            let (ids, times) = h.join().unwrap();
            assert_eq!(ids, expected_short[i], "stream {i}");
            // Tokens the stream got while the long prompt was prefilled: with the prompt's chunks
            // run back to back, as before, the 2 or 3 tokens already on their way (4 at most in
            // runs of this test); with a decode pass between chunks, 23 to 83.
            let during = times
                .iter()
                .filter(|t| **t > sent && **t < first_token)
                .count();
            eprintln!(
                "stream {i}: {during} tokens during the long prefill of {:?}",
                first_token - sent
            );
            assert!(
                during >= 10,
                "stream {i} got {during} tokens in the {:?} the {prompt_tokens}-token prompt's prefill took",
                first_token - sent
            );
        }
    });
}
