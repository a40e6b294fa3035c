//! A stage: decoder layers `first..=last` of a model, with the embedding when it is the first
//! stage and the final norm and LM head when it is the last.
//!
//! The weights are shared by every sequence (`&self`); each sequence has its own KV cache for the
//! stage's layers, created when its position-0 chunk arrives and dropped on [`Stage::release`].
//! Callers on several threads may run different sequences through one stage at once.
//!
//! # Layout
//!
//! - this file: the stage, its sequences' caches, and its forward passes (one chunk, or one
//!   decode step of several sequences in a batch);
//! - [`load`]: which tensors a stage reads and how, from safetensors or GGUF;
//! - [`layer`]: the decoder layer (attention and MLP);
//! - [`linear`]: projections and the product each weight format takes;
//! - [`kv`]: the KV cache that grows in place;
//! - [`pool`]: the threads a stage's passes run on, kept awake during a pass.

mod kv;
mod layer;
mod linear;
mod load;
mod pool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm};
use cluster_api::LayerRange;

use self::kv::{LayerKv, SequenceCache};
use self::layer::DecoderLayer;
use self::linear::{Proj, linear};
use self::pool::on_pool_awake;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::rope::RotaryTable;
use crate::weights::Weights;

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

/// The token embedding of the first stage: a dense table, or a GGUF table kept in its block
/// format, of which a lookup dequantizes only the rows it needs; a table that is also the
/// stage's (tied) head is held repacked for the head's kernels, once for both.
enum TokenEmbedding {
    Dense(Embedding),
    Quant(candle_core::quantized::QMatMul),
    Packed(linear::PackedBlocks),
}

impl TokenEmbedding {
    /// The rows of `ids` (`(1, len)`): `(1, len, hidden)`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(e) => e.forward(ids)?,
            Self::Quant(q) => q.embedding(ids)?,
            Self::Packed(p) => p.embedding(ids)?,
        })
    }
}

/// The final norm and the LM head of the last stage.
struct Head {
    norm: RmsNorm,
    lm_head: Proj,
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
    /// The weights' precision.
    dtype: DType,
    /// The precision of hidden states, norms, the KV cache: the weights' own, but f32 for
    /// half-precision weights on the CPU, which widen as they are multiplied.
    act: DType,
    embed: Option<TokenEmbedding>,
    layers: Vec<DecoderLayer>,
    head: Option<Head>,
    rotary: RotaryTable,
    caches: Mutex<HashMap<SeqId, SequenceCache>>,
    /// Caches taken out of `caches` by a forward pass in progress; they still count as held.
    busy: AtomicUsize,
    /// The threads its passes run on ([`pool::pass_pool`]).
    pool: rayon::ThreadPool,
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

/// The precision a stage computes in with weights of `dtype` on `device`: on the CPU,
/// half-precision weights are widened as they are multiplied and everything else is f32 (the
/// CPU has no fast half-precision arithmetic, and f32 sums are what the references compute);
/// GPUs compute in the weights' precision.
pub(crate) fn activation_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && matches!(dtype, DType::BF16 | DType::F16) {
        DType::F32
    } else {
        dtype
    }
}

impl Stage {
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

    /// Whether a prompt chunk's rows come out the same whatever the chunk's length, as long as
    /// it has more than one row: on the CPU with f32 weights from safetensors, whose chunks go
    /// through candle's general product, which takes the same operations for a row in any
    /// chunk (a chunk of one row goes through `matvec`, which sums in another order). Stage 0
    /// may then size chunks by load without changing a prompt's logits. Not so for half
    /// precision (the decode kernel up to 16 rows, a general product past) nor for GGUF files
    /// (several kernels, by block format and rows).
    pub fn chunks_are_row_exact(&self) -> bool {
        self.device.is_cpu()
            && self.dtype == DType::F32
            && !self.files.iter().any(|f| {
                f.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            })
    }

    /// The precision of the stage's weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The precision of its hidden states: the weights', or f32 for half-precision weights on
    /// the CPU.
    pub fn activation_dtype(&self) -> DType {
        self.act
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
        // A pass runs on a thread of the stage's pool, its caller asleep until it ends, the
        // pool's other threads kept awake for its products (`on_pool_awake`). Run from outside
        // the pool, its serial work (attention, norms, quantizing inputs) took a thread of its
        // own beside the pool's: on 2 cores, 3 busy threads made two-thread decode of a GGUF
        // stage half as fast as one thread's.
        if self.pool.current_thread_index().is_none() {
            return self
                .pool
                .install(|| on_pool_awake(|| self.forward(seq, position, input)));
        }
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
        // On the stage's pool, as `forward` runs.
        if self.pool.current_thread_index().is_none() {
            return self
                .pool
                .install(|| on_pool_awake(|| self.forward_batch(items)));
        }
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
        let cos = Tensor::cat(&cos, 0)?.to_dtype(self.act)?;
        let sin = Tensor::cat(&sin, 0)?.to_dtype(self.act)?;
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
                Ok(embed.forward(&ids)?.to_dtype(self.act)?)
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
                Ok(h.to_device(&self.device)?.to_dtype(self.act)?)
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
        let (cos, sin) = (cos.to_dtype(self.act)?, sin.to_dtype(self.act)?);
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

#[cfg(test)]
mod tests;
