//! The daemon's own behaviour: settings from flags, environment and a config file; SIGTERM
//! drains the streams in flight before exiting, at stage 0 and at a later stage.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

/// Starts a `/generate` stream of `max_tokens` and reads its first token; the thread returns
/// the stream's last event.
fn stream_in_flight(port: u16, max_tokens: usize) -> std::thread::JoinHandle<Value> {
    let resp = http_client(Duration::from_secs(90))
        .post(&format!("http://127.0.0.1:{port}/generate"))
        .send_json(json!({"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": true}))
        .unwrap();
    let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "token");
    std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .map(|l| serde_json::from_str::<Value>(&l).unwrap())
            .last()
            .unwrap_or(Value::Null)
    })
}

#[test]
fn sigterm_lets_streams_finish_refuses_new_ones_and_exits_cleanly() {
    // A grace period longer than the stream needs even on a loaded machine: the test is that
    // the stream finishes, not how fast.
    let mut c = Cluster::start(1, &[&["--grace-period", "60"]]);
    let model = c.tiny_model();
    let port = c.serve("one.yaml", |port| {
        pipeline_yaml(&model, &[("node-0", "0-3")], port)
    });
    let started = Instant::now();
    let waiter = stream_in_flight(port, 1000);
    let code = c.terminate(0, Duration::from_secs(70));
    let last = waiter.join().unwrap();
    assert_eq!(
        last["event"], "done",
        "the stream in flight finished: {last}"
    );
    assert_eq!(last["completion_tokens"], 1000);
    assert_eq!(code, Some(0), "{}", c.log(0));
    assert!(started.elapsed() < Duration::from_secs(70));
    let log = c.log(0);
    assert!(
        log.contains("waiting up to") && log.contains("stopped"),
        "{log}"
    );
    // Gone: a new request finds nobody listening.
    assert!(generate(port, "Hello", 3).is_err());
}

/// A later stage stopped with SIGTERM (launchd and systemd stop agents so for updates and
/// reboots) serves its sequences in flight to their end before it exits, and takes no new one
/// meanwhile.
#[test]
fn sigterm_of_a_later_stage_lets_its_streams_finish() {
    let mut c = Cluster::start(2, &[&[], &["--grace-period", "60"]]);
    let model = c.tiny_model();
    let port = c.serve("two.yaml", |port| {
        pipeline_yaml(&model, &[("node-0", "0-1"), ("node-1", "2-3")], port)
    });
    let streams: Vec<_> = (0..2).map(|_| stream_in_flight(port, 600)).collect();
    c.signal(1, "TERM");
    // While it drains, a new sequence is turned away at once, saying why.
    std::thread::sleep(Duration::from_millis(300));
    let refused = generate(port, "Hello", 3).unwrap_err();
    assert!(refused.contains("takes no new sequence"), "{refused}");
    let code = c.wait_exit(1, Duration::from_secs(70));
    for s in streams {
        let last = s.join().unwrap();
        assert_eq!(
            last["event"], "done",
            "the stream in flight finished: {last}"
        );
        assert_eq!(last["completion_tokens"], 600);
    }
    assert_eq!(code, Some(0), "{}", c.log(1));
    let log = c.log(1);
    assert!(
        log.contains("waiting up to")
            && log.contains("stopped")
            && !log.contains("grace period over"),
        "{log}"
    );
    // Gone: a new request is answered at once, not held.
    let start = Instant::now();
    assert!(generate(port, "Hello", 3).is_err());
    assert!(start.elapsed() < Duration::from_secs(10));
}

