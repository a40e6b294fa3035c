//! The head's generation loop (stage 0): admission, prefill in chunks, one decode step per
//! token that comes back around the ring, stop conditions, and the events streamed to callers.
//!
//! No lock is held across a generation: a sequence's state is touched only for the instant a
//! token arrives, so every sequence advances as soon as its own token is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_api::{FinishReason, SamplingParams};
use cluster_engine::tokenizer::{IncrementalDecoder, TextTokenizer};
use cluster_engine::{ModelFolder, SeqId};
use serde::Serialize;
use tokio::sync::mpsc;

use super::compute::{Job, SequenceStart};
use super::frame::FrameKind;
use super::node::Shared;

/// How recently a probe must have come back around the ring for it to count as whole.
pub const PROBE_FRESH: Duration = Duration::from_millis(1500);

/// A generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Keep going past EOS tokens.
    pub ignore_eos: bool,
}

/// What a caller receives, in order: tokens, then one `Done` or one `Error`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// A generated token and the text it completes (possibly empty).
    Token {
        /// The id.
        id: u32,
        /// Its text.
        text: String,
    },
    /// The sequence ended normally.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
        /// Milliseconds from admission to the first token.
        time_to_first_token_ms: f64,
        /// Generated tokens per second after the first.
        decode_tokens_per_s: f64,
    },
    /// The sequence failed; the message names the stage and node when one is at fault.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Why a request was not admitted.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// HTTP status that fits: 400 bad request, 429 full, 503 ring not ready.
    pub status: u16,
    /// The reason.
    pub message: String,
}

struct SeqState {
    events: mpsc::UnboundedSender<Event>,
    decoder: IncrementalDecoder,
    prompt_len: usize,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    admitted: Instant,
    first_token_at: Option<Instant>,
    last_progress: Instant,
}

/// Stage 0's sequence table and what it needs to run the loop.
pub struct Head {
    folder: ModelFolder,
    sequences: Mutex<HashMap<SeqId, SeqState>>,
    next_seq: AtomicU64,
    last_probe: Mutex<Option<Instant>>,
    last_ring_error: Mutex<Option<String>>,
    /// The probe on its way around the ring and when it left.
    probe_out: Mutex<Option<(u64, Instant)>>,
    /// Mean seconds per hop of recent probes (an exponential average), in nanoseconds.
    hop_nanos: AtomicU64,
    /// A sequence with no token for this long is failed rather than left hanging.
    pub step_timeout: Duration,
    /// Token events held back until stage 0's compute thread has started the sequence's next
    /// step (see [`Head::flush_events`]).
    deferred: Mutex<Vec<(mpsc::UnboundedSender<Event>, Event)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Head {
    /// A head over the model folder (tokenizer, template, EOS ids, context length).
    pub fn new(folder: ModelFolder, step_timeout: Duration) -> Self {
        // Sequence ids from the clock, so a restarted head never reuses a live id downstream.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Self {
            folder,
            sequences: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(start << 8),
            last_probe: Mutex::new(None),
            last_ring_error: Mutex::new(None),
            probe_out: Mutex::new(None),
            hop_nanos: AtomicU64::new(0),
            step_timeout,
            deferred: Mutex::new(Vec::new()),
        }
    }

    /// The model folder.
    pub fn folder(&self) -> &ModelFolder {
        &self.folder
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.folder.tokenizer
    }

