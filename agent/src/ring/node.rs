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

/// Longest wait for a TCP connect or a handshake to finish.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often stage 0 sends a probe around the ring (to time its hops) and checks its sequences.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A ring link whose peer's host stops answering at the TCP level (it lost power, its cable was
/// pulled) is closed after about this long: keepalive probes start after 5 s of quiet, 1 s
/// apart, and unacknowledged data waits at most 20 s. A stopped process's kernel still answers,
/// so a SIGSTOP'ed stage stays connected (and is reported stalled by its heartbeats).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 5;
#[cfg(any(target_os = "linux", target_os = "android"))]
const USER_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Keepalive and a bound on unacknowledged data, so that a vanished host ends its links.
fn tune_link_socket(stream: &std::net::TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    #[cfg(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "android",
        target_os = "ios"
    ))]
    let keepalive = keepalive.with_retries(KEEPALIVE_PROBES);
    #[cfg(not(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "android",
        target_os = "ios"
    )))]
    let _ = KEEPALIVE_PROBES;
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "cannot set TCP keepalive on a ring link");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::warn!(error = %e, "cannot set TCP_USER_TIMEOUT on a ring link");
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

/// Fetches the bytes of stage `index`'s tensors that this node's cache lacks (peers first),
/// seals the files now held whole, and reports on `progress` what came from where.
fn fetch_weights(
    config: &RingConfig,
    index: usize,
    source: &cluster_api::manifest::ModelSource,
    folder: &ModelFolder,
    peers: &crate::fetch::Peers,
    progress: Option<&LoadProgress>,
) -> Result<()> {
    let range = config.stages[index].layers;
    let (first, last) = (index == 0, index + 1 == config.stages.len());
    let started = Instant::now();
    if let Some(p) = progress {
        p.fetching.store(true, Ordering::Relaxed);
    }
    let fetched = crate::fetch::fetch_stage(
        source,
        folder,
        range,
        first,
        last,
        peers,
        &mut |note| {
            tracing::warn!(stage = index, "{note}");
            if let Some(p) = progress {
                p.notes.lock().unwrap_or_else(|e| e.into_inner()).push(note);
            }
        },
        &mut |done, total| {
            if let Some(p) = progress {
                p.loaded.store(done, Ordering::Relaxed);
                p.total.store(total, Ordering::Relaxed);
            }
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{}: fetching layers {range}: {e}",
            config.describe_stage(index)
        )
    })?;
    tracing::info!(
        stage = index,
        layers = %range,
        source = %source.describe(),
        bytes = fetched.bytes,
        from_peers = fetched.peer_bytes,
        requests = fetched.requests,
        ms = started.elapsed().as_millis() as u64,
        "stage's weights fetched"
    );
    // Files now held whole are checked against the source's digest and get digests
    // of their own, so that peers may fetch from this node.
    let sealed = crate::fetch::seal(source, folder).map_err(anyhow::Error::msg)?;
    if !sealed.is_empty() {
        tracing::info!(
            stage = index,
            files = sealed.len(),
            "whole files sealed for peers"
        );
    }
    // Published through the store, so that the bytes this node serves its peers are checked
    // against digests that do not come with them (and the cluster knows them while this node
    // is away). Files sealed before a restart are published again if the store lacks them.
    let node = &config.stages[index].node;
    crate::fetch::publish_held(source, folder, peers, node).map_err(anyhow::Error::msg)?;
    if let Some(p) = progress {
        p.fetching.store(false, Ordering::Relaxed);
        p.fetched.store(fetched.bytes, Ordering::Relaxed);
        let peers: Vec<&str> = fetched.peers.iter().map(String::as_str).collect();
        let from = match fetched.bytes - fetched.peer_bytes {
            _ if fetched.peer_bytes == 0 => source.describe(),
            // Headers aside, which always come from the source.
            rest if rest <= fetched.bytes / 100 => format!(
                "peer {} (the headers from {})",
                peers.join(", "),
                source.describe()
            ),
            rest => format!(
                "peer {} ({}) and {} ({})",
                peers.join(", "),
                cluster_api::human_bytes(fetched.peer_bytes),
                source.describe(),
                cluster_api::human_bytes(rest)
            ),
        };
        *p.fetched_from.lock().unwrap_or_else(|e| e.into_inner()) = from;
    }
    Ok(())
}

