//! Stage 0's watch over its ring: the verdict its admission and reports use, the warm-up that
//! makes a new ring serve, and the failing of sequences when the ring breaks or stalls. The link
//! thread calls [`Head::watch`] after every heartbeat and every tick ([`super::links`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cluster_api::SamplingParams;
use cluster_api::cluster::{RingReport, RingState};
use tokio::sync::mpsc;

use super::head::{Event, Head, Request, lock};
use super::health::{StageBeat, Verdict, judge};
use super::node::Shared;
use cluster_engine::SeqId;

/// A warm-up that failed is tried again after this long, doubling up to [`WARMUP_RETRY_MAX`].
const WARMUP_RETRY_MIN: Duration = Duration::from_millis(500);
const WARMUP_RETRY_MAX: Duration = Duration::from_secs(30);

/// The warm-up on its way: for which ring (its links' identities), its sequence, when it left,
/// and its events.
struct Running {
    links: Vec<u64>,
    seq: SeqId,
    started: Instant,
    events: mpsc::UnboundedReceiver<Event>,
}

#[derive(Default)]
struct Warmup {
    /// The ring that last carried a warm-up.
    done: Option<Vec<u64>>,
    running: Option<Running>,
    /// Failed attempts in a row, and when to try again.
    failures: u32,
    retry_at: Option<Instant>,
    /// Why the ring last broke, until a warm-up goes round again: stage 0 may hear of a break
    /// (an error frame, its own link's end) a beat before its view of the links shows it, and
    /// admitting a request in that beat would send it into the broken ring.
    broken: Option<String>,
}

/// What stage 0 keeps of its watch.
#[derive(Default)]
pub struct Watch {
    warmup: Mutex<Warmup>,
    /// Since when no stage has had any work, as the last heartbeats said.
    idle_since: Mutex<Option<Instant>>,
}

impl Watch {
    /// What the warm-up is doing, for messages.
    pub fn warming_text(&self) -> String {
        match &lock(&self.warmup).running {
            Some(r) => format!(
                "warming up: a first pass through every stage, under way for {:.1} s",
                r.started.elapsed().as_secs_f64()
            ),
            None => "warming up: a first pass through every stage is about to start".into(),
        }
    }

    /// How long no stage has had any work, when none has.
    pub fn idle_for(&self) -> Option<Duration> {
        lock(&self.idle_since).map(|t| t.elapsed())
    }

    fn warmed(&self) -> Option<Vec<u64>> {
        lock(&self.warmup).done.clone()
    }

    fn note_idle(&self, idle: bool) {
        let mut since = lock(&self.idle_since);
        match (idle, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            _ => {}
        }
    }

    /// The ring lost a link (`message` says which): it serves again only once a warm-up has
    /// gone round the ring as it then stands.
    pub(super) fn broke(&self, message: &str) {
        let mut w = lock(&self.warmup);
        w.done = None;
        w.broken = Some(message.to_string());
    }

    fn failed(&self) {
        let mut w = lock(&self.warmup);
        w.failures = w.failures.saturating_add(1);
        let wait = WARMUP_RETRY_MIN
            .saturating_mul(1 << (w.failures - 1).min(8))
            .min(WARMUP_RETRY_MAX);
        w.retry_at = Some(Instant::now() + wait);
    }
}

impl Head {
    /// Whether the ring serves now, judged from this stage's passes and link and what the
    /// heartbeats brought.
    pub fn verdict(&self, shared: &Shared) -> Verdict {
        let verdict = self.judged(shared);
        match verdict {
            Verdict::Unwarmed { .. } => {
                let w = lock(&self.watch.warmup);
                let Some(why) = &w.broken else {
                    return verdict;
                };
                let message = match &w.running {
                    None => why.clone(),
                    Some(r) => format!(
                        "{why}; a warm-up through the ring as it stands now has run for {:.1} s",
                        r.started.elapsed().as_secs_f64()
                    ),
                };
                Verdict::Broken {
                    state: RingState::NotConnected,
                    message,
                }
            }
            _ => verdict,
        }
    }

