//! `clusterctl chat ENDPOINT`: talks to an Endpoint through its OpenAI-compatible API,
//! streaming the answer as it comes. With `-p` it answers one prompt and exits; otherwise it
//! reads prompts line by line and keeps the conversation.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use super::Outcome;
use crate::Env;

/// Flags of `chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Endpoint name (its URL and model come from the cluster).
    pub endpoint: String,
    /// One prompt: print the answer and exit.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// The endpoint's API key, if it has keys.
    #[arg(long, env = "CLUSTERCTL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: u32,
    /// Sampling temperature (0 is greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Seed, for answers that can be reproduced.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds one answer may take.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Runs `chat`.
pub fn run(env: &Env, args: ChatArgs) -> Outcome {
    let (url, model) = crate::openai::endpoint(env, &args.endpoint)?;
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(args.timeout)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    let ask = |messages: &Vec<Value>| -> anyhow::Result<String> {
        let mut body = json!({
            "model": model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream": true,
        });
        if let Some(seed) = args.seed {
            body["seed"] = json!(seed);
        }
        let mut reader = crate::openai::post(
            &http,
            &format!("{url}/v1/chat/completions"),
            args.api_key.as_deref(),
            &body,
            &format!("endpoint {} at {url}", args.endpoint),
        )?;
        let mut answer = String::new();
        let mut out = std::io::stdout();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).context("reading the stream")? == 0 {
                bail!("the stream ended without [DONE]");
            }
            let Some(data) = line.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data).context("a stream chunk is not JSON")?;
            if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
                bail!("the generation failed: {m}");
            }
            if let Some(piece) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                answer.push_str(piece);
                let _ = write!(out, "{piece}");
                let _ = out.flush();
            }
        }
        println!();
        Ok(answer)
    };
    if let Some(p) = &args.prompt {
        messages.push(json!({"role": "user", "content": p}));
        ask(&messages)?;
        return Ok(());
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!(
            "chatting with {} ({model}); an empty line or Ctrl-D ends",
            args.endpoint
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if tty {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            break;
        }
        messages.push(json!({"role": "user", "content": line}));
        let answer = ask(&messages)?;
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    Ok(())
}
