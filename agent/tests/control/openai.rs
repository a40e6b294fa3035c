//! The OpenAI-compatible endpoint: the engine's tokens through chat and text completions,
//! streamed or not, with exact SSE framing; stop sequences across tokens; every error with
//! OpenAI's body and status; many concurrent clients; disconnects; OpenAI's own SDK; and
//! `clusterctl chat`.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const KEY: &str = "key-1";
const MODEL: &str = "tiny-model";

/// A 2-agent cluster serving the tiny model split in two, behind an endpoint with an API key.
fn serve(max_sequences: usize) -> (Cluster, std::path::PathBuf, u16) {
    serve_on(max_sequences, None)
}

/// [`serve`] with the endpoint on `endpoint_node` (default: stage 0's node).
fn serve_on(
    max_sequences: usize,
    endpoint_node: Option<&str>,
) -> (Cluster, std::path::PathBuf, u16) {
    let c = Cluster::start(2, &[]);
    let model = c.dir.path().join("model");
    make_model(&model);
    let port = free_port();
    let text = format!(
        "{}apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {{path: \"{}\"}}}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: tiny-pipe}}\nspec:\n  model: tiny\n  device: cpu\n  maxSequences: {max_sequences}\n  stages:\n    - {{node: node-0, layers: \"0-1\"}}\n    - {{node: node-1, layers: \"2-3\"}}\n---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: tiny-api}}\nspec: {{pipeline: tiny-pipe,{node} port: {port}, servedModelName: {MODEL}, apiKeys: [{KEY}]}}\n",
        c.nodes_yaml(),
        model.display(),
        node = endpoint_node
            .map(|n| format!(" node: {n},"))
            .unwrap_or_default(),
    );
    c.apply_wait("openai.yaml", &text);
    (c, model, port)
}

fn http() -> ureq::Agent {
    http_client(Duration::from_secs(60))
}

/// POSTs `body` to `route` with `key`; returns the status, the content type and the raw body.
fn post(port: u16, route: &str, key: Option<&str>, body: &Value) -> (u16, String, String) {
    let mut req = http().post(&format!("http://127.0.0.1:{port}{route}"));
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = req.send_json(body).unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, ctype, text)
}

fn json_of(port: u16, route: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = post(port, route, Some(KEY), body);
    (status, serde_json::from_str(&text).unwrap())
}

/// Checks SSE framing byte for byte: `data: {json}\n\n` events ending with `data: [DONE]\n\n`;
/// returns the JSON events.
fn sse_events(body: &str) -> Vec<Value> {
    assert!(body.ends_with("data: [DONE]\n\n"), "{body:?}");
    let pieces: Vec<&str> = body.split_terminator("\n\n").collect();
    assert_eq!(pieces.last(), Some(&"data: [DONE]"));
    pieces[..pieces.len() - 1]
        .iter()
        .map(|p| {
            let json = p
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {p:?}"));
            assert!(!json.contains('\n'), "one line per event: {p:?}");
            serde_json::from_str(json).unwrap()
        })
        .collect()
}

/// Starts a 3000-token stream and reads its first event line; returns the open stream.
fn long_stream(port: u16) -> (BufReader<impl Read>, String) {
    let mut body = chat_body("Hello", 3000);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let resp = http()
        .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("Authorization", &format!("Bearer {KEY}"))
        .send_json(&body)
        .unwrap();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    (reader, first)
}

