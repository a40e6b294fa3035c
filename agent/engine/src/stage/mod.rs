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
//! - [`kv`]: the KV cache that grows in place.

mod kv;
mod layer;
mod linear;
mod load;

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
    /// The threads its passes run on ([`pass_pool`]).
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

/// The threads a stage's passes run on, as many as rayon's global pool has
/// (`RAYON_NUM_THREADS`, else one per CPU). Each stage has its own: the threads that
/// [`on_pool_awake`] keeps waiting take whatever work their pool has, and in a pool shared
/// with another stage of the same process they could take that stage's whole pass, and hold
/// this pass's end until the other's.
fn pass_pool() -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("stage-pass-{i}"))
        .build()
        .map_err(|e| candle_core::Error::Msg(format!("starting a stage's threads: {e}")).into())
}

/// Runs `pass` on a thread of rayon's pool while the pool's other threads stay awake for it.
///
/// A decode pass hands the pool a parallel product about seven times a layer, with serial
/// work (norms, attention, quantizing inputs) between them. Left alone, a pool thread with no
/// work yields a few dozen times and then sleeps, and waking it again costs more than a small
/// product: with two threads, 28% of a GGUF decode step went to `futex` and `sched_yield`, and
/// two threads decoded no faster than one. Here each other thread runs a job that takes
/// whatever work the pool has (`rayon::yield_now`) and otherwise waits on its core without
/// sleeping, until the pass ends.
fn on_pool_awake<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    let done = std::sync::atomic::AtomicBool::new(false);
    let done = &done;
    rayon::scope(|scope| {
        let home = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(move |_| keep_awake(done, home));
        }
        /// Ends the waiting however `pass` ends, a panic included: the scope waits for it.
        struct Finished<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Finished<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _finished = Finished(done);
        pass()
    })
}

/// A pool thread's wait for work until `done`; the pass's own thread (`home`), which may run
/// this job while it waits for its products, returns at once instead, or the pass would never
/// end.
fn keep_awake(done: &std::sync::atomic::AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home {
        return;
    }
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle = 0,
            _ => {
                idle = idle.wrapping_add(1);
                // Now and then the core goes to whatever else is runnable (another stage's
                // process on the same machine); otherwise a pause, which keeps the wake-up
                // to the next product under a microsecond.
                if idle % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use candle_nn::{Linear, Module};

    use super::kv::LayerKv;
    use super::linear::{Proj, ROWS_AS_GEMM, linear};

    /// `work` run on its own thread, which must end within ten seconds.
    fn within_seconds<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(work()).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pool was not let go")
    }

    #[test]
    fn a_pass_kept_awake_gives_its_result_and_lets_the_pool_go() {
        use rayon::prelude::*;
        // Which threads take which products is the scheduler's business (the benchmark shows
        // the gain); what must hold is the result, and that the waiting jobs end with the pass.
        for threads in [1, 2, 3] {
            let sum = within_seconds(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let sum = pool.install(|| {
                    super::on_pool_awake(|| {
                        // Many small products with serial work between them, as in a pass.
                        (0..100u64)
                            .map(|step| {
                                std::thread::sleep(std::time::Duration::from_micros(50));
                                (0..64u32)
                                    .into_par_iter()
                                    .with_max_len(1)
                                    .map(|i| std::hint::black_box(step * u64::from(i)))
                                    .sum::<u64>()
                            })
                            .sum::<u64>()
                    })
                });
                // The pool's threads are free again: later jobs run, a pass from outside too.
                assert_eq!(pool.install(|| 7), 7);
                sum
            });
            assert_eq!(sum, (0..100u64).sum::<u64>() * (0..64u64).sum::<u64>());
        }
        // Called from outside any pool, the pass goes to the global one and comes back.
        assert_eq!(within_seconds(|| super::on_pool_awake(|| 5)), 5);
    }

    #[test]
    fn a_pass_that_panics_still_lets_the_pool_go() {
        within_seconds(|| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| super::on_pool_awake(|| panic!("a pass fails")))
            }));
            assert!(failed.is_err());
            assert_eq!(pool.install(|| 7), 7);
        });
    }

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
