//! `clusterctl bench TARGET...`: drives an OpenAI-compatible endpoint with 1, 4, 16 and 32
//! concurrent streaming clients and prints what each level got: output tokens per second over
//! all streams, one stream's decode rate, time to first token and the gaps between tokens, as
//! percentiles. What users run to size a cluster: the same figures llama-bench and vLLM's
//! serving benchmark print, against this cluster's own endpoint.
//!
//! TARGET is an Endpoint's name (its URL and model come from the cluster) or the base URL of
//! any OpenAI-compatible server. Several targets share each level's streams evenly, so that
//! replicas (one agent per machine, each serving the whole model) can be measured as one
//! service beside a pipeline that splits the model.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use super::Outcome;
use crate::output::table;
use crate::{Env, Usage};

/// Flags of `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Endpoint names, or base URLs of OpenAI-compatible servers (http://HOST:PORT); with
    /// several, each level's streams are spread over them evenly.
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// Concurrent streams of each level, measured in this order.
    #[arg(short = 'c', long, value_delimiter = ',', default_value = "1,4,16,32")]
    pub concurrency: Vec<usize>,
    /// Tokens each request generates. The server is asked to ignore end-of-sequence, so that
    /// every request generates this many and levels compare the same work.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub tokens: u32,
    /// Prompt length to aim for, in tokens (words of one token in common tokenizers); the
    /// prompt tokens the server counted are reported.
    #[arg(short = 'p', long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Requests each stream sends, one after another, at each level.
    #[arg(short = 'r', long, default_value_t = 2)]
    pub requests_per_stream: usize,
    /// Requests sent before measuring, to each target, so that no level pays for a first pass.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Let a request end at the model's end-of-sequence token instead of generating all of
    /// `--tokens`.
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Model name to send [default: the endpoint's served name, or a URL's first /v1/models].
    #[arg(long)]
    pub model: Option<String>,
    /// The endpoints' API key, if they have keys.
    #[arg(long, env = "CLUSTERCTL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Output format: table (default) or json.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: String,
}

/// One target as requests reach it.
#[derive(Debug, Clone)]
struct Target {
    /// As the user named it.
    label: String,
    url: String,
    model: String,
}

/// What one request measured.
#[derive(Debug, Default, Clone)]
struct Sample {
    /// Seconds from sending to the first token's text.
    ttft: f64,
    /// Seconds between consecutive chunks of text.
    gaps: Vec<f64>,
    /// Seconds from sending to the end of the stream.
    total: f64,
    completion_tokens: u64,
    prompt_tokens: u64,
}

/// Counters the progress line shows while a level runs.
#[derive(Default)]
struct Progress {
    requests_done: AtomicUsize,
    tokens: AtomicU64,
}

