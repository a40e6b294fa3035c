//! A ring's liveness, kept apart from its work.
//!
//! A stage whose forward pass takes seconds (a big model on a slow machine, a long prompt) is
//! busy, not gone. So liveness does not travel with the work: every stage's link thread (see
//! [`super::links`]) sends a heartbeat back to its predecessor every [`HEARTBEAT_INTERVAL`],
//! whatever its compute thread is doing, carrying what it knows of itself and of every stage
//! after it. Stage 0 thus sees the whole ring: each link up or not, each stage's pass in progress
//! and its recent pass times, and [`judge`]s from that alone whether the ring serves.
//!
//! - A link that closes is *not connected*: the stage went away (a crash, a SIGKILL) or has not
//!   joined yet. The sequences on it fail at once.
//! - A stage that answers no heartbeat for [`SILENCE_LIMIT`] while its connection stays open,
//!   or whose pass runs past its own bound ([`PassClock`]: ten times its slowest recent pass,
//!   at least [`STALL_FLOOR`]), is *stalled*: stopped (SIGSTOP, a laptop's closed lid) or
//!   wedged. Its sequences fail too; when it answers again the ring serves again, with no apply.
//! - A pass that is merely slow is neither: requests wait for it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use cluster_api::RingConfig;
use cluster_api::cluster::{PassStats, RingReport, RingState};
use serde::{Deserialize, Serialize};

/// How often a stage tells its predecessor it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// A stage silent this long while its connection is open is stalled: ten heartbeats missed,
/// which a live process's link thread never misses, however busy its compute thread is.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(2);
/// No pass counts as stalled before it has run this long.
pub const STALL_FLOOR: Duration = Duration::from_secs(5);
/// A pass counts as stalled past this many times the stage's slowest recent pass (scaled to
/// its tokens when it holds more than that pass did).
pub const STALL_FACTOR: f64 = 10.0;
/// Before a stage has finished any pass there is nothing to scale from: its first pass (the
/// ring's warm-up, which no request waits on) may take this long before it counts as stalled.
const FIRST_PASS_ALLOWANCE: Duration = Duration::from_secs(600);
/// Passes remembered for the recent figures.
const RECENT_PASSES: usize = 32;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One finished pass.
#[derive(Debug, Clone, Copy)]
struct Pass {
    took: Duration,
    tokens: usize,
}

/// A stage's forward passes as they happen: the compute thread marks each pass's start and end,
/// and any thread reads the pass in progress and the recent ones. Reads never wait on a pass.
#[derive(Debug)]
pub struct PassClock {
    epoch: Instant,
    /// Nanoseconds from `epoch` to the start of the pass in progress, plus one; 0 when idle.
    started: AtomicU64,
    /// Tokens in the pass in progress.
    tokens: AtomicUsize,
    recent: Mutex<VecDeque<Pass>>,
    passes: AtomicU64,
}

impl Default for PassClock {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            tokens: AtomicUsize::new(0),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_PASSES)),
            passes: AtomicU64::new(0),
        }
    }
}

/// A pass in progress; dropping it marks the end.
pub struct PassGuard<'a> {
    clock: &'a PassClock,
    started: Instant,
    tokens: usize,
}

impl PassGuard<'_> {
    /// When the pass started.
    pub fn started(&self) -> Instant {
        self.started
    }
}

impl Drop for PassGuard<'_> {
    fn drop(&mut self) {
        self.clock.finish(self.started.elapsed(), self.tokens);
    }
}