fn healthz_name(listen: &str) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(mut r) = ureq::get(&format!("http://{listen}/healthz")).call() {
            let v: Value = r.body_mut().read_json().ok()?;
            return v["node"].as_str().map(str::to_string);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn settings_come_from_flags_then_environment_then_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "name: from-file\nlisten: \"{listen}\"\nring-listen: \"127.0.0.1:{}\"\ndata-dir: \"{}\"\n",
            free_port(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let run = |env_name: Option<&str>, flag_name: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clusteragent"));
        cmd.args(["--config", config.to_str().unwrap()])
            .env_remove("CLUSTERAGENT_NAME")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(n) = env_name {
            cmd.env("CLUSTERAGENT_NAME", n);
        }
        if let Some(n) = flag_name {
            cmd.args(["--name", n]);
        }
        let mut child = cmd.spawn().unwrap();
        let name = healthz_name(&listen);
        let _ = child.kill();
        let _ = child.wait();
        name
    };
    assert_eq!(run(None, None).as_deref(), Some("from-file"));
    assert_eq!(run(Some("from-env"), None).as_deref(), Some("from-env"));
    assert_eq!(
        run(Some("from-env"), Some("from-flag")).as_deref(),
        Some("from-flag")
    );
    // The token was generated on first start and kept.
    let token = std::fs::read_to_string(dir.path().join("data/cluster-token")).unwrap();
    assert_eq!(token.trim().len(), 48);
    // A key the config file does not know is named.
    std::fs::write(&config, "name: a\nlisen: 127.0.0.1:1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clusteragent"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `lisen`"), "{err}");
}

/// A second agent on a data directory another agent holds is refused naming the cause, and
/// leaves nothing behind (it used to write a token file into the other agent's directory).
#[test]
fn a_second_agent_on_a_held_data_directory_is_refused_and_writes_nothing() {
    let c = Cluster::start(1, &[]);
    let data = &c.agents[0].data_dir;
    assert!(
        !data.join("cluster-token").exists(),
        "the harness gives its own token file"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_clusteragent"))
        .args(["--name", "second"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--ring-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another agent is using this data directory"),
        "{err}"
    );
    assert!(
        !data.join("cluster-token").exists(),
        "the refused agent wrote a token into the other's data directory"
    );
}

#[test]
fn reads_need_the_token_unless_the_agent_opens_them() {
    let c = Cluster::start(2, &[&["--open-reads"], &[]]);
    let nodes = c.write("nodes.yaml", &c.nodes_yaml());
    // Open reads: anyone may look; changing still needs the token.
    assert!(c.ctl_with(0, None, &["get", "nodes"]).status.success());
    let out = c.ctl_with(0, None, &["apply", "-f", nodes.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    // The default: reads need it too.
    let out = c.ctl_with(1, None, &["get", "nodes"]);
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    assert!(c.ctl_on(1, &["get", "nodes"]).status.success());

    // Open reads do not show an Endpoint's API keys, which would open its completions to all.
    let model = c.dir.path().join("model");
    make_model(&model);
    let port = free_port();
    let text = pipeline_yaml(&model, &[("node-0", "0-3")], port).replace(
        "spec: {pipeline: tiny-pipe,",
        "spec: {apiKeys: [s3cret-key], pipeline: tiny-pipe,",
    );
    assert!(text.contains("s3cret-key"), "{text}");
    let path = c.write("keyed.yaml", &format!("{}{text}", c.nodes_yaml()));
    let out = c.ctl_on(0, &["apply", "-f", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", shown(&out));
    for args in [
        &["get", "endpoints", "-o", "json"][..],
        &["get", "endpoints", "tiny-api", "-o", "yaml"][..],
        &["describe", "endpoint", "tiny-api"][..],
    ] {
        let open = c.ctl_with(0, None, args);
        assert!(open.status.success(), "{}", shown(&open));
        let text = String::from_utf8_lossy(&open.stdout);
        assert!(
            !text.contains("s3cret-key") && text.contains("hidden: shown with the cluster token"),
            "{args:?} without the token: {text}"
        );
        let with = c.ctl_on(0, args);
        assert!(
            String::from_utf8_lossy(&with.stdout).contains("s3cret-key"),
            "{args:?} with the token: {}",
            shown(&with)
        );
    }
    // The store that holds them is private to the agent's user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&c.agents[0].data_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "data dir mode {mode:o}");
}
