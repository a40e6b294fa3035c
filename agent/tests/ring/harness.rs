//! Starts rings of real stage processes and talks to them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_api::{DeviceKind, WeightDType};
use cluster_engine::{GenerateOptions, LoadOptions, LocalPipeline};
use serde_json::{Value, json};

pub const TOKEN: &str = "test-cluster-token";

pub use crate::common::free_port;

/// Writes a tiny model with the project's own generator.
pub fn make_model(dir: &Path, arch: &str) {
    make_model_with(dir, arch, &[]);
}

/// [`make_model`] with more `make-model` flags (sizes, `--gguf`).
pub fn make_model_with(dir: &Path, arch: &str, extra: &[&str]) {
    crate::common::make_model(dir, &[&["--arch", arch], extra].concat());
}

/// Greedy tokens of the one-process engine, the reference every ring must match.
pub fn one_process(model: &Path, prompt: &str, max_tokens: usize) -> Vec<u32> {
    one_process_with(model, prompt, max_tokens, false)
}

/// [`one_process`], optionally running past EOS tokens.
pub fn one_process_with(
    model: &Path,
    prompt: &str,
    max_tokens: usize,
    ignore_eos: bool,
) -> Vec<u32> {
    let p = LocalPipeline::load(
        model,
        &LoadOptions {
            split: None,
            device: DeviceKind::Cpu,
            dtype: Some(WeightDType::F32),
        },
    )
    .unwrap();
    let ids = p.encode_text(prompt).unwrap();
    let options = GenerateOptions {
        max_tokens,
        ignore_eos,
        ..GenerateOptions::default()
    };
    p.generate(1, &ids, &options, &mut |_| {})
        .unwrap()
        .token_ids
}

/// A ring of stage processes.
pub struct Ring {
    pub dir: tempfile::TempDir,
    pub config: Value,
    pub http: SocketAddr,
    children: Vec<Option<Child>>,
    /// More environment variables of each stage's process (test hooks).
    env: Vec<Vec<(String, String)>>,
}

/// How [`Ring::start_opts`] starts a ring beyond its model and split.
pub struct RingOptions {
    pub prefill_chunk: usize,
    pub max_sequences: usize,
    pub first_token_timeout_ms: Option<u64>,
    /// `(stage, variable, value)`: more environment for that stage's process.
    pub env: Vec<(usize, &'static str, String)>,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            prefill_chunk: 64,
            max_sequences: 64,
            first_token_timeout_ms: None,
            env: Vec::new(),
        }
    }
}

impl Ring {
    /// Starts one process per range of `split` and waits until the ring is whole.
    pub fn start(model: &Path, split: &[&str], prefill_chunk: usize) -> Ring {
        Self::start_with(model, split, prefill_chunk, 64)
    }

    /// [`Ring::start`] with a limit on sequences in flight.
    pub fn start_with(
        model: &Path,
        split: &[&str],
        prefill_chunk: usize,
        max_sequences: usize,
    ) -> Ring {
        Self::start_opts(
            model,
            split,
            RingOptions {
                prefill_chunk,
                max_sequences,
                ..RingOptions::default()
            },
        )
    }

