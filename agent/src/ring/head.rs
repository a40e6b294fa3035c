//! The head's generation loop (stage 0): admission, prefill in chunks, one decode step per
//! token that comes back around the ring, stop conditions, and the events streamed to callers.
//!
//! No lock is held across a generation: a sequence's state is touched only for the instant a
//! token arrives, so every sequence advances as soon as its own token is back.
//!
//! Whether the ring serves is judged from its links' heartbeats ([`super::watch`]), never from
//! how long work takes: a request is admitted while every link is live, no stage is stalled,
//! and the ring has carried one pass through every stage since it formed (the warm-up, which
//! makes "Ready" mean "serving"). A sequence waits for its tokens as long as the ring makes
//! progress, unless the pipeline bounds the wait for the first one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_api::{FinishReason, SamplingParams};
use cluster_engine::tokenizer::{IncrementalDecoder, TextTokenizer};
use cluster_engine::{ModelFolder, SeqId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::compute::{Job, SequenceStart};
use super::frame::FrameKind;
use super::health::Verdict;
use super::node::Shared;
use super::watch::Watch;

/// A sequence that has had no token for this long while no stage had any work (no pass
/// running, nothing queued anywhere) was lost on the way, by a fault no link showed: it fails
/// rather than waiting forever.
const LOST_AFTER: Duration = Duration::from_secs(10);

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
    /// How many of the prompt's last ids an earlier run of this sequence generated (it failed
    /// over from another replica): the text decoder goes on after them as if it had decoded
    /// them, and the sampler makes as many draws before its first, so that the sequence goes
    /// on with the tokens it would have had.
    pub resumed: usize,
}

/// What a caller receives, in order: tokens, then one `Done` or one `Error`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

pub(super) struct SeqState {
    events: mpsc::UnboundedSender<Event>,
    decoder: IncrementalDecoder,
    prompt_len: usize,
    /// Prompt tokens stage 0 has run so far.
    prefilled: usize,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    admitted: Instant,
    first_token_at: Option<Instant>,
    last_progress: Instant,
    /// The warm-up rather than a caller's request: not counted against `maxSequences` nor in
    /// reports.
    pub(super) internal: bool,
}