/// Runs `bench`.
pub fn run(env: &Env, args: BenchArgs) -> Outcome {
    let json_out = match args.output.as_str() {
        "table" => false,
        "json" => true,
        other => {
            return Err(Usage(format!("--output must be table or json, not {other:?}")).into());
        }
    };
    if let Some(&bad) = args.concurrency.iter().find(|&&c| c == 0 || c > 1024) {
        return Err(Usage(format!(
            "--concurrency {bad}: each level needs 1 to 1024 streams"
        ))
        .into());
    }
    if args.tokens == 0 || args.requests_per_stream == 0 || args.prompt_tokens == 0 {
        return Err(Usage(
            "--tokens, --prompt-tokens and --requests-per-stream must be at least 1".into(),
        )
        .into());
    }
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(args.timeout.max(1))))
        .http_status_as_error(false)
        .build()
        .into();
    let targets = args
        .targets
        .iter()
        .map(|t| resolve(env, &http, t, &args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tty = std::io::stderr().is_terminal();
    for t in &targets {
        for i in 0..args.warmup {
            let body = request_body(&t.model, &args, 1_000_000 + i);
            one_request(&http, t, &args, &body, None)
                .with_context(|| format!("the warm-up request to {}", t.label))?;
        }
    }
    let mut levels = Vec::new();
    let mut failed_any = false;
    for (li, &streams) in args.concurrency.iter().enumerate() {
        let level = run_level(&http, &targets, &args, streams, |p, started| {
            let total = streams * args.requests_per_stream;
            let done = p.requests_done.load(Ordering::Relaxed);
            let line = format!(
                "level {}/{}: {streams} streams, {done}/{total} requests, {} tokens, {:.1} s",
                li + 1,
                args.concurrency.len(),
                p.tokens.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            if tty {
                let width = 24;
                let filled = done * width / total.max(1);
                eprint!(
                    "\r[{}{}] {line}  ",
                    "#".repeat(filled),
                    ".".repeat(width - filled)
                );
                let _ = std::io::stderr().flush();
            }
        });
        if tty {
            eprintln!();
        }
        eprintln!("{}", level.summary_line());
        failed_any |= !level.errors.is_empty();
        levels.push(level);
    }
    if json_out {
        let doc = json!({
            "targets": targets.iter().map(|t| json!({"target": t.label, "url": t.url, "model": t.model})).collect::<Vec<_>>(),
            "tokensPerRequest": args.tokens,
            "promptTokensRequested": args.prompt_tokens,
            "requestsPerStream": args.requests_per_stream,
            "ignoreEos": !args.stop_at_eos,
            "levels": levels.iter().map(Level::to_json).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).context("printing the results")?
        );
    } else {
        print!("{}", render_table(&levels));
        for l in &levels {
            for e in l.errors.iter().take(3) {
                println!("{} streams: {e}", l.streams);
            }
        }
    }
    if failed_any {
        let failed: usize = levels.iter().map(|l| l.errors.len()).sum();
        bail!("{failed} requests failed (see above); their levels' figures count only the rest");
    }
    Ok(())
}

/// A target by endpoint name (through the cluster) or by URL, with the model name to send.
fn resolve(
    env: &Env,
    http: &ureq::Agent,
    target: &str,
    args: &BenchArgs,
) -> anyhow::Result<Target> {
    if target.starts_with("http://") || target.starts_with("https://") {
        let url = target.trim_end_matches('/').to_string();
        let model = match &args.model {
            Some(m) => m.clone(),
            None => {
                let mut req = http.get(&format!("{url}/v1/models"));
                if let Some(k) = &args.api_key {
                    req = req.header("Authorization", &format!("Bearer {k}"));
                }
                let resp = req
                    .call()
                    .with_context(|| format!("cannot reach {url} to list its models"))?;
                let status = resp.status().as_u16();
                let body: Value = resp
                    .into_body()
                    .read_json()
                    .with_context(|| format!("{url}/v1/models answered {status}, not JSON"))?;
                if status != 200 {
                    bail!("{url}/v1/models answered {status}: {body}");
                }
                body.pointer("/data/0/id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .with_context(|| format!("{url}/v1/models lists no model; pass --model"))?
            }
        };
        return Ok(Target {
            label: target.to_string(),
            url,
            model,
        });
    }
    let (url, served) = crate::openai::endpoint(env, target)?;
    let model = args.model.clone().unwrap_or(served);
    Ok(Target {
        label: target.to_string(),
        url,
        model,
    })
}

/// Words that common BPE tokenizers encode as one token each, with their leading space.
const WORDS: [&str; 16] = [
    "the", "cat", "sat", "on", "a", "mat", "and", "we", "saw", "it", "from", "our", "new", "house",
    "by", "day",
];

/// A text completion of `args.tokens` tokens for request number `n`: its prompt begins with
/// the number, so that no two requests send the same text.
fn request_body(model: &str, args: &BenchArgs, n: usize) -> Value {
    let mut prompt = format!("{n}");
    for i in 1..args.prompt_tokens {
        prompt.push(' ');
        prompt.push_str(WORDS[(i * 7 + n) % WORDS.len()]);
    }
    json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true},
        "ignore_eos": !args.stop_at_eos,
    })
}