fn chat_body(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn chat_and_completions_give_the_engines_tokens_streamed_or_not() {
    let (_c, model, port) = serve(64);
    let prompt = "Tell me about two machines on a shelf";
    let want_chat = one_process_json(&model, prompt, 24, true);
    let want_text = one_process_json(&model, prompt, 24, false);
    let n_chat = want_chat["token_ids"].as_array().unwrap().len();
    let finish = want_chat["finish_reason"].as_str().unwrap();

    let (status, v) = json_of(port, "/v1/chat/completions", &chat_body(prompt, 24));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want_chat["text"]);
    assert_eq!(v["choices"][0]["finish_reason"], finish);
    assert_eq!(v["usage"]["completion_tokens"], n_chat);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        want_chat["prompt_token_ids"].as_array().unwrap().len()
    );

    let mut body = chat_body(prompt, 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, ctype, raw) = post(port, "/v1/chat/completions", Some(KEY), &body);
    assert_eq!(status, 200);
    assert_eq!(ctype, "text/event-stream");
    let events = sse_events(&raw);
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let id = events[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && events.iter().all(|e| e["id"] == id));
    let usage = events.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], n_chat);
    let last = &events[events.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], finish);
    assert_eq!(last["choices"][0]["delta"], json!({}));
    let deltas: Vec<&str> = events[1..events.len() - 2]
        .iter()
        .map(|e| {
            assert_eq!(e["choices"][0]["finish_reason"], Value::Null);
            e["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(deltas.concat(), want_chat["text"].as_str().unwrap());

    // Text completions, whole and streamed.
    let tbody = json!({"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0});
    let (status, v) = json_of(port, "/v1/completions", &tbody);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want_text["text"]);
    let mut sbody = tbody.clone();
    sbody["stream"] = json!(true);
    let (_, _, raw) = post(port, "/v1/completions", Some(KEY), &sbody);
    let events = sse_events(&raw);
    let text: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, want_text["text"].as_str().unwrap());
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "no usage unless asked"
    );
    // vLLM's `continuous_usage_stats`: a chunk for every token, its usage counting them, so
    // that a client times each token even where a character's bytes span several.
    sbody["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
    let (_, _, raw) = post(port, "/v1/completions", Some(KEY), &sbody);
    let events = sse_events(&raw);
    let n_text = want_text["token_ids"].as_array().unwrap().len();
    let tokens: Vec<&Value> = events
        .iter()
        .filter(|e| e["choices"][0]["finish_reason"].is_null() && e["choices"][0].is_object())
        .collect();
    let counts: Vec<u64> = tokens
        .iter()
        .map(|e| e["usage"]["completion_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(
        counts,
        (1..=n_text as u64).collect::<Vec<_>>(),
        "{events:?}"
    );
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want_text["text"].as_str().unwrap());
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], n_text);

    // A stop sequence made of the end of one token and the start of the next.
    let k = deltas
        .windows(2)
        .position(|w| !w[0].is_empty() && !w[1].is_empty())
        .expect("two neighbouring tokens with text");
    let stop: String = deltas[k]
        .chars()
        .last()
        .into_iter()
        .chain(deltas[k + 1].chars().next())
        .collect();
    let full = want_chat["text"].as_str().unwrap();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut sb = chat_body(prompt, 24);
    sb["stop"] = json!([stop, "never-appears"]);
    let (_, v) = json_of(port, "/v1/chat/completions", &sb);
    assert_eq!(
        v["choices"][0]["message"]["content"], expected,
        "stop {stop:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    sb["stream"] = json!(true);
    let (_, _, raw) = post(port, "/v1/chat/completions", Some(KEY), &sb);
    let events = sse_events(&raw);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, expected);
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // Sampling with a seed is reproducible, and the seed matters.
    let sampled = |seed: u64| {
        let mut b = chat_body(prompt, 16);
        b["temperature"] = json!(1.0);
        b["seed"] = json!(seed);
        json_of(port, "/v1/chat/completions", &b).1["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(sampled(42), sampled(42));
    assert_ne!(sampled(42), sampled(43));
    // max_completion_tokens is max_tokens' newer name.
    let mut b = chat_body(prompt, 24);
    b.as_object_mut().unwrap().remove("max_tokens");
    b["max_completion_tokens"] = json!(3);
    b["ignore_eos"] = json!(true);
    let (_, v) = json_of(port, "/v1/chat/completions", &b);
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");

    // Models, and fields OpenAI's API has that this server does not know are ignored.
    let mut r = http()
        .get(&format!("http://127.0.0.1:{port}/v1/models"))
        .header("Authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap();
    let models: Value = r.body_mut().read_json().unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let mut odd = chat_body(prompt, 4);
    odd["user"] = json!("someone");
    odd["frobnicate"] = json!({"x": 1});
    assert_eq!(json_of(port, "/v1/chat/completions", &odd).0, 200);
}

#[test]
fn each_error_has_openais_body_and_status() {
    let (mut c, _model, port) = serve(1);
    let body = chat_body("Hello", 4);
    let check = |status: u16, v: &Value, want: u16, code: Option<&str>, needle: &str| {
        assert_eq!(status, want, "{v}");
        let e = &v["error"];
        assert!(e["message"].as_str().unwrap().contains(needle), "{v}");
        assert!(e["type"].is_string(), "{v}");
        if let Some(code) = code {
            assert_eq!(e["code"], code, "{v}");
        }
    };
    for key in [None, Some("wrong")] {
        let (status, _, text) = post(port, "/v1/chat/completions", key, &body);
        check(
            status,
            &serde_json::from_str(&text).unwrap(),
            401,
            Some("invalid_api_key"),
            "API key",
        );
    }
    let mut b = body.clone();
    b["model"] = json!("gpt-4");
    let (s, v) = json_of(port, "/v1/chat/completions", &b);
    check(s, &v, 404, Some("model_not_found"), "gpt-4");
    let mut b = body.clone();
    b["n"] = json!(2);
    let (s, v) = json_of(port, "/v1/chat/completions", &b);
    check(s, &v, 400, None, "n = 2");
    assert_eq!(v["error"]["param"], "n");
    let mut b = body.clone();
    b["temperature"] = json!(3.5);
    let (s, v) = json_of(port, "/v1/chat/completions", &b);
    check(s, &v, 400, None, "temperature");
    let mut b = body.clone();
    b["max_tokens"] = json!(0);
    let (s, v) = json_of(port, "/v1/chat/completions", &b);
    check(s, &v, 400, None, "max_tokens");
    let long = "word ".repeat(5000);
    let (s, v) = json_of(
        port,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": long, "max_tokens": 4}),
    );
    check(
        s,
        &v,
        400,
        Some("context_length_exceeded"),
        "maximum context length",
    );
    let (s, v) = json_of(
        port,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": []}),
    );
    check(s, &v, 400, None, "messages");
    // Content as a list of parts, as many clients send it: the text parts are the message, so
    // the answer is the one of the same text as a string; other parts are refused by name.
    let parts = json!({"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]});
    let (s, v) = json_of(port, "/v1/chat/completions", &parts);
    assert_eq!(s, 200, "{v}");
    let (_, plain) = json_of(port, "/v1/chat/completions", &{
        let mut b = chat_body("Hello", 4);
        b["temperature"] = json!(0);
        b
    });
    assert_eq!(
        v["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"],
        "{v} {plain}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"]);
    let image = json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]});
    let (s, v) = json_of(port, "/v1/chat/completions", &image);
    check(s, &v, 400, None, "\"image_url\"");
    assert_eq!(v["error"]["param"], "messages");
    // One token id is a prompt; an id past the vocabulary is the client's mistake (400).
    let (s, v) = json_of(
        port,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1], "max_tokens": 2}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = json_of(
        port,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 99999999], "max_tokens": 2}),
    );
    check(s, &v, 400, None, "outside the model's vocabulary");
    // A body over the endpoint's limit is refused from its length alone (413), a chunked one
    // (411): nothing is read as an empty body.
    for (headers, want) in [
        ("Content-Length: 17000000\r\n", "413"),
        ("Transfer-Encoding: chunked\r\n", "411"),
    ] {
        let answer = raw_request(
            &format!("127.0.0.1:{port}"),
            &format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n{headers}\r\n"
            ),
        );
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {want}")) && answer.contains("\"error\""),
            "{headers}: {answer}"
        );
    }
    // The scheme of `Authorization` is case-insensitive.
    let mut r = http()
        .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("Authorization", &format!("bearer {KEY}"))
        .send_json(&body)
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );

    // maxSequences is 1: while one stream runs, another request gets 429 with Retry-After.
    let (reader, first) = long_stream(port);
    assert!(first.starts_with("data: "), "{first}");
    let mut r = http()
        .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("Authorization", &format!("Bearer {KEY}"))
        .send_json(&body)
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let v: Value = r.body_mut().read_json().unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    drop(reader);

    // A pipeline that is not Ready: 503 naming the stage that is down.
    c.kill(1);
    c.wait_for("the ring notices", Duration::from_secs(10), || {
        let (s, _) = json_of(port, "/v1/chat/completions", &body);
        s == 503
    });
    let (s, v) = json_of(port, "/v1/chat/completions", &body);
    check(s, &v, 503, None, "stage 1");
}

