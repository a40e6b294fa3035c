//! Faults: a stage killed in the middle of streams, and connections that are not a
//! predecessor's (wrong token, wrong version, bad magic, oversized or truncated frames).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clusteragent::ring::frame::{Frame, FrameKind, FrameReader, MAX_BODY_BYTES};
use clusteragent::ring::handshake::{self, RingIdentity};
use serde_json::json;

use crate::harness::{Ring, TOKEN, make_model, one_process};

#[test]
fn killing_a_stage_ends_every_stream_within_two_seconds_and_a_restart_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "llama");
    let mut ring = Ring::start(&model, &["0-0", "1-2", "3-3"], 64);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut streams = Vec::new();
    for i in 0..4 {
        let (status, lines) = ring.stream(
            &json!({"prompt": format!("stream {i}"), "max_tokens": 4000, "ignore_eos": true}),
        );
        assert_eq!(status, 200);
        let tx = tx.clone();
        streams.push(std::thread::spawn(move || {
            let mut tokens = 0;
            for event in lines {
                match event["event"].as_str() {
                    Some("token") => {
                        tokens += 1;
                        if tokens == 5 {
                            tx.send(()).unwrap();
                        }
                    }
                    _ => return (tokens, event, Instant::now()),
                }
            }
            (tokens, serde_json::Value::Null, Instant::now())
        }));
    }
    for _ in 0..4 {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("every stream produces tokens");
    }
    let killed_at = Instant::now();
    ring.kill_stage(1);
    for s in streams {
        let (tokens, last, ended_at) = s.join().unwrap();
        assert!((5..4000).contains(&tokens), "{tokens} tokens");
        assert_eq!(last["event"], "error", "{last}");
        let message = last["message"].as_str().unwrap();
        assert!(message.contains("stage 1 (node-1 at"), "{message}");
        let waited = ended_at.duration_since(killed_at);
        assert!(
            waited < Duration::from_secs(2),
            "a stream ended {waited:?} after the kill"
        );
    }
    // While stage 1 is down, new requests are refused at once, saying why.
    let (status, mut lines) = ring.stream(&json!({"prompt": "hello", "max_tokens": 4}));
    assert_eq!(status, 503);
    let body = lines.next().unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("pipeline test-ring is not serving: stage 1 (node-1 at"),
        "{body}"
    );
    // Back up without restarting the other stages.
    ring.spawn_stage(1);
    ring.wait_up(Duration::from_secs(30));
    let (ids, last) =
        ring.generate(&json!({"prompt": "What is the capital of France?", "max_tokens": 12}));
    assert_eq!(last["event"], "done", "{last}");
    assert_eq!(
        ids,
        one_process(&model, "What is the capital of France?", 12)
    );
}

/// Expects the server to close the connection within a few seconds, whatever it says first.
fn assert_closed(mut s: TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue, // a Refuse frame, then the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: connection not closed: {e}"),
        }
    }
}

#[test]
fn connections_that_are_not_the_predecessor_are_refused_while_the_ring_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    make_model(&model, "qwen3");
    let ring = Ring::start(&model, &["0-1", "2-3"], 64);
    let target = ring.stage_address(1);
    let expected = one_process(&model, "Good tools tell you what went wrong", 400);

    // A long generation runs through stage 1 the whole time.
    let (status, lines) =
        ring.stream(&json!({"prompt": "Good tools tell you what went wrong", "max_tokens": 400}));
    assert_eq!(status, 200);
    let running = std::thread::spawn(move || lines.collect::<Vec<_>>());

    // Wrong token: the real handshake, refused.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(&target).await.unwrap();
        let (r, mut w) = stream.into_split();
        let id = RingIdentity {
            pipeline: "test-ring".into(),
            generation: 3,
            token: "not-the-token".into(),
        };
        handshake::connect(&mut FrameReader::new(r), &mut w, &id, 0).await
    });
    let err = refused.unwrap_err().to_string();
    assert!(
        err.contains("could not prove it knows the cluster token"),
        "{err}"
    );
    // The right token but a stale placement generation.
    let stale = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(&target).await.unwrap();
        let (r, mut w) = stream.into_split();
        let id = RingIdentity {
            pipeline: "test-ring".into(),
            generation: 2,
            token: TOKEN.into(),
        };
        handshake::connect(&mut FrameReader::new(r), &mut w, &id, 0).await
    });
    assert!(
        stale
            .unwrap_err()
            .to_string()
            .contains("generation 2 does not match")
    );

    let hello = Frame::new(FrameKind::Hello, "test-ring", 3, 0)
        .with_meta(r#"{"from":0,"nonce":"00"}"#)
        .encode();

    // Another protocol version.
    let mut wrong_version = hello.to_vec();
    wrong_version[4..6].copy_from_slice(&99u16.to_le_bytes());
    let mut s = TcpStream::connect(&target).unwrap();
    s.write_all(&wrong_version).unwrap();
    assert_closed(s, "wrong version");

    // Not our magic at all.
    let mut s = TcpStream::connect(&target).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(s, "bad magic");

    // A length over the cap: refused before anything is allocated for it.
    let mut huge = hello[..12].to_vec();
    huge[8..12].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
    let mut s = TcpStream::connect(&target).unwrap();
    s.write_all(&huge).unwrap();
    assert_closed(s, "length over the cap");

    // A hello announcing a body within the cap of frames but over a handshake's: refused from
    // its header, at once, rather than after waiting for (and making room for) 64 MiB.
    let mut big = hello[..12].to_vec();
    big[8..12].copy_from_slice(&MAX_BODY_BYTES.to_le_bytes());
    let mut s = TcpStream::connect(&target).unwrap();
    s.write_all(&big).unwrap();
    let started = std::time::Instant::now();
    assert_closed(s, "a handshake frame over its cap");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed only after {:?}",
        started.elapsed()
    );

    // A frame cut short, then the connection closed.
    let mut s = TcpStream::connect(&target).unwrap();
    s.write_all(&hello[..hello.len() - 3]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closed(s, "truncated frame");

    // The generation that ran through all of it is intact, and the ring still serves.
    let events = running.join().unwrap();
    let ids: Vec<u32> = events
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        events.last().unwrap()["event"],
        "done",
        "{:?}",
        events.last()
    );
    assert_eq!(ids, expected);
    let (ids, _) = ring.generate(&json!({"prompt": "Hi", "max_tokens": 8}));
    assert_eq!(ids, one_process(&model, "Hi", 8));
    let log = ring.log(1);
    for needle in [
        "could not prove",
        "protocol version 99",
        "bad magic",
        "exceeds the cap",
        "bytes for a handshake frame",
        "closed in the middle of a frame",
    ] {
        assert!(
            log.contains(needle),
            "stage 1's log does not mention {needle:?}:\n{log}"
        );
    }
    // A flood of one kind is logged once per 10 s, not once per connection.
    for _ in 0..50 {
        let mut s = TcpStream::connect(&target).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_closed(s, "bad magic, again");
    }
    let lines = ring.log(1).matches("bad magic").count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines for 51 connections of bad magic"
    );
}