fn load_stage(
    config: &RingConfig,
    index: usize,
    peers: &crate::fetch::Peers,
    progress: Option<&LoadProgress>,
) -> Result<(ModelFolder, Stage)> {
    let range = config.stages[index].layers;
    let (first, last) = (index == 0, index + 1 == config.stages.len());
    // A fetched model's `model` is its place in this node's cache: its small files and headers
    // first, so that the split is checked before any weights are fetched.
    if let Some(source) = &config.fetch {
        crate::fetch::prepare(&config.model, source).map_err(anyhow::Error::msg)?;
    }
    let folder = ModelFolder::open(&config.model).with_context(|| match &config.fetch {
        Some(source) => format!("opening model {}", source.describe()),
        None => format!("opening model {}", config.model.display()),
    })?;
    config
        .validate(folder.config.num_hidden_layers)
        .map_err(anyhow::Error::msg)?;
    if let Some(source) = &config.fetch {
        fetch_weights(config, index, source, &folder, peers, progress)?;
    }
    let device = open_device(config.device)?;
    let dtype = choose_dtype(config.dtype, folder.config.dtype);
    let started = Instant::now();
    let stage = Stage::load(
        StageSpec {
            config: folder.config.clone(),
            weights: &folder.weights,
            range,
            first,
            last,
            device,
            dtype,
        },
        &mut |done, total| {
            if let Some(p) = progress {
                p.loaded.store(done, Ordering::Relaxed);
                p.total.store(total, Ordering::Relaxed);
            }
        },
    )
    .with_context(|| format!("{}: loading layers {range}", config.describe_stage(index)))?;
    tracing::info!(
        stage = index,
        layers = %range,
        weight_bytes = stage.weight_bytes(),
        ms = started.elapsed().as_millis() as u64,
        "stage loaded"
    );
    Ok((folder, stage))
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                let _ = stream.set_nodelay(true);
                let (read, write) = stream.into_split();
                tokio::spawn(serve_inbound(
                    shared.clone(),
                    FrameReader::new(read),
                    write,
                    peer,
                    None,
                ));
            }
            Err(e) => {
                // Running out of descriptors is transient: wait and keep accepting.
                tracing::error!(error = %e, "accepting a ring connection failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One connection from the predecessor: handshake (its hello already read when the agent's
/// shared ring port picked this stage by it), then hand it to the compute thread, which reads
/// its frames from then on and notices when it ends.
async fn serve_inbound(
    shared: Arc<Shared>,
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    peer: SocketAddr,
    hello: Option<Frame>,
) {
    let n = shared.config.stages.len();
    let predecessor = (shared.index + n - 1) % n;
    let shook = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let hello = match hello {
            Some(h) => h,
            None => handshake::read_hello(&mut reader).await?,
        };
        handshake::accept_hello(
            &mut reader,
            &mut write,
            &shared.identity,
            predecessor,
            hello,
        )
        .await
    })
    .await;
    match shook {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "refused a ring connection");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "refused a ring connection: no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
            return;
        }
    }
    // From here the compute thread reads the connection itself, and the link thread writes
    // heartbeats back on it.
    let (read, buffered) = reader.into_parts();
    let conn = read
        .reunite(write)
        .map_err(|e| e.to_string())
        .and_then(|stream| stream.into_std().map_err(|e| e.to_string()))
        .and_then(|stream| {
            tune_link_socket(&stream);
            let back = stream.try_clone().map_err(|e| e.to_string())?;
            let conn =
                InboundConn::new(stream, buffered, shared.config.describe_stage(predecessor))
                    .map_err(|e| e.to_string())?;
            Ok((conn, back))
        });
    match conn {
        Ok((conn, back)) => {
            tracing::info!(%peer, from = predecessor, "predecessor connected");
            shared.link_thread.send(LinkCmd::Inbound { stream: back });
            if shared
                .jobs
                .send(Job::Inbound(Box::new(conn)))
                .await
                .is_err()
            {
                tracing::warn!(%peer, "the stage stopped before it could take the connection");
            }
        }
        Err(e) => tracing::warn!(%peer, error = %e, "cannot take over a ring connection"),
    }
}

