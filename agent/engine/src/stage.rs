//! A stage: decoder layers `first..=last` of a model, with the embedding when it is the first
//! stage and the final norm and LM head when it is the last.
//!
//! The weights are shared by every sequence (`&self`); each sequence has its own KV cache for the
//! stage's layers, created when its position-0 chunk arrives and dropped on [`Stage::release`].
//! Callers on several threads may run different sequences through one stage at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm};
use cluster_api::LayerRange;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::rope::RotaryTable;
use crate::weights::{LoadedTensors, WeightFiles, Weights};

/// A projection's weights: dense (safetensors, in the stage's dtype) or quantized (GGUF, in the
/// file's block format, multiplied without dequantizing the whole matrix).
enum Proj {
    Dense(Linear),
    Quant(QMatMul, Option<Tensor>),
}

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
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    /// Qwen3 normalises each head of q and k before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
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
    lm_head: Proj,
}

/// One sequence's keys and values for the stage's layers.
struct SequenceCache {
    layers: Vec<LayerKv>,
    /// Tokens already in the cache: the position the next chunk must start at.
    len: usize,
}

/// One layer's keys and values for one sequence: buffers of `(1, kv_heads, capacity, head_dim)`
/// filled to `len`. A step is written in place; when full, the capacity doubles (at least
/// [`KV_MIN_CAPACITY`] positions). Concatenating each step onto the cache instead copied all of
/// it every step, into fresh memory.
#[derive(Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// Positions a layer's cache holds at first: small enough that a short request reserves little.
const KV_MIN_CAPACITY: usize = 64;

impl LayerKv {
    /// Appends `k` and `v` (`(1, kv_heads, n, head_dim)`) and returns the keys and values of
    /// every position so far: views of the buffers, contiguous within each head.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let need = self.len + k.dim(2)?;
        let capacity = match &self.k {
            Some(t) => t.dim(2)?,
            None => 0,
        };
        if need > capacity {
            let capacity = need.max(2 * capacity).max(KV_MIN_CAPACITY);
            self.k = Some(Self::grow(self.k.as_ref(), k, self.len, capacity)?);
            self.v = Some(Self::grow(self.v.as_ref(), v, self.len, capacity)?);
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            unreachable!("the buffers exist once the capacity is above zero");
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    /// A buffer of `capacity` positions shaped like `like`, holding the first `len` of `old`.
    fn grow(old: Option<&Tensor>, like: &Tensor, len: usize, capacity: usize) -> Result<Tensor> {
        let (b, heads, _, d) = like.dims4()?;
        let buf = Tensor::zeros((b, heads, capacity, d), like.dtype(), like.device())?;
        if let Some(old) = old
            && len > 0
        {
            buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        Ok(buf)
    }
}

/// One sequence's decode step inside [`Stage::forward_batch`].
struct BatchItem {
    /// Index in the caller's list.
    idx: usize,
    seq: SeqId,
    position: usize,
    cache: SequenceCache,
    /// Its hidden state, `(1, 1, hidden)`.
    x: Tensor,
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
    /// Caches taken out of `caches` by a forward pass in progress; they still count as held.
    busy: AtomicUsize,
    weight_bytes: u64,
    files: Vec<PathBuf>,
}

/// Options of [`Stage::load`].
pub struct StageSpec<'a> {
    /// The model's configuration.
    pub config: Arc<ModelConfig>,
    /// Where its weights are.
    pub weights: &'a Weights,
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

    /// Names and shapes of the tensors a GGUF stage with this spec reads: the same tensors as
    /// [`Stage::tensor_list`], under llama.cpp's names.
    pub fn gguf_tensor_list(
        cfg: &ModelConfig,
        range: LayerRange,
        first: bool,
        last: bool,
    ) -> Vec<(String, Vec<usize>)> {
        // The same tensors as a safetensors stage, under llama.cpp's names.
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
        let tied_head = last && cfg.tie_word_embeddings;
        if first || tied_head {
            wanted.push(("token_embd.weight".into(), vec![cfg.vocab_size, h]));
        }
        for i in range.iter() {
            let p = format!("blk.{i}");
            let mut add = |n: &str, shape: Vec<usize>| wanted.push((format!("{p}.{n}"), shape));
            add("attn_norm.weight", vec![h]);
            add("ffn_norm.weight", vec![h]);
            add("attn_q.weight", vec![cfg.q_width(), h]);
            add("attn_k.weight", vec![cfg.kv_width(), h]);
            add("attn_v.weight", vec![cfg.kv_width(), h]);
            add("attn_output.weight", vec![h, cfg.q_width()]);
            if cfg.qkv_bias {
                add("attn_q.bias", vec![cfg.q_width()]);
                add("attn_k.bias", vec![cfg.kv_width()]);
                add("attn_v.bias", vec![cfg.kv_width()]);
            }
            if cfg.qk_norm {
                add("attn_q_norm.weight", vec![cfg.head_dim]);
                add("attn_k_norm.weight", vec![cfg.head_dim]);
            }
            add("ffn_gate.weight", vec![m, h]);
            add("ffn_up.weight", vec![m, h]);
            add("ffn_down.weight", vec![h, m]);
        }
        if last {
            wanted.push(("output_norm.weight".into(), vec![h]));
            if !cfg.tie_word_embeddings {
                wanted.push(("output.weight".into(), vec![cfg.vocab_size, h]));
            }
        }
        wanted
    }

    /// Loads the stage's tensors, and only those. `progress` gets (bytes read, bytes to read).
    pub fn load(spec: StageSpec<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<Self> {
        match spec.weights {
            Weights::Safetensors(files) => Self::load_safetensors(spec, files, progress),
            Weights::Gguf(file) => Self::load_gguf(spec, file, progress),
        }
    }

    fn load_safetensors(
        spec: StageSpec<'_>,
        files: &WeightFiles,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        let cfg = spec.config;
        spec.range.check_within(cfg.num_hidden_layers)?;
        let list = Self::tensor_list(&cfg, spec.range, spec.first, spec.last);
        let mut t = files.load(&list, spec.dtype, &spec.device, progress)?;
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
                lm_head: Proj::Dense(Linear::new(lm_weight, None)),
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
            busy: AtomicUsize::new(0),
            weight_bytes: t.bytes,
            files: t.files,
        })
    }

