//! `clusteragent ask`: sends one prompt to a ring's stage 0 and streams the answer.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use cluster_api::SamplingParams;
use serde_json::{Value, json};

/// Flags of `clusteragent ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    /// Stage 0's API, e.g. http://127.0.0.1:7100.
    #[arg(long)]
    pub head: String,
    /// The prompt: plain text, or the user's message with --chat.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Give up when the answer has not finished after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// First wait up to this many seconds for the ring to be whole (stages still starting).
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
}

/// Runs `clusteragent ask`.
pub fn run(args: AskArgs) -> Result<()> {
    let mut body = json!({
        "max_tokens": args.max_tokens,
        "sampling": SamplingParams { temperature: args.temperature, seed: args.seed, ..SamplingParams::default() },
    });
    if args.chat {
        body["messages"] = json!([{"role": "user", "content": args.prompt}]);
    } else {
        body["prompt"] = json!(args.prompt);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(args.timeout)))
        .http_status_as_error(false)
        .build()
        .into();
    let base = args.head.trim_end_matches('/');
    if args.wait > 0 {
        wait_for_ring(&agent, base, Duration::from_secs(args.wait))?;
    }
    let url = format!("{base}/generate");
    let resp = agent
        .post(&url)
        .send_json(&body)
        .with_context(|| format!("posting to {url}"))?;
    let status = resp.status();
    let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
    if status != 200 {
        let text = lines.next().transpose()?.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("{url} answered {status}: {message}");
    }
    let mut out = std::io::stdout().lock();
    for line in lines {
        let event: Value = serde_json::from_str(&line?)?;
        match event["event"].as_str() {
            Some("token") => {
                out.write_all(event["text"].as_str().unwrap_or_default().as_bytes())?;
                out.flush()?;
            }
            Some("done") => {
                writeln!(out)?;
                eprintln!(
                    "[{} prompt tokens, {} generated, finish_reason {}, first token {:.0} ms, {:.1} tok/s]",
                    event["prompt_tokens"],
                    event["completion_tokens"],
                    event["finish_reason"].as_str().unwrap_or("?"),
                    event["time_to_first_token_ms"].as_f64().unwrap_or(0.0),
                    event["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
                );
                return Ok(());
            }
            _ => {
                writeln!(out)?;
                bail!("{}", event["message"].as_str().unwrap_or("the ring failed"));
            }
        }
    }
    bail!("the stream from {url} ended without a final event")
}

fn wait_for_ring(agent: &ureq::Agent, base: &str, limit: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    let mut last = String::from("no answer");
    while start.elapsed() < limit {
        match agent.get(&format!("{base}/health")).call() {
            Ok(mut r) => {
                let health: Value = r.body_mut().read_json().unwrap_or(Value::Null);
                if health["ring"] == "up" {
                    return Ok(());
                }
                last = health["detail"].as_str().unwrap_or("ring down").to_string();
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "the ring at {base} was not up within {} s: {last}",
        limit.as_secs()
    )
}
