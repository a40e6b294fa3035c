//! Sampling parameters and finish reasons, shared by the engine, the ring and the inference API.

use serde::{Deserialize, Serialize};

/// How the last stage picks the next token. Greedy when `temperature` is zero or absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; `0` (or below) means greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Keep only the `top_k` most likely tokens before sampling.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Divides (or multiplies, when negative) the logits of tokens already seen; `1.0` is off.
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    /// How many of the most recent tokens the repetition penalty looks at.
    #[serde(default = "default_penalty_window")]
    pub repetition_window: usize,
    /// Seed of the sampler's random generator, so that a sampled answer can be reproduced.
    #[serde(default)]
    pub seed: u64,
}

fn one() -> f32 {
    1.0
}

fn default_penalty_window() -> usize {
    64
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repetition_penalty: 1.0,
            repetition_window: default_penalty_window(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks the values a client may send, naming the field and value at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("top_p must be in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1, got 0".to_string());
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Why a generation ended, as OpenAI's API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// The token limit or the context length.
    Length,
}

impl FinishReason {
    /// The name used on the wire and in JSON output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}