    /// Loads a stage from a GGUF file: projections stay in the file's quantized types; the
    /// embedding, norms and biases are dequantized to f32, in which GGUF stages compute.
    fn load_gguf(
        spec: StageSpec<'_>,
        file: &GgufFile,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        let cfg = spec.config;
        spec.range.check_within(cfg.num_hidden_layers)?;
        let dev = &spec.device;
        let h = cfg.hidden_size;
        let wanted = Self::gguf_tensor_list(&cfg, spec.range, spec.first, spec.last);
        let total: u64 = wanted.iter().map(|(n, _)| file.tensor_bytes(n)).sum();
        for (name, expected) in &wanted {
            match file.tensor_shape(name) {
                None => {
                    return Err(EngineError::MissingTensor {
                        name: name.clone(),
                        place: file.path().to_path_buf(),
                    });
                }
                Some(actual) if &actual != expected => {
                    return Err(EngineError::TensorShape {
                        path: file.path().to_path_buf(),
                        name: name.clone(),
                        expected: expected.clone(),
                        actual,
                    });
                }
                Some(_) => {}
            }
        }
        let mut r = GgufReader {
            file,
            device: dev,
            done: 0,
            total,
            held: 0,
            progress,
        };
        let eps = cfg.rms_norm_eps;
        let embed = if spec.first {
            Some(Embedding::new(r.dense("token_embd.weight")?, h))
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.range.len());
        for i in spec.range.iter() {
            let p = format!("blk.{i}");
            let qk_norm = if cfg.qk_norm {
                Some((
                    RmsNorm::new(r.dense(&format!("{p}.attn_q_norm.weight"))?, eps),
                    RmsNorm::new(r.dense(&format!("{p}.attn_k_norm.weight"))?, eps),
                ))
            } else {
                None
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::new(r.dense(&format!("{p}.attn_norm.weight"))?, eps),
                attn: Attention {
                    q_proj: r.proj(&format!("{p}.attn_q"), cfg.qkv_bias)?,
                    k_proj: r.proj(&format!("{p}.attn_k"), cfg.qkv_bias)?,
                    v_proj: r.proj(&format!("{p}.attn_v"), cfg.qkv_bias)?,
                    o_proj: r.proj(&format!("{p}.attn_output"), cfg.o_bias)?,
                    qk_norm,
                },
                post_attention_layernorm: RmsNorm::new(
                    r.dense(&format!("{p}.ffn_norm.weight"))?,
                    eps,
                ),
                mlp: Mlp {
                    gate_proj: r.proj(&format!("{p}.ffn_gate"), false)?,
                    up_proj: r.proj(&format!("{p}.ffn_up"), false)?,
                    down_proj: r.proj(&format!("{p}.ffn_down"), false)?,
                },
            });
        }
        let head = if spec.last {
            let norm = RmsNorm::new(r.dense("output_norm.weight")?, eps);
            let name = if cfg.tie_word_embeddings {
                "token_embd"
            } else {
                "output"
            };
            Some(Head {
                norm,
                lm_head: r.proj(name, false)?,
            })
        } else {
            None
        };
        let held = r.held;
        Ok(Self {
            rotary: RotaryTable::new(&cfg),
            config: cfg,
            range: spec.range,
            device: spec.device,
            dtype: DType::F32,
            embed,
            layers,
            head,
            caches: Mutex::new(HashMap::new()),
            busy: AtomicUsize::new(0),
            weight_bytes: held,
            files: vec![file.path().to_path_buf()],
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

    /// How many sequences hold a cache here, those being computed included.
    pub fn sequences(&self) -> usize {
        let resting = self
            .caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        resting + self.busy.load(Ordering::Acquire)
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

    /// Takes `seq`'s cache out of the table for a chunk starting at `position` (a new one at
    /// position 0). The caller puts it back when the chunk succeeded.
    fn take_cache(&self, seq: SeqId, position: usize) -> Result<SequenceCache> {
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        if position == 0 {
            caches.remove(&seq);
            self.busy.fetch_add(1, Ordering::AcqRel);
            return Ok(SequenceCache {
                layers: (0..self.layers.len()).map(|_| LayerKv::default()).collect(),
                len: 0,
            });
        }
        let cache = caches.remove(&seq).ok_or_else(|| {
            self.seq_err(seq, format!("no cache for this sequence (asked to continue at position {position}); it was never started, was released, or is in use by another call"))
        })?;
        if cache.len != position {
            return Err(self.seq_err(
                seq,
                format!(
                    "chunk starts at position {position} but the cache holds {} tokens",
                    cache.len
                ),
            ));
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        Ok(cache)
    }

    fn put_cache(&self, seq: SeqId, cache: SequenceCache) {
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        caches.insert(seq, cache);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }

    /// A cache taken for a pass that failed is dropped: its contents are no longer known.
    fn drop_cache(&self, cache: SequenceCache) {
        drop(cache);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }

    /// Runs a chunk of `seq` starting at `position` through the stage.
    ///
    /// Position 0 starts the sequence (replacing any cache it had); later chunks must start where
    /// the cache ends. A failed call drops the sequence's cache: its state is no longer known.
    pub fn forward(&self, seq: SeqId, position: usize, input: StageInput) -> Result<StageOutput> {
        let mut cache = self.take_cache(seq, position)?;
        match self.run(&mut cache, position, input) {
            Ok(output) => {
                self.put_cache(seq, cache);
                Ok(output)
            }
            Err(e) => {
                self.drop_cache(cache);
                Err(e)
            }
        }
    }

    /// Runs one decode step (one token, or one position of hidden states) for each of several
    /// sequences in a single pass: the projections and the MLP see all of them at once, so the
    /// weights are read once for the batch; attention runs per sequence over its own cache.
    ///
    /// Results come back in the order given; a sequence whose input or cache is wrong fails
    /// alone. Each result equals what [`Stage::forward`] gives for that sequence alone, up to
    /// float rounding.
    pub fn forward_batch(
        &self,
        items: Vec<(SeqId, usize, StageInput)>,
    ) -> Vec<Result<StageOutput>> {
        if items.len() == 1 {
            return items
                .into_iter()
                .map(|(seq, pos, input)| self.forward(seq, pos, input))
                .collect();
        }
        let mut results: Vec<Option<Result<StageOutput>>> = items.iter().map(|_| None).collect();
        let mut batch: Vec<BatchItem> = Vec::new();
        for (idx, (seq, position, input)) in items.into_iter().enumerate() {
            let prepared = self
                .embed_input(input)
                .and_then(|x| {
                    let len = x.dim(1)?;
                    if len != 1 {
                        return Err(self.input_err(format!(
                            "a batched decode step takes one position, got {len}"
                        )));
                    }
                    self.check_context(position, 1)?;
                    Ok(x)
                })
                .and_then(|x| self.take_cache(seq, position).map(|cache| (cache, x)));
            match prepared {
                Ok((cache, x)) => batch.push(BatchItem {
                    idx,
                    seq,
                    position,
                    cache,
                    x,
                }),
                Err(e) => results[idx] = Some(Err(e)),
            }
        }
        if !batch.is_empty() {
            match self.run_batch(&mut batch) {
                Ok(outputs) => {
                    for (item, out) in batch.into_iter().zip(outputs) {
                        self.put_cache(item.seq, item.cache);
                        results[item.idx] = Some(Ok(out));
                    }
                }
                Err(e) => {
                    // The caches of the whole batch are in an unknown state: they are dropped.
                    let message = e.to_string();
                    for item in batch {
                        self.drop_cache(item.cache);
                        results[item.idx] = Some(Err(
                            self.seq_err(item.seq, format!("batched step failed: {message}"))
                        ));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(EngineError::InvalidRequest(
                        "a batch item got no result".into(),
                    ))
                })
            })
            .collect()
    }

    fn run_batch(&self, batch: &mut [BatchItem]) -> Result<Vec<StageOutput>> {
        let xs: Vec<&Tensor> = batch.iter().map(|b| &b.x).collect();
        let mut x = Tensor::cat(&xs, 0)?;
        let n = batch.len();
        let half = self.config.head_dim / 2;
        let mut cos = Vec::with_capacity(n);
        let mut sin = Vec::with_capacity(n);
        let mut masks = Vec::with_capacity(n);
        for b in batch.iter() {
            let (c, s) = self.rotary.cos_sin(b.position, 1, &self.device)?;
            cos.push(c.reshape((1, 1, half))?);
            sin.push(s.reshape((1, 1, half))?);
            masks.push(self.mask(1, b.position)?);
        }
        let cos = Tensor::cat(&cos, 0)?.to_dtype(self.dtype)?;
        let sin = Tensor::cat(&sin, 0)?.to_dtype(self.dtype)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut kvs: Vec<&mut LayerKv> =
                batch.iter_mut().map(|b| &mut b.cache.layers[l]).collect();
            x = layer.forward(&x, &self.config, &cos, &sin, &masks, &mut kvs)?;
        }
        for b in batch.iter_mut() {
            b.cache.len += 1;
        }
        match &self.head {
            None => (0..n)
                .map(|i| Ok(StageOutput::Hidden(x.narrow(0, i, 1)?)))
                .collect(),
            Some(head) => {
                let logits =
                    linear(&head.lm_head, &head.norm.forward(&x)?)?.to_dtype(DType::F32)?;
                (0..n)
                    .map(|i| Ok(StageOutput::Logits(logits.narrow(0, i, 1)?.flatten_all()?)))
                    .collect()
            }
        }
    }

    /// Turns a stage input into hidden states `(1, tokens, hidden)` on the stage's device.
    fn embed_input(&self, input: StageInput) -> Result<Tensor> {
        match (input, &self.embed) {
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
                Ok(embed.forward(&ids)?)
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
                Ok(h.to_device(&self.device)?.to_dtype(self.dtype)?)
            }
            (StageInput::Tokens(_), None) => {
                Err(self
                    .input_err("token ids given to a stage that does not start the model".into()))
            }
            (StageInput::Hidden(_), Some(_)) => Err(self
                .input_err("hidden states given to the first stage, which takes token ids".into())),
        }
    }

    fn check_context(&self, position: usize, len: usize) -> Result<()> {
        let limit = self.config.max_position_embeddings;
        if position + len > limit {
            return Err(EngineError::ContextOverflow {
                requested: position + len,
                limit,
            });
        }
        Ok(())
    }

    /// The additive mask of `len` queries starting at `position`, when one is needed: several
    /// queries (causal), or a sliding window shorter than the keys.
    ///
    /// A window of `w` lets a query see itself and the `w - 1` keys before it, as transformers'
    /// Mistral does. (candle-transformers' Mistral shows one key more, and only within a chunk.)
    fn mask(&self, len: usize, position: usize) -> Result<Option<Tensor>> {
        // candle's helper keeps keys within distance `w` of the query: `w + 1` of them.
        let window = self
            .config
            .sliding_window
            .filter(|w| *w < position + len)
            .map(|w| w - 1);
        if len == 1 && window.is_none() {
            return Ok(None);
        }
        Ok(Some(
            candle_transformers::utils::build_additive_causal_mask(
                len,
                position,
                window,
                &self.device,
                DType::F32,
            )?,
        ))
    }

    fn run(
        &self,
        cache: &mut SequenceCache,
        position: usize,
        input: StageInput,
    ) -> Result<StageOutput> {
        let mut x = self.embed_input(input)?;
        let len = x.dim(1)?;
        self.check_context(position, len)?;
        let (cos, sin) = self.rotary.cos_sin(position, len, &self.device)?;
        let (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        let kv_len = position + len;
        let mask = self.mask(len, position)?;
        let masks = [mask];
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &self.config, &cos, &sin, &masks, &mut [kv])?;
        }
        cache.len = kv_len;
        match &self.head {
            None => Ok(StageOutput::Hidden(x)),
            Some(head) => {
                let last = x.narrow(1, len - 1, 1)?;
                let logits = linear(&head.lm_head, &head.norm.forward(&last)?)?;
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

/// Where [`decode_on_cpu`] does not apply (GPU tensors, other dtypes), decode batches at least
/// this large multiply as `W · Xᵀ` (one pass over the weights, a general matrix product);
/// smaller ones run one matrix-vector product per row, which re-reads the weights from cache
/// rather than memory. Measured on x86 with candle's gemm: a 2-row general product costs almost
/// 3 matrix-vector products, while 2 rows one by one cost 1.45.
const ROWS_AS_GEMM: usize = 5;

/// `lin(x)` for `x` of shape `(b, len, in)`. A decode batch (`len == 1`, several sequences)
/// avoids the general product that small batches would otherwise get.
fn linear(proj: &Proj, x: &Tensor) -> Result<Tensor> {
    let lin = match proj {
        Proj::Dense(lin) => lin,
        Proj::Quant(w, bias) => {
            // F32, F16 and BF16 files are held as plain f32 matrices (candle dequantizes them).
            if let QMatMul::Tensor(t) = w
                && let Some(y) = decode_on_cpu(t, bias.as_ref(), x)?
            {
                return Ok(y);
            }
            let (b, len, _) = x.dims3()?;
            // A small decode batch goes row by row: candle picks other kernels for several rows
            // of some block formats, whose last bits differ from one row's (and 8-bit rounding
            // of the next input can make that visible); the weights stay in cache meanwhile.
            let y = if len == 1 && b > 1 && b < ROWS_AS_GEMM {
                let rows = (0..b)
                    .map(|i| w.forward(&x.narrow(0, i, 1)?))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            } else {
                w.forward(x)?
            };
            return Ok(match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
    };
    if let Some(y) = decode_on_cpu(lin.weight(), lin.bias(), x)? {
        return Ok(y);
    }
    let (b, len, width) = x.dims3()?;
    if len != 1 || b == 1 {
        return Ok(lin.forward(x)?);
    }
    if b < ROWS_AS_GEMM {
        let rows = (0..b)
            .map(|i| lin.forward(&x.narrow(0, i, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&rows, 0)?);
    }
    let xt = x.reshape((b, width))?.t()?.contiguous()?;
    let y = lin.weight().matmul(&xt)?.t()?;
    let y = match lin.bias() {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    Ok(y.contiguous()?.unsqueeze(1)?)
}

/// A decode step (`len == 1`, any number of sequences) against f32 weights in CPU memory (an
/// f32 checkpoint's, or a GGUF file's F32, F16 and BF16 tensors, which candle holds as f32),
/// through [`matvec`](crate::matvec): each weight row is read once for the whole batch, and a
/// sequence's result has the same bits whichever batch it came in. `None` for anything else
/// (prefill chunks, other dtypes, GPU tensors), which takes candle's products.
fn decode_on_cpu(w: &Tensor, bias: Option<&Tensor>, x: &Tensor) -> Result<Option<Tensor>> {
    let (b, len, width) = x.dims3()?;
    if len != 1 || !w.device().is_cpu() || w.dtype() != DType::F32 || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (outputs, w_width) = w.dims2()?;
    if w_width != width {
        // candle's product reports the mismatch with both shapes.
        return Ok(None);
    }
    // Attention's output comes transposed; the kernel reads rows in place.
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * outputs];
    {
        let (w_storage, w_layout) = w.storage_and_layout();
        let (x_storage, x_layout) = x.storage_and_layout();
        let (Some(w), Some(xs)) = (cpu_f32(&w_storage, w_layout), cpu_f32(&x_storage, x_layout))
        else {
            return Ok(None);
        };
        crate::matvec::rows_times_weights(xs, b, w, width, &mut out);
    }
    let y = Tensor::from_vec(out, (b, 1, outputs), x.device())?;
    Ok(Some(match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    }))
}

/// A contiguous f32 CPU tensor's elements, from its storage and layout; `None` for any other.
fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets()?;
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.get(start..end),
        _ => None,
    }
}

/// The elements of an f32 CPU tensor `(1, heads, len, head_dim)` whose heads are each one
/// contiguous block (a [`LayerKv`] view), from the first head's start, with the distance
/// between heads; `None` for any other tensor.
fn heads_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<(&'a [f32], usize)> {
    let (&[1, _, len, d], &[_, head_stride, row_stride, 1]) = (layout.dims(), layout.stride())
    else {
        return None;
    };
    if row_stride != d || head_stride < len * d {
        return None;
    }
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            v.get(layout.start_offset()..).map(|s| (s, head_stride))
        }
        _ => None,
    }
}

/// Reads a GGUF stage's tensors one by one, counting the bytes held and reporting progress.
struct GgufReader<'a> {
    file: &'a GgufFile,
    device: &'a Device,
    done: u64,
    total: u64,
    /// Bytes the stage holds: quantized matrices at their stored size, the rest in f32.
    held: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl GgufReader<'_> {
    fn read(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let t = self.file.qtensor(name, self.device)?;
        self.done += self.file.tensor_bytes(name);
        (self.progress)(self.done, self.total);
        Ok(t)
    }

    /// A tensor dequantized to f32 (embeddings, norms, biases).
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let t = self.read(name)?.dequantize(self.device)?;
        self.held += (t.elem_count() * 4) as u64;
        Ok(t)
    }

    /// `{prefix}.weight` kept quantized, with `{prefix}.bias` in f32 when `bias`.
    fn proj(&mut self, prefix: &str, bias: bool) -> Result<Proj> {
        let w = self.read(&format!("{prefix}.weight"))?;
        self.held += w.storage_size_in_bytes() as u64;
        let b = if bias {
            Some(self.dense(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Proj::Quant(QMatMul::from_qtensor(w)?, b))
    }
}

fn load_linear(t: &mut LoadedTensors, prefix: &str, bias: bool) -> Result<Proj> {
    let w = t.take(&format!("{prefix}.weight"))?;
    let b = if bias {
        Some(t.take(&format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Proj::Dense(Linear::new(w, b)))
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
    /// Runs the layer for `n` sequences at once: `x` is `(n, len, hidden)` (one sequence's chunk,
    /// or one position of each of several sequences), `cos`/`sin` are `(len, head_dim / 2)` or
    /// `(n, len, head_dim / 2)`, and `masks[i]`, `kvs[i]` are sequence i's mask and cache.
    fn forward(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        cos: &Tensor,
        sin: &Tensor,
        masks: &[Option<Tensor>],
        kvs: &mut [&mut LayerKv],
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let (q, k, v) = self.attn.project(&h, cfg, cos, sin)?;
        let mut ys = Vec::with_capacity(kvs.len());
        for (i, kv) in kvs.iter_mut().enumerate() {
            let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
            ys.push(
                self.attn
                    .attend(&qi, &ki, &vi, cfg, masks[i].as_ref(), kv)?,
            );
        }
        let y = Tensor::cat(&ys, 0)?;
        let h = self.attn.output(&y, cfg)?;
        let x = (x + h)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        Ok((x + h)?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&linear(&self.gate_proj, x)?)?;
        let up = linear(&self.up_proj, x)?;
        linear(&self.down_proj, &(gate * up)?)
    }
}

impl Attention {
    /// Projects `x` `(b, len, hidden)` to rotated queries and keys and to values, each
    /// `(b, heads, len, head_dim)`.
    fn project(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, len, _) = x.dims3()?;
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let q = linear(&self.q_proj, x)?.reshape((b, len, heads, d))?;
        let k = linear(&self.k_proj, x)?.reshape((b, len, kv_heads, d))?;
        let v = linear(&self.v_proj, x)?.reshape((b, len, kv_heads, d))?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q, k),
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?;
        let rope = if cfg.rope_interleaved {
            candle_nn::rotary_emb::rope_i
        } else {
            candle_nn::rotary_emb::rope
        };
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// One sequence's attention: appends its new keys and values to its cache and attends over
    /// all of them. Returns `(1, heads, len, head_dim)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cfg: &ModelConfig,
        mask: Option<&Tensor>,
        kv: &mut LayerKv,
    ) -> Result<Tensor> {
        let (k, v) = kv.append(k, v)?;
        let dense = matches!(self.o_proj, Proj::Dense(_));
        // A decode step of a dense f32 stage on the CPU: one pass over the cache per group of
        // heads. Quantized stages keep the paths below, whose rounding their references share.
        if dense
            && mask.is_none()
            && q.dim(2)? == 1
            && q.device().is_cpu()
            && q.dtype() == DType::F32
            && k.dtype() == DType::F32
            && let Some(y) = Self::attend_decode_cpu(q, &k, &v, cfg)?
        {
            return Ok(y);
        }
        if cfg.family == crate::config::Family::Qwen3 && q.device().is_cpu() && !dense {
            return Self::attend_cpu_flash(q, &k.contiguous()?, &v.contiguous()?, cfg);
        }
        let groups = cfg.num_attention_heads / cfg.num_key_value_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
        // Scores and softmax in f32 whatever the weights' precision: bf16 softmax loses tokens.
        let in_dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        // Llama's reference implementations divide by √d and the others multiply by 1/√d; the
        // results differ in the last bit, which quantized matmuls (that round their inputs to
        // 8 bits) can turn into visible differences, so each family follows its reference.
        let raw = q.matmul(&k.t()?)?;
        let mut scores = if cfg.family == crate::config::Family::Llama {
            (raw / (cfg.head_dim as f64).sqrt())?
        } else {
            (raw * (1.0 / (cfg.head_dim as f64).sqrt()))?
        };
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&v)?.to_dtype(in_dtype)?)
    }

    /// One position's attention over the whole cache through
    /// [`decode_attention`](crate::matvec::decode_attention), reading the cache in place: candle's
    /// path copies the keys and values per head and multiplies one row at a time, which at 1500
    /// cached positions was half of a decode step. `None` when a tensor is not in CPU memory as
    /// f32. Returns `(1, heads, 1, head_dim)`.
    fn attend_decode_cpu(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cfg: &ModelConfig,
    ) -> Result<Option<Tensor>> {
        use crate::matvec::{HeadBlocks, ScoreScale, decode_attention};
        let (_, heads, _, d) = q.dims4()?;
        let (_, kv_heads, len, _) = k.dims4()?;
        let q = q.contiguous()?;
        let sqrt = (d as f64).sqrt();
        let scale = if cfg.family == crate::config::Family::Llama {
            ScoreScale::Divide(sqrt as f32)
        } else {
            ScoreScale::Multiply((1.0 / sqrt) as f32)
        };
        let mut out = vec![0f32; heads * d];
        {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (Some(q), Some((k, k_stride)), Some((v, v_stride))) =
                (cpu_f32(&qs, ql), heads_f32(&ks, kl), heads_f32(&vs, vl))
            else {
                return Ok(None);
            };
            if k_stride != v_stride {
                return Ok(None);
            }
            let cache = HeadBlocks {
                k,
                v,
                stride: k_stride,
                len,
            };
            decode_attention(q, cache, heads, kv_heads, d, scale, &mut out);
        }
        Ok(Some(Tensor::from_vec(out, (1, heads, 1, d), q.device())?))
    }

    /// Quantized Qwen3 stages on the CPU: candle's fused flash-attention kernel, causal from the
    /// chunk's offset, grouped-query heads handled inside. Their references (candle-transformers'
    /// Qwen3, whole and quantized) use it on the CPU, and its online softmax rounds differently
    /// from the plain path: with quantized matmuls, which round their inputs to 8 bits, that
    /// rounding must match. Dense stages only need agreement within 1e-5 and take the faster
    /// paths: on the 8-layer Qwen3-shaped model at 1500 positions this kernel decoded 27 tokens/s
    /// against 103-110, and prefilled 300 tokens/s against 500-540. Returns
    /// `(1, heads, len, head_dim)`.
    fn attend_cpu_flash(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
        use candle_nn::attention::cpu_flash::causal::causal_decode_f32_interleaved;
        use candle_nn::attention::{AttnMask, flash_attn};
        let len = q.dim(2)?;
        let kv_len = k.dim(2)?;
        let offset = kv_len - len;
        let in_dtype = q.dtype();
        if len == 1 && in_dtype == DType::F32 {
            // The references decode one position with a dedicated kernel over keys and values
            // interleaved per position, `(positions, kv_heads, 2 * head_dim)`.
            let (heads, kv_heads, d) = (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            );
            let q_flat: Vec<f32> = q.flatten_all()?.to_vec1()?;
            let kv = Tensor::cat(
                &[
                    k.squeeze(0)?.transpose(0, 1)?,
                    v.squeeze(0)?.transpose(0, 1)?,
                ],
                2,
            )?;
            let kv_flat: Vec<f32> = kv.flatten_all()?.to_vec1()?;
            let scale = 1.0 / (d as f32).sqrt();
            let y = causal_decode_f32_interleaved(
                &q_flat, &kv_flat, heads, kv_heads, d, kv_len, scale,
            )?;
            return Ok(y.unsqueeze(0)?);
        }
        let prep = |t: &Tensor| -> Result<Tensor> {
            Ok(t.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)?)
        };
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let y = flash_attn::<f32>(
            &prep(q)?,
            &prep(k)?,
            &prep(v)?,
            scale,
            AttnMask::causal_with_offset(offset),
            None,
            None,
        )?;
        Ok(y.to_dtype(in_dtype)?)
    }