impl PassClock {
    /// Marks the start of a pass over `tokens` positions (all its sequences').
    pub fn begin(&self, tokens: usize) -> PassGuard<'_> {
        let started = Instant::now();
        let nanos = started.duration_since(self.epoch).as_nanos() as u64;
        self.tokens.store(tokens, Ordering::Relaxed);
        self.started.store(nanos + 1, Ordering::Release);
        PassGuard {
            clock: self,
            started,
            tokens,
        }
    }

    fn finish(&self, took: Duration, tokens: usize) {
        self.started.store(0, Ordering::Release);
        self.passes.fetch_add(1, Ordering::Relaxed);
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_PASSES {
            recent.pop_front();
        }
        recent.push_back(Pass { took, tokens });
    }

    /// The pass in progress: how long it has run and its tokens.
    pub fn running(&self) -> Option<(Duration, usize)> {
        let started = self.started.load(Ordering::Acquire);
        if started == 0 {
            return None;
        }
        let at = self.epoch + Duration::from_nanos(started - 1);
        Some((at.elapsed(), self.tokens.load(Ordering::Relaxed)))
    }

    /// How long a pass of `tokens` may run before the stage counts as stalled: ten times the
    /// slowest recent pass, or ten times the slowest recent time per token times `tokens` when
    /// that is more (a long prompt's chunk after short decode steps), and never under
    /// [`STALL_FLOOR`].
    pub fn allowance(&self, tokens: usize) -> Duration {
        let recent = lock(&self.recent);
        if recent.is_empty() {
            return FIRST_PASS_ALLOWANCE;
        }
        let slowest = recent.iter().map(|p| p.took).max().unwrap_or_default();
        let per_token = recent
            .iter()
            .map(|p| p.took.as_secs_f64() / p.tokens.max(1) as f64)
            .fold(0.0, f64::max);
        let base = slowest.as_secs_f64().max(per_token * tokens as f64);
        Duration::from_secs_f64(base * STALL_FACTOR).max(STALL_FLOOR)
    }

    /// The figures a report shows.
    pub fn stats(&self) -> PassStats {
        let running = self.running();
        let allowance = self.allowance(running.map_or(1, |(_, t)| t));
        let recent = lock(&self.recent);
        let mean = (!recent.is_empty()).then(|| {
            recent.iter().map(|p| p.took.as_secs_f64()).sum::<f64>() / recent.len() as f64
        });
        PassStats {
            passes: self.passes.load(Ordering::Relaxed),
            last_seconds: recent.back().map(|p| p.took.as_secs_f64()),
            mean_recent_seconds: mean,
            slowest_recent_seconds: recent.iter().map(|p| p.took.as_secs_f64()).reduce(f64::max),
            running_seconds: running.map(|(d, _)| d.as_secs_f64()),
            running_tokens: running.map_or(0, |(_, t)| t),
            stall_after_seconds: allowance.as_secs_f64(),
        }
    }
}

/// A stage's link to its successor, as the stage reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum LinkBeat {
    /// Connected, and the successor's heartbeats arrive. `id` names this connection: a new one
    /// means the ring re-formed and needs a new warm-up.
    Up {
        /// This connection's identity.
        id: u64,
    },
    /// Not connected: never yet, or the connection closed and the stage is reconnecting.
    Connecting {
        /// Why the last attempt or the last connection ended.
        why: String,
    },
    /// Connected, but the successor has sent no heartbeat for `ms` milliseconds.
    Silent {
        /// Milliseconds since the last heartbeat.
        ms: u64,
    },
}

/// What a heartbeat says of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageBeat {
    /// The stage's index.
    pub index: usize,
    /// Milliseconds since the stage itself said this (grows as it is relayed).
    pub age_ms: u64,
    /// Its passes.
    pub passes: PassStats,
    /// Work waiting at it: jobs queued and frames read but not served.
    pub queued: usize,
    /// Its link to its successor.
    pub link: LinkBeat,
}

/// A heartbeat's body: the sender first, then the stages after it that it has heard of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Stages in ring order from the sender.
    pub stages: Vec<StageBeat>,
}

/// What a stage knows of its outbound link and of the stages after it.
#[derive(Debug, Default)]
pub struct Downstream {
    /// The stage's own link to its successor.
    pub link: Option<LinkBeat>,
    /// The successor's last heartbeat and when it came.
    pub heard: Option<(Instant, Vec<StageBeat>)>,
    /// The latest word of every stage after this one, kept when it goes silent, so that a
    /// message about a stalled stage can say what its passes were.
    pub known: HashMap<usize, StageBeat>,
}

