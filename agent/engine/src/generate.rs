//! Generation through stages in one process: the baseline that every pipeline is compared with,
//! and the loop `clusteragent generate` runs.

use std::path::Path;
use std::time::{Duration, Instant};

use cluster_api::{DeviceKind, FinishReason, LayerSplit, SamplingParams, WeightDType};
use serde::Serialize;

use crate::device::{choose_dtype, open_device};
use crate::error::{EngineError, Result};
use crate::folder::ModelFolder;
use crate::sampling::Sampler;
use crate::stage::{SeqId, Stage, StageInput, StageOutput, StageSpec};
use crate::tokenizer::IncrementalDecoder;

/// Default prefill chunk: long enough to keep matrix multiplies efficient, short enough that a
/// pipeline's stages overlap on long prompts.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// How to load a model for in-process generation.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Inclusive layer ranges of the stages; `None` for one stage holding every layer.
    pub split: Option<String>,
    /// Device to run on.
    pub device: DeviceKind,
    /// Weight precision; `None` takes the checkpoint's.
    pub dtype: Option<WeightDType>,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Keep going past EOS tokens (for benchmarks that need a fixed length).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::greedy(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            ignore_eos: false,
        }
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Prompt tokens processed per second during prefill.
    pub prompt_tokens_per_s: f64,
    /// Tokens generated per second after the first one.
    pub decode_tokens_per_s: f64,
    /// From the start of prefill to the first sampled token, in milliseconds.
    pub time_to_first_token_ms: f64,
    /// The whole generation, in milliseconds.
    pub total_ms: f64,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The prompt as token ids.
    pub prompt_token_ids: Vec<u32>,
    /// The generated ids, the EOS token included when one ended the sequence.
    pub token_ids: Vec<u32>,
    /// The generated text (special tokens left out).
    pub text: String,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// How long it took.
    pub timings: Timings,
}

/// A model loaded as one or more stages in this process.
pub struct LocalPipeline {
    /// The model folder: tokenizer, chat template, EOS ids.
    pub folder: ModelFolder,
    /// The stages in order.
    pub stages: Vec<Stage>,
}

fn rate(count: usize, time: Duration) -> f64 {
    let secs = time.as_secs_f64();
    if count == 0 || secs <= 0.0 {
        0.0
    } else {
        count as f64 / secs
    }
}