    /// The verdict from the links alone, without the last break: what the warm-up goes by.
    pub(super) fn judged(&self, shared: &Shared) -> Verdict {
        let own = shared.own_beat(shared.own_link());
        let warmed = self.watch.warmed();
        shared
            .links
            .with(|down| judge(&shared.config, &own, down, warmed.as_deref()))
    }

    /// The ring's state as reports show it.
    pub fn report(&self, shared: &Shared) -> RingReport {
        self.verdict(shared).report(|| self.watch.warming_text())
    }

    /// Judges the ring with this stage's own beat `own`: fails the sequences of a ring that
    /// broke or stalled, sends the warm-up through a ring that formed, and notes whether any
    /// stage has work.
    pub fn watch(&self, shared: &Shared, own: &StageBeat) {
        // First, whether a warm-up has just come back: the verdict depends on it.
        self.check_warmup(shared);
        let warmed = self.watch.warmed();
        let (verdict, idle) = shared.links.with(|down| {
            let verdict = judge(&shared.config, own, down, warmed.as_deref());
            let relayed = down.relayed();
            let idle = own.passes.running_seconds.is_none()
                && own.queued == 0
                && relayed.len() + 1 == shared.config.stages.len()
                && relayed
                    .iter()
                    .all(|b| b.passes.running_seconds.is_none() && b.queued == 0);
            (verdict, idle)
        });
        self.watch.note_idle(idle);
        match verdict {
            Verdict::Serving => {}
            Verdict::Unwarmed { links } => self.start_warmup(shared, links),
            Verdict::Broken { state, message } => {
                if !lock(&self.sequences).is_empty() {
                    self.fail_all(shared, message, state == RingState::NotConnected);
                }
            }
        }
    }

    /// Sends the warm-up through the ring `links` unless one is on its way or due later: a
    /// one-token prompt, sampled at the last stage, whose token comes back to stage 0.
    fn start_warmup(&self, shared: &Shared, links: Vec<u64>) {
        {
            let w = lock(&self.watch.warmup);
            if w.running.is_some() || w.retry_at.is_some_and(|t| Instant::now() < t) {
                return;
            }
        }
        let limit = self.folder.tokenizer.vocab_size() as u32;
        // Any token the model has will do; one it also sees at the start of prompts is the
        // most ordinary.
        let token = self
            .folder
            .config
            .bos_token_id
            .into_iter()
            .chain(self.folder.eos_token_ids.iter().copied())
            .find(|&id| id < limit)
            .unwrap_or(0);
        let request = Request {
            prompt_ids: vec![token],
            max_tokens: 1,
            sampling: SamplingParams::default(),
            ignore_eos: true,
            resumed: 0,
        };
        match self.admit(shared, request, true) {
            Ok((seq, events)) => {
                tracing::info!(pipeline = %shared.config.pipeline, links = ?links, "warming up: a first pass through every stage");
                lock(&self.watch.warmup).running = Some(Running {
                    links,
                    seq,
                    started: Instant::now(),
                    events,
                });
            }
            Err(refusal) => {
                tracing::warn!(pipeline = %shared.config.pipeline, "cannot start the warm-up: {}", refusal.message);
                self.watch.failed();
            }
        }
    }

    /// Looks at the warm-up on its way: done, failed, or still going.
    fn check_warmup(&self, shared: &Shared) {
        let mut w = lock(&self.watch.warmup);
        let Some(running) = w.running.as_mut() else {
            return;
        };
        let outcome = loop {
            match running.events.try_recv() {
                Ok(Event::Token { .. }) => continue,
                Ok(Event::Done { .. }) => break Ok(()),
                Ok(Event::Error { message }) => break Err(message),
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    break Err("it ended without a word".into());
                }
            }
        };
        let Some(running) = w.running.take() else {
            return;
        };
        match outcome {
            Ok(()) => {
                tracing::info!(
                    pipeline = %shared.config.pipeline,
                    seq = running.seq,
                    ms = running.started.elapsed().as_millis() as u64,
                    "warm-up done: the ring serves"
                );
                w.done = Some(running.links);
                w.broken = None;
                w.failures = 0;
                w.retry_at = None;
            }
            Err(message) => {
                drop(w);
                tracing::warn!(pipeline = %shared.config.pipeline, "the warm-up failed: {message}");
                self.watch.failed();
            }
        }
    }
}