    /// Sequences in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.sequences).len()
    }

    /// Sequences past their prompt: each has a decode step somewhere in the ring.
    pub fn decoding(&self) -> usize {
        lock(&self.sequences)
            .values()
            .filter(|st| st.generated > 0)
            .count()
    }

    /// Whether every link of the ring is up, and if not, why.
    pub fn ring_status(&self, shared: &Shared) -> Result<(), String> {
        if !shared.outbound_up() {
            return Err(format!(
                "{} is not connected",
                shared.config.describe_stage(shared.config.successor(0))
            ));
        }
        let fresh = lock(&self.last_probe).is_some_and(|t| t.elapsed() < PROBE_FRESH);
        if fresh {
            return Ok(());
        }
        let detail = lock(&self.last_ring_error)
            .clone()
            .unwrap_or_else(|| "a stage after stage 1 is down or unreachable".into());
        Err(format!(
            "the ring is incomplete: no probe came back around within {} ms ({detail})",
            PROBE_FRESH.as_millis()
        ))
    }

    /// A probe left for the ring.
    pub fn probe_sent(&self, seq: u64) {
        *lock(&self.probe_out) = Some((seq, Instant::now()));
    }

    /// Probe `seq` came back after `hops` hops: every link is up, and its round trip (no
    /// compute on the way) is the network and framing time of the ring.
    pub fn probe_back(&self, seq: u64, hops: usize) {
        if let Some((sent, at)) = *lock(&self.probe_out)
            && sent == seq
            && hops > 0
        {
            let hop = at.elapsed().as_nanos() as u64 / hops as u64;
            let old = self.hop_nanos.load(Ordering::Relaxed);
            let new = if old == 0 { hop } else { (old * 7 + hop) / 8 };
            self.hop_nanos.store(new, Ordering::Relaxed);
        }
        self.probe_returned();
    }

    /// Mean seconds of one hop around the ring, from recent probes.
    pub fn hop_seconds(&self) -> Option<f64> {
        let n = self.hop_nanos.load(Ordering::Relaxed);
        (n > 0).then(|| n as f64 / 1e9)
    }

    /// A probe came back around: every link is up.
    pub fn probe_returned(&self) {
        *lock(&self.last_probe) = Some(Instant::now());
        *lock(&self.last_ring_error) = None;
    }

    /// Admits a request and starts its prefill.
    pub fn submit(
        &self,
        shared: &Shared,
        req: Request,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Refusal> {
        let refuse = |status, message: String| Refusal { status, message };
        self.ring_status(shared).map_err(|m| {
            refuse(
                503,
                format!("pipeline {} is not ready: {m}", shared.config.pipeline),
            )
        })?;
        req.sampling.validate().map_err(|m| refuse(400, m))?;
        if req.prompt_ids.is_empty() {
            return Err(refuse(
                400,
                "the prompt is empty: it encodes to no tokens".into(),
            ));
        }
        let limit = self.folder.config.max_position_embeddings;
        if req.prompt_ids.len() >= limit {
            return Err(refuse(
                400,
                format!(
                    "the prompt has {} tokens but the model's context is {limit} tokens",
                    req.prompt_ids.len()
                ),
            ));
        }
        if req.max_tokens == 0 {
            return Err(refuse(400, "max_tokens must be at least 1".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        {
            let mut seqs = lock(&self.sequences);
            if seqs.len() >= shared.config.max_sequences {
                return Err(refuse(
                    429,
                    format!(
                        "pipeline {} is serving its limit of {} sequences; retry shortly",
                        shared.config.pipeline, shared.config.max_sequences
                    ),
                ));
            }
            let now = Instant::now();
            seqs.insert(
                seq,
                SeqState {
                    events: tx,
                    decoder: IncrementalDecoder::new(true),
                    prompt_len: req.prompt_ids.len(),
                    generated: 0,
                    max_tokens: req.max_tokens,
                    ignore_eos: req.ignore_eos,
                    admitted: now,
                    first_token_at: None,
                    last_progress: now,
                },
            );
        }
        let context_start = req
            .prompt_ids
            .len()
            .saturating_sub(req.sampling.repetition_window);
        let start = SequenceStart {
            sampling: req.sampling.clone(),
            vocab_limit: self.folder.tokenizer.vocab_size(),
            context: req.prompt_ids[context_start..].to_vec(),
        };
        let start = Bytes::from(serde_json::to_vec(&start).unwrap_or_default());
        let chunk = shared.config.prefill_chunk;
        let count = req.prompt_ids.len().div_ceil(chunk);
        for (i, tokens) in req.prompt_ids.chunks(chunk).enumerate() {
            let job = Job::Tokens {
                seq,
                position: i * chunk,
                tokens: tokens.to_vec(),
                kind: FrameKind::Prefill,
                last_chunk: i + 1 == count,
                start: (i == 0).then(|| start.clone()),
            };
            if shared.jobs.try_send(job).is_err() {
                self.fail(
                    shared,
                    seq,
                    "stage 0's compute queue is full; retry shortly".into(),
                );
                break;
            }
        }
        Ok(rx)
    }

    /// A token came back around the ring for `seq`.
    pub fn on_token(&self, shared: &Shared, seq: SeqId, id: u32) {
        let next = {
            let mut seqs = lock(&self.sequences);
            let Some(st) = seqs.get_mut(&seq) else {
                return; // cancelled or failed while the token was on its way
            };
            let now = Instant::now();
            st.generated += 1;
            st.last_progress = now;
            st.first_token_at.get_or_insert(now);
            let eos = !st.ignore_eos && self.folder.eos_token_ids.contains(&id);
            let position = st.prompt_len + st.generated - 1;
            let finish = if eos {
                Some(FinishReason::Stop)
            } else if st.generated >= st.max_tokens
                || position + 1 > self.folder.config.max_position_embeddings
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            let mut text = if eos {
                String::new()
            } else {
                st.decoder
                    .push(&self.folder.tokenizer, id)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            };
            if finish.is_some()
                && let Ok(Some(rest)) = st.decoder.finish(&self.folder.tokenizer)
            {
                text.push_str(&rest);
            }
            let token = Event::Token { id, text };
            let alive = match finish {
                Some(reason) => {
                    self.flush_events();
                    let _ = st.events.send(token);
                    let first = st.first_token_at.unwrap_or(now);
                    let decode_secs = now.duration_since(first).as_secs_f64();
                    let _ = st.events.send(Event::Done {
                        finish_reason: reason,
                        prompt_tokens: st.prompt_len,
                        completion_tokens: st.generated,
                        time_to_first_token_ms: first.duration_since(st.admitted).as_secs_f64()
                            * 1e3,
                        decode_tokens_per_s: if decode_secs > 0.0 {
                            (st.generated - 1) as f64 / decode_secs
                        } else {
                            0.0
                        },
                    });
                    false
                }
                None if st.events.is_closed() => false,
                // The first token goes out at once: time to first token is what callers
                // measure, and the event costs that time only once.
                None if st.generated == 1 => {
                    let _ = st.events.send(token);
                    true
                }
                None => {
                    lock(&self.deferred).push((st.events.clone(), token));
                    true
                }
            };
            if alive {
                Some(position)
            } else {
                let kind = if finish.is_some() {
                    FrameKind::Release
                } else {
                    FrameKind::Cancel
                };
                seqs.remove(&seq);
                let _ = shared.jobs.try_send(Job::Release { seq, kind });
                None
            }
        };
        if let Some(position) = next {
            let job = Job::Tokens {
                seq,
                position,
                tokens: vec![id],
                kind: FrameKind::Decode,
                last_chunk: true,
                start: None,
            };
            if shared.jobs.try_send(job).is_err() {
                self.fail(shared, seq, "stage 0's compute queue is full".into());
            }
        }
    }

    /// Sends the token events held back since the last call. Stage 0's compute thread calls
    /// this once it has started the next step of those sequences: handing an event to its
    /// caller wakes a runtime thread, which on a busy core would run before the next step and
    /// add its time to every token (150 µs of a 10 ms step on this project's 2-core VM). Held
    /// here, the event goes out while the other stages compute.
    pub fn flush_events(&self) {
        let mut deferred = lock(&self.deferred);
        // Sent under the lock, so that an error sent after a flush cannot overtake a token.
        for (tx, event) in deferred.drain(..) {
            let _ = tx.send(event);
        }
    }

    /// Ends one sequence with an error and frees it around the ring.
    pub fn fail(&self, shared: &Shared, seq: SeqId, message: String) {
        let removed = lock(&self.sequences).remove(&seq);
        if let Some(st) = removed {
            self.flush_events();
            let _ = st.events.send(Event::Error { message });
            let _ = shared.jobs.try_send(Job::Release {
                seq,
                kind: FrameKind::Cancel,
            });
        }
    }

    /// Ends every sequence with an error (a link went down) and frees stage 0's caches.
    pub fn fail_all(&self, shared: &Shared, message: String) {
        let failed: Vec<SeqState> = lock(&self.sequences).drain().map(|(_, st)| st).collect();
        if !failed.is_empty() {
            tracing::warn!(pipeline = %shared.config.pipeline, sequences = failed.len(), "{message}");
        }
        self.flush_events();
        for st in failed {
            let _ = st.events.send(Event::Error {
                message: message.clone(),
            });
        }
        *lock(&self.last_ring_error) = Some(message);
        *lock(&self.last_probe) = None;
        let _ = shared.jobs.try_send(Job::DropAll);
    }

    /// Fails sequences whose caller went away or that made no progress for `step_timeout`;
    /// called periodically.
    pub fn sweep(&self, shared: &Shared) {
        let now = Instant::now();
        let stale: Vec<(SeqId, bool)> = lock(&self.sequences)
            .iter()
            .filter_map(|(seq, st)| {
                if st.events.is_closed() {
                    Some((*seq, true))
                } else if now.duration_since(st.last_progress) > self.step_timeout {
                    Some((*seq, false))
                } else {
                    None
                }
            })
            .collect();
        for (seq, gone) in stale {
            if gone {
                if lock(&self.sequences).remove(&seq).is_some() {
                    let _ = shared.jobs.try_send(Job::Release {
                        seq,
                        kind: FrameKind::Cancel,
                    });
                }
            } else {
                self.fail(
                    shared,
                    seq,
                    format!(
                        "no token came back around the ring for {} s",
                        self.step_timeout.as_secs_f64()
                    ),
                );
            }
        }
    }
}