/// Keeps the link to the successor up: connect, handshake, write frames, reconnect with
/// backoff when it drops. The link thread reads what comes back on it (heartbeats) and closes
/// the writer when the connection ends.
async fn connect_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let successor = shared.config.successor(shared.index);
    let address = shared.config.stages[successor].address.clone();
    let who = shared.config.describe_stage(successor);
    let mut backoff = BACKOFF_MIN;
    let mut logged_down = false;
    loop {
        if *stop.borrow() {
            return;
        }
        match open_link(&shared, &address).await {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                logged_down = false;
                tracing::info!(stage = shared.index, "connected to {who}");
                let reason = run_link(&shared, link, &mut stop).await;
                shared.set_outbound(None);
                shared.link_thread.send(LinkCmd::Connecting {
                    why: format!("it went away ({reason})"),
                });
                let message = format!("{who} went away: {reason}");
                tracing::warn!(stage = shared.index, "{message}");
                match &shared.head {
                    Some(head) => head.fail_all(&shared, message, true),
                    None => {
                        let _ = shared.jobs.send(Job::DropAll).await;
                    }
                }
            }
            Err(e) => {
                shared.link_thread.send(LinkCmd::Connecting {
                    why: format!("{e:#}"),
                });
                if !logged_down {
                    tracing::info!(
                        stage = shared.index,
                        "cannot reach {who} yet: {e:#}; retrying"
                    );
                    logged_down = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A link to the successor whose handshake is done: its writing half, and the same socket
/// with the bytes read past the handshake, for the link thread.
struct OpenLink {
    writer: tokio::net::tcp::OwnedWriteHalf,
    stream: std::net::TcpStream,
    buffered: bytes::BytesMut,
}

async fn open_link(shared: &Shared, address: &str) -> Result<OpenLink> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(address))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read);
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::connect(&mut reader, &mut write, &shared.identity, shared.index),
    )
    .await
    .context("handshake timed out")??;
    let (read, buffered) = reader.into_parts();
    let stream = read.reunite(write)?.into_std()?;
    tune_link_socket(&stream);
    let back = stream.try_clone()?;
    let (_, writer) = TcpStream::from_std(stream)?.into_split();
    Ok(OpenLink {
        writer,
        stream: back,
        buffered,
    })
}

/// Writes frames to the successor until the link breaks; returns why it ended.
async fn run_link(shared: &Shared, open: OpenLink, stop: &mut watch::Receiver<bool>) -> String {
    let link = Arc::new(LinkWriter::new(open.writer));
    shared.set_outbound(Some(link.clone()));
    shared.link_thread.send(LinkCmd::Outbound {
        link: link.clone(),
        stream: open.stream,
        buffered: open.buffered,
        id: rand::random::<u64>() | 1,
    });
    tokio::select! {
        why = link.flush_forever() => why,
        _ = stop.changed() => "this stage is stopping".into(),
    }
}

/// Stage 0: sends a probe around the ring, which times its hops (the ring's state comes from
/// heartbeats, not from probes), and sweeps sequences whose caller left or that wait in vain.
async fn probe_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(head) = shared.head.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    let mut probe_seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        probe_seq += 1;
        if shared.config.stages.len() > 1 {
            head.probe_sent(probe_seq);
            shared.forward(&Frame::new(
                FrameKind::Probe,
                &shared.config.pipeline,
                shared.config.generation,
                probe_seq,
            ));
        }
        head.sweep(&shared);
    }
}

/// The agent's ring port: one listener for every pipeline stage the agent runs, each connection
/// handed to the stage its hello names.
pub struct RingMux {
    addr: SocketAddr,
    stages: Mutex<std::collections::HashMap<String, Arc<Shared>>>,
}

impl RingMux {
    /// Binds `addr` and starts accepting for as long as the runtime runs.
    pub async fn bind(addr: &str) -> Result<Arc<Self>> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the ring port on {addr}"))?;
        let mux = Arc::new(Self {
            addr: listener.local_addr()?,
            stages: Mutex::new(std::collections::HashMap::new()),
        });
        tokio::spawn(mux.clone().accept_loop(listener));
        Ok(mux)
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn register(&self, shared: Arc<Shared>) {
        self.stages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(shared.config.pipeline.clone(), shared);
    }

    fn unregister(&self, shared: &Arc<Shared>) {
        let mut stages = self.stages.lock().unwrap_or_else(PoisonError::into_inner);
        if stages
            .get(&shared.config.pipeline)
            .is_some_and(|s| Arc::ptr_eq(s, shared))
        {
            stages.remove(&shared.config.pipeline);
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = BACKOFF_MIN;
                    tokio::spawn(self.clone().dispatch(stream, peer));
                }
                Err(e) => {
                    tracing::error!(error = %e, "accepting a ring connection failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn dispatch(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut reader = FrameReader::new(read);
        let hello =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::read_hello(&mut reader)).await
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "refused a ring connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "refused a ring connection: no hello in time");
                    return;
                }
            };
        let shared = self
            .stages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hello.pipeline)
            .cloned();
        match shared {
            Some(shared) => serve_inbound(shared, reader, write, peer, Some(hello)).await,
            None => {
                let reason = format!(
                    "pipeline {:?} has no stage on this node (yet)",
                    hello.pipeline
                );
                tracing::warn!(%peer, "refused a ring connection: {reason}");
                let id = RingIdentity {
                    pipeline: hello.pipeline.clone(),
                    generation: hello.generation,
                    token: String::new(),
                };
                handshake::refuse(&mut write, &id, &reason).await;
            }
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
