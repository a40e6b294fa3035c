//! `clusteragent bench-ring`: the pipeline ring against one process, side by side in one run,
//! ratios printed last.
//!
//! (a) one sequence: decode tokens/s through a 2-stage ring over loopback ÷ one process holding
//!     the whole model, every process with one compute thread;
//! (b) four concurrent sequences through the 2 stages, each pinned to its own core ÷ that one
//!     process decoding one sequence on one core.
//!
//! The one process is the same stage server holding every layer (a 1-stage ring), started with
//! the ring and measured through the same HTTP API, so the ratio is what splitting the model
//! and the two hops cost, not a difference between a fresh process and a long-lived one (on
//! this project's VM those differ by up to 20%, with where their memory landed). There is one
//! on each core, since the ring computes half of each step on either; their step times are
//! averaged. The `generate` command in a fresh process is printed too, for reference.

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

    // The ring, two stage processes, each on its own core; and one process holding the whole
    // model on each core.
    let half = layers / 2;
    let mut children = Killed(Vec::new());
    let ring_http = format!("127.0.0.1:{}", free_port()?);
    let ring = start_ring(
        &tmp,
        "ring",
        &model,
        &[format!("0-{}", half - 1), format!("{half}-{}", layers - 1)],
        &ring_http,
        &[0, 1],
        &mut children,
    )?;
    let mut whole_http = Vec::new();
    let mut whole_pids = Vec::new();
    for core in 0..2 {
        let http = format!("127.0.0.1:{}", free_port()?);
        let pids = start_ring(
            &tmp,
            &format!("whole{core}"),
            &model,
            &[format!("0-{}", layers - 1)],
            &http,
            &[core],
            &mut children,
        )?;
        whole_http.push(http);
        whole_pids.extend(pids);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .http_status_as_error(false)
        .build()
        .into();
    for http in whole_http.iter().chain([&ring_http]) {
        wait_up(&agent, http)?;
    }
    let huge = huge_pages_report(&[
        ("stage 0", ring[0]),
        ("stage 1", ring[1]),
        ("one process core 0", whole_pids[0]),
        ("one process core 1", whole_pids[1]),
    ]);

    let mut m = Measurements::default();
    for round in 1..=args.rounds.max(1) {
        eprintln!(
            "round {round}: one process on core 0 and on core 1; the ring with 1 and {} sequences; \
             one process with {0} sequences; generate in a fresh process",
            args.concurrency
        );
        let w0 = stream(&agent, &whole_http[0], args.tokens)?.decode_tokens_per_s();
        let w1 = stream(&agent, &whole_http[1], args.tokens)?.decode_tokens_per_s();
        let ring1 = stream(&agent, &ring_http, args.tokens)?.decode_tokens_per_s();
        let before = pass_counts(&agent, &ring_http)?;
        let ring_n = concurrent(&agent, &ring_http, args.tokens, args.concurrency)?;
        let after = pass_counts(&agent, &ring_http)?;
        m.steps += after.0 - before.0;
        m.passes += after.1 - before.1;
        let whole_n = concurrent(&agent, &whole_http[0], args.tokens, args.concurrency)?;
        let fresh = one_process(&model, args.tokens)?;
        // The ring computes half of a step on each core: the baseline step is the mean of the
        // two cores' steps.
        let base = 2.0 / (1.0 / w0 + 1.0 / w1);
        eprintln!(
            "  one process {w0:.2} / {w1:.2} tok/s (cores 0 / 1), ring {ring1:.2} tok/s, ring x{n} \
             {ring_n:.2} tok/s, one process x{n} {whole_n:.2} tok/s, generate {fresh:.2} tok/s",
            n = args.concurrency
        );
        m.base.push(base);
        m.ring1.push(ring1);
        m.ring_n.push(ring_n);
        m.whole_n.push(whole_n);
        m.fresh.push(fresh);
        m.a.push(ring1 / base);
        m.b.push(ring_n / base);
    }
    drop(children);
    m.print(&model, layers, half, &args, &huge);
    Ok(())
}

/// Each round's figures; ratios are taken within a round (seconds apart, so the machine's
/// drift cancels) and the median round is reported with the spread.
#[derive(Default)]
struct Measurements {
    base: Vec<f64>,
    ring1: Vec<f64>,
    ring_n: Vec<f64>,
    whole_n: Vec<f64>,
    fresh: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    /// Stage 0's steps and forward passes while the ring served several sequences.
    steps: u64,
    passes: u64,
}