    /// Merges the heads of `y` `(b, heads, len, head_dim)` and applies the output projection.
    fn output(&self, y: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
        let (b, _, len, _) = y.dims4()?;
        let y = y.transpose(1, 2)?.reshape((b, len, cfg.q_width()))?;
        linear(&self.o_proj, &y)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use candle_nn::{Linear, Module};

    use super::{LayerKv, Proj, ROWS_AS_GEMM, linear};

    #[test]
    fn the_kv_cache_grows_in_place_and_returns_every_position_in_order() {
        let dev = Device::Cpu;
        let mut kv = LayerKv::default();
        let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
        // A prefill chunk, then single steps past the first capacity and past its double.
        for n in std::iter::once(50).chain(std::iter::repeat_n(1, 90)) {
            let k = Tensor::randn(0f32, 1.0, (1, 2, n, 8), &dev).unwrap();
            // Values arrive transposed from the projection, as in `Attention::project`.
            let v = Tensor::randn(0f32, 1.0, (1, n, 2, 8), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let (ck, cv) = kv.append(&k, &v).unwrap();
            all_k.push(k);
            all_v.push(v);
            let want_k = Tensor::cat(&all_k, 2).unwrap();
            let want_v = Tensor::cat(&all_v, 2).unwrap();
            assert_eq!(ck.dims(), want_k.dims());
            let same = |a: &Tensor, b: &Tensor| {
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(same(&ck, &want_k) && same(&cv, &want_v), "at {}", kv.len);
        }
        assert_eq!(kv.len, 140);
        // 64 positions at first, doubled at 65 and at 129.
        assert_eq!(kv.k.as_ref().unwrap().dim(2).unwrap(), 256);
    }

    #[test]
    fn batched_rows_equal_one_row_at_a_time() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 37), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
        let lin = Linear::new(w, Some(b));
        let proj = Proj::Dense(lin.clone());
        for rows in [2, ROWS_AS_GEMM - 1, ROWS_AS_GEMM, 9] {
            let x = Tensor::randn(0f32, 1.0, (rows, 1, 37), &dev).unwrap();
            let batched = linear(&proj, &x).unwrap();
            assert_eq!(batched.dims(), &[rows, 1, 48]);
            for i in 0..rows {
                // A sequence's result is the same whether it came alone or in a batch.
                let alone = linear(&proj, &x.narrow(0, i, 1).unwrap()).unwrap();
                let row = batched.narrow(0, i, 1).unwrap();
                assert_eq!(
                    row.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{rows} rows: row {i}"
                );
                // And within rounding of candle's own product.
                let one = lin.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                let diff = (batched.narrow(0, i, 1).unwrap() - one)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-5, "{rows} rows: row {i} differs by {diff}");
            }
        }
    }
}