/// Sends one streaming request and times its chunks; counts tokens into `progress` as they
/// come (one per chunk; the usage at the end is what the sample keeps).
fn one_request(
    http: &ureq::Agent,
    target: &Target,
    args: &BenchArgs,
    body: &Value,
    progress: Option<&Progress>,
) -> anyhow::Result<Sample> {
    let url = format!("{}/v1/completions", target.url);
    let sent = Instant::now();
    let mut reader = crate::openai::post(http, &url, args.api_key.as_deref(), body, &target.label)?;
    let mut sample = Sample::default();
    let mut last: Option<Instant> = None;
    let mut usage = None;
    // Tokens counted by the usage of each chunk (`continuous_usage_stats`), where the server
    // reports it: a token whose text is held back (a character cut between two tokens) still
    // comes as its own chunk then, so that gaps are between tokens, not between pieces of text.
    let mut counted: u64 = 0;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .with_context(|| format!("reading the stream from {}", target.label))?;
        if n == 0 {
            bail!("the stream from {} ended without [DONE]", target.label);
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let now = Instant::now();
        let v: Value = serde_json::from_str(data)
            .with_context(|| format!("a chunk from {} is not JSON: {data}", target.label))?;
        if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
            bail!("{} failed the generation: {m}", target.label);
        }
        let running = v
            .get("usage")
            .filter(|u| !u.is_null())
            .and_then(|u| u["completion_tokens"].as_u64());
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        let is_token = v.pointer("/choices/0").is_some();
        let came = match running {
            Some(n) if is_token => {
                let new = n.saturating_sub(counted);
                counted = counted.max(n);
                new
            }
            // A server without running usage: a chunk of text stands for a token.
            _ => u64::from(
                v.pointer("/choices/0/text")
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty()),
            ),
        };
        if came > 0 {
            match last {
                None => sample.ttft = (now - sent).as_secs_f64(),
                // Several tokens in one chunk: the wait is shared between them.
                Some(prev) => {
                    let gap = (now - prev).as_secs_f64() / came as f64;
                    sample.gaps.extend(std::iter::repeat_n(gap, came as usize));
                }
            }
            last = Some(now);
            if let Some(p) = progress {
                p.tokens.fetch_add(came, Ordering::Relaxed);
            }
        }
    }
    sample.total = sent.elapsed().as_secs_f64();
    let usage = usage.with_context(|| {
        format!(
            "{} sent no usage (it must honour stream_options.include_usage)",
            target.label
        )
    })?;
    sample.completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
    sample.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
    if last.is_none() {
        // Every token decoded to nothing visible: the first token's time is the stream's end.
        sample.ttft = sample.total;
    }
    Ok(sample)
}

/// One level's results.
struct Level {
    streams: usize,
    requests: usize,
    wall: f64,
    samples: Vec<Sample>,
    errors: Vec<String>,
}

/// Runs `streams` clients at once, each sending `requests_per_stream` requests back to back,
/// stream `i` to target `i mod targets`; `show` draws progress every 200 ms.
fn run_level(
    http: &ureq::Agent,
    targets: &[Target],
    args: &BenchArgs,
    streams: usize,
    show: impl Fn(&Progress, Instant),
) -> Level {
    let progress = Arc::new(Progress::default());
    let results: Arc<Mutex<(Vec<Sample>, Vec<String>)>> = Arc::default();
    let start = Arc::new(Barrier::new(streams + 1));
    let mut handles = Vec::with_capacity(streams);
    for s in 0..streams {
        let (http, target) = (http.clone(), targets[s % targets.len()].clone());
        let (progress, results, start) = (progress.clone(), results.clone(), start.clone());
        let bodies: Vec<Value> = (0..args.requests_per_stream)
            .map(|r| request_body(&target.model, args, s * args.requests_per_stream + r))
            .collect();
        let args = args.clone();
        handles.push(std::thread::spawn(move || {
            start.wait();
            for body in &bodies {
                let outcome = one_request(&http, &target, &args, body, Some(&progress));
                progress.requests_done.fetch_add(1, Ordering::Relaxed);
                let mut r = results.lock().unwrap_or_else(PoisonError::into_inner);
                match outcome {
                    Ok(sample) => r.0.push(sample),
                    Err(e) => r.1.push(format!("{e:#}")),
                }
            }
            Instant::now()
        }));
    }
    start.wait();
    let started = Instant::now();
    while !handles.iter().all(|h| h.is_finished()) {
        show(&progress, started);
        std::thread::sleep(Duration::from_millis(50));
    }
    // The level ends when its last request does, not when the loop above next looks.
    let mut ended = started;
    for h in handles {
        // A client thread that panicked lost its requests; they count as failed below.
        if let Ok(at) = h.join() {
            ended = ended.max(at);
        }
    }
    let wall = (ended - started).as_secs_f64();
    show(&progress, started);
    let (samples, mut errors) =
        std::mem::take(&mut *results.lock().unwrap_or_else(PoisonError::into_inner));
    let requests = streams * args.requests_per_stream;
    let missing = requests.saturating_sub(samples.len() + errors.len());
    if missing > 0 {
        errors.push(format!(
            "{missing} requests were lost with their client thread"
        ));
    }
    Level {
        streams,
        requests,
        wall,
        samples,
        errors,
    }
}

