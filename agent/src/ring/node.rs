//! A stage process: its listener for the predecessor's link, its connector to the successor,
//! its compute thread, and on stage 0 the head.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cluster_api::RingConfig;
use cluster_engine::device::{choose_dtype, open_device};
use cluster_engine::{ModelFolder, SeqId, Stage, StageSpec};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::compute::{self, Job, JobQueue};
use super::frame::{Frame, FrameKind, FrameReader};
use super::handshake::{self, RingIdentity};
use super::head::Head;
use super::health::{LinkBeat, LinkState, PassClock, PassGuard, StageBeat};
use super::inbound::{InboundConn, wake_pair};
use super::link::LinkWriter;
use super::links::{self, LinkCmd, LinkHandle};

mod load;
mod wire;

use self::load::load_stage;
pub use self::wire::RingMux;
use self::wire::{accept_loop, connect_loop, probe_loop};

/// Counters a stage keeps about its own work.
#[derive(Debug, Default)]
pub struct StageMetrics {
    compute_nanos: AtomicU64,
    compute_passes: AtomicU64,
    compute_steps: AtomicU64,
    frames_sent: AtomicU64,
    frames_dropped: AtomicU64,
    /// The pass in progress and the recent ones, read by the link thread for heartbeats.
    pub passes: PassClock,
}

/// A forward pass in progress: ends (and is counted) when dropped.
pub struct PassTimer<'a> {
    metrics: &'a StageMetrics,
    guard: PassGuard<'a>,
    steps: usize,
}

impl PassTimer<'_> {
    /// When the pass started.
    pub fn started(&self) -> Instant {
        self.guard.started()
    }
}

impl Drop for PassTimer<'_> {
    fn drop(&mut self) {
        let d = self.guard.started().elapsed();
        let m = self.metrics;
        m.compute_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        m.compute_passes.fetch_add(1, Ordering::Relaxed);
        m.compute_steps
            .fetch_add(self.steps as u64, Ordering::Relaxed);
    }
}

impl StageMetrics {
    /// Starts timing a forward pass of `steps` sequences over `tokens` positions in all.
    pub fn pass(&self, steps: usize, tokens: usize) -> PassTimer<'_> {
        PassTimer {
            metrics: self,
            guard: self.passes.begin(tokens),
            steps,
        }
    }

    /// Seconds spent in forward passes.
    pub fn compute_seconds(&self) -> f64 {
        self.compute_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Forward passes (a batched pass counts once).
    pub fn compute_passes(&self) -> u64 {
        self.compute_passes.load(Ordering::Relaxed)
    }

    /// The counters as JSON.
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "compute_seconds": self.compute_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            "compute_passes": self.compute_passes.load(Ordering::Relaxed),
            "compute_steps": self.compute_steps.load(Ordering::Relaxed),
            "frames_sent": self.frames_sent.load(Ordering::Relaxed),
            "frames_dropped": self.frames_dropped.load(Ordering::Relaxed),
        })
    }
}

/// State shared by a stage's tasks and its compute thread.
pub struct Shared {
    /// The ring.
    pub config: RingConfig,
    /// This stage's index.
    pub index: usize,
    identity: RingIdentity,
    /// The link toward the successor; `None` while it is down.
    outbound: Mutex<Option<Arc<LinkWriter>>>,
    /// The compute thread's queue.
    pub jobs: JobQueue,
    /// The head, on stage 0.
    pub head: Option<Arc<Head>>,
    /// The stage itself, shared with the compute thread (for reports: its cached sequences).
    pub stage: Arc<Stage>,
    /// Counters.
    pub metrics: StageMetrics,
    /// This stage's link to its successor and what came back over it, kept by the link thread.
    pub links: LinkState,
    /// The link thread.
    link_thread: LinkHandle,
    /// Frames the compute thread has read but not served yet (its queue counts apart).
    pub backlog: AtomicUsize,
    /// Set when the agent is stopping: a stage after stage 0 takes no new sequence, so that
    /// those in flight can finish within the grace period (stage 0's endpoint stops taking
    /// requests on its own).
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Whether the link to the successor is up.
    pub fn outbound_up(&self) -> bool {
        self.outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn describe_self(&self) -> String {
        self.config.describe_stage(self.index)
    }

    /// Work waiting at this stage: queued jobs and frames read but not served.
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity() + self.backlog.load(Ordering::Relaxed)
    }

