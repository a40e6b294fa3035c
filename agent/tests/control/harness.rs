//! Starts agents, runs `clusterctl` against them, writes manifests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const TOKEN: &str = "control-test-token";

pub use crate::common::{free_port, python_has};
pub use cluster_fixtures::shared_data;

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> std::time::SystemTime {
    let mut t = std::time::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        let m = if p.is_dir() {
            newest(&p)
        } else {
            entry.metadata().and_then(|m| m.modified()).unwrap_or(t)
        };
        t = t.max(m);
    }
    t
}

/// The `clusterctl` binary beside `clusteragent`. `cargo test --workspace` builds it; when this
/// test runs alone and the binary is missing or older than its sources, it is built here.
/// (Building it unconditionally would rebuild it with other feature choices than the
/// workspace build made, which takes minutes.)
pub fn clusterctl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let agent = Path::new(env!("CARGO_BIN_EXE_clusteragent"));
        let ctl = agent.with_file_name(format!("clusterctl{}", std::env::consts::EXE_SUFFIX));
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sources = newest(&root.join("ctl/src")).max(newest(&root.join("agent/api/src")));
        let built = std::fs::metadata(&ctl).and_then(|m| m.modified()).ok();
        if built.is_some_and(|b| b >= sources) {
            return ctl;
        }
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", "clusterctl"]);
        if agent.components().any(|c| c.as_os_str() == "release") {
            build.arg("--release");
        }
        let out = build.output().unwrap();
        assert!(
            out.status.success() && ctl.exists(),
            "building clusterctl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ctl
    })
    .clone()
}

/// Writes a tiny 4-layer model with the project's own generator.
pub fn make_model(dir: &Path) {
    crate::common::make_model(dir, &["--layers", "4"]);
}

/// What placement sets aside on a node, beside the weights, for a stage of the tiny model of
/// [`make_model`] to compute in (with the default prefill chunk).
pub fn tiny_working_bytes() -> u64 {
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path());
    cluster_engine::ModelFolder::open(dir.path())
        .unwrap()
        .byte_profile(None)
        .working_bytes(128)
}

/// `--max-memory` that leaves `bytes` for the tiny model's weights once a stage's working memory
/// is set aside.
pub fn tiny_room(bytes: u64) -> String {
    format!("{}B", bytes + tiny_working_bytes())
}