impl Downstream {
    /// The stages after this one as the last heartbeat said, aged to now. Empty when the link
    /// is not up: what came over it before no longer holds.
    pub fn relayed(&self) -> Vec<StageBeat> {
        if !matches!(self.link, Some(LinkBeat::Up { .. })) {
            return Vec::new();
        }
        let Some((at, stages)) = &self.heard else {
            return Vec::new();
        };
        let extra = at.elapsed().as_millis() as u64;
        stages
            .iter()
            .cloned()
            .map(|mut s| {
                s.age_ms += extra;
                s
            })
            .collect()
    }
}

/// Shared between a stage's link thread, which writes it, and everyone who reports on it.
#[derive(Debug, Default)]
pub struct LinkState(Mutex<Downstream>);

impl LinkState {
    /// Runs `f` on the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut Downstream) -> R) -> R {
        f(&mut lock(&self.0))
    }
}

/// Whether a ring serves, as [`judge`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Requests are admitted.
    Serving,
    /// Every link is up and nothing is stalled, but the ring has not carried a pass through
    /// every stage since it formed: requests wait for that (it is the `WarmingUp` state).
    Unwarmed {
        /// Every link's identity, in ring order: the warm-up is for this ring.
        links: Vec<u64>,
    },
    /// Requests are refused and sequences in flight fail.
    Broken {
        /// Not connected or stalled.
        state: RingState,
        /// Why, naming the stage and node, in one sentence.
        message: String,
    },
}

impl Verdict {
    /// The verdict as reports show it; `warming` says what the warm-up is doing.
    pub fn report(&self, warming: impl FnOnce() -> String) -> RingReport {
        match self {
            Verdict::Serving => RingReport {
                state: RingState::Serving,
                message: None,
            },
            Verdict::Unwarmed { .. } => RingReport {
                state: RingState::WarmingUp,
                message: Some(warming()),
            },
            Verdict::Broken { state, message } => RingReport {
                state: *state,
                message: Some(message.clone()),
            },
        }
    }
}

/// `0.42 s`, `61.0 s`: seconds as messages show them.
fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

/// A stage's last passes for a message: ` (its last forward pass took 0.42 s)`.
fn last_pass(beat: Option<&StageBeat>) -> String {
    match beat.and_then(|b| b.passes.last_seconds) {
        Some(s) => format!(" (its last forward pass took {})", secs(s)),
        None => String::new(),
    }
}

/// Whether the pass a stage reports has run past its allowance, as a message.
fn stalled_pass(config: &RingConfig, beat: &StageBeat) -> Option<String> {
    let p = &beat.passes;
    let running = p.running_seconds? + beat.age_ms as f64 / 1e3;
    if running <= p.stall_after_seconds {
        return None;
    }
    let basis = match p.slowest_recent_seconds {
        Some(s) => format!(
            "{STALL_FACTOR}x its slowest recent pass of {}, at least {}",
            secs(s),
            secs(STALL_FLOOR.as_secs_f64())
        ),
        None => "its first pass".to_string(),
    };
    let tokens = match p.running_tokens {
        1 => "1 token".to_string(),
        n => format!("{n} tokens"),
    };
    Some(format!(
        "{} is stalled: its forward pass of {tokens} has run for {}, past the {} allowed ({basis})",
        config.describe_stage(beat.index),
        secs(running),
        secs(p.stall_after_seconds),
    ))
}