    /// What this stage's heartbeat says of itself, with its link in state `link`.
    pub fn own_beat(&self, link: LinkBeat) -> StageBeat {
        StageBeat {
            index: self.index,
            age_ms: 0,
            passes: self.metrics.passes.stats(),
            queued: self.queued(),
            link,
        }
    }

    /// This stage's link to its successor as the link thread last saw it.
    pub fn own_link(&self) -> LinkBeat {
        self.links.with(|d| {
            d.link.clone().unwrap_or_else(|| LinkBeat::Connecting {
                why: "not connected yet".into(),
            })
        })
    }

    /// Sends a frame to the successor, waiting when the link is busy. A frame for a down link
    /// is dropped: on stage 0 its sequence fails at once; elsewhere the stage that lost its
    /// predecessor reports the loss toward stage 0.
    pub fn send(&self, frame: Frame) {
        let sender = self
            .outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let seq = frame.seq;
        let kind = frame.kind;
        let sent = match sender {
            Some(link) => link.send_blocking(&frame),
            None => false,
        };
        if sent {
            self.metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(head) = &self.head
                && matches!(kind, FrameKind::Prefill | FrameKind::Decode)
            {
                let next = self
                    .config
                    .describe_stage(self.config.successor(self.index));
                head.fail(self, seq, format!("{next} is not connected"));
            }
        }
    }

    /// Delivers a sampled token: to the head when this stage is also stage 0, else to stage 0.
    pub fn deliver_token(&self, seq: SeqId, id: u32) {
        match &self.head {
            Some(head) => head.on_token(self, seq, id),
            None => self.send(
                Frame::new(
                    FrameKind::Token,
                    &self.config.pipeline,
                    self.config.generation,
                    seq,
                )
                .with_tokens(&[id]),
            ),
        }
    }

    /// Fails one sequence because of this stage: on stage 0 directly, elsewhere by an Error
    /// frame that travels on to stage 0.
    pub fn fail_sequence(&self, seq: SeqId, message: &str) {
        let message = format!("{}: {message}", self.describe_self());
        match &self.head {
            Some(head) => head.fail(self, seq, message),
            None => self.send(
                Frame::new(
                    FrameKind::Error,
                    &self.config.pipeline,
                    self.config.generation,
                    seq,
                )
                .with_meta(message),
            ),
        }
    }

    fn set_outbound(&self, link: Option<Arc<LinkWriter>>) {
        *self.outbound.lock().unwrap_or_else(PoisonError::into_inner) = link;
    }

    /// Sends a frame on (forwarded probes and errors): never waits, so that neither async code
    /// nor the compute thread can be held by a slow successor here.
    pub(super) fn forward(&self, frame: &Frame) {
        let link = self
            .outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(link) = link {
            link.send(frame);
        }
    }
}

/// What a stage process needs beyond the ring configuration.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// This stage's index in the ring.
    pub index: usize,
    /// How long the compute thread polls for work before sleeping (see `compute::next_job`).
    pub compute_spin: Duration,
    /// A test hook: forward passes take at least these times (see [`PassFloor::from_env`]).
    pub pass_floor: Option<PassFloor>,
    /// Agents that may hold the model's files, asked before the hub when fetching.
    pub peers: crate::fetch::Peers,
}