impl Measurements {
    fn print(
        &mut self,
        model: &Path,
        layers: usize,
        half: usize,
        args: &BenchRingArgs,
        huge: &str,
    ) {
        let n = args.concurrency;
        let spread = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.3}-{hi:.3}")
        };
        let per_round =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
        let batched = per_round(&self.ring_n, &self.whole_n);
        let vs_fresh = per_round(&self.ring1, &self.fresh);
        let base = median(&mut self.base);
        let ring1 = median(&mut self.ring1);
        let step_ms = 1e3 / base;
        // Two hops per token (stage 0 → 1, 1 → 0); whatever the ring adds to a step is theirs.
        let hop_ms = (1e3 / ring1 - step_ms) / 2.0;
        println!(
            "model: {} ({layers} layers, split 0-{} / {half}-{}), {} tokens per sequence, {} interleaved rounds",
            model.display(),
            half - 1,
            layers - 1,
            args.tokens,
            args.rounds.max(1)
        );
        println!("huge pages held:                      {huge}");
        println!(
            "one process, 1 core:                 {base:8.2} tok/s median ({step_ms:.2} ms per decode step, cores 0 and 1 averaged)"
        );
        println!("2-stage ring, 1 sequence:             {ring1:8.2} tok/s median");
        println!(
            "2-stage ring, {n} sequences (total):   {:8.2} tok/s median",
            median(&mut self.ring_n)
        );
        println!(
            "stage 0 with {n} sequences:            {:8.2} steps per forward pass (prefill chunks count one each)",
            self.steps as f64 / self.passes.max(1) as f64
        );
        println!(
            "one process, {n} sequences (batched):  {:8.2} tok/s median (core 0)",
            median(&mut self.whole_n)
        );
        println!(
            "generate, fresh process, core 0:     {:8.2} tok/s median",
            median(&mut self.fresh)
        );
        println!(
            "ring time per hop per token:          {hop_ms:8.3} ms (ring step minus one-process step, over 2 hops)"
        );
        // A ratio: its median round, the spread of its rounds, and what goes with it.
        let ratio = |label: &str, v: &[f64], note: &str| {
            println!(
                "{label:<48} {:.3}  (rounds {}{note})",
                median(&mut v.to_vec()),
                spread(v)
            );
        };
        ratio("ring / generate in a fresh process:", &vs_fresh, "");
        ratio(
            &format!("ring, {n} sequences / one process, {n} sequences:"),
            &batched,
            "; both batch",
        );
        ratio(
            "ratio (a) ring / one process, 1 sequence:",
            &self.a,
            "; target >= 0.95",
        );
        ratio(
            &format!("ratio (b) ring, {n} sequences / one process:"),
            &self.b,
            "; target >= 1.8",
        );
    }
}

/// Starts the stage processes of a ring named `name` (one per range, stage `i` pinned to
/// `cores[i]`, stage 0 serving `http`) and returns their pids.
fn start_ring(
    tmp: &Path,
    name: &str,
    model: &Path,
    ranges: &[String],
    http: &str,
    cores: &[usize],
    children: &mut Killed,
) -> Result<Vec<u32>> {
    let stages = ranges
        .iter()
        .enumerate()
        .map(|(i, layers)| {
            Ok(json!({"node": format!("core{}", cores[i]), "address": format!("127.0.0.1:{}", free_port()?), "layers": layers}))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = json!({
        "pipeline": name, "generation": 1, "model": model, "device": "cpu", "dtype": "f32",
        "token": "bench-token", "stages": stages,
    });
    let config_path = tmp.join(format!("{name}.json"));
    std::fs::write(&config_path, config.to_string())?;
    let mut pids = Vec::new();
    for (i, core) in cores.iter().enumerate() {
        let mut cmd = pinned(Some(*core))?;
        cmd.args(["stage", "--config"])
            .arg(&config_path)
            .args(["--index", &i.to_string()]);
        if i == 0 {
            cmd.args(["--http", http]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        pids.push(child.id());
        children.0.push(child);
    }
    Ok(pids)
}

/// How much of each process's memory sits in transparent huge pages (Linux): a process without
/// them decodes far more slowly, which would be the whole of a ratio.
fn huge_pages_report(processes: &[(&str, u32)]) -> String {
    let held: Vec<Option<u64>> = processes
        .iter()
        .map(|(_, pid)| crate::memory::huge_page_bytes_of(*pid))
        .collect();
    let mut report = processes
        .iter()
        .zip(&held)
        .map(|((what, _), held)| match held {
            Some(b) => format!("{what} {:.0} MB", *b as f64 / (1 << 20) as f64),
            None => format!("{what} unknown"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    if held.contains(&Some(0)) && held.iter().any(|b| b.is_some_and(|b| b > 0)) {
        report.push_str(
            " (warning: some processes hold none, so the ratios compare unlike processes; \
             see troubleshooting.md)",
        );
    }
    report
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

/// Stage 0's `(steps, forward passes)` so far: how much its passes batched.
fn pass_counts(agent: &ureq::Agent, http: &str) -> Result<(u64, u64)> {
    let health: Value = agent
        .get(&format!("http://{http}/health"))
        .call()?
        .body_mut()
        .read_json()?;
    let count = |key: &str| {
        health["metrics"][key]
            .as_u64()
            .with_context(|| format!("stage 0's /health has no metrics.{key}: {health}"))
    };
    Ok((count("compute_steps")?, count("compute_passes")?))
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
            Some("done") => return Ok(Timeline { stamps }),
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