/// Stage 0's sequence table and what it needs to run the loop.
pub struct Head {
    pub(super) folder: ModelFolder,
    pub(super) sequences: Mutex<HashMap<SeqId, SeqState>>,
    next_seq: AtomicU64,
    /// The probe on its way around the ring and when it left.
    probe_out: Mutex<Option<(u64, Instant)>>,
    /// Mean seconds per hop of recent probes (an exponential average), in nanoseconds.
    hop_nanos: AtomicU64,
    /// What the link thread last judged of the ring, the warm-up, and whether stages are idle.
    pub(super) watch: Watch,
    /// Token events held back until stage 0's compute thread has started the sequence's next
    /// step (see [`Head::flush_events`]).
    deferred: Mutex<Vec<(mpsc::UnboundedSender<Event>, Event)>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Head {
    /// A head over the model folder (tokenizer, template, EOS ids, context length).
    pub fn new(folder: ModelFolder) -> Self {
        // Sequence ids from the clock, so a restarted head never reuses a live id downstream.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Self {
            folder,
            sequences: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(start << 8),
            probe_out: Mutex::new(None),
            hop_nanos: AtomicU64::new(0),
            watch: Watch::default(),
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

    /// Callers' sequences in flight (the warm-up is not one).
    pub fn in_flight(&self) -> usize {
        lock(&self.sequences)
            .values()
            .filter(|st| !st.internal)
            .count()
    }

    /// Sequences past their prompt: each has a decode step somewhere in the ring.
    pub fn decoding(&self) -> usize {
        lock(&self.sequences)
            .values()
            .filter(|st| st.generated > 0)
            .count()
    }

    /// Whether `seq` is still in flight, so that the rest of its prompt is worth running.
    pub fn is_live(&self, seq: SeqId) -> bool {
        lock(&self.sequences).contains_key(&seq)
    }

    /// Stage 0 has run `seq`'s prompt up to `tokens`.
    pub fn prefilled(&self, seq: SeqId, tokens: usize) {
        if let Some(st) = lock(&self.sequences).get_mut(&seq) {
            st.prefilled = tokens;
        }
    }

    /// A probe left for the ring.
    pub fn probe_sent(&self, seq: u64) {
        *lock(&self.probe_out) = Some((seq, Instant::now()));
    }

    /// Probe `seq` came back after `hops` hops: its round trip (no compute on the way, though
    /// it may wait behind a pass at each stage) is the network and framing time of the ring.
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
    }

    /// Mean seconds of one hop around the ring, from recent probes.
    pub fn hop_seconds(&self) -> Option<f64> {
        let n = self.hop_nanos.load(Ordering::Relaxed);
        (n > 0).then(|| n as f64 / 1e9)
    }

    /// Admits a caller's request and starts its prefill.
    pub fn submit(
        &self,
        shared: &Shared,
        req: Request,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Refusal> {
        self.admit(shared, req, false).map(|(_, rx)| rx)
    }

    /// Admits a request (`internal`: the warm-up, which a ring that is not warm yet takes and
    /// `maxSequences` does not count) and queues its prompt.
    pub(super) fn admit(
        &self,
        shared: &Shared,
        req: Request,
        internal: bool,
    ) -> Result<(SeqId, mpsc::UnboundedReceiver<Event>), Refusal> {
        let refuse = |status, message: String| Refusal { status, message };
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
        if req.resumed >= req.prompt_ids.len() {
            return Err(refuse(
                400,
                format!(
                    "resumed is {} but the prompt has only {} tokens: a resumed sequence's prompt is the original prompt and the tokens generated so far",
                    req.resumed,
                    req.prompt_ids.len()
                ),
            ));
        }
        // The text of a resumed sequence follows what its client already has: a character
        // cut between two tokens, or a SentencePiece word's leading space, comes out as it
        // would have without the failover.
        let mut decoder = IncrementalDecoder::new(true);
        for &id in &req.prompt_ids[req.prompt_ids.len() - req.resumed..] {
            let _ = decoder.push(&self.folder.tokenizer, id);
        }
        let pipeline = &shared.config.pipeline;
        let verdict = if internal {
            self.judged(shared)
        } else {
            self.verdict(shared)
        };
        match verdict {
            Verdict::Serving => {}
            Verdict::Unwarmed { .. } if internal => {}
            Verdict::Unwarmed { .. } => {
                return Err(refuse(
                    503,
                    format!("pipeline {pipeline} is {}", self.watch.warming_text()),
                ));
            }
            Verdict::Broken { message, .. } => {
                return Err(refuse(
                    503,
                    format!("pipeline {pipeline} is not serving: {message}"),
                ));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        {
            let mut seqs = lock(&self.sequences);
            let callers = seqs.values().filter(|s| !s.internal).count();
            if !internal && callers >= shared.config.max_sequences {
                return Err(refuse(
                    429,
                    format!(
                        "pipeline {pipeline} is serving its limit of {} sequences; retry shortly",
                        shared.config.max_sequences
                    ),
                ));
            }
            let now = Instant::now();
            seqs.insert(
                seq,
                SeqState {
                    events: tx,
                    decoder,
                    prompt_len: req.prompt_ids.len(),
                    prefilled: 0,
                    generated: 0,
                    max_tokens: req.max_tokens,
                    ignore_eos: req.ignore_eos,
                    admitted: now,
                    first_token_at: None,
                    last_progress: now,
                    internal,
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
            draws: req.resumed,
        };
        let start = Bytes::from(serde_json::to_vec(&start).unwrap_or_default());
        // One job for the whole prompt: stage 0's compute thread runs it chunk by chunk, so a
        // long prompt takes one place in its queue, not one per chunk.
        let job = Job::Prompt {
            seq,
            tokens: req.prompt_ids,
            next: 0,
            start,
        };
        if shared.jobs.try_send(job).is_err() {
            lock(&self.sequences).remove(&seq);
            return Err(refuse(
                429,
                format!("pipeline {pipeline}: stage 0's compute queue is full; retry shortly"),
            ));
        }
        Ok((seq, rx))
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

    /// Ends every sequence with `message`. When the ring lost a link (`broken`), stage 0 drops
    /// every cache (the others drop theirs as they notice); when a stage stalled with every link
    /// up, each sequence is cancelled around the ring instead, so that every stage frees it
    /// once the stalled one moves again.
    pub fn fail_all(&self, shared: &Shared, message: String, broken: bool) {
        if broken {
            self.watch.broke(&message);
        }
        let failed: Vec<(SeqId, SeqState)> = lock(&self.sequences).drain().collect();
        let callers = failed.iter().filter(|(_, st)| !st.internal).count();
        if callers > 0 {
            tracing::warn!(pipeline = %shared.config.pipeline, sequences = callers, "{message}");
        }
        self.flush_events();
        for (seq, st) in &failed {
            let _ = st.events.send(Event::Error {
                message: message.clone(),
            });
            if !broken {
                let _ = shared.jobs.try_send(Job::Release {
                    seq: *seq,
                    kind: FrameKind::Cancel,
                });
            }
        }
        if broken {
            let _ = shared.jobs.try_send(Job::DropAll);
        }
    }

    /// Cancels sequences whose caller went away; fails those past the pipeline's
    /// `firstTokenTimeout`, and those lost in a ring that has been idle for [`LOST_AFTER`].
    /// Called periodically.
    pub fn sweep(&self, shared: &Shared) {
        let now = Instant::now();
        let first_limit = shared
            .config
            .first_token_timeout_ms
            .map(Duration::from_millis);
        let idle = self.watch.idle_for().is_some_and(|d| d >= LOST_AFTER);
        let mut gone = Vec::new();
        let mut failing = Vec::new();
        for (seq, st) in lock(&self.sequences).iter() {
            if st.events.is_closed() {
                gone.push(*seq);
            } else if let Some(limit) = first_limit
                && !st.internal
                && st.first_token_at.is_none()
                && now.duration_since(st.admitted) > limit
            {
                failing.push((
                    *seq,
                    format!(
                        "no first token within {:.1} s, the pipeline's firstTokenTimeout: stage 0 had run {} of the prompt's {} tokens",
                        limit.as_secs_f64(),
                        st.prefilled,
                        st.prompt_len
                    ),
                ));
            } else if idle && now.duration_since(st.last_progress) >= LOST_AFTER {
                failing.push((
                    *seq,
                    format!(
                        "no token came back for {:.0} s while no stage had work: its step was lost in the ring",
                        now.duration_since(st.last_progress).as_secs_f64()
                    ),
                ));
            }
        }
        for seq in gone {
            if lock(&self.sequences).remove(&seq).is_some() {
                let _ = shared.jobs.try_send(Job::Release {
                    seq,
                    kind: FrameKind::Cancel,
                });
            }
        }
        for (seq, message) in failing {
            self.fail(shared, seq, message);
        }
    }
}
