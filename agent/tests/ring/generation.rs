//! Rings of 2 and 3 processes generate exactly the one-process engine's greedy tokens, one
//! sequence at a time and eight at once.

use std::path::Path;

use serde_json::json;

use crate::harness::{Ring, make_model, one_process};

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

#[test]
fn a_three_stage_ring_generates_the_one_process_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "qwen3");
    check_ring(&model, &["0-0", "1-2", "3-3"]);
}

#[test]
fn eight_concurrent_sequences_each_match_their_one_process_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "qwen2");
    let ring = Ring::start(&model, &["0-1", "2-3"], 16);
    let cases: Vec<(String, usize)> = (0..8)
        .map(|i| {
            let prompt = format!(
                "{} {}",
                PROMPTS[i % 4],
                "and then some more words ".repeat(i)
            );
            (prompt, 10 + 5 * i)
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
