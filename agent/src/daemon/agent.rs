//! The agent's state: settings, store, what it knows of its peers, recent events, the runtime
//! of its stages and endpoints, and the statuses computed from all of them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use cluster_api::cluster::{
    EndpointReport, EndpointStatus, Event, Inventory, ModelFileStatus, ModelStatus, NodeReport,
    NodeStatus, Phase, PipelineStageStatus, PipelineStatus, Record, RingReport, RingState, Status,
};
use cluster_api::manifest::{Kind, Object};
use tokio::sync::{Notify, watch};

use super::Settings;
use super::reconcile::Runtime;
use crate::ring::RingMux;
use crate::store::Store;

/// Events kept in memory for `describe` and `/api/v1/events`.
const EVENTS_KEPT: usize = 500;
/// How often the inventory is read again.
const INVENTORY_INTERVAL: Duration = Duration::from_secs(5);

/// What this agent knows of a peer.
#[derive(Debug, Default, Clone)]
pub struct Peer {
    /// When it was last heard from.
    pub last_seen: Option<Instant>,
    /// Its last report.
    pub report: Option<NodeReport>,
    /// Why the last exchange failed.
    pub error: Option<String>,
    /// Whether it counted as Ready at the last check (for NotReady/Ready events).
    pub ready: bool,
}

/// The agent.
pub struct Agent {
    /// Settings.
    pub settings: Settings,
    /// Desired state.
    pub store: Store,
    /// Serialises applies, deletes and merges on this agent (versions are assigned under it).
    pub write_lock: Mutex<()>,
    events: Mutex<VecDeque<Event>>,
    peers: Mutex<HashMap<String, Peer>>,
    inventory: Mutex<Inventory>,
    started: Instant,
    /// Wakes the reconcile loop.
    pub reconcile_now: Notify,
    /// Wakes the heartbeat loop to push a change at once.
    pub sync_now: Notify,
    /// Stages and endpoints running here.
    pub runtime: Runtime,
    shutting_down: AtomicBool,
}

impl Agent {
    /// Opens the store and builds the agent.
    pub fn open(settings: Settings, mux: Arc<RingMux>) -> Result<Arc<Self>> {
        let store = Store::open(&settings.data_dir)?;
        let inventory = crate::inventory::read(settings.max_memory);
        Ok(Arc::new(Self {
            store,
            write_lock: Mutex::new(()),
            events: Mutex::new(VecDeque::new()),
            peers: Mutex::new(HashMap::new()),
            inventory: Mutex::new(inventory),
            started: Instant::now(),
            reconcile_now: Notify::new(),
            sync_now: Notify::new(),
            runtime: Runtime::new(mux, settings.compute_spin),
            shutting_down: AtomicBool::new(false),
            settings,
        }))
    }

    /// Where model files fetched from a hub or a URL are kept on this node.
    pub fn model_cache(&self) -> std::path::PathBuf {
        self.settings.data_dir.join("models")
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Whether SIGTERM arrived.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Stops taking new work.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.runtime.stop_endpoints();
    }

    /// Records an event (also logged).
    pub fn event(&self, object: &str, warning: bool, reason: &str, message: impl Into<String>) {
        let message = message.into();
        if warning {
            tracing::warn!(object, reason, "{message}");
        } else {
            tracing::info!(object, reason, "{message}");
        }
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events.push_back(Event {
            time: crate::inventory::now(),
            node: self.settings.name.clone(),
            object: object.to_string(),
            kind: if warning { "Warning" } else { "Normal" }.into(),
            reason: reason.to_string(),
            message,
        });
        while events.len() > EVENTS_KEPT {
            events.pop_front();
        }
    }