    /// Starts a ring as `options` say and waits until it serves.
    pub fn start_opts(model: &Path, split: &[&str], options: RingOptions) -> Ring {
        let RingOptions {
            prefill_chunk,
            max_sequences,
            first_token_timeout_ms,
            env,
        } = options;
        let dir = tempfile::tempdir().unwrap();
        let stages: Vec<Value> = split
            .iter()
            .enumerate()
            .map(|(i, layers)| json!({"node": format!("node-{i}"), "address": format!("127.0.0.1:{}", free_port()), "layers": layers}))
            .collect();
        let mut config = json!({
            "pipeline": "test-ring", "generation": 3, "model": model, "device": "cpu",
            "dtype": "f32", "prefillChunk": prefill_chunk, "maxSequences": max_sequences,
            "token": TOKEN, "stages": stages,
        });
        if let Some(ms) = first_token_timeout_ms {
            config["firstTokenTimeoutMs"] = json!(ms);
        }
        std::fs::write(dir.path().join("ring.json"), config.to_string()).unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut ring = Ring {
            dir,
            config,
            http,
            children: (0..split.len()).map(|_| None).collect(),
            env: (0..split.len())
                .map(|i| {
                    env.iter()
                        .filter(|(stage, ..)| *stage == i)
                        .map(|(_, k, v)| (k.to_string(), v.clone()))
                        .collect()
                })
                .collect(),
        };
        for i in 0..split.len() {
            ring.spawn_stage(i);
        }
        ring.wait_up(Duration::from_secs(30));
        ring
    }

    pub fn stage_address(&self, i: usize) -> String {
        self.config["stages"][i]["address"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("stage-{i}.log"))
    }

    /// The stage's log so far, for failure messages.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    pub fn spawn_stage(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clusteragent"));
        cmd.args([
            "stage",
            "--config",
            self.dir.path().join("ring.json").to_str().unwrap(),
            "--index",
            &i.to_string(),
        ])
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .envs(self.env[i].iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log);
        if i == 0 {
            cmd.args(["--http", &self.http.to_string()]);
        }
        self.children[i] = Some(cmd.spawn().unwrap());
    }

    /// SIGKILL, as a crash or a pulled power cord would end it.
    pub fn kill_stage(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn health(&self) -> Option<Value> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = agent
            .get(&format!("http://{}/health", self.http))
            .call()
            .ok()?;
        resp.body_mut().read_json().ok()
    }

    pub fn wait_up(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.health().is_some_and(|h| h["ring"] == "up") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let logs: Vec<String> = (0..self.children.len())
            .map(|i| format!("--- stage {i}:\n{}", self.log(i)))
            .collect();
        panic!(
            "ring not up within {limit:?}: {:?}\n{}",
            self.health(),
            logs.join("\n")
        );
    }

    /// CPU seconds stage `i`'s process has used so far (Linux: `/proc/PID/stat`, in the
    /// kernel's clock ticks of 1/100 s).
    #[cfg(target_os = "linux")]
    pub fn cpu_seconds(&self, i: usize) -> f64 {
        let pid = self.children[i].as_ref().expect("stage running").id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command's closing parenthesis; utime and stime are 14th and 15th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }

    /// Waits until stage 0 has no sequence in flight and no cache.
    pub fn wait_idle(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if self
                .health()
                .is_some_and(|h| h["sequences"] == 0 && h["cached_sequences"] == 0)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("stage 0 still busy after 5 s: {:?}", self.health());
    }

    /// Posts a generation and returns the streaming response's lines as they come.
    pub fn stream(&self, body: &Value) -> (u16, Box<dyn Iterator<Item = Value> + Send>) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build()
            .into();
        let resp = agent
            .post(&format!("http://{}/generate", self.http))
            .send_json(body)
            .unwrap();
        let status = resp.status().as_u16();
        let reader = BufReader::new(resp.into_body().into_reader());
        let lines = reader
            .lines()
            .map_while(Result::ok)
            .map(|l| serde_json::from_str::<Value>(&l).unwrap());
        (status, Box::new(lines))
    }

    /// Generates to the end: the token ids, and the final event.
    pub fn generate(&self, body: &Value) -> (Vec<u32>, Value) {
        let (status, lines) = self.stream(body);
        let events: Vec<Value> = lines.collect();
        assert_eq!(status, 200, "{events:?}");
        let ids = events
            .iter()
            .filter(|e| e["event"] == "token")
            .map(|e| e["id"].as_u64().unwrap() as u32)
            .collect::<Vec<_>>();
        (ids, events.last().cloned().unwrap_or(Value::Null))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill_stage(i);
        }
    }
}