#[test]
fn sixteen_concurrent_streams_complete_and_a_disconnect_frees_its_sequence() {
    let (c, model, port) = serve(64);
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Prompt number {i} about shelves"))
        .collect();
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            one_process_json(&model, p, 16, true)["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            std::thread::spawn(move || {
                let mut body = chat_body(&p, 16);
                body["stream"] = json!(true);
                let (status, _, raw) = post(port, "/v1/chat/completions", Some(KEY), &body);
                assert_eq!(status, 200, "{raw}");
                sse_events(&raw)
                    .iter()
                    .filter_map(|e| {
                        e["choices"][0]["delta"]["content"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect::<String>()
            })
        })
        .collect();
    for (h, w) in handles.into_iter().zip(&want) {
        assert_eq!(&h.join().unwrap(), w);
    }

    // A client that goes away mid-stream: its sequence is cancelled around the ring.
    let (reader, _) = long_stream(port);
    drop(reader);
    let metric = |text: &str, name: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    };
    c.wait_for(
        "the disconnect shows in the metrics",
        Duration::from_secs(10),
        || {
            let text = metrics(port);
            metric(&text, "clusteragent_requests_cancelled_total") == vec![1.0]
                && metric(&text, "clusteragent_sequences_in_flight") == vec![0.0]
                && metric(&text, "clusteragent_stage_cached_sequences") == vec![0.0, 0.0]
        },
    );
    let text = metrics(port);
    assert!(
        text.contains("route=\"/v1/chat/completions\",status=\"200\"} 17"),
        "{text}"
    );
    assert!(
        metric(&text, "clusteragent_time_to_first_token_seconds_count")[0] >= 16.0,
        "{text}"
    );
    assert!(metric(&text, "clusteragent_hop_network_seconds")[0] > 0.0);
    let memory = metric(&text, "clusteragent_stage_memory_bytes");
    assert!(
        memory.len() == 2 && memory.iter().all(|m| *m > 0.0),
        "{text}"
    );
    assert!(
        metric(&text, "clusteragent_stage_compute_seconds_total")
            .iter()
            .all(|s| *s > 0.0)
    );
}