/// The value below which a fraction `q` of the sorted `v` lies (nearest rank); 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

impl Level {
    fn output_tokens(&self) -> u64 {
        self.samples.iter().map(|s| s.completion_tokens).sum()
    }

    fn tokens_per_second(&self) -> f64 {
        if self.wall > 0.0 {
            self.output_tokens() as f64 / self.wall
        } else {
            0.0
        }
    }

    /// One stream's decode rate after its first token, per request, sorted.
    fn stream_rates(&self) -> Vec<f64> {
        sorted(
            self.samples
                .iter()
                .filter(|s| s.completion_tokens > 1 && s.total > s.ttft)
                .map(|s| (s.completion_tokens - 1) as f64 / (s.total - s.ttft))
                .collect(),
        )
    }

    fn ttfts(&self) -> Vec<f64> {
        sorted(self.samples.iter().map(|s| s.ttft).collect())
    }

    fn gaps(&self) -> Vec<f64> {
        sorted(
            self.samples
                .iter()
                .flat_map(|s| s.gaps.iter().copied())
                .collect(),
        )
    }

    fn summary_line(&self) -> String {
        format!(
            "{} streams: {} requests ({} failed) in {:.1} s, {:.1} tokens/s",
            self.streams,
            self.requests,
            self.errors.len(),
            self.wall,
            self.tokens_per_second()
        )
    }

    fn to_json(&self) -> Value {
        let ms = |v: &[f64]| {
            json!({
                "p50": percentile(v, 0.5) * 1e3,
                "p90": percentile(v, 0.9) * 1e3,
                "p99": percentile(v, 0.99) * 1e3,
            })
        };
        let prompt_mean = if self.samples.is_empty() {
            0.0
        } else {
            self.samples.iter().map(|s| s.prompt_tokens).sum::<u64>() as f64
                / self.samples.len() as f64
        };
        json!({
            "streams": self.streams,
            "requests": self.requests,
            "failed": self.errors.len(),
            "errors": self.errors,
            "wallSeconds": self.wall,
            "outputTokens": self.output_tokens(),
            "outputTokensPerSecond": self.tokens_per_second(),
            "streamTokensPerSecondP50": percentile(&self.stream_rates(), 0.5),
            "promptTokensMean": prompt_mean,
            "ttftMs": ms(&self.ttfts()),
            "itlMs": ms(&self.gaps()),
        })
    }
}

fn render_table(levels: &[Level]) -> String {
    let rows: Vec<Vec<String>> = levels
        .iter()
        .map(|l| {
            let (t, g) = (l.ttfts(), l.gaps());
            let ms = |v: &[f64], q| format!("{:.1}", percentile(v, q) * 1e3);
            vec![
                l.streams.to_string(),
                format!("{}/{}", l.samples.len(), l.requests),
                format!("{:.1}", l.tokens_per_second()),
                format!("{:.1}", percentile(&l.stream_rates(), 0.5)),
                ms(&t, 0.5),
                ms(&t, 0.99),
                ms(&g, 0.5),
                ms(&g, 0.9),
                ms(&g, 0.99),
            ]
        })
        .collect();
    table(
        &[
            "STREAMS",
            "OK",
            "TOKENS/S",
            "PER-STREAM",
            "TTFT-P50-MS",
            "TTFT-P99-MS",
            "ITL-P50-MS",
            "ITL-P90-MS",
            "ITL-P99-MS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