/// Loads the stages of `split` from an opened folder, in pipeline order: the first embeds, the
/// last holds the head.
pub fn load_stages(
    folder: &ModelFolder,
    split: &LayerSplit,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<Vec<Stage>> {
    let count = split.ranges().len();
    split
        .ranges()
        .iter()
        .enumerate()
        .map(|(i, range)| {
            let spec = StageSpec {
                config: folder.config.clone(),
                weights: &folder.weights,
                range: *range,
                first: i == 0,
                last: i + 1 == count,
                device: device.clone(),
                dtype,
            };
            Stage::load(spec, &mut |_, _| {})
        })
        .collect()
}

impl LocalPipeline {
    /// Opens the folder and loads its stages.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let layers = folder.config.num_hidden_layers;
        let split = match &options.split {
            Some(text) => LayerSplit::parse(text, layers)?,
            None => LayerSplit::whole(layers)?,
        };
        let device = open_device(options.device)?;
        let dtype = choose_dtype(options.dtype, folder.config.dtype);
        let stages = load_stages(&folder, &split, &device, dtype)?;
        Ok(Self { folder, stages })
    }

    /// Token ids of a plain-text prompt, with the tokenizer's special tokens (a BOS for Llama).
    pub fn encode_text(&self, prompt: &str) -> Result<Vec<u32>> {
        self.folder.tokenizer.encode(prompt, true)
    }

    /// Token ids of a chat rendered with the model's template, ready for the assistant's turn.
    pub fn encode_chat(&self, messages: &serde_json::Value) -> Result<Vec<u32>> {
        let template = self.folder.chat_template.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "{}: the model has no chat template (tokenizer_config.json has no chat_template); use a plain prompt",
                self.folder.dir.display()
            ))
        })?;
        let text = template.render(messages, true, None)?;
        self.folder.tokenizer.encode(&text, false)
    }

    /// Runs one chunk through every stage; returns the logits when the chunk is the last of
    /// the prompt or a decode step.
    fn step(&self, seq: SeqId, position: usize, tokens: Vec<u32>) -> Result<candle_core::Tensor> {
        let mut input = StageInput::Tokens(tokens);
        for stage in &self.stages {
            match stage.forward(seq, position, input)? {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                StageOutput::Logits(l) => return Ok(l),
            }
        }
        Err(EngineError::InvalidRequest(
            "the pipeline has no last stage".into(),
        ))
    }

    /// Frees `seq`'s caches in every stage.
    pub fn release(&self, seq: SeqId) {
        for stage in &self.stages {
            stage.release(seq);
        }
    }

    /// Generates from `prompt_ids`, calling `on_text` with each piece of text as it is decoded.
    pub fn generate(
        &self,
        seq: SeqId,
        prompt_ids: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let result = self.generate_inner(seq, prompt_ids, options, on_text);
        self.release(seq);
        result
    }

    fn generate_inner(
        &self,
        seq: SeqId,
        prompt_ids: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the prompt is empty: it encodes to no tokens".into(),
            ));
        }
        if options.prefill_chunk == 0 {
            return Err(EngineError::InvalidRequest(
                "prefill chunk must be at least 1 token".into(),
            ));
        }
        let limit = self.folder.config.max_position_embeddings;
        if prompt_ids.len() >= limit {
            return Err(EngineError::ContextOverflow {
                requested: prompt_ids.len() + 1,
                limit,
            });
        }
        let tokenizer = &self.folder.tokenizer;
        let mut sampler = Sampler::new(&options.sampling, tokenizer.vocab_size(), prompt_ids)?;
        let mut decoder = IncrementalDecoder::new(true);
        let start = Instant::now();
        let mut logits = None;
        let mut position = 0;
        for chunk in prompt_ids.chunks(options.prefill_chunk) {
            logits = Some(self.step(seq, position, chunk.to_vec())?);
            position += chunk.len();
        }
        let mut logits =
            logits.ok_or_else(|| EngineError::InvalidRequest("the prompt is empty".into()))?;
        let prefill_time = start.elapsed();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut first_token_at = None;
        let finish_reason = loop {
            if tokens.len() >= options.max_tokens {
                break FinishReason::Length;
            }
            let id = sampler.sample(&logits)?;
            first_token_at.get_or_insert_with(|| start.elapsed());
            tokens.push(id);
            if !options.ignore_eos && self.folder.eos_token_ids.contains(&id) {
                break FinishReason::Stop;
            }
            if let Some(piece) = decoder.push(tokenizer, id)? {
                on_text(&piece);
                text.push_str(&piece);
            }
            if tokens.len() >= options.max_tokens || position + 1 > limit {
                break FinishReason::Length;
            }
            logits = self.step(seq, position, vec![id])?;
            position += 1;
        };
        if let Some(piece) = decoder.finish(tokenizer)? {
            on_text(&piece);
            text.push_str(&piece);
        }
        let total = start.elapsed();
        let ttft = first_token_at.unwrap_or(total);
        Ok(Generation {
            prompt_token_ids: prompt_ids.to_vec(),
            timings: Timings {
                prompt_tokens_per_s: rate(prompt_ids.len(), prefill_time),
                decode_tokens_per_s: rate(
                    tokens.len().saturating_sub(1),
                    total.saturating_sub(ttft),
                ),
                time_to_first_token_ms: ttft.as_secs_f64() * 1e3,
                total_ms: total.as_secs_f64() * 1e3,
            },
            token_ids: tokens,
            text,
            finish_reason,
        })
    }
}
