//! `clusteragent generate`: one-process generation, the baseline of every pipeline benchmark.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use cluster_api::{DeviceKind, SamplingParams, WeightDType};
use cluster_engine::generate::DEFAULT_PREFILL_CHUNK;
use cluster_engine::{GenerateOptions, LoadOptions, LocalPipeline};
use serde_json::json;

/// Flags of `clusteragent generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder (config.json, tokenizer.json, safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt: plain text, or the user's message with --chat.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message to put before the prompt (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Repetition penalty (1.0 is off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceKind,
    /// Weight precision: f32, f16 or bf16 (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<WeightDType>,
    /// Run through in-process stages with these inclusive layer ranges, e.g. 0-13,14-27.
    #[arg(long)]
    pub split: Option<String>,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Do not stop at end-of-sequence tokens (fixed-length runs for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (ids, text, finish reason, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `clusteragent generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let pipeline = LocalPipeline::load(
        &args.model,
        &LoadOptions {
            split: args.split.clone(),
            device: args.device,
            dtype: args.dtype,
        },
    )
    .with_context(|| format!("loading model {}", args.model.display()))?;
    let prompt_ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": args.prompt}));
        pipeline.encode_chat(&serde_json::Value::Array(messages))?
    } else {
        pipeline.encode_text(&args.prompt)?
    };
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        prefill_chunk: args.prefill_chunk,
        ignore_eos: args.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let stream = !args.json;
    let generation = pipeline.generate(1, &prompt_ids, &options, &mut |piece| {
        if stream
            && write_error.is_none()
            && let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
        {
            write_error = Some(e);
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    if args.json {
        let mut value = serde_json::to_value(&generation)?;
        value["stages"] =
            json!(pipeline
            .stages
            .iter()
            .map(|s| json!({"layers": s.range().to_string(), "weight_bytes": s.weight_bytes()}))
            .collect::<Vec<_>>());
        writeln!(stdout, "{}", serde_json::to_string(&value)?)?;
    } else {
        writeln!(stdout)?;
        let t = &generation.timings;
        eprintln!(
            "[{} prompt tokens, {} generated, finish_reason {}; prompt {:.1} tok/s, decode {:.1} tok/s, first token {:.0} ms]",
            generation.prompt_token_ids.len(),
            generation.token_ids.len(),
            generation.finish_reason.as_str(),
            t.prompt_tokens_per_s,
            t.decode_tokens_per_s,
            t.time_to_first_token_ms,
        );
    }
    Ok(())
}