/// Greedy tokens of the one-process engine (`clusteragent generate`), the reference.
pub fn one_process(model: &Path, prompt: &str, max_tokens: usize) -> Vec<u32> {
    one_process_json(model, prompt, max_tokens, false)["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// The one-process engine's JSON answer (`clusteragent generate --json`), rendering `prompt`
/// as a one-message chat when `chat`.
pub fn one_process_json(model: &Path, prompt: &str, max_tokens: usize, chat: bool) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clusteragent"));
    cmd.args([
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
    ])
    .args([
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
        "--json",
    ]);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One agent process.
pub struct Agent {
    pub name: String,
    pub listen: String,
    pub ring: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub extra: Vec<String>,
    /// More environment variables (test hooks).
    pub env: Vec<(String, String)>,
    /// Its working directory, where relative model paths resolve: one per agent, so a test can
    /// give a model to one node only.
    pub cwd: PathBuf,
    /// The network namespace it runs in (`ip netns exec`), for partition tests.
    pub netns: Option<String>,
    child: Option<Child>,
}

/// Where an agent listens, and the network namespace it runs in.
pub struct Host {
    /// Its control plane's `host:port`.
    pub listen: String,
    /// Its ring's `host:port`.
    pub ring: String,
    /// Its network namespace, when not this process's.
    pub netns: Option<String>,
}

/// Agents sharing a token, in one temporary folder.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub agents: Vec<Agent>,
    pub token_file: PathBuf,
}

impl Cluster {
    /// Starts `n` agents named node-0.. with fast heartbeats; `extra[i]` are more flags.
    pub fn start(n: usize, extra: &[&[&str]]) -> Cluster {
        Self::start_with_env(n, extra, &[])
    }

    /// [`Cluster::start`] with `env[i]`: more environment variables for agent `i`.
    pub fn start_with_env(n: usize, extra: &[&[&str]], env: &[&[(&str, &str)]]) -> Cluster {
        let hosts: Vec<Host> = (0..n)
            .map(|_| Host {
                listen: format!("127.0.0.1:{}", free_port()),
                ring: format!("127.0.0.1:{}", free_port()),
                netns: None,
            })
            .collect();
        Self::start_on(&hosts, extra, env)
    }

    /// Starts an agent on each of `hosts`; `extra` and `env` as for
    /// [`Cluster::start_with_env`].
    pub fn start_on(hosts: &[Host], extra: &[&[&str]], env: &[&[(&str, &str)]]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let mut cluster = Cluster {
            agents: Vec::new(),
            token_file,
            dir,
        };
        for (i, host) in hosts.iter().enumerate() {
            let name = format!("node-{i}");
            let agent = Agent {
                listen: host.listen.clone(),
                ring: host.ring.clone(),
                data_dir: cluster.dir.path().join(&name),
                log: cluster.dir.path().join(format!("{name}.log")),
                extra: extra
                    .get(i)
                    .map(|e| e.iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default(),
                env: env
                    .get(i)
                    .map(|e| {
                        e.iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
                cwd: cluster.dir.path().join(format!("{name}-cwd")),
                netns: host.netns.clone(),
                name,
                child: None,
            };
            std::fs::create_dir_all(&agent.cwd).unwrap();
            cluster.agents.push(agent);
            cluster.spawn(i);
        }
        cluster
    }

    /// Starts (or restarts) agent `i` on its data dir and waits until it answers.
    pub fn spawn(&mut self, i: usize) {
        let token_file = self.token_file.clone();
        let a = &mut self.agents[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)
            .unwrap();
        let mut command = match &a.netns {
            // `ip netns exec` runs the agent itself (exec), so the child is the agent.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_clusteragent")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_clusteragent")),
        };
        let child = command
            .args([
                "--name",
                &a.name,
                "--listen",
                &a.listen,
                "--ring-listen",
                &a.ring,
            ])
            .args(["--data-dir", a.data_dir.to_str().unwrap()])
            .args(["--token-file", token_file.to_str().unwrap()])
            .args(["--heartbeat-ms", "200", "--node-timeout-ms", "1500"])
            .args(&a.extra)
            .envs(a.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&a.cwd)
            .env("RUST_LOG", "info")
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        a.child = Some(child);
        let url = format!("http://{}/healthz", a.listen);
        let name = a.name.clone();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if ureq::get(&url).call().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent {name} did not answer: {}", self.log(i));
    }

    /// SIGKILL of agent `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Agent `i`'s process id.
    pub fn pid(&self, i: usize) -> u32 {
        self.agents[i].child.as_ref().expect("agent running").id()
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to agent `i`.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.agents[i].child.as_ref().expect("agent running").id();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// SIGTERM to agent `i`; waits (at most `limit`) for it to exit and returns its exit code.
    pub fn terminate(&mut self, i: usize, limit: Duration) -> Option<i32> {
        self.signal(i, "TERM");
        self.wait_exit(i, limit)
    }

    /// Waits (at most `limit`) for agent `i` to exit and returns its exit code.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<i32> {
        let mut child = self.agents[i].child.take()?;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        panic!(
            "agent {} still running after {limit:?}",
            self.agents[i].name
        );
    }

    /// Agent `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.agents[i].log).unwrap_or_default()
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        (0..self.agents.len())
            .map(|i| format!("--- {} ---\n{}", self.agents[i].name, self.log(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs clusterctl against agent `i` with the token; `stdin` feeds `-f -`.
    pub fn ctl_on(&self, i: usize, args: &[&str]) -> Output {
        self.ctl_with(i, Some(TOKEN), args)
    }

    /// Runs clusterctl against agent 0 with the token.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_on(0, args)
    }

    /// Runs clusterctl against agent `i` with `token` (none: no token at all).
    pub fn ctl_with(&self, i: usize, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(clusterctl());
        cmd.args(args)
            .env("CLUSTERCTL_SERVER", &self.agents[i].listen)
            .env("CLUSTERCTL_CONFIG", self.dir.path().join("ctl-config.yaml"))
            .env_remove("CLUSTERCTL_TOKEN")
            .env_remove("CLUSTERCTL_TOKEN_FILE");
        if let Some(t) = token {
            cmd.env("CLUSTERCTL_TOKEN", t);
        }
        cmd.output().unwrap()
    }

    /// Writes `text` as manifest file `name`, applies it through agent `i` with `--wait`, and
    /// returns clusterctl's output; a failed apply fails the test with clusterctl's output.
    pub fn apply_wait_on(&self, i: usize, name: &str, text: &str) -> String {
        self.apply_wait_within(i, name, text, 60)
    }

    /// [`Cluster::apply_wait_on`] with `clusterctl apply --wait --timeout SECONDS`.
    pub fn apply_wait_within(&self, i: usize, name: &str, text: &str, seconds: u64) -> String {
        let file = self.write(name, text);
        let out = self.ctl_on(
            i,
            &[
                "apply",
                "-f",
                file.to_str().unwrap(),
                "--wait",
                "--timeout",
                &seconds.to_string(),
            ],
        );
        assert!(out.status.success(), "{}\n{}", shown(&out), self.logs());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Cluster::apply_wait_on`] through agent 0.
    pub fn apply_wait(&self, name: &str, text: &str) -> String {
        self.apply_wait_on(0, name, text)
    }

    /// Writes a manifest file in the cluster's folder.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `GET path` on agent `i`, with the token, as JSON.
    pub fn get(&self, i: usize, path: &str) -> Value {
        let agent = http_client(Duration::from_secs(10));
        let mut r = agent
            .get(&format!("http://{}{path}", self.agents[i].listen))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap();
        r.body_mut().read_json().unwrap_or(Value::Null)
    }

    /// Waits until `check` holds, or fails with `what` and the logs.
    pub fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what}: not within {limit:?}\n{}", self.logs());
    }

    /// A pipeline's phase as agent `i` reports it.
    pub fn phase(&self, i: usize, pipeline: &str) -> String {
        self.get(i, &format!("/api/v1/pipelines/{pipeline}"))["status"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Bytes of stage weights each node reports holding, as agent 0 sees them.
    pub fn stage_memory(&self) -> Vec<u64> {
        let nodes = self.get(0, "/api/v1/nodes");
        self.agents
            .iter()
            .map(|a| {
                nodes["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["metadata"]["name"] == a.name.as_str())
                    .and_then(|n| n["status"]["report"]["stageMemoryBytes"].as_u64())
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }

    /// Applies every agent's Node through agent 0 and waits until agent 0 has heard from them
    /// all (placement needs their reports).
    pub fn apply_nodes(&self) {
        let nodes = self.write("nodes.yaml", &self.nodes_yaml());
        let out = self.ctl(&["apply", "-f", nodes.to_str().unwrap()]);
        assert!(out.status.success(), "{}", shown(&out));
        let n = self.agents.len();
        self.wait_for(
            "agent 0 hears from every node",
            Duration::from_secs(15),
            || {
                self.get(0, "/api/v1/nodes")["items"]
                    .as_array()
                    .is_some_and(|a| {
                        a.len() == n && a.iter().all(|x| x["status"]["phase"] == "Ready")
                    })
            },
        );
    }

    /// The tiny model of [`make_model`], written into the cluster's folder: its path.
    pub fn tiny_model(&self) -> PathBuf {
        let model = self.dir.path().join("model");
        make_model(&model);
        model
    }

    /// Applies every agent's Node and `spec(port)` (what serves a model on `port`, a free port
    /// chosen here) from the file `name` through agent 0, waits until it serves, and returns
    /// the port.
    pub fn serve(&self, name: &str, spec: impl FnOnce(u16) -> String) -> u16 {
        let port = free_port();
        self.apply_wait(name, &format!("{}{}", self.nodes_yaml(), spec(port)));
        port
    }

    /// The Node documents of every agent.
    pub fn nodes_yaml(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{address: \"{}\", ringAddress: \"{}\"}}\n---\n",
                    a.name, a.listen, a.ring
                )
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.kill(i);
        }
    }
}

/// A model, a pipeline over `stages` (node, layers) and an endpoint on `port`.
pub fn pipeline_yaml(model: &Path, stages: &[(&str, &str)], port: u16) -> String {
    let stages: String = stages
        .iter()
        .map(|(n, l)| format!("    - {{node: {n}, layers: \"{l}\"}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec:\n  source: {{path: \"{}\"}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: tiny-pipe}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n{stages}---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: tiny-api}}\nspec: {{pipeline: tiny-pipe, port: {port}}}\n",
        model.display()
    )
}

/// Generates through an endpoint's `/generate`: the token ids, or the error status and body.
pub fn generate(port: u16, prompt: &str, max_tokens: usize) -> Result<Vec<u32>, String> {
    generate_within(port, prompt, max_tokens, Duration::from_secs(60))
}

/// [`generate`], waiting at most `limit` for the whole answer.
pub fn generate_within(
    port: u16,
    prompt: &str,
    max_tokens: usize,
    limit: Duration,
) -> Result<Vec<u32>, String> {
    generate_at(&format!("127.0.0.1:{port}"), prompt, max_tokens, limit)
}

/// [`generate_within`] through the endpoint at `address` (`host:port`).
pub fn generate_at(
    address: &str,
    prompt: &str,
    max_tokens: usize,
    limit: Duration,
) -> Result<Vec<u32>, String> {
    let agent = http_client(limit);
    let resp = agent
        .post(&format!("http://{address}/generate"))
        .send_json(json!({"prompt": prompt, "max_tokens": max_tokens}))
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let lines: Vec<Value> = BufReader::new(resp.into_body().into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    if status != 200 || lines.last().is_none_or(|l| l["event"] != "done") {
        return Err(format!("HTTP {status}: {lines:?}"));
    }
    Ok(lines
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["id"].as_u64().unwrap() as u32)
        .collect())
}

/// The sum of the values on the lines of a Prometheus exposition that start with `name`
/// (a metric's name, with as many of its labels as narrow it).
pub fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two replicas of two stages over four agents.
pub const TWO_BY_TWO: [(usize, &str, &str); 4] = [
    (0, "node-0", "0-1"),
    (0, "node-1", "2-3"),
    (1, "node-2", "0-1"),
    (1, "node-3", "2-3"),
];

/// Model `tiny` at `model`, pipeline `tiny-pipe` of as many replicas as `stages` (replica,
/// node, layers) name, and endpoint `tiny-api` on `port`.
pub fn replicas_yaml(model: &Path, stages: &[(usize, &str, &str)], port: u16) -> String {
    let replicas = stages.iter().map(|s| s.0 + 1).max().unwrap_or(1);
    let stages: String = stages
        .iter()
        .map(|(r, n, l)| format!("    - {{replica: {r}, node: {n}, layers: \"{l}\"}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {{path: \"{}\"}}}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: tiny-pipe}}\nspec:\n  model: tiny\n  device: cpu\n  replicas: {replicas}\n  stages:\n{stages}---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: tiny-api}}\nspec: {{pipeline: tiny-pipe, port: {port}}}\n",
        model.display()
    )
}

/// An endpoint's Prometheus exposition.
pub fn metrics(port: u16) -> String {
    http_client(Duration::from_secs(30))
        .get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// An HTTP client that hands back error statuses instead of failing on them.
pub fn http_client(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// stdout and stderr of a clusterctl run, for messages.
pub fn shown(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
