//! A stage: decoder layers `first..=last` of a model, with the embedding when it is the first
//! stage and the final norm and LM head when it is the last.
//!
//! The weights are shared by every sequence (`&self`); each sequence has its own KV cache for the
//! stage's layers, created when its position-0 chunk arrives and dropped on [`Stage::release`].
//! Callers on several threads may run different sequences through one stage at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::ConcatKvCache;
use candle_nn::{Embedding, Linear, RmsNorm};
use cluster_api::LayerRange;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::rope::RotaryTable;
use crate::weights::{LoadedTensors, WeightFiles};

/// Identifies a sequence across stages.
pub type SeqId = u64;

/// What flows into a stage.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids: only the first stage takes these.
    Tokens(Vec<u32>),
    /// Hidden states of shape `(1, tokens, hidden_size)` from the previous stage.
    Hidden(Tensor),
}

/// What a stage produces.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// Hidden states of shape `(1, tokens, hidden_size)` for the next stage.
    Hidden(Tensor),
    /// Logits of the chunk's last position, shape `(vocab_size,)`, f32: only the last stage.
    Logits(Tensor),
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3 normalises each head of q and k before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The final norm and the LM head of the last stage.
struct Head {
    norm: RmsNorm,
    lm_head: Linear,
}

/// One sequence's keys and values for the stage's layers.
struct SequenceCache {
    layers: Vec<ConcatKvCache>,
    /// Tokens already in the cache: the position the next chunk must start at.
    len: usize,
}

/// Layers `range` of a model, loaded on one device.
pub struct Stage {
    config: Arc<ModelConfig>,
    range: LayerRange,
    device: Device,
    dtype: DType,
    embed: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    head: Option<Head>,
    rotary: RotaryTable,
    caches: Mutex<HashMap<SeqId, SequenceCache>>,
    weight_bytes: u64,
    files: Vec<PathBuf>,
}

/// Options of [`Stage::load`].
pub struct StageSpec<'a> {
    /// The model's configuration.
    pub config: Arc<ModelConfig>,
    /// Where its weights are.
    pub weights: &'a WeightFiles,
    /// Layers to hold.
    pub range: LayerRange,
    /// Whether this stage embeds tokens (holds layer 0's input).
    pub first: bool,
    /// Whether this stage ends the model (holds the final norm and the LM head).
    pub last: bool,
    /// Device to compute on.
    pub device: Device,
    /// Precision of the weights.
    pub dtype: DType,
}

fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

impl Stage {
    /// Names and shapes of the tensors a stage with this spec reads.
    pub fn tensor_list(
        cfg: &ModelConfig,
        range: LayerRange,
        first: bool,
        last: bool,
    ) -> Vec<(String, Vec<usize>)> {
        let h = cfg.hidden_size;
        let mut list: Vec<(String, Vec<usize>)> = Vec::new();
        let embed = (
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
        );
        if first || (last && cfg.tie_word_embeddings) {
            list.push(embed);
        }
        for i in range.iter() {
            let p = layer_prefix(i);
            let mut add = |name: &str, shape: Vec<usize>| list.push((format!("{p}.{name}"), shape));
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
            add("self_attn.q_proj.weight", vec![cfg.q_width(), h]);
            add("self_attn.k_proj.weight", vec![cfg.kv_width(), h]);
            add("self_attn.v_proj.weight", vec![cfg.kv_width(), h]);
            add("self_attn.o_proj.weight", vec![h, cfg.q_width()]);
            if cfg.qkv_bias {
                add("self_attn.q_proj.bias", vec![cfg.q_width()]);
                add("self_attn.k_proj.bias", vec![cfg.kv_width()]);
                add("self_attn.v_proj.bias", vec![cfg.kv_width()]);
            }
            if cfg.o_bias {
                add("self_attn.o_proj.bias", vec![h]);
            }
            if cfg.qk_norm {
                add("self_attn.q_norm.weight", vec![cfg.head_dim]);
                add("self_attn.k_norm.weight", vec![cfg.head_dim]);
            }
            let m = cfg.intermediate_size;
            add("mlp.gate_proj.weight", vec![m, h]);
            add("mlp.up_proj.weight", vec![m, h]);
            add("mlp.down_proj.weight", vec![h, m]);
            if cfg.mlp_bias {
                add("mlp.gate_proj.bias", vec![m]);
                add("mlp.up_proj.bias", vec![m]);
                add("mlp.down_proj.bias", vec![h]);
            }
        }
        if last {
            list.push(("model.norm.weight".to_string(), vec![h]));
            if !cfg.tie_word_embeddings {
                list.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
            }
        }
        list
    }