    /// Recent events, oldest first, optionally only those about `object` (`Pipeline qwen`).
    pub fn events(&self, object: Option<&str>, limit: usize) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let matching: Vec<Event> = events
            .iter()
            .filter(|e| object.is_none_or(|o| e.object == o))
            .cloned()
            .collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).collect()
    }

    /// This node's report: inventory, stages, endpoints.
    pub fn report(&self) -> NodeReport {
        let inventory = self
            .inventory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        NodeReport {
            node: self.settings.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs(),
            inventory,
            stages: self.runtime.stage_reports(),
            endpoints: self.runtime.endpoint_reports(),
            stage_memory_bytes: self.runtime.held_bytes(),
            huge_page_bytes: crate::memory::huge_page_bytes(),
        }
    }

    /// Reads the inventory again.
    pub fn refresh_inventory(&self) {
        let fresh = crate::inventory::read(self.settings.max_memory);
        *self
            .inventory
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fresh;
    }

    /// Notes a report from a peer (the heartbeat).
    pub fn peer_seen(&self, report: NodeReport) {
        let name = report.node.clone();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = peers.entry(name).or_default();
        peer.last_seen = Some(Instant::now());
        peer.report = Some(report);
        peer.error = None;
    }

    /// Notes a failed exchange with a peer.
    pub fn peer_failed(&self, name: &str, error: String) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.entry(name.to_string()).or_default().error = Some(error);
    }

    /// Checks every peer against the NotReady bound and records transitions as events.
    pub fn check_readiness(&self) {
        let mut changes = Vec::new();
        {
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            for (name, peer) in peers.iter_mut() {
                let ready = peer
                    .last_seen
                    .is_some_and(|t| t.elapsed() < self.settings.node_timeout);
                if ready != peer.ready {
                    peer.ready = ready;
                    changes.push((name.clone(), ready, peer.error.clone()));
                }
            }
        }
        for (name, ready, error) in changes {
            if ready {
                self.event(
                    &format!("Node {name}"),
                    false,
                    "NodeReady",
                    "heard from again",
                );
            } else {
                self.event(
                    &format!("Node {name}"),
                    true,
                    "NodeNotReady",
                    format!(
                        "not heard from for {:.1} s{}",
                        self.settings.node_timeout.as_secs_f64(),
                        error.map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                );
            }
        }
    }

    /// A node's report when it is fresh (this node's own, or a peer's within the bound).
    pub fn fresh_report(&self, node: &str) -> Option<NodeReport> {
        if node == self.settings.name {
            return Some(self.report());
        }
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = peers.get(node)?;
        if peer
            .last_seen
            .is_some_and(|t| t.elapsed() < self.settings.node_timeout)
        {
            peer.report.clone()
        } else {
            None
        }
    }

    /// Whether a peer has not answered yet, this agent having started within the NotReady
    /// bound (after that, silence counts as NotReady).
    pub fn never_heard(&self, node: &str) -> bool {
        node != self.settings.name
            && self.started.elapsed() < self.settings.node_timeout
            && self
                .peers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(node)
                .is_none_or(|p| p.last_seen.is_none())
    }

    /// A node's status as this agent sees it.
    pub fn node_status(&self, node: &str) -> NodeStatus {
        if node == self.settings.name {
            return NodeStatus {
                phase: Phase::Ready,
                message: None,
                last_seen_seconds: Some(0.0),
                report: Some(self.report()),
            };
        }
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(peer) = peers.get(node) else {
            return NodeStatus {
                phase: Phase::NotReady,
                message: Some("never heard from".into()),
                last_seen_seconds: None,
                report: None,
            };
        };
        let age = peer.last_seen.map(|t| t.elapsed());
        let fresh = age.is_some_and(|a| a < self.settings.node_timeout);
        NodeStatus {
            phase: if fresh { Phase::Ready } else { Phase::NotReady },
            message: if fresh {
                None
            } else {
                Some(match (&peer.error, age) {
                    (Some(e), Some(a)) => {
                        format!("not heard from for {:.1} s: {e}", a.as_secs_f64())
                    }
                    (Some(e), None) => format!("never heard from: {e}"),
                    (None, Some(a)) => format!("not heard from for {:.1} s", a.as_secs_f64()),
                    (None, None) => "never heard from".into(),
                })
            },
            last_seen_seconds: age.map(|a| a.as_secs_f64()),
            report: peer.report.clone(),
        }
    }

    /// A pipeline's status from its stages' reports.
    pub fn pipeline_status(&self, record: &Record) -> PipelineStatus {
        let name = record.object.name();
        let generation = record.object.metadata.generation;
        let Some(placement) = &record.placement else {
            return PipelineStatus {
                phase: Phase::Pending,
                message: Some("not placed yet".into()),
                progress: 0.0,
                placement: None,
                stages: Vec::new(),
            };
        };
        let mut stages = Vec::new();
        let (mut loaded, mut total) = (0u64, 0u64);
        let mut ring: Option<RingReport> = None;
        for (i, st) in placement.stages.iter().enumerate() {
            let mut status = PipelineStageStatus {
                index: i,
                node: st.node.clone(),
                layers: st.layers,
                phase: Phase::Pending,
                progress: 0.0,
                memory_bytes: 0,
                weight_bytes: st.weight_bytes,
                sequences: 0,
                compute_seconds: 0.0,
                forward_passes: 0,
                passes: Default::default(),
                message: None,
            };
            match self.fresh_report(&st.node) {
                None if self.never_heard(&st.node) => {
                    status.message = Some(format!("waiting for node {}'s first report", st.node));
                }
                None => {
                    status.phase = Phase::NotReady;
                    status.message = Some(
                        self.node_status(&st.node)
                            .message
                            .map(|m| format!("node {}: {m}", st.node))
                            .unwrap_or_else(|| format!("node {} is not ready", st.node)),
                    );
                }
                Some(report) => {
                    let found = report
                        .stages
                        .iter()
                        .find(|s| s.pipeline == name && s.index == i && s.generation == generation);
                    if let Some(s) = found {
                        status.phase = s.phase;
                        status.memory_bytes = s.memory_bytes;
                        status.sequences = s.sequences;
                        status.compute_seconds = s.compute_seconds;
                        status.forward_passes = s.forward_passes;
                        status.passes = s.passes.clone();
                        status.message = s.message.clone();
                        status.progress = if s.total_bytes > 0 {
                            100.0 * s.loaded_bytes as f64 / s.total_bytes as f64
                        } else if s.phase == Phase::Ready {
                            100.0
                        } else {
                            0.0
                        };
                        if i == 0 && s.phase == Phase::Ready {
                            ring = s.ring.clone();
                        }
                    }
                }
            }
            loaded += (status.progress / 100.0 * st.weight_bytes as f64) as u64;
            total += st.weight_bytes;
            stages.push(status);
        }
        let progress = if total > 0 {
            100.0 * loaded as f64 / total as f64
        } else {
            0.0
        };
        let describe = |s: &PipelineStageStatus| format!("stage {} on {}", s.index, s.node);
        let (phase, message) = if let Some(s) = stages.iter().find(|s| s.phase == Phase::Failed) {
            (
                Phase::Failed,
                Some(format!(
                    "{}: {}",
                    describe(s),
                    s.message.clone().unwrap_or_else(|| "failed".into())
                )),
            )
        } else if let Some(s) = stages.iter().find(|s| s.phase == Phase::NotReady) {
            (
                Phase::Degraded,
                Some(format!(
                    "{}: {}",
                    describe(s),
                    s.message.clone().unwrap_or_default()
                )),
            )
        } else if stages.iter().all(|s| s.phase == Phase::Ready) {
            // Loaded everywhere; whether it serves is stage 0's to say, from its links'
            // heartbeats: Ready only once a first pass went through every stage.
            match ring {
                Some(RingReport {
                    state: RingState::Serving,
                    ..
                })
                | None => (Phase::Ready, None),
                Some(RingReport {
                    state: RingState::WarmingUp,
                    message,
                }) => (Phase::Loading, message),
                Some(RingReport { message, .. }) => (Phase::Degraded, message),
            }
        } else if stages
            .iter()
            .any(|s| matches!(s.phase, Phase::Loading | Phase::Ready))
        {
            let fetching = stages.iter().any(|s| {
                s.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("fetching"))
            });
            let doing = if fetching { "fetching" } else { "loading" };
            (Phase::Loading, Some(format!("{doing}: {progress:.0}%")))
        } else {
            (
                Phase::Pending,
                Some("waiting for the nodes to start their stages".into()),
            )
        };
        PipelineStatus {
            phase,
            message,
            progress,
            placement: Some(placement.reason.clone()),
            stages,
        }
    }

    /// The node an endpoint listens on: its own, or its pipeline's stage 0.
    pub fn endpoint_node(&self, object: &Object) -> Option<String> {
        let e = object.as_endpoint()?;
        if let Some(n) = &e.node {
            return Some(n.clone());
        }
        let pipeline = self.store.get(Kind::Pipeline, &e.pipeline).ok()??;
        if pipeline.deleted {
            return None;
        }
        pipeline
            .placement
            .and_then(|p| p.stages.first().map(|s| s.node.clone()))
    }

    /// An endpoint's status: its listener (from its node's report) and its pipeline.
    pub fn endpoint_status(&self, record: &Record) -> Option<EndpointStatus> {
        let name = record.object.name();
        let spec = record.object.as_endpoint()?;
        let node = self.endpoint_node(&record.object);
        let report: Option<EndpointReport> = node
            .as_deref()
            .and_then(|n| self.fresh_report(n))
            .and_then(|r| r.endpoints.into_iter().find(|e| e.endpoint == name));
        let pipeline = self
            .store
            .get(Kind::Pipeline, &spec.pipeline)
            .ok()
            .flatten()
            .filter(|r| !r.deleted)
            .map(|r| self.pipeline_status(&r));
        let (phase, message) = match (&report, &pipeline) {
            (None, _) => (
                Phase::Pending,
                Some(match &node {
                    Some(n) => format!("node {n} has not reported this endpoint listening"),
                    None => "its pipeline is not placed".to_string(),
                }),
            ),
            (Some(r), _) if r.phase != Phase::Ready => (r.phase, r.message.clone()),
            (Some(_), Some(p)) if p.phase != Phase::Ready => (
                Phase::Degraded,
                Some(format!(
                    "listening, but pipeline {} is {}{}",
                    spec.pipeline,
                    p.phase,
                    p.message
                        .as_ref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )),
            ),
            (Some(_), None) => (
                Phase::Degraded,
                Some(format!("pipeline {} does not exist", spec.pipeline)),
            ),
            (Some(_), Some(_)) => (Phase::Ready, None),
        };
        Some(EndpointStatus {
            phase,
            message,
            node,
            url: report.map(|r| r.url),
        })
    }

    /// The object with its status filled in.
    pub fn with_status(&self, record: &Record) -> Object {
        let mut object = record.object.clone();
        object.status = match object.kind {
            Kind::Node => Some(Status::Node(Box::new(self.node_status(object.name())))),
            Kind::Pipeline => Some(Status::Pipeline(self.pipeline_status(record))),
            Kind::Endpoint => self.endpoint_status(record).map(Status::Endpoint),
            Kind::Model => {
                let pipelines: Vec<String> = self
                    .store
                    .live(Kind::Pipeline)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| {
                        p.object
                            .as_pipeline()
                            .is_some_and(|s| s.model == object.name())
                    })
                    .map(|p| p.object.metadata.name)
                    .collect();
                // The files held whole somewhere in the cluster, as their digests were
                // published: what peers fetching stages check bytes against.
                let files = self
                    .store
                    .all_file_digests()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|d| d.model == object.name())
                    .map(|d| ModelFileStatus {
                        tensors: d.tensors.len(),
                        file: d.file,
                        size: d.size,
                        sha256: d.sha256,
                        verified: d.verified,
                        sealed_by: d.sealed_by,
                    })
                    .collect();
                Some(Status::Model(ModelStatus {
                    pipelines,
                    files,
                    commit: record.revision.clone(),
                }))
            }
        };
        object
    }

    /// Peers to exchange state with: every live node but this one.
    pub fn peer_addresses(&self) -> Vec<(String, String)> {
        self.store
            .live(Kind::Node)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.object.name() != self.settings.name)
            .filter_map(|r| {
                let address = r.object.as_node()?.address.clone();
                Some((r.object.metadata.name, address))
            })
            .collect()
    }

    /// Merges records from a peer: each replaces ours when its version is higher (records that
    /// apply would refuse are dropped, each said in an event). Returns how
    /// many changed here. Two different writes with the same version are a conflict: the
    /// writer with the greater name wins everywhere, and the loss is recorded as an event.
    pub fn merge(&self, incoming: Vec<Record>) -> Result<usize> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut newer = Vec::new();
        let mut top = 0;
        for r in incoming {
            // A peer holds the token, not the final word: what apply would refuse is not
            // stored from it either (a name no route can delete, a version that would wrap
            // the clock so that every later write orders first).
            let name = r.object.name();
            let refused = cluster_api::manifest::check_name(name).err().or_else(|| {
                (r.object.metadata.resource_version > MAX_PEER_VERSION).then(|| {
                    format!(
                        "version {} is past {MAX_PEER_VERSION}",
                        r.object.metadata.resource_version
                    )
                })
            });
            if let Some(why) = refused {
                self.event(
                    &format!("{} {}", r.object.kind, name.escape_debug()),
                    true,
                    "RefusedFromPeer",
                    format!(
                        "a record written by {} was not stored: {why}",
                        r.object.metadata.updated_by.as_deref().unwrap_or("a peer")
                    ),
                );
                continue;
            }
            top = top.max(r.object.metadata.resource_version);
            let ours = self.store.get(r.object.kind, r.object.name())?;
            let take = match &ours {
                None => true,
                Some(o) => r.version() > o.version(),
            };
            if !take {
                continue;
            }
            if let Some(o) = &ours
                && o.object.metadata.resource_version == r.object.metadata.resource_version
                && o.object.metadata.updated_by != r.object.metadata.updated_by
            {
                self.event(
                    &r.object.describe(),
                    true,
                    "Conflict",
                    format!(
                        "{} and {} changed it at the same version {}; {}'s change is kept, {}'s is dropped",
                        o.object.metadata.updated_by.as_deref().unwrap_or("?"),
                        r.object.metadata.updated_by.as_deref().unwrap_or("?"),
                        r.object.metadata.resource_version,
                        r.object.metadata.updated_by.as_deref().unwrap_or("?"),
                        o.object.metadata.updated_by.as_deref().unwrap_or("?"),
                    ),
                );
            }
            newer.push(r);
        }
        self.store.observe(top)?;
        if newer.is_empty() {
            return Ok(0);
        }
        for r in &newer {
            self.event(
                &r.object.describe(),
                false,
                if r.deleted { "SyncedDelete" } else { "Synced" },
                format!(
                    "version {} from {}",
                    r.object.metadata.resource_version,
                    r.object.metadata.updated_by.as_deref().unwrap_or("a peer")
                ),
            );
        }
        self.store.write(&newer)?;
        self.reconcile_now.notify_one();
        Ok(newer.len())
    }
}

