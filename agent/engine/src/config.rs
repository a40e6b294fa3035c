//! `config.json` as Hugging Face's transformers 4 and 5 write it, for the families we run.
//!
//! We read the JSON by hand rather than with one serde struct per family because real configs
//! disagree on where things live (`rope_theta` at the top or inside `rope_parameters`,
//! `torch_dtype` or `dtype`, `eos_token_id` as a number or a list) and because an error must name
//! the field and the value.

use std::path::{Path, PathBuf};

use cluster_api::WeightDType;
use serde_json::{Map, Value};

use crate::error::{EngineError, Result};
pub use crate::family::Family;
use crate::family::{Bias, Numerics, Window};

/// How rotary position frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (`rope_type: llama3`).
    Llama3 {
        /// Overall stretch of low frequencies.
        factor: f64,
        /// Wavelength bound below which frequencies are stretched fully.
        low_freq_factor: f64,
        /// Wavelength bound above which frequencies are kept.
        high_freq_factor: f64,
        /// The context length the model was trained at.
        original_max_position_embeddings: usize,
    },
}

/// What a stage needs to know about a model, read from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family of decoder this is.
    pub family: Family,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Rows of the embedding and the LM head; may exceed the tokenizer's vocabulary.
    pub vocab_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (fewer than query heads with grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head; Qwen3 sets it apart from `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE scaling variant.
    pub rope_scaling: RopeScaling,
    /// The context length: positions beyond it are refused.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Attention window in tokens, when the model uses one on every layer.
    pub sliding_window: Option<usize>,
    /// The precision the checkpoint was saved in, when the config says.
    pub dtype: Option<WeightDType>,
    /// Begin-of-sequence token, when the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens named by the config.
    pub eos_token_ids: Vec<u32>,
    /// Rotary pairs are adjacent elements (GGUF Llama) rather than the two halves of a head.
    pub rope_interleaved: bool,
    /// The last-bit choices of the family's reference for this format.
    pub numerics: Numerics,
}

/// Field access on one JSON object that names the file and field in every error.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, message: impl Into<String>) -> EngineError {
        EngineError::config(self.path, self.name(key), message)
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(key, "missing (required for this architecture)"))
    }

    fn positive(&self, key: &str) -> Result<usize> {
        let n = self.usize(key)?;
        if n == 0 {
            return Err(self.err(key, "must be at least 1, got 0"));
        }
        Ok(n)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a string, got {v}"))),
        }
    }

    fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_object()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected an object, got {v}"))),
        }
    }

    /// Token ids written as one number or a list of numbers.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            self.err(
                key,
                format!("expected a token id or a list of them, got {v}"),
            )
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(|| bad(v)),
        }
    }
}

/// Reads `eos_token_id` as one id or a list, from any JSON object (config or generation config).
pub(crate) fn read_token_ids(path: &Path, obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    Fields {
        path,
        obj,
        prefix: "",
    }
    .token_ids(key)
}

/// Parses and checks a JSON file into an object.
/// Largest JSON file of a model folder read (real `tokenizer.json` files are tens of MB).
const MAX_JSON_BYTES: u64 = 512 << 20;

/// Checks that `path` is a regular file (following links) of at most `max` bytes before it is
/// opened: a FIFO would block the open (and an apply holding the store's lock) forever, and a
/// device such as `/dev/zero` would be read without end. Returns its length.
pub(crate) fn regular_file(path: &Path, what: &str, max: u64) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            EngineError::MissingFile {
                path: path.to_path_buf(),
                what: what.to_string(),
            }
        } else {
            EngineError::io(path, e)
        }
    })?;
    if !meta.is_file() {
        return Err(EngineError::io(
            path,
            std::io::Error::other(format!(
                "{what}: not a regular file (a directory, device, FIFO or socket); give the file itself"
            )),
        ));
    }
    if meta.len() > max {
        return Err(EngineError::io(
            path,
            std::io::Error::other(format!(
                "{what}: {} bytes, more than the {max} this reader accepts",
                meta.len()
            )),
        ));
    }
    Ok(meta.len())
}

pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    regular_file(
        path,
        "expected in a Hugging Face model folder",
        MAX_JSON_BYTES,
    )?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            EngineError::MissingFile {
                path: path.to_path_buf(),
                what: "expected in a Hugging Face model folder".into(),
            }
        } else {
            EngineError::io(path, e)
        }
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| EngineError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        other => Err(EngineError::config(
            path,
            "(top level)",
            format!("expected a JSON object, got {}", json_kind(&other)),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl ModelConfig {
    /// Reads `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let obj = read_json_object(path)?;
        Self::from_json(path, &obj)
    }

    /// Interprets an already parsed `config.json`; `path` is used only in error messages.
    pub fn from_json(path: &Path, obj: &Map<String, Value>) -> Result<Self> {
        let f = Fields {
            path,
            obj,
            prefix: "",
        };
        let family = Self::family(&f)?;
        let hidden_size = f.positive("hidden_size")?;
        let num_attention_heads = f.positive("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "head_dim",
                        format!(
                            "missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("must be even and positive for RoPE, got {head_dim}"),
            ));
        }
        if let Some(act) = f.str_opt("hidden_act")?
            && act != "silu"
        {
            return Err(f.err(
                "hidden_act",
                format!("{act:?} is not supported; only \"silu\" is"),
            ));
        }
        let (rope_theta, rope_scaling) = Self::rope(&f)?;
        let dtype = match f.str_opt("dtype")?.or(f.str_opt("torch_dtype")?) {
            None => None,
            Some(s) => Some(s.parse::<WeightDType>().map_err(|e| {
                let key = if f.get("dtype").is_some() {
                    "dtype"
                } else {
                    "torch_dtype"
                };
                f.err(key, e)
            })?),
        };
        let spec = family.spec();
        let attention_bias = f.bool_opt("attention_bias")?.unwrap_or(false);
        let bias = |rule: Bias| match rule {
            Bias::Always => Ok(true),
            Bias::AttentionBias => Ok(attention_bias),
            Bias::Never if attention_bias => Err(f.err(
                "attention_bias",
                format!("true is not supported for {}", spec.hf_architecture),
            )),
            Bias::Never => Ok(false),
        };
        let (qkv_bias, o_bias) = (bias(spec.qkv_bias)?, bias(spec.o_bias)?);
        let mlp_bias = f.bool_opt("mlp_bias")?.unwrap_or(false);
        if mlp_bias && spec.rule(crate::family::Part::GateBias).is_none() {
            return Err(f.err(
                "mlp_bias",
                format!("true is not supported for {}", spec.hf_architecture),
            ));
        }
        if let Some(factor) = f.f64_opt("partial_rotary_factor")?
            && factor != 1.0
        {
            return Err(f.err(
                "partial_rotary_factor",
                format!("{factor} is not supported; rotary embeddings over part of a head are not implemented"),
            ));
        }
        let sliding_window = match spec.window {
            Window::EveryLayer => match f.usize_opt("sliding_window")? {
                Some(0) => return Err(f.err("sliding_window", "must be at least 1 token, got 0")),
                w => w,
            },
            Window::QwenSwitch => {
                if f.bool_opt("use_sliding_window")?.unwrap_or(false) {
                    return Err(f.err(
                        "use_sliding_window",
                        "true is not supported (sliding-window layers are not implemented for Qwen)",
                    ));
                }
                None
            }
            Window::None => None,
        };
        let cfg = Self {
            family,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            vocab_size: f.positive("vocab_size")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.positive("max_position_embeddings")?,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: spec.qk_norm,
            sliding_window,
            dtype,
            bos_token_id: f.usize_opt("bos_token_id")?.map(|n| n as u32),
            eos_token_ids: f.token_ids("eos_token_id")?,
            rope_interleaved: false,
            numerics: spec.hf_numerics,
        };
        Ok(cfg)
    }

    fn family(f: &Fields<'_>) -> Result<Family> {
        let archs = match f.get("architectures") {
            Some(Value::Array(a)) => a.clone(),
            Some(v) => return Err(f.err("architectures", format!("expected a list, got {v}"))),
            None => {
                return Err(f.err(
                    "architectures",
                    format!(
                        "missing; expected one of {}",
                        crate::family::hf_architectures().join(", ")
                    ),
                ));
            }
        };
        let name = archs
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| f.err("architectures", "expected a non-empty list of names"))?;
        Family::from_hf_architecture(name).ok_or_else(|| EngineError::UnsupportedArchitecture {
            path: f.path.to_path_buf(),
            name: name.to_string(),
            supported: crate::family::hf_architectures(),
        })
    }

    /// `rope_theta` and scaling, from transformers 4 (`rope_theta`, `rope_scaling`) or 5
    /// (`rope_parameters` holding both).
    fn rope(f: &Fields<'_>) -> Result<(f64, RopeScaling)> {
        let params = f.object("rope_parameters")?;
        let (scaling_obj, scaling_key) = match params {
            Some(p) => (Some(p), "rope_parameters"),
            None => (f.object("rope_scaling")?, "rope_scaling"),
        };
        let theta = match params {
            Some(p) => {
                let pf = Fields {
                    path: f.path,
                    obj: p,
                    prefix: "rope_parameters.",
                };
                pf.f64_opt("rope_theta")?.or(f.f64_opt("rope_theta")?)
            }
            None => f.f64_opt("rope_theta")?,
        }
        .unwrap_or(10_000.0);
        let Some(obj) = scaling_obj else {
            return Ok((theta, RopeScaling::None));
        };
        let prefix = format!("{scaling_key}.");
        let sf = Fields {
            path: f.path,
            obj,
            prefix: &prefix,
        };
        let kind = sf
            .str_opt("rope_type")?
            .or(sf.str_opt("type")?)
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: sf
                    .f64_opt("factor")?
                    .ok_or_else(|| sf.err("factor", "missing"))?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: sf
                    .f64_opt("factor")?
                    .ok_or_else(|| sf.err("factor", "missing"))?,
                low_freq_factor: sf
                    .f64_opt("low_freq_factor")?
                    .ok_or_else(|| sf.err("low_freq_factor", "missing"))?,
                high_freq_factor: sf
                    .f64_opt("high_freq_factor")?
                    .ok_or_else(|| sf.err("high_freq_factor", "missing"))?,
                original_max_position_embeddings: sf.usize("original_max_position_embeddings")?,
            },
            other => {
                return Err(sf.err(
                    "rope_type",
                    format!("{other:?} is not supported; supported: default, linear, llama3"),
                ));
            }
        };
        Ok((theta, scaling))
    }

    /// Width of all query heads together.
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// Path of `config.json` in a model folder.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
mod tests;
