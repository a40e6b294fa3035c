//! A stage that is alive but makes no progress: its pass runs far past its recent ones (a wedged
//! device, stood in for by the pass-time test hook). It is reported stalled once the pass runs
//! past ten times its slowest recent pass (at least 5 s), its streams fail saying so, and the
//! ring serves again by itself when the pass ends. A pipeline's bound on the first token fails
//! a request that waits longer, saying why.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Ring, RingOptions, make_model, one_process};

#[test]
fn a_wedged_pass_is_reported_stalled_and_the_ring_serves_again_when_it_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "llama");
    // Stage 1: the warm-up, a prefill and two decode steps take 20 ms; the next pass 8 s.
    let ring = Ring::start_opts(
        &model,
        &["0-1", "2-3"],
        RingOptions {
            env: vec![(1, "CLUSTERAGENT_TEST_PASS_MS", "20,20,20,20,8000,20".into())],
            ..RingOptions::default()
        },
    );
    let (status, lines) =
        ring.stream(&json!({"prompt": "wedge me", "max_tokens": 50, "ignore_eos": true}));
    assert_eq!(status, 200);
    let started = Instant::now();
    let events: Vec<Value> = lines.collect();
    let waited = started.elapsed();
    let tokens = events.iter().filter(|e| e["event"] == "token").count();
    let last = events.last().unwrap();
    let message = last["message"].as_str().unwrap_or_default();
    eprintln!("{tokens} tokens, then after {waited:?}: {message}");
    assert_eq!(tokens, 3, "{events:?}");
    assert_eq!(last["event"], "error", "{last}");
    assert!(
        message.starts_with("stage 1 (node-1 at")
            && message.contains("is stalled: its forward pass of 1 token has run for 5.")
            && message.contains("past the 5.00 s allowed (10x its slowest recent pass of"),
        "{message}"
    );
    assert!(
        waited < Duration::from_secs(8),
        "the stall was reported after {waited:?}, not within its bound"
    );
    // While the pass runs, requests are refused, saying why.
    let (status, mut lines) = ring.stream(&json!({"prompt": "hello", "max_tokens": 4}));
    assert_eq!(status, 503);
    let body = lines.next().unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("is stalled"),
        "{body}"
    );
    // The pass ends: the ring serves again, with nothing re-applied or restarted.
    ring.wait_up(Duration::from_secs(30));
    let (ids, last) =
        ring.generate(&json!({"prompt": "What is the capital of France?", "max_tokens": 8}));
    assert_eq!(last["event"], "done", "{last}");
    assert_eq!(
        ids,
        one_process(&model, "What is the capital of France?", 8)
    );
    ring.wait_idle();
}

#[test]
fn a_first_token_past_the_pipelines_bound_fails_saying_why() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "qwen3");
    // The warm-up and the first request's prefill take 3 s at stage 1; later passes 20 ms.
    let ring = Ring::start_opts(
        &model,
        &["0-1", "2-3"],
        RingOptions {
            first_token_timeout_ms: Some(1500),
            env: vec![(1, "CLUSTERAGENT_TEST_PASS_MS", "3000,3000,20".into())],
            ..RingOptions::default()
        },
    );
    let started = Instant::now();
    let (status, lines) = ring.stream(&json!({"prompt": "Be quick about it", "max_tokens": 4}));
    assert_eq!(status, 200);
    let events: Vec<Value> = lines.collect();
    let waited = started.elapsed();
    let last = events.last().unwrap();
    let message = last["message"].as_str().unwrap_or_default();
    eprintln!("after {waited:?}: {message}");
    assert_eq!(last["event"], "error", "{events:?}");
    assert!(
        message.starts_with(
            "no first token within 1.5 s, the pipeline's firstTokenTimeout: stage 0 had run "
        ) && message.contains(" of the prompt's "),
        "{message}"
    );
    assert!(waited < Duration::from_secs(3), "failed after {waited:?}");
    // Nothing is broken: the next request, on fast passes, is served.
    let (ids, last) = ring.generate(&json!({"prompt": "Be quick about it", "max_tokens": 4}));
    assert_eq!(last["event"], "done", "{last}");
    assert_eq!(ids, one_process(&model, "Be quick about it", 4));
    ring.wait_idle();
}
