//! Picking the next token: candle-transformers' `LogitsProcessor` (greedy, temperature, top-k,
//! top-p, seeded) after a repetition penalty, over the ids the tokenizer can spell.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use cluster_api::SamplingParams;

use crate::error::{EngineError, Result};

/// The sampler of one sequence; it keeps the recent tokens the repetition penalty looks at.
pub struct Sampler {
    processor: LogitsProcessor,
    params: SamplingParams,
    /// Ids past the tokenizer's vocabulary have no text: real checkpoints pad `vocab_size` for
    /// speed and those rows were never trained, so they are never sampled.
    vocab_limit: usize,
    recent: Vec<u32>,
}

impl Sampler {
    /// A sampler for `params`; `context` primes the repetition penalty (the prompt's tail).
    pub fn new(params: &SamplingParams, vocab_limit: usize, context: &[u32]) -> Result<Self> {
        params.validate().map_err(EngineError::InvalidRequest)?;
        let greedy = params.temperature <= 0.0;
        let sampling = if greedy {
            Sampling::ArgMax
        } else {
            let temperature = params.temperature;
            match (params.top_k, params.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        let window = params.repetition_window;
        let start = context.len().saturating_sub(window);
        Ok(Self {
            processor: LogitsProcessor::from_sampling(params.seed, sampling),
            params: params.clone(),
            vocab_limit,
            recent: context[start..].to_vec(),
        })
    }

    /// Picks a token from the last position's logits, shape `(vocab,)`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let vocab = logits.dim(0)?;
        let logits = if vocab > self.vocab_limit {
            logits.narrow(0, 0, self.vocab_limit)?
        } else {
            logits.clone()
        };
        let logits = if self.params.repetition_penalty != 1.0 && !self.recent.is_empty() {
            candle_transformers::utils::apply_repeat_penalty(&logits, self.params.repetition_penalty, &self.recent)?
        } else {
            logits
        };
        let id = self.processor.sample(&logits)?;
        self.recent.push(id);
        if self.recent.len() > self.params.repetition_window {
            self.recent.remove(0);
        }
        Ok(id)
    }
}