#[test]
fn openais_python_sdk_and_clusterctl_chat_work_against_an_endpoint() {
    let (c, model, port) = serve(64);
    let prompt = "Hello there";
    let want_chat = one_process_json(&model, prompt, 12, true);
    let want_text = one_process_json(&model, prompt, 12, false);

    let out = c.ctl(&[
        "chat",
        "tiny-api",
        "-p",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--api-key",
        KEY,
    ]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", want_chat["text"].as_str().unwrap())
    );
    let out = c.ctl(&["chat", "tiny-api", "-p", prompt]);
    assert_eq!(out.status.code(), Some(1), "no key: {}", shown(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        shown(&out)
    );
    // Interactive: prompts on stdin, the conversation kept between them.
    let mut child = std::process::Command::new(clusterctl())
        .args([
            "chat",
            "tiny-api",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--api-key",
            KEY,
        ])
        .env("CLUSTERCTL_SERVER", &c.agents[0].listen)
        .env("CLUSTERCTL_TOKEN", TOKEN)
        .env("CLUSTERCTL_CONFIG", c.dir.path().join("ctl-config.yaml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!("{prompt}\nAnd then?\n").as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{}\n", want_chat["text"].as_str().unwrap())),
        "{stdout}"
    );

    if !python_has("openai") {
        return;
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tools/openai_sdk.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([
            &format!("http://127.0.0.1:{port}"),
            KEY,
            MODEL,
            prompt,
            "12",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], json!([MODEL]));
    assert_eq!(v["chat"], want_chat["text"]);
    assert_eq!(v["stream"], want_chat["text"]);
    assert_eq!(
        v["chat_usage"],
        want_chat["token_ids"].as_array().unwrap().len()
    );
    assert_eq!(v["stream_usage"], v["chat_usage"]);
    assert_eq!(v["completion"], want_text["text"]);
    assert_eq!(v["unknown_model"], 404);
}

#[test]
fn an_endpoint_on_another_node_than_stage_0_forwards_to_it() {
    let (c, model, port) = serve_on(64, Some("node-1"));
    let ep = c.get(0, "/api/v1/endpoints/tiny-api");
    assert_eq!(ep["status"]["node"], "node-1", "{ep}");
    let prompt = "Two machines";
    let want = one_process_json(&model, prompt, 12, true);
    c.wait_for(
        "the forwarding endpoint answers",
        Duration::from_secs(10),
        || json_of(port, "/v1/chat/completions", &chat_body(prompt, 12)).0 == 200,
    );
    let (_, v) = json_of(port, "/v1/chat/completions", &chat_body(prompt, 12));
    assert_eq!(v["choices"][0]["message"]["content"], want["text"]);
    let mut body = chat_body(prompt, 12);
    body["stream"] = json!(true);
    let (status, ctype, raw) = post(port, "/v1/chat/completions", Some(KEY), &body);
    assert_eq!((status, ctype.as_str()), (200, "text/event-stream"));
    let streamed: String = sse_events(&raw)
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, want["text"].as_str().unwrap());
    let (status, _, text) = post(port, "/v1/chat/completions", Some("wrong"), &body);
    assert_eq!(status, 401, "{text}");
    // A client that goes away cancels its sequence on stage 0's node.
    let (reader, _) = long_stream(port);
    drop(reader);
    c.wait_for("the cancel reaches stage 0", Duration::from_secs(10), || {
        let text = metrics(port);
        text.contains("clusteragent_requests_cancelled_total{endpoint=\"tiny-api\",pipeline=\"tiny-pipe\"} 1")
            && text.contains("clusteragent_sequences_in_flight{endpoint=\"tiny-api\",pipeline=\"tiny-pipe\"} 0")
    });
}

