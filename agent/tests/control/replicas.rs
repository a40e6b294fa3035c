//! Replicas behind one endpoint: two rings of the same model on four agents; requests spread
//! over both; a stage killed or stopped in the middle of eight streams, greedy and seeded, and
//! every stream ends with exactly the text and token count of an undisturbed run, through
//! OpenAI's Python SDK too; the stopped agent comes back and its replica takes requests again.
//! Re-placement of a lost or drained node's stages under `placement: auto`.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

const STREAMS: usize = 8;
const TOKENS: usize = 200;

/// Two replicas of the whole model on two agents.
const TWO_WHOLE: [(usize, &str, &str); 2] = [(0, "node-0", "0-3"), (1, "node-1", "0-3")];

/// What a client keeps of a streamed text completion.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    text: String,
    completion_tokens: u64,
    finish: String,
}

fn body(i: usize, sampled: bool) -> Value {
    let mut b = json!({
        "model": "tiny-pipe",
        "prompt": format!("Stream {i} says hello to the replicas"),
        "max_tokens": TOKENS,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if sampled {
        b["temperature"] = json!(0.8);
        b["seed"] = json!(1000 + i);
    } else {
        b["temperature"] = json!(0);
    }
    b
}

/// Streams one completion, counting its text chunks in `progress`; an error event ends it.
fn stream(port: u16, body: &Value, progress: &AtomicUsize) -> Result<Answer, String> {
    let resp = http_client(Duration::from_secs(120))
        .post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .send_json(body)
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let (mut completion_tokens, mut finish) = (0, String::new());
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return Ok(Answer {
                text,
                completion_tokens,
                finish,
            });
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if v.get("error").is_some() {
            return Err(format!("error event after {} chars: {v}", text.len()));
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            completion_tokens = n;
        }
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["text"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
            progress.fetch_add(1, Ordering::Relaxed);
        }
    }
    Err(format!(
        "the stream ended without [DONE] after {} chars",
        text.len()
    ))
}

/// Runs the eight streams at once; `during` runs once every stream has sent `after` chunks.
fn eight(
    port: u16,
    sampled: bool,
    after: usize,
    during: impl FnOnce(),
) -> Vec<Result<Answer, String>> {
    let progress: Vec<Arc<AtomicUsize>> = (0..STREAMS)
        .map(|_| Arc::new(AtomicUsize::new(0)))
        .collect();
    let handles: Vec<_> = (0..STREAMS)
        .map(|i| {
            let p = progress[i].clone();
            std::thread::spawn(move || stream(port, &body(i, sampled), &p))
        })
        .collect();
    let start = Instant::now();
    while progress.iter().any(|p| p.load(Ordering::Relaxed) < after)
        && start.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let least = progress
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    assert!(
        after == 0 || (least >= after && least < TOKENS),
        "every stream should be under way: the least has {least} chunks"
    );
    during();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn routed(port: u16) -> [f64; 2] {
    let m = metrics(port);
    [
        counter(
            &m,
            "clusteragent_replica_sequences_total{endpoint=\"tiny-api\",pipeline=\"tiny-pipe\",replica=\"0\"}",
        ),
        counter(
            &m,
            "clusteragent_replica_sequences_total{endpoint=\"tiny-api\",pipeline=\"tiny-pipe\",replica=\"1\"}",
        ),
    ]
}

#[test]
fn streams_survive_a_killed_stage_by_going_on_at_the_other_replica() {
    let mut c = Cluster::start(4, &[]);
    let model = c.dir.path().join("model");
    // Big enough that 200 tokens take a while on two shared cores.
    crate::common::make_model(
        &model,
        &["--layers", "4", "--hidden", "384", "--intermediate", "1024"],
    );
    let port = free_port();
    let out = c.apply_wait(
        "replicas.yaml",
        &format!(
            "{}{}",
            c.nodes_yaml(),
            replicas_yaml(&model, &TWO_BY_TWO, port)
        ),
    );
    assert!(out.contains("pipeline/tiny-pipe ready"), "{out}");
    let described =
        String::from_utf8_lossy(&c.ctl(&["describe", "pipeline", "tiny-pipe"]).stdout).into_owned();
    for needle in ["Replicas:", "head node-0", "head node-2", "1/1"] {
        assert!(described.contains(needle), "{needle} missing:\n{described}");
    }

    // Undisturbed: the reference answers, spread over both replicas.
    let mut references = Vec::new();
    for sampled in [false, true] {
        let before = routed(port);
        let reference: Vec<Answer> = eight(port, sampled, 0, || {})
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let after = routed(port);
        let split = [after[0] - before[0], after[1] - before[1]];
        assert!(
            (split[0] - split[1]).abs() <= 2.0,
            "8 streams split {split:?} between the replicas"
        );
        for a in &reference {
            assert_eq!(a.completion_tokens, TOKENS as u64, "{a:?}");
            assert_eq!(a.finish, "length");
        }
        references.push(reference);
    }
    // Stopped mid-stream: replica 0's last stage killed (greedy streams), replica 1's killed
    // (seeded ones), replica 0's stopped with SIGTERM (greedy ones: it serves what it holds to
    // the end, so they need not move).
    // Then replica 1's head itself (its streams come from another agent over HTTP).
    for (sampled, victim, how) in [
        (false, 1, "SIGKILL"),
        (true, 3, "SIGKILL"),
        (false, 1, "SIGTERM"),
        (true, 2, "SIGKILL"),
    ] {
        let reference = &references[usize::from(sampled)];
        let gap = |m: &str, part: &str| {
            counter(
                m,
                &format!(
                    "clusteragent_failover_gap_seconds_{part}{{endpoint=\"tiny-api\",pipeline=\"tiny-pipe\"}}"
                ),
            )
        };
        let m = metrics(port);
        let (failovers, gaps, gap_count) = (
            counter(&m, "clusteragent_failovers_total"),
            gap(&m, "sum"),
            gap(&m, "count"),
        );
        let answers = eight(port, sampled, 20, || {
            if how == "SIGKILL" {
                c.kill(victim);
            } else {
                c.terminate(victim, Duration::from_secs(30));
            }
        });
        for (i, (got, want)) in answers.iter().zip(reference).enumerate() {
            let got = got.as_ref().unwrap_or_else(|e| {
                panic!("stream {i} (sampled {sampled}, {how}): {e}\n{}", c.logs())
            });
            assert_eq!(got, want, "stream {i} (sampled {sampled}, {how})");
        }
        let m = metrics(port);
        let moved = counter(&m, "clusteragent_failovers_total") - failovers;
        let (gaps, gap_count) = (gap(&m, "sum") - gaps, gap(&m, "count") - gap_count);
        println!(
            "{STREAMS} streams (sampled {sampled}, {how} of node-{victim}): {moved} failed over, mean gap {:.0} ms from the failure to the next token",
            1e3 * gaps / gap_count.max(1.0)
        );
        if how == "SIGKILL" {
            assert!(
                (2.0..=STREAMS as f64).contains(&moved),
                "streams on the killed replica should have moved: {moved}\n{m}"
            );
        }

        // The pipeline says which replica is down, and serves on the other meanwhile.
        c.wait_for("the pipeline is Degraded", Duration::from_secs(15), || {
            c.phase(0, "tiny-pipe") == "Degraded"
        });
        let status = c.get(0, "/api/v1/pipelines/tiny-pipe")["status"].clone();
        let down = if victim >= 2 {
            "replica 1"
        } else {
            "replica 0"
        };
        assert!(
            status["message"].as_str().unwrap_or("").contains(down),
            "{status}"
        );
        let one = stream(port, &body(0, sampled), &AtomicUsize::new(0)).unwrap();
        assert_eq!(one, reference[0]);

        // Back by itself: Ready, and its replica takes requests again.
        c.spawn(victim);
        c.wait_for(
            "the pipeline is Ready again",
            Duration::from_secs(60),
            || c.phase(0, "tiny-pipe") == "Ready",
        );
        let before = routed(port);
        let again = eight(port, sampled, 0, || {});
        let after = routed(port);
        let back = if victim >= 2 { 1 } else { 0 };
        assert!(
            after[back] - before[back] >= 2.0,
            "replica {back} takes requests again: {before:?} -> {after:?}"
        );
        for (got, want) in again.iter().zip(reference) {
            assert_eq!(got.as_ref().unwrap(), want);
        }
    }

    // OpenAI's Python SDK streaming through a failover sees one stream.
    if !crate::common::python_has("openai") {
        return;
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tools/openai_stream.py");
    let first = &body(0, false);
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .args([
            &format!("http://127.0.0.1:{port}"),
            "tiny-pipe",
            first["prompt"].as_str().unwrap(),
            &TOKENS.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut text = String::new();
    let mut chunks = 0;
    let mut last = Value::Null;
    for line in lines.by_ref() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if let Some(t) = v["text"].as_str() {
            text.push_str(t);
            chunks += 1;
            // The single stream went to replica 0 (both idle, the lower index first).
            if chunks == 20 {
                c.kill(1);
            }
        } else {
            last = v;
        }
    }
    assert!(child.wait().unwrap().success());
    assert!(chunks > 20, "the stream had {chunks} chunks");
    assert_eq!(last["error"], Value::Null, "the SDK raised: {last}");
    assert_eq!(text, references[0][0].text);
    assert_eq!(last["usage"], TOKENS as u64, "{last}");
    assert_eq!(last["finish"], "length", "{last}");
}

#[test]
fn replicas_are_refused_by_field_when_they_share_nodes_or_leave_one_empty() {
    let c = Cluster::start(2, &[]);
    let model = c.dir.path().join("model");
    make_model(&model);
    // Auto placement needs every node's report.
    c.apply_nodes();
    let head = format!(
        "{}apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {{path: \"{}\"}}}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: tiny-pipe}}\nspec:\n  model: tiny\n  device: cpu\n",
        c.nodes_yaml(),
        model.display(),
    );
    let cases = [
        (
            "  replicas: 2\n  stages:\n    - {replica: 0, node: node-0, layers: \"0-3\"}\n    - {replica: 1, node: node-0, layers: \"0-3\"}\n",
            vec![
                "spec.stages[1].node",
                "node node-0 already runs a stage of replica 0",
            ],
        ),
        (
            "  replicas: 2\n  stages:\n    - {replica: 0, node: node-0, layers: \"0-3\"}\n",
            vec!["spec.stages", "replica 1 has no stages"],
        ),
        (
            "  stages:\n    - {replica: 1, node: node-0, layers: \"0-3\"}\n",
            vec![
                "spec.stages[0].replica",
                "is 1 but the pipeline has 1 replica",
            ],
        ),
        (
            "  replicas: 2\n  stages:\n    - {replica: 0, node: node-0, layers: \"0-3\"}\n    - {replica: 1, node: node-1, layers: \"0-2\"}\n",
            vec!["layer"],
        ),
        (
            "  replicas: 0\n  placement: auto\n",
            vec!["spec.replicas", "at least 1"],
        ),
        (
            "  replicas: 3\n  placement: auto\n",
            vec!["spec.placement", "replica 2"],
        ),
        (
            "  replicas: auto\n  stages:\n    - {node: node-0, layers: \"0-3\"}\n",
            vec!["spec.replicas", "`auto` needs `placement: auto`"],
        ),
        (
            "  replicas: many\n  placement: auto\n",
            vec![
                "spec.replicas",
                "a number of replicas or `auto`",
                "\"many\"",
            ],
        ),
    ];
    for (spec, needles) in cases {
        let file = c.write("bad.yaml", &format!("{head}{spec}"));
        let out = c.ctl(&["apply", "-f", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{spec}\n{}", shown(&out));
        for n in needles {
            assert!(err.contains(n), "{n:?} missing for\n{spec}\n{err}");
        }
    }
    assert_eq!(
        c.get(0, "/api/v1/pipelines")["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Auto placement puts each replica on nodes of its own.
    let file = c.write(
        "auto.yaml",
        &format!("{head}  replicas: 2\n  placement: auto\n"),
    );
    let out = c.ctl(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{}", shown(&out));
    let record = c.get(0, "/api/v1/pipelines/tiny-pipe");
    let stages = record["status"]["stages"].as_array().unwrap();
    let nodes: Vec<(u64, &str)> = stages
        .iter()
        .map(|s| {
            (
                s["replica"].as_u64().unwrap_or(0),
                s["node"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(nodes.len(), 2, "{record}");
    assert_ne!(nodes[0].1, nodes[1].1, "{record}");
    assert_eq!((nodes[0].0, nodes[1].0), (0, 1), "{record}");
    assert_eq!(record["status"]["phase"], "Ready", "{record}");
    let placement = record["status"]["placement"].as_str().unwrap();
    assert!(
        placement.contains("replica 0: auto") && placement.contains("replica 1: auto"),
        "{placement}"
    );

    // `replicas: auto`: as many as fit, here the whole model on each node.
    let file = c.write(
        "as-many.yaml",
        &format!("{head}  replicas: auto\n  placement: auto\n")
            .replace("name: tiny-pipe", "name: as-many"),
    );
    let out = c.ctl(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{}", shown(&out));
    let record = c.get(0, "/api/v1/pipelines/as-many");
    let replicas = record["status"]["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{record}");
    let placement = record["status"]["placement"].as_str().unwrap();
    assert!(
        placement.starts_with("replicas: auto: 2 replica(s), as many as the nodes' memory holds")
            && placement.contains("stays on one node"),
        "{placement}"
    );
    let described =
        String::from_utf8_lossy(&c.ctl(&["describe", "pipeline", "as-many"]).stdout).into_owned();
    assert!(
        described.contains("replicas: auto: 2 replica(s)"),
        "{described}"
    );
}

fn nodes_of(c: &Cluster, i: usize, pipeline: &str) -> Vec<String> {
    c.get(i, &format!("/api/v1/pipelines/{pipeline}"))["status"]["stages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["node"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_lost_or_drained_nodes_stages_are_placed_again_under_auto_placement() {
    // The 4-layer model (~680 KiB) fits no single node's 500 KB: auto splits it over two.
    let room = tiny_room(500_000);
    let mut c = Cluster::start(
        3,
        &[
            &["--max-memory", &room],
            &["--max-memory", &room],
            &["--max-memory", &room],
        ],
    );
    let model = c.dir.path().join("model");
    make_model(&model);
    let want = one_process(&model, "Hello world", 10);
    c.apply_nodes();
    let port = free_port();
    let text = format!(
        "apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {{path: \"{}\"}}}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: tiny-pipe}}\nspec:\n  model: tiny\n  device: cpu\n  placement: auto\n  failover: {{replaceAfter: 3s}}\n---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: tiny-api}}\nspec: {{pipeline: tiny-pipe, port: {port}}}\n",
        model.display()
    );
    c.apply_wait("auto.yaml", &text);
    assert_eq!(nodes_of(&c, 0, "tiny-pipe"), ["node-0", "node-1"]);
    assert_eq!(generate(port, "Hello world", 10).unwrap(), want);
    // The same manifest again moves nothing.
    let file = c.dir.path().join("auto.yaml");
    let again = c.ctl(&["apply", "-f", file.to_str().unwrap()]);
    let again = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(again.contains("pipeline/tiny-pipe unchanged"), "{again}");

    c.kill(1);
    let killed = Instant::now();
    c.wait_for(
        "the pipeline is placed again without node-1 and Ready",
        Duration::from_secs(40),
        || {
            nodes_of(&c, 0, "tiny-pipe") == ["node-0", "node-2"]
                && c.phase(0, "tiny-pipe") == "Ready"
        },
    );
    println!(
        "node-1 killed; the pipeline was Ready on node-0 and node-2 {:.1} s later (replaceAfter 3 s, node timeout 1.5 s)",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "not before replaceAfter"
    );
    c.wait_for("generation works again", Duration::from_secs(15), || {
        generate(port, "Hello world", 10).is_ok()
    });
    assert_eq!(generate(port, "Hello world", 10).unwrap(), want);
    let events = String::from_utf8_lossy(&c.ctl(&["events"]).stdout).into_owned();
    assert!(
        events.contains("Replaced")
            && events.contains("node node-1 has not been heard from")
            && events.contains("replaceAfter 3s"),
        "{events}"
    );

    // Back, node-1 is not given its stage again behind the pipeline's back.
    c.spawn(1);
    c.wait_for("node-1 is Ready again", Duration::from_secs(15), || {
        c.get(0, "/api/v1/nodes/node-1")["status"]["phase"] == "Ready"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(nodes_of(&c, 0, "tiny-pipe"), ["node-0", "node-2"]);
    assert_eq!(c.phase(0, "tiny-pipe"), "Ready");

    // Drained, node-2 gives its stage up at once (no replaceAfter), to node-1.
    let out = c.ctl(&["drain", "node-2", "--timeout", "60"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", shown(&out));
    assert!(
        said.contains("node/node-2 cordoned")
            && said.contains("pipeline/tiny-pipe serves from node-0:0-1,node-1:2-3")
            && said.contains("node/node-2 drained"),
        "{said}"
    );
    assert_eq!(nodes_of(&c, 0, "tiny-pipe"), ["node-0", "node-1"]);
    assert_eq!(generate(port, "Hello world", 10).unwrap(), want);
    let table = String::from_utf8_lossy(&c.ctl(&["get", "nodes"]).stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("node-2") && l.contains("Ready,SchedulingDisabled")),
        "{table}"
    );
    let events = String::from_utf8_lossy(&c.ctl(&["events"]).stdout).into_owned();
    assert!(events.contains("node node-2 is drained"), "{events}");
    // Uncordoned, it may be used again by a later placement; nothing moves now.
    let out = c.ctl(&["uncordon", "node-2"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node/node-2 uncordoned"),
        "{}",
        shown(&out)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(nodes_of(&c, 0, "tiny-pipe"), ["node-0", "node-1"]);
    let table = String::from_utf8_lossy(&c.ctl(&["get", "nodes"]).stdout).into_owned();
    assert!(!table.contains("SchedulingDisabled"), "{table}");
}

/// Balance follows the queues: with replica 1's passes made to take 80 ms (the slow-machine
/// hook), clients that send their next request as soon as one ends find replica 0 with fewer
/// of their sequences, and most requests go there.
#[test]
fn a_slower_replica_gets_fewer_of_the_requests_of_a_closed_loop() {
    let env: [&[(&str, &str)]; 2] = [&[], &[("CLUSTERAGENT_TEST_PASS_MS", "80")]];
    let c = Cluster::start_with_env(2, &[], &env);
    let model = c.tiny_model();
    let want = one_process(&model, "Hello world", 16);
    let port = c.serve("slow.yaml", |port| replicas_yaml(&model, &TWO_WHOLE, port));
    let before = routed(port);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..4)
                    .map(|_| {
                        let body = json!({"model": "tiny-pipe", "prompt": "Hello world", "max_tokens": 16, "temperature": 0});
                        let mut r = http_client(Duration::from_secs(60))
                            .post(&format!("http://127.0.0.1:{port}/v1/completions"))
                            .send_json(&body)
                            .unwrap();
                        let v: Value = r.body_mut().read_json().unwrap();
                        v["usage"]["completion_tokens"].as_u64().unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for c in clients {
        for n in c.join().unwrap() {
            assert!(n > 0 && n <= 16);
        }
    }
    let after = routed(port);
    let split = [after[0] - before[0], after[1] - before[1]];
    println!("32 requests of 8 closed-loop clients: {split:?} to the fast and the slow replica");
    assert_eq!(split[0] + split[1], 32.0, "{split:?}");
    assert!(
        split[0] >= 2.0 * split[1],
        "the slow replica should get fewer: {split:?}"
    );
    // Both give the same tokens.
    assert_eq!(generate(port, "Hello world", 16).unwrap(), want);
}

/// The endpoint's node restarts and its own stage takes seconds to load (a big model from
/// disk, here the load-delay hook): meanwhile the endpoint sends its requests whole to the
/// other replica's agent, and the answers are the same.
#[test]
fn an_endpoint_whose_own_stage_is_loading_answers_from_another_replica() {
    let mut c = Cluster::start(2, &[]);
    let model = c.tiny_model();
    let port = c.serve("two.yaml", |port| replicas_yaml(&model, &TWO_WHOLE, port));
    let body =
        json!({"model": "tiny-pipe", "prompt": "Hello world", "max_tokens": 12, "temperature": 0});
    let complete = || {
        let mut r = http_client(Duration::from_secs(30))
            .post(&format!("http://127.0.0.1:{port}/v1/completions"))
            .send_json(&body)
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let v: Value = r.body_mut().read_json().map_err(|e| e.to_string())?;
        if status == 200 {
            Ok(v["choices"][0]["text"].as_str().unwrap_or("").to_string())
        } else {
            Err(format!("HTTP {status}: {v}"))
        }
    };
    let want = complete().unwrap();

    c.agents[0]
        .env
        .push(("CLUSTERAGENT_TEST_LOAD_MS".into(), "8000".into()));
    c.kill(0);
    c.spawn(0);
    let restarted = Instant::now();
    let mut answered = None;
    while restarted.elapsed() < Duration::from_secs(6) {
        match complete() {
            Ok(text) => {
                answered = Some(text);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let loading = c.get(0, "/api/v1/pipelines/tiny-pipe")["status"]["stages"][0]["phase"].clone();
    let answered = answered.unwrap_or_else(|| panic!("no answer while node-0 loads\n{}", c.logs()));
    println!(
        "answered {:.1} s after node-0 restarted, its own stage {loading}",
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(answered, want);
    assert_ne!(loading, "Ready", "node-0's stage was still loading");
    // Streamed, too.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = http_client(Duration::from_secs(30))
        .post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .send_json(&streamed)
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text: String = BufReader::new(resp.into_body().into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l.strip_prefix("data: ")?).ok()?;
            Some(v["choices"][0]["text"].as_str()?.to_string())
        })
        .collect();
    assert_eq!(text, want);
}