/// Decides from stage 0's own beat (its passes, its link) and what its link relays whether the
/// ring serves, and if not, why. `warmed` is the ring (its links' identities) that last carried
/// the warm-up.
pub fn judge(
    config: &RingConfig,
    own: &StageBeat,
    downstream: &Downstream,
    warmed: Option<&[u64]>,
) -> Verdict {
    let n = config.stages.len();
    let relayed = downstream.relayed();
    let mut ids = Vec::with_capacity(n);
    for k in 0..n {
        let beat = if k == 0 {
            Some(own)
        } else {
            relayed.iter().find(|b| b.index == k)
        };
        let Some(beat) = beat else {
            // The link before it is up but its first heartbeat has not come round yet.
            return Verdict::Broken {
                state: RingState::NotConnected,
                message: format!("{} has not reported yet", config.describe_stage(k)),
            };
        };
        if let Some(message) = stalled_pass(config, beat) {
            return Verdict::Broken {
                state: RingState::Stalled,
                message,
            };
        }
        if n == 1 {
            break;
        }
        let next = config.successor(k);
        match &beat.link {
            LinkBeat::Up { id } => ids.push(*id),
            LinkBeat::Connecting { why } => {
                return Verdict::Broken {
                    state: RingState::NotConnected,
                    message: format!("{} is not connected: {why}", config.describe_stage(next)),
                };
            }
            LinkBeat::Silent { ms } => {
                let seen = downstream.known.get(&next);
                return Verdict::Broken {
                    state: RingState::Stalled,
                    message: format!(
                        "{} is stalled: it has answered no heartbeat for {}{}",
                        config.describe_stage(next),
                        secs(*ms as f64 / 1e3),
                        last_pass(seen),
                    ),
                };
            }
        }
    }
    if warmed == Some(ids.as_slice()) {
        Verdict::Serving
    } else {
        Verdict::Unwarmed { links: ids }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_api::{LayerRange, RingStage};

    fn config(n: usize) -> RingConfig {
        RingConfig {
            pipeline: "p".into(),
            generation: 1,
            model: "m".into(),
            fetch: None,
            device: Default::default(),
            dtype: None,
            prefill_chunk: 8,
            max_sequences: 4,
            first_token_timeout_ms: None,
            token: "t".into(),
            stages: (0..n)
                .map(|i| RingStage {
                    node: format!("n{i}"),
                    address: format!("127.0.0.1:{}", 7000 + i),
                    layers: LayerRange::new(i, i).unwrap(),
                })
                .collect(),
        }
    }

    fn beat(index: usize, link: LinkBeat) -> StageBeat {
        StageBeat {
            index,
            age_ms: 0,
            passes: PassStats {
                stall_after_seconds: 5.0,
                last_seconds: Some(0.5),
                ..PassStats::default()
            },
            queued: 0,
            link,
        }
    }

    fn heard(link: LinkBeat, stages: Vec<StageBeat>) -> Downstream {
        let known = stages.iter().map(|b| (b.index, b.clone())).collect();
        Downstream {
            link: Some(link),
            heard: Some((Instant::now(), stages)),
            known,
        }
    }

    #[test]
    fn a_whole_ring_serves_once_warmed_for_those_very_links() {
        let c = config(3);
        let own = beat(0, LinkBeat::Up { id: 10 });
        let down = heard(
            LinkBeat::Up { id: 10 },
            vec![
                beat(1, LinkBeat::Up { id: 11 }),
                beat(2, LinkBeat::Up { id: 12 }),
            ],
        );
        assert_eq!(
            judge(&c, &own, &down, None),
            Verdict::Unwarmed {
                links: vec![10, 11, 12]
            }
        );
        assert_eq!(
            judge(&c, &own, &down, Some(&[10, 11, 12])),
            Verdict::Serving
        );
        // A stage that reconnected is a new ring: warm it again.
        assert!(matches!(
            judge(&c, &own, &down, Some(&[10, 99, 12])),
            Verdict::Unwarmed { .. }
        ));
    }

    #[test]
    fn a_missing_or_silent_link_names_the_stage_after_it_once() {
        let c = config(3);
        let own = beat(0, LinkBeat::Up { id: 1 });
        let down = heard(
            LinkBeat::Up { id: 1 },
            vec![beat(
                1,
                LinkBeat::Connecting {
                    why: "connection refused".into(),
                },
            )],
        );
        let Verdict::Broken { state, message } = judge(&c, &own, &down, None) else {
            panic!()
        };
        assert_eq!(state, RingState::NotConnected);
        assert_eq!(
            message,
            "stage 2 (n2 at 127.0.0.1:7002) is not connected: connection refused"
        );

        let mut down = heard(
            LinkBeat::Up { id: 1 },
            vec![beat(1, LinkBeat::Silent { ms: 2300 })],
        );
        down.known.insert(2, beat(2, LinkBeat::Up { id: 3 }));
        let Verdict::Broken { state, message } = judge(&c, &own, &down, None) else {
            panic!()
        };
        assert_eq!(state, RingState::Stalled);
        assert_eq!(
            message,
            "stage 2 (n2 at 127.0.0.1:7002) is stalled: it has answered no heartbeat for 2.30 s (its last forward pass took 0.50 s)"
        );

        // What a link relayed stops counting once the link is down.
        let mut down = heard(
            LinkBeat::Up { id: 1 },
            vec![beat(1, LinkBeat::Up { id: 2 })],
        );
        down.link = Some(LinkBeat::Connecting {
            why: "closed the connection".into(),
        });
        let own = beat(
            0,
            LinkBeat::Connecting {
                why: "closed the connection".into(),
            },
        );
        let Verdict::Broken { message, .. } = judge(&c, &own, &down, None) else {
            panic!()
        };
        assert!(message.starts_with("stage 1 (n1"), "{message}");
    }

    #[test]
    fn a_slow_pass_is_not_a_stall_until_it_runs_past_its_allowance() {
        let c = config(2);
        let own = beat(0, LinkBeat::Up { id: 1 });
        let mut busy = beat(1, LinkBeat::Up { id: 2 });
        busy.passes.running_seconds = Some(4.0);
        busy.passes.running_tokens = 128;
        busy.passes.slowest_recent_seconds = Some(0.4);
        let down = heard(LinkBeat::Up { id: 1 }, vec![busy.clone()]);
        assert!(matches!(
            judge(&c, &own, &down, None),
            Verdict::Unwarmed { .. }
        ));
        busy.passes.running_seconds = Some(5.5);
        let down = heard(LinkBeat::Up { id: 1 }, vec![busy]);
        let Verdict::Broken { state, message } = judge(&c, &own, &down, None) else {
            panic!()
        };
        assert_eq!(state, RingState::Stalled);
        assert!(
            message.contains("stage 1 (n1 at 127.0.0.1:7001) is stalled: its forward pass of 128 tokens has run for 5.50 s, past the 5.00 s allowed (10x its slowest recent pass of 0.40 s"),
            "{message}"
        );
    }

    #[test]
    fn the_allowance_scales_with_the_slowest_pass_and_with_tokens() {
        let clock = PassClock::default();
        assert_eq!(clock.allowance(1), FIRST_PASS_ALLOWANCE);
        clock.finish(Duration::from_millis(800), 1);
        clock.finish(Duration::from_millis(100), 1);
        assert_eq!(clock.allowance(1), Duration::from_secs(8));
        // A 128-token chunk after one-token steps of 0.8 s each.
        assert_eq!(
            clock.allowance(128),
            Duration::from_secs_f64(0.8 * 128.0 * 10.0)
        );
        // Fast passes never make the bound shorter than the floor.
        let fast = PassClock::default();
        fast.finish(Duration::from_millis(3), 1);
        assert_eq!(fast.allowance(1), STALL_FLOOR);
        {
            let _pass = fast.begin(7);
            let (_, tokens) = fast.running().unwrap();
            assert_eq!(tokens, 7);
            assert_eq!(fast.stats().running_tokens, 7);
        }
        assert!(fast.running().is_none());
        assert_eq!(fast.stats().passes, 2);
    }
}