/// Sends `head` (a request's line and headers, no body) and returns what the server answers
/// before closing or within 5 s.
fn raw_request(address: &str, head: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `clusterctl bench`: every level's requests answered, each generating the tokens asked for,
/// throughput and latency figures that agree with each other; the same through URLs spread
/// over two targets; a target with nothing behind it fails naming it.
#[test]
fn clusterctl_bench_measures_every_level_and_says_what_failed() {
    let (c, _model, port) = serve(8);
    let out = c.ctl(&[
        "bench",
        "tiny-api",
        "-c",
        "1,3",
        "-n",
        "6",
        "-p",
        "12",
        "-r",
        "2",
        "--api-key",
        KEY,
        "-o",
        "json",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["targets"][0]["model"], MODEL, "{v}");
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2, "{v}");
    for (level, streams) in levels.iter().zip([1u64, 3]) {
        assert_eq!(level["streams"], streams, "{level}");
        assert_eq!(level["requests"], streams * 2, "{level}");
        assert_eq!(level["failed"], 0, "{level}");
        // ignore_eos: every request generates all six tokens.
        assert_eq!(level["outputTokens"], streams * 2 * 6, "{level}");
        let wall = level["wallSeconds"].as_f64().unwrap();
        let rate = level["outputTokensPerSecond"].as_f64().unwrap();
        assert!(wall > 0.0 && rate > 0.0, "{level}");
        assert!(
            (rate * wall - (streams * 12) as f64).abs() < 1e-6,
            "{level}"
        );
        let prompt = level["promptTokensMean"].as_f64().unwrap();
        assert!((10.0..=40.0).contains(&prompt), "{level}");
        for key in ["ttftMs", "itlMs"] {
            let p = |q: &str| level[key][q].as_f64().unwrap();
            assert!(
                0.0 < p("p50") && p("p50") <= p("p90") && p("p90") <= p("p99"),
                "{key}: {level}"
            );
            assert!(p("p99") < wall * 1e3, "{key}: {level}");
        }
        assert!(level["streamTokensPerSecondP50"].as_f64().unwrap() > 0.0);
        assert!(
            stderr.contains(&format!(
                "{streams} streams: {} requests (0 failed)",
                streams * 2
            )),
            "{stderr}"
        );
    }
    // Two URLs (replicas' shape; here the same endpoint twice), the model from /v1/models.
    let url = format!("http://127.0.0.1:{port}");
    let out = c.ctl(&[
        "bench",
        &url,
        &url,
        "-c",
        "2",
        "-n",
        "4",
        "-r",
        "1",
        "--api-key",
        KEY,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cells: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(cells.len(), 2, "{stdout}");
    assert_eq!(cells[0][..3], ["STREAMS", "OK", "TOKENS/S"], "{stdout}");
    assert_eq!(cells[1][..2], ["2", "2/2"], "{stdout}");
    let total: f64 = cells[1][2].parse().unwrap();
    let per_stream: f64 = cells[1][3].parse().unwrap();
    assert!(total > 0.0 && per_stream > 0.0, "{stdout}");
    // Nothing listens here: the target is named, and the exit status says it failed.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = c.ctl(&["bench", &dead, "--model", MODEL, "-c", "1", "-n", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("warm-up request to {dead}")),
        "{stderr}"
    );
    let out = c.ctl(&["bench", &url, "-c", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrency 0"));
}

/// The peak resident memory of process `pid`, in bytes (Linux).
#[cfg(target_os = "linux")]
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A prompt of megabytes, far past the context, is refused with the context error after
/// counting a piece of it: tokenized whole it took an agent from 53 MB to 840 MB, and anyone
/// can send one to an endpoint without keys. The same through the ring's `/generate`, and
/// through chat messages.
#[cfg(target_os = "linux")]
#[test]
fn a_prompt_of_megabytes_is_refused_without_tokenizing_it_whole() {
    let (c, _model, port) = serve(8);
    let huge = "The two machines sat side by side on the shelf. ".repeat(100_000);
    assert!(huge.len() > 4_000_000);
    let before = peak_rss(c.pid(0));
    for _ in 0..3 {
        let (status, v) = json_of(
            port,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": huge, "max_tokens": 4}),
        );
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "This model's maximum context length is 4096 tokens; your prompt has at least "
            ),
            "{message}"
        );
    }
    let mut chat = chat_body("", 4);
    chat["messages"][0]["content"] = json!(huge);
    let (status, v) = json_of(port, "/v1/chat/completions", &chat);
    assert_eq!(
        (status, &v["error"]["code"]),
        (400, &json!("context_length_exceeded")),
        "{v}"
    );
    let resp = http()
        .post(&format!("http://127.0.0.1:{port}/generate"))
        .header("Authorization", &format!("Bearer {KEY}"))
        .send_json(json!({"prompt": huge, "max_tokens": 4}))
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("but the model's context is 4096 tokens"),
        "{text}"
    );
    let grown = peak_rss(c.pid(0)).saturating_sub(before);
    assert!(
        grown < 150 << 20,
        "the agent's peak memory grew by {} MB",
        grown >> 20
    );
}

/// Fuzzing as a test: valid request bodies of each kind (chat with stops, streamed chat with
/// content parts and sampling, text completions from text and from token ids, tools),
/// damaged as bytes or as JSON values (`cluster_fixtures::damage`), sent to a running
/// endpoint. Every answer must come whole within the client's 60 s bound, be a success (a
/// stream to its end, or one object) or a client error with OpenAI's error body, never a
/// server error; afterwards the endpoint still answers a valid request and holds no
/// sequence. Bodies that stay JSON objects get at most a few tokens to generate, so that the
/// cases test the parser, not the model. Failures shrink and are kept in
/// `openai.regressions` beside this file.
#[test]
fn damaged_requests_get_an_answer_and_the_endpoint_lives_on() {
    use cluster_fixtures::damage::{apply, apply_json, config, damages, json_damages};
    use proptest::prelude::*;
    use proptest::test_runner::{TestCaseError, TestRunner};

    let (_c, _model, port) = serve(8);
    let seeds: [(&str, Value); 5] = [
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], "max_tokens": 2, "temperature": 0, "stop": ["\n", "end"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}, "top_p": 0.9, "seed": 7, "temperature": 0.8}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 2, "stop": "x", "logprobs": null}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "echo": false}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Call it"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tool_choice": "auto", "max_tokens": 2}),
        ),
    ];
    let mut cfg = config();
    cfg.source_file = Some(file!());
    let mut runner = TestRunner::new(cfg);
    // Half the cases damage bytes (the JSON parser's share), half damage values (the fields'
    // checks' share: byte damage leaves hardly any body valid JSON).
    let outcome = runner.run(
        &(
            0..seeds.len(),
            any::<bool>(),
            damages(256, 6),
            json_damages(4),
        ),
        |(which, as_bytes, damage, json_damage)| {
            let (route, seed) = &seeds[which];
            let mut body = if as_bytes {
                apply(&serde_json::to_vec(seed).unwrap(), &damage)
            } else {
                serde_json::to_vec(&apply_json(seed, &json_damage)).unwrap()
            };
            if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&body) {
                for key in ["max_tokens", "max_completion_tokens"] {
                    let many = m.get(key).and_then(Value::as_u64).is_some_and(|n| n > 4);
                    if many || (key == "max_tokens" && !m.contains_key(key)) {
                        m.insert(key.into(), json!(2));
                    }
                }
                body = serde_json::to_vec(&Value::Object(m)).unwrap();
            }
            let mut resp = http()
                .post(&format!("http://127.0.0.1:{port}{route}"))
                .header("Authorization", &format!("Bearer {KEY}"))
                .header("Content-Type", "application/json")
                .send(&body[..])
                .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
            let status = resp.status().as_u16();
            let streamed = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("text/event-stream"));
            let text = resp
                .body_mut()
                .read_to_string()
                .map_err(|e| TestCaseError::fail(format!("{status}, the answer not read: {e}")))?;
            let sent = String::from_utf8_lossy(&body);
            prop_assert!(status < 500, "{status} for {sent}: {text}");
            if status == 200 {
                // The body may nest deeper than serde_json's own recursion bound lets this
                // test read it back (the endpoint skips unknown fields without recursing), so
                // the answer's kind is taken from what the endpoint said it sent, checked
                // against the request where the test can read it.
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    prop_assert_eq!(
                        streamed,
                        v["stream"] == json!(true),
                        "200 for {}: {}",
                        sent,
                        text
                    );
                }
                // A whole answer: a stream to its end, or one JSON object.
                prop_assert!(
                    if streamed {
                        text.ends_with("data: [DONE]\n\n")
                    } else {
                        serde_json::from_str::<Value>(&text).is_ok()
                    },
                    "200 for {sent}: {text}"
                );
            } else {
                let error: Value = serde_json::from_str(&text)
                    .map_err(|_| TestCaseError::fail(format!("{status}, not JSON: {text}")))?;
                prop_assert!(
                    error["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "{status} for {sent}: {text}"
                );
            }
            Ok(())
        },
    );
    if let Err(e) = outcome {
        panic!("{e}");
    }
    let (status, v) = json_of(port, "/v1/chat/completions", &chat_body("Hello", 3));
    assert_eq!(status, 200, "{v}");
    let m = metrics(port);
    let in_flight = m
        .lines()
        .find(|l| l.starts_with("clusteragent_sequences_in_flight"))
        .unwrap_or_else(|| panic!("no sequences gauge in {m}"));
    assert!(in_flight.ends_with(" 0"), "{in_flight}");
}
