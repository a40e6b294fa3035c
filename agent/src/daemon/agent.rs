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

mod status;

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
        self.runtime.stop_taking_sequences();
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

    /// How long `node` has not been heard from, when it is not fresh: since its last report,
    /// or since this agent started when it never reported to it. `None` while it is fresh.
    /// (Fresh as [`Agent::fresh_report`] says, without copying the report: the re-placement
    /// loop asks it of every node twice a second.)
    pub fn silent_for(&self, node: &str) -> Option<Duration> {
        if node == self.settings.name {
            return None;
        }
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = peers.get(node);
        let since = peer.and_then(|p| p.last_seen).map(|t| t.elapsed());
        let fresh = peer.is_some_and(|p| p.report.is_some())
            && since.is_some_and(|d| d < self.settings.node_timeout);
        if fresh {
            return None;
        }
        Some(since.unwrap_or_else(|| self.started.elapsed()))
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