    /// Loads the stage's tensors, and only those. `progress` gets (bytes read, bytes to read).
    pub fn load(spec: StageSpec<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<Self> {
        let cfg = spec.config;
        spec.range.check_within(cfg.num_hidden_layers)?;
        let list = Self::tensor_list(&cfg, spec.range, spec.first, spec.last);
        let mut t = spec
            .weights
            .load(&list, spec.dtype, &spec.device, progress)?;
        let eps = cfg.rms_norm_eps;
        let embed_weight = if spec.first || (spec.last && cfg.tie_word_embeddings) {
            Some(t.take("model.embed_tokens.weight")?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.range.len());
        for i in spec.range.iter() {
            layers.push(load_layer(&mut t, &cfg, &layer_prefix(i))?);
        }
        let head = if spec.last {
            let lm_weight = match (&embed_weight, cfg.tie_word_embeddings) {
                (Some(w), true) => w.clone(),
                _ => t.take("lm_head.weight")?,
            };
            Some(Head {
                norm: RmsNorm::new(t.take("model.norm.weight")?, eps),
                lm_head: Linear::new(lm_weight, None),
            })
        } else {
            None
        };
        let embed = match (spec.first, embed_weight) {
            (true, Some(w)) => Some(Embedding::new(w, cfg.hidden_size)),
            _ => None,
        };
        Ok(Self {
            rotary: RotaryTable::new(&cfg),
            config: cfg,
            range: spec.range,
            device: spec.device,
            dtype: spec.dtype,
            embed,
            layers,
            head,
            caches: Mutex::new(HashMap::new()),
            weight_bytes: t.bytes,
            files: t.files,
        })
    }

    /// The layers this stage holds.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// Whether the stage embeds tokens.
    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    /// Whether the stage produces logits.
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Bytes of weights the stage holds, in its dtype.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The weights files the stage opened.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the stage computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The precision of the stage's weights and hidden states.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How many sequences hold a cache here.
    pub fn sequences(&self) -> usize {
        self.caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Tokens cached for `seq`, if the stage holds it.
    pub fn cached_tokens(&self, seq: SeqId) -> Option<usize> {
        self.caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&seq)
            .map(|c| c.len)
    }

    /// Frees `seq`'s cache; returns whether the stage held it.
    pub fn release(&self, seq: SeqId) -> bool {
        self.caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&seq)
            .is_some()
    }

    /// Frees every sequence's cache (a link of the ring went down: they are all lost); returns
    /// how many there were.
    pub fn release_all(&self) -> usize {
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        let n = caches.len();
        caches.clear();
        n
    }

    fn seq_err(&self, seq: SeqId, message: String) -> EngineError {
        EngineError::Sequence {
            range: self.range,
            seq,
            message,
        }
    }

    /// Runs a chunk of `seq` starting at `position` through the stage.
    ///
    /// Position 0 starts the sequence (replacing any cache it had); later chunks must start where
    /// the cache ends. A failed call drops the sequence's cache: its state is no longer known.
    pub fn forward(&self, seq: SeqId, position: usize, input: StageInput) -> Result<StageOutput> {
        let mut cache = {
            let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
            if position == 0 {
                caches.remove(&seq);
                SequenceCache {
                    layers: (0..self.layers.len())
                        .map(|_| ConcatKvCache::new(2))
                        .collect(),
                    len: 0,
                }
            } else {
                caches.remove(&seq).ok_or_else(|| {
                    self.seq_err(seq, format!("no cache for this sequence (asked to continue at position {position}); it was never started, was released, or is in use by another call"))
                })?
            }
        };
        if cache.len != position {
            return Err(self.seq_err(
                seq,
                format!(
                    "chunk starts at position {position} but the cache holds {} tokens",
                    cache.len
                ),
            ));
        }
        let output = self.run(&mut cache, position, input)?;
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        caches.insert(seq, cache);
        Ok(output)
    }

    fn run(
        &self,
        cache: &mut SequenceCache,
        position: usize,
        input: StageInput,
    ) -> Result<StageOutput> {
        let mut x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) => {
                if ids.is_empty() {
                    return Err(self.input_err("an empty chunk of tokens".into()));
                }
                let vocab = self.config.vocab_size;
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(self.input_err(format!(
                        "token id {bad} is outside the model's vocabulary of {vocab}"
                    )));
                }
                let len = ids.len();
                let ids = Tensor::from_vec(ids, (1, len), &self.device)?;
                embed.forward(&ids)?
            }
            (StageInput::Hidden(h), None) => {
                let dims = h.dims().to_vec();
                if dims.len() != 3
                    || dims[0] != 1
                    || dims[1] == 0
                    || dims[2] != self.config.hidden_size
                {
                    return Err(self.input_err(format!(
                        "hidden states of shape {dims:?}, expected (1, tokens, {})",
                        self.config.hidden_size
                    )));
                }
                h.to_device(&self.device)?.to_dtype(self.dtype)?
            }
            (StageInput::Tokens(_), None) => {
                return Err(self
                    .input_err("token ids given to a stage that does not start the model".into()));
            }
            (StageInput::Hidden(_), Some(_)) => {
                return Err(self.input_err(
                    "hidden states given to the first stage, which takes token ids".into(),
                ));
            }
        };
        let len = x.dim(1)?;
        let limit = self.config.max_position_embeddings;
        if position + len > limit {
            return Err(EngineError::ContextOverflow {
                requested: position + len,
                limit,
            });
        }
        let (cos, sin) = self.rotary.cos_sin(position, len, &self.device)?;
        let (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        let kv_len = position + len;
        let window = self.config.sliding_window.filter(|w| *w < kv_len);
        let mask = if len > 1 || window.is_some() {
            Some(candle_transformers::utils::build_additive_causal_mask(
                len,
                position,
                window,
                &self.device,
                DType::F32,
            )?)
        } else {
            None
        };
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &self.config, &cos, &sin, mask.as_ref(), kv)?;
        }
        cache.len = kv_len;
        match &self.head {
            None => Ok(StageOutput::Hidden(x)),
            Some(head) => {
                let last = x.narrow(1, len - 1, 1)?;
                let logits = head.lm_head.forward(&head.norm.forward(&last)?)?;
                Ok(StageOutput::Logits(
                    logits.flatten_all()?.to_dtype(DType::F32)?,
                ))
            }
        }
    }

    fn input_err(&self, message: String) -> EngineError {
        EngineError::StageInput {
            range: self.range,
            message,
        }
    }
}