/// The highest version a peer's record may carry: far beyond any real count of writes, and
/// exactly representable wherever a JSON number is read as a double.
const MAX_PEER_VERSION: u64 = 1 << 53;

/// The store's digests of fetched models' files, shared with the peers at the next exchange
/// (at once after a publish).
impl crate::fetch::DigestBook for Agent {
    fn published(&self, model: &str, file: &str) -> Option<cluster_api::cluster::FileDigests> {
        self.store.file_digests(model, file).ok().flatten()
    }

    fn publish(&self, entry: cluster_api::cluster::FileDigests) {
        let what = format!(
            "digests of {} ({}, {} tensors, sha256 {}{})",
            entry.file,
            cluster_api::human_bytes(entry.size),
            entry.tensors.len(),
            &entry.sha256[..entry.sha256.len().min(12)],
            if entry.verified {
                ", as the source gives it"
            } else {
                "; the source gives none to check it against"
            }
        );
        let object = format!("Model {}", entry.model);
        match self.store.merge_file_digests(std::slice::from_ref(&entry)) {
            Ok(0) => {}
            Ok(_) => {
                self.event(
                    &object,
                    false,
                    "DigestsPublished",
                    format!("{what} published"),
                );
                self.sync_now.notify_one();
            }
            Err(e) => self.event(
                &object,
                true,
                "DigestsNotPublished",
                format!("{what}: {e:#}"),
            ),
        }
    }
}

/// Reads the inventory every few seconds.
pub async fn inventory_loop(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(INVENTORY_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let a = agent.clone();
        let _ = tokio::task::spawn_blocking(move || a.refresh_inventory()).await;
    }
}
