//! `clusteragent bench-ring`: the pipeline ring against the one-process engine, side by side in
//! one run, ratios printed last.
//!
//! (a) one sequence: decode tokens/s through a 2-stage ring over loopback ÷ one process, every
//!     process with one compute thread;
//! (b) four concurrent sequences through 2 stages, each pinned to its own core ÷ one process
//!     pinned to one core (which serves one token at a time, whatever the number of callers).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

/// Flags of `clusteragent bench-ring`.
#[derive(Debug, Args)]
pub struct BenchRingArgs {
    /// Model folder to use; by default a random-weight Llama-shaped model (8 layers, hidden 768,
    /// about 230 MB in f32) is written to a temporary folder, large enough that one decode step
    /// takes well over 10 ms on one core.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens each sequence generates.
    #[arg(long, default_value_t = 96)]
    pub tokens: usize,
    /// Concurrent sequences for the throughput measurement.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Rounds of the three measurements, interleaved; medians are reported, since a shared
    /// machine's speed drifts by ±10% from one run to the next.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the clusteragent binary")
}

/// A command pinned to `core` when `taskset` exists (Linux), with one compute thread.
fn pinned(core: Option<usize>) -> Result<Command> {
    let mut cmd = match core {
        Some(c) if Path::new("/usr/bin/taskset").exists() => {
            let mut cmd = Command::new("/usr/bin/taskset");
            cmd.arg("-c").arg(c.to_string()).arg(exe()?);
            cmd
        }
        _ => Command::new(exe()?),
    };
    cmd.env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1");
    Ok(cmd)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

const PROMPT: &str = "The two machines sat side by side on the shelf, joined by a short cable.";

/// Runs `clusteragent bench-ring`.
pub fn run(args: BenchRingArgs) -> Result<()> {
    if args.tokens < 8 || args.concurrency == 0 {
        bail!("--tokens must be at least 8 and --concurrency at least 1");
    }
    let tmp = std::env::temp_dir().join(format!("clusteragent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let _cleanup = scopeguard(tmp.clone());
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let m = tmp.join("model");
            eprintln!("writing the benchmark model to {}", m.display());
            let status = Command::new(exe()?)
                .args(["make-model", "--out"])
                .arg(&m)
                .args([
                    "--arch",
                    "llama",
                    "--layers",
                    "8",
                    "--hidden",
                    "768",
                    "--intermediate",
                    "2048",
                    "--heads",
                    "12",
                    "--kv-heads",
                    "4",
                ])
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("make-model failed");
            }
            m
        }
    };
    let layers = cluster_engine::ModelFolder::open(&model)?
        .config
        .num_hidden_layers;
    if layers < 2 {
        bail!("the model has {layers} layer; a 2-stage ring needs at least 2");
    }
    let pin = Path::new("/usr/bin/taskset").exists();
    if !pin {
        eprintln!("note: taskset not found; processes are not pinned to cores");
    }

    // The ring: two stage processes, each on its own core.
    let half = layers / 2;
    let http = format!("127.0.0.1:{}", free_port()?);
    let config = json!({
        "pipeline": "bench", "generation": 1, "model": model, "device": "cpu", "dtype": "f32",
        "token": "bench-token",
        "stages": [
            {"node": "core0", "address": format!("127.0.0.1:{}", free_port()?), "layers": format!("0-{}", half - 1)},
            {"node": "core1", "address": format!("127.0.0.1:{}", free_port()?), "layers": format!("{half}-{}", layers - 1)},
        ],
    });
    let config_path = tmp.join("ring.json");
    std::fs::write(&config_path, config.to_string())?;
    let mut children = Killed(Vec::new());
    for i in 0..2 {
        let mut cmd = pinned(Some(i))?;
        cmd.args(["stage", "--config"])
            .arg(&config_path)
            .args(["--index", &i.to_string()]);
        if i == 0 {
            cmd.args(["--http", &http]);
        }
        children
            .0
            .push(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .http_status_as_error(false)
        .build()
        .into();
    wait_up(&agent, &http)?;

    let (mut singles, mut rings, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        eprintln!(
            "round {round}: one process on core 0; the ring with 1 sequence; the ring with {} sequences",
            args.concurrency
        );
        singles.push(one_process(&model, args.tokens)?);
        let one = stream(&agent, &http, args.tokens)?;
        eprintln!(
            "  ring, 1 sequence: {:.2} tok/s seen by the client, {:.2} by stage 0",
            one.decode_tokens_per_s(),
            one.server_rate
        );
        rings.push(one.decode_tokens_per_s());
        totals.push(concurrent(&agent, &http, args.tokens, args.concurrency)?);
        eprintln!(
            "  one process {:.2} tok/s, ring {:.2} tok/s, ring x{} {:.2} tok/s",
            singles[round - 1],
            rings[round - 1],
            args.concurrency,
            totals[round - 1]
        );
    }
    drop(children);
    // Each round's ratios compare measurements taken seconds apart, so the machine's drift
    // cancels within a round; the median round is reported, with the spread.
    let mut ratio_a: Vec<f64> = rings.iter().zip(&singles).map(|(r, s)| r / s).collect();
    let mut ratio_b: Vec<f64> = totals.iter().zip(&singles).map(|(t, s)| t / s).collect();
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.3}-{hi:.3}")
    };
    let (spread_a, spread_b) = (spread(&ratio_a), spread(&ratio_b));
    let one_process_tps = median(&mut singles);
    let ring_tps = median(&mut rings);
    let total_tps = median(&mut totals);
    let step_ms = 1e3 / one_process_tps;
    // Two hops per token (stage 0 → 1, 1 → 0); whatever the ring adds to a step is theirs.
    let hop_ms = (1e3 / ring_tps - step_ms) / 2.0;
    println!(
        "model: {} ({layers} layers, split 0-{} / {half}-{}), {} tokens per sequence, {} interleaved rounds",
        model.display(),
        half - 1,
        layers - 1,
        args.tokens,
        args.rounds.max(1)
    );
    println!(
        "one process, 1 core:                  {one_process_tps:8.2} tok/s median ({step_ms:.2} ms per decode step)"
    );
    println!("2-stage ring, 1 sequence:             {ring_tps:8.2} tok/s median");
    println!(
        "2-stage ring, {} sequences (total):    {total_tps:8.2} tok/s median",
        args.concurrency
    );
    println!(
        "ring time per hop per token:          {hop_ms:8.3} ms (ring step minus one-process step, over 2 hops)"
    );
    println!(
        "ratio (a) ring / one process, 1 sequence:     {:.3}  (rounds {spread_a}; target >= 0.95)",
        median(&mut ratio_a)
    );
    println!(
        "ratio (b) ring, {} sequences / one process:    {:.3}  (rounds {spread_b}; target >= 1.8)",
        args.concurrency,
        median(&mut ratio_b)
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn wait_up(agent: &ureq::Agent, http: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let up = agent
            .get(&format!("http://{http}/health"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
            .is_some_and(|h| h["ring"] == "up");
        if up {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the ring did not come up within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Decode tokens/s of `clusteragent generate` pinned to core 0.
fn one_process(model: &Path, tokens: usize) -> Result<f64> {
    let out = pinned(Some(0))?
        .args(["generate", "--model"])
        .arg(model)
        .args([
            "--prompt",
            PROMPT,
            "--max-tokens",
            &tokens.to_string(),
            "--ignore-eos",
            "--json",
            "--device",
            "cpu",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "one-process generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let single: Value = serde_json::from_slice(&out.stdout)?;
    single["timings"]["decode_tokens_per_s"]
        .as_f64()
        .context("generate --json reported no decode rate")
}

/// Total decode tokens/s of `n` sequences at once, in the steady state: from the moment every
/// sequence has its first token to the moment the first one finishes.
fn concurrent(agent: &ureq::Agent, http: &str, tokens: usize, n: usize) -> Result<f64> {
    let results: Vec<Result<Timeline>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| s.spawn(|| stream(agent, http, tokens)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked")))
            })
            .collect()
    });
    let timelines = results.into_iter().collect::<Result<Vec<_>>>()?;
    let start = timelines
        .iter()
        .filter_map(|t| t.stamps.first().copied())
        .max()
        .context("no tokens")?;
    let end = timelines
        .iter()
        .filter_map(|t| t.stamps.last().copied())
        .min()
        .context("no tokens")?;
    let count: usize = timelines
        .iter()
        .map(|t| t.stamps.iter().filter(|&&s| s > start && s <= end).count())
        .sum();
    let secs = end.duration_since(start).as_secs_f64();
    Ok(if secs > 0.0 { count as f64 / secs } else { 0.0 })
}

/// Arrival times of one sequence's tokens, as the caller sees them.
struct Timeline {
    stamps: Vec<Instant>,
    /// The decode rate stage 0 measured itself, as `generate` does for the one-process run.
    server_rate: f64,
}

impl Timeline {
    fn decode_tokens_per_s(&self) -> f64 {
        match (self.stamps.first(), self.stamps.last()) {
            (Some(a), Some(b)) if self.stamps.len() > 1 => {
                (self.stamps.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

fn stream(agent: &ureq::Agent, http: &str, tokens: usize) -> Result<Timeline> {
    let resp = agent
        .post(&format!("http://{http}/generate"))
        .send_json(json!({"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": true}))?;
    if resp.status() != 200 {
        bail!("the ring refused the request: HTTP {}", resp.status());
    }
    let mut stamps = Vec::with_capacity(tokens);
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let event: Value = serde_json::from_str(&line?)?;
        match event["event"].as_str() {
            Some("token") => stamps.push(Instant::now()),
            Some("done") => {
                let server_rate = event["decode_tokens_per_s"].as_f64().unwrap_or(0.0);
                return Ok(Timeline {
                    stamps,
                    server_rate,
                });
            }
            _ => bail!("the ring failed: {event}"),
        }
    }
    bail!("the stream ended without a final event")
}

/// Removes the benchmark's temporary folder when the run ends, however it ends.
fn scopeguard(dir: PathBuf) -> impl Drop {
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Remove(dir)
}