fn load_linear(t: &mut LoadedTensors, prefix: &str, bias: bool) -> Result<Linear> {
    let w = t.take(&format!("{prefix}.weight"))?;
    let b = if bias {
        Some(t.take(&format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

fn load_layer(t: &mut LoadedTensors, cfg: &ModelConfig, p: &str) -> Result<DecoderLayer> {
    let eps = cfg.rms_norm_eps;
    let a = format!("{p}.self_attn");
    let qk_norm = if cfg.qk_norm {
        Some((
            RmsNorm::new(t.take(&format!("{a}.q_norm.weight"))?, eps),
            RmsNorm::new(t.take(&format!("{a}.k_norm.weight"))?, eps),
        ))
    } else {
        None
    };
    Ok(DecoderLayer {
        input_layernorm: RmsNorm::new(t.take(&format!("{p}.input_layernorm.weight"))?, eps),
        post_attention_layernorm: RmsNorm::new(
            t.take(&format!("{p}.post_attention_layernorm.weight"))?,
            eps,
        ),
        attn: Attention {
            q_proj: load_linear(t, &format!("{a}.q_proj"), cfg.qkv_bias)?,
            k_proj: load_linear(t, &format!("{a}.k_proj"), cfg.qkv_bias)?,
            v_proj: load_linear(t, &format!("{a}.v_proj"), cfg.qkv_bias)?,
            o_proj: load_linear(t, &format!("{a}.o_proj"), cfg.o_bias)?,
            qk_norm,
        },
        mlp: Mlp {
            gate_proj: load_linear(t, &format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
            up_proj: load_linear(t, &format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
            down_proj: load_linear(t, &format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
        },
    })
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut ConcatKvCache,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self.attn.forward(&h, cfg, cos, sin, mask, kv)?;
        let x = (x + h)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        Ok((x + h)?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut ConcatKvCache,
    ) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let q = self.q_proj.forward(x)?.reshape((b, len, heads, d))?;
        let k = self.k_proj.forward(x)?.reshape((b, len, kv_heads, d))?;
        let v = self.v_proj.forward(x)?.reshape((b, len, kv_heads, d))?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q, k),
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = kv.append(&k, &v)?;
        let groups = heads / kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
        // Scores and softmax in f32 whatever the weights' precision: bf16 softmax loses tokens.
        let in_dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let scale = 1.0 / (d as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?.to_dtype(in_dtype)?;
        let y = y.transpose(1, 2)?.reshape((b, len, heads * d))?;
        Ok(self.o_proj.forward(&y)?)
    }
}