/// A test hook standing in for a slow machine: the stage's forward passes take at least the
/// times given, in order, the last one repeating. From `CLUSTERAGENT_TEST_PASS_MS`: `3000`
/// makes every pass take 3 s; `50,50,30000` lets the first two take 50 ms and wedges the rest
/// for 30 s. Unset: no floor.
#[derive(Debug, Clone, PartialEq)]
pub struct PassFloor {
    floors: Vec<Duration>,
    passes: usize,
}

impl PassFloor {
    /// The hook from the environment, or `None` when unset.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var("CLUSTERAGENT_TEST_PASS_MS") {
            Err(_) => Ok(None),
            Ok(v) => Self::parse(&v).map(Some),
        }
    }

    fn parse(v: &str) -> Result<Self> {
        let floors = v
            .split(',')
            .map(|ms| {
                ms.trim().parse::<u64>().map(Duration::from_millis).with_context(|| {
                    format!("CLUSTERAGENT_TEST_PASS_MS={v:?}: {ms:?} is not a number of milliseconds")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { floors, passes: 0 })
    }

    /// The floor of the next pass.
    pub fn next_floor(&mut self) -> Duration {
        let floor = self.floors[self.passes.min(self.floors.len() - 1)];
        self.passes += 1;
        floor
    }

    /// The floors, for the log.
    pub fn describe(&self) -> String {
        let ms: Vec<String> = self
            .floors
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect();
        ms.join(", ")
    }
}

/// Where a stage accepts its predecessor's connection.
pub enum Inbound {
    /// Its own listener on its stage's address (`clusteragent stage`).
    Bind,
    /// The agent's ring port, shared by the stages of every pipeline it runs.
    Shared(Arc<RingMux>),
}

/// Bytes of weights read so far and in all, while a stage loads.
#[derive(Debug, Default)]
pub struct LoadProgress {
    /// Read so far.
    pub loaded: AtomicU64,
    /// To read.
    pub total: AtomicU64,
    /// Whether the bytes are still being fetched (hub or URL) rather than read.
    pub fetching: std::sync::atomic::AtomicBool,
    /// Bytes this load fetched over the network (0: all were local or in the cache).
    pub fetched: AtomicU64,
    /// What the fetch had to say (a peer's bytes refused, a source given up on), for events.
    pub notes: std::sync::Mutex<Vec<String>>,
    /// Where the fetched bytes came from, in words.
    pub fetched_from: std::sync::Mutex<String>,
}

/// A running stage; dropping it does not stop the tasks, [`RingNode::shutdown`] does.
pub struct RingNode {
    /// State shared with the tasks.
    pub shared: Arc<Shared>,
    /// The address the ring listener is bound to.
    pub ring_addr: SocketAddr,
    stop: watch::Sender<bool>,
    mux: Option<Arc<RingMux>>,
}

impl RingNode {
    /// Loads the stage and starts its own listener, connector and compute thread.
    pub async fn start(config: RingConfig, options: NodeOptions) -> Result<Self> {
        Self::start_with(config, options, Inbound::Bind, None).await
    }

    /// Loads the stage (reporting bytes read to `progress`) and starts it, accepting its
    /// predecessor as `inbound` says.
    pub async fn start_with(
        config: RingConfig,
        options: NodeOptions,
        inbound: Inbound,
        progress: Option<Arc<LoadProgress>>,
    ) -> Result<Self> {
        let index = options.index;
        let Some(me) = config.stages.get(index) else {
            bail!(
                "pipeline {}: there is no stage {index} (the ring has {} stages)",
                config.pipeline,
                config.stages.len()
            );
        };
        let (listener, mux, ring_addr) = match inbound {
            Inbound::Bind => {
                let listener = TcpListener::bind(&me.address).await.with_context(|| {
                    format!(
                        "{}: binding the ring listener on {}",
                        config.describe_stage(index),
                        me.address
                    )
                })?;
                let addr = listener.local_addr()?;
                (Some(listener), None, addr)
            }
            Inbound::Shared(mux) => {
                let addr = mux.local_addr();
                (None, Some(mux), addr)
            }
        };
        let load_config = config.clone();
        let peers = options.peers.clone();
        let (folder, stage) = tokio::task::spawn_blocking(move || {
            load_stage(&load_config, index, &peers, progress.as_deref())
        })
        .await??;
        let (stop, stop_rx) = watch::channel(false);
        let (jobs_tx, jobs_rx) = mpsc::channel(compute::queue_capacity(config.max_sequences));
        let (wake, sleeper) = wake_pair().context("creating the compute thread's poller")?;
        let (link_thread, link_worker) =
            links::channel().context("creating the link thread's poller")?;
        let head = (index == 0).then(|| Arc::new(Head::new(folder)));
        let shared = Arc::new(Shared {
            identity: RingIdentity {
                pipeline: config.pipeline.clone(),
                generation: config.generation,
                token: config.token.clone(),
            },
            config,
            index,
            outbound: Mutex::new(None),
            jobs: JobQueue::new(jobs_tx, wake),
            head,
            stage: Arc::new(stage),
            metrics: StageMetrics::default(),
            links: LinkState::default(),
            link_thread,
            backlog: AtomicUsize::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        let compute_shared = shared.clone();
        let compute_stage = shared.stage.clone();
        let spin = options.compute_spin;
        let pace = options.pass_floor;
        if let Some(floor) = &pace {
            tracing::warn!(
                stage = index,
                "test hook: forward passes of this stage take at least {} ms (CLUSTERAGENT_TEST_PASS_MS)",
                floor.describe()
            );
        }
        std::thread::Builder::new()
            .name(format!("stage-{index}-compute"))
            .spawn(move || {
                compute::run(compute_shared, compute_stage, jobs_rx, sleeper, spin, pace)
            })
            .context("starting the compute thread")?;
        link_worker
            .spawn(&shared)
            .context("starting the link thread")?;
        if let Some(listener) = listener {
            tokio::spawn(accept_loop(shared.clone(), listener, stop_rx.clone()));
        }
        if let Some(mux) = &mux {
            mux.register(shared.clone());
        }
        tokio::spawn(connect_loop(shared.clone(), stop_rx.clone()));
        if shared.head.is_some() {
            tokio::spawn(probe_loop(shared.clone(), stop_rx));
        }
        tracing::info!(stage = index, address = %ring_addr, "stage ready");
        Ok(Self {
            shared,
            ring_addr,
            stop,
            mux,
        })
    }

    /// Stops accepting and connecting; sequences in flight end with an error; the compute
    /// thread frees every cache and ends, so that once the tasks have noticed, nothing holds
    /// the weights.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.shared.link_thread.send(LinkCmd::Stop);
        if let Some(mux) = &self.mux {
            mux.unregister(&self.shared);
        }
        let jobs = self.shared.jobs.clone();
        tokio::spawn(async move {
            let _ = jobs.send(Job::Stop).await;
        });
        if let Some(head) = &self.shared.head {
            head.fail_all(
                &self.shared,
                format!("{} is shutting down", self.shared.describe_self()),
                true,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pass_floor_hook_reads_one_time_or_a_schedule_whose_last_time_repeats() {
        let mut one = PassFloor::parse("3000").unwrap();
        assert_eq!(one.next_floor(), Duration::from_secs(3));
        assert_eq!(one.next_floor(), Duration::from_secs(3));
        let mut wedge = PassFloor::parse("50, 50,30000").unwrap();
        let floors: Vec<u64> = (0..4)
            .map(|_| wedge.next_floor().as_millis() as u64)
            .collect();
        assert_eq!(floors, [50, 50, 30_000, 30_000]);
        let err = PassFloor::parse("fast").unwrap_err().to_string();
        assert!(
            err.contains("\"fast\" is not a number of milliseconds"),
            "{err}"
        );
    }
}
