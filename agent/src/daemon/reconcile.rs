//! The reconcile loop: compares the stages and endpoints the store places on this node with
//! those running, and acts: loads a stage (progress as bytes read) and joins its ring, unloads
//! one that was deleted or changed, retries a failed one with backoff; opens and closes
//! endpoint listeners. Runs on every change and every half second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use cluster_api::cluster::{EndpointReport, Phase, Record, StageReport};
use cluster_api::manifest::{Kind, split_host_port};
use cluster_api::{RingConfig, RingStage};
use cluster_engine::Stage;
use tokio::sync::{oneshot, watch};

use super::agent::Agent;
use crate::ring::{Inbound, LoadProgress, NodeOptions, RingMux, RingNode, http};

mod endpoints;
mod replace;
mod stages;

pub use self::endpoints::endpoint_state;
use self::endpoints::open_endpoint;
use self::stages::load_stage;

const TICK: Duration = Duration::from_millis(500);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, PartialEq)]
struct StageWant {
    config: RingConfig,
    index: usize,
}

enum StageState {
    Loading,
    Ready(Arc<RingNode>),
    Failed(String),
}

struct StageSlot {
    want: StageWant,
    state: StageState,
    progress: Arc<LoadProgress>,
    attempts: u32,
    retry_at: Instant,
    /// Distinguishes this load from an earlier one whose task may still finish.
    epoch: u64,
}

#[derive(Clone, PartialEq)]
struct EndpointWant {
    pipeline: String,
    address: String,
    served_model: String,
    api_keys: Vec<String>,
    /// The control-plane address of the node running stage 0, when that is another node:
    /// this node then forwards the endpoint's requests there.
    head: Option<String>,
}

struct EndpointSlot {
    want: EndpointWant,
    /// Closes the listener; `None` while it failed.
    stop: Option<oneshot::Sender<()>>,
    message: Option<String>,
    retry_at: Instant,
    attempts: u32,
}

/// Stages and endpoints running on this node.
pub struct Runtime {
    mux: Arc<RingMux>,
    compute_spin: Duration,
    stages: Mutex<HashMap<String, StageSlot>>,
    /// Stages unloaded whose memory may still be held by a task finishing.
    draining: Mutex<Vec<Weak<Stage>>>,
    endpoints: Mutex<HashMap<String, EndpointSlot>>,
    /// Endpoints listening on other nodes whose requests come here, with the generation of
    /// the Endpoint they were built from.
    forwarded: Mutex<HashMap<String, (u64, Arc<crate::endpoint::EndpointState>)>>,
    epochs: std::sync::atomic::AtomicU64,
    /// When each pipeline may next be re-placed for a lost node.
    replacing: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn backoff(attempts: u32) -> Duration {
    (RETRY_MIN * 2u32.saturating_pow(attempts.saturating_sub(1).min(5))).min(RETRY_MAX)
}

impl Runtime {
    /// An empty runtime on the agent's ring port.
    pub fn new(mux: Arc<RingMux>, compute_spin: Duration) -> Self {
        Self {
            mux,
            compute_spin,
            stages: Mutex::new(HashMap::new()),
            draining: Mutex::new(Vec::new()),
            endpoints: Mutex::new(HashMap::new()),
            forwarded: Mutex::new(HashMap::new()),
            epochs: std::sync::atomic::AtomicU64::new(0),
            replacing: Mutex::new(HashMap::new()),
        }
    }

    /// Where ring connections arrive.
    pub fn ring_addr(&self) -> std::net::SocketAddr {
        self.mux.local_addr()
    }

    /// The state answering requests forwarded for endpoint `name` from the node it listens on.
    pub fn forwarded_endpoint(
        &self,
        agent: &Arc<Agent>,
        name: &str,
    ) -> Result<Arc<crate::endpoint::EndpointState>, String> {
        let record = agent
            .store
            .get(Kind::Endpoint, name)
            .map_err(|e| e.to_string())?
            .filter(|r| !r.deleted)
            .ok_or_else(|| format!("endpoint {name} does not exist"))?;
        let spec = record.object.as_endpoint().ok_or("not an endpoint")?;
        let generation = record.object.metadata.generation;
        let mut forwarded = lock(&self.forwarded);
        if let Some((g, state)) = forwarded.get(name)
            && *g == generation
        {
            return Ok(state.clone());
        }
        let served = spec
            .served_model_name
            .clone()
            .unwrap_or_else(|| spec.pipeline.clone());
        let state = endpoint_state(agent, name, &spec.pipeline, &served, &spec.api_keys);
        forwarded.insert(name.to_string(), (generation, state.clone()));
        Ok(state)
    }

    /// Stage 0 of `pipeline` when it runs here and is ready.
    pub fn head_of(&self, pipeline: &str) -> Option<Arc<crate::ring::node::Shared>> {
        let stages = lock(&self.stages);
        match stages.get(pipeline) {
            Some(StageSlot {
                state: StageState::Ready(node),
                want,
                ..
            }) if want.index == 0 => Some(node.shared.clone()),
            _ => None,
        }
    }

    /// Sequences in flight on the heads running here.
    pub fn in_flight(&self) -> usize {
        lock(&self.stages)
            .values()
            .filter_map(|s| match &s.state {
                // Stage 0 counts its callers' sequences; a later stage the sequences holding
                // a cache on it, which the head releases as they end.
                StageState::Ready(n) => Some(match &n.shared.head {
                    Some(h) => h.in_flight(),
                    None => n.shared.stage.sequences(),
                }),
                _ => None,
            })
            .sum()
    }

    /// Tells the stages here that the agent is stopping: those after stage 0 take no new
    /// sequence from now on.
    pub fn stop_taking_sequences(&self) {
        for slot in lock(&self.stages).values() {
            if let StageState::Ready(n) = &slot.state {
                n.shared
                    .stopping
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Reports of the stages here.
    pub fn stage_reports(&self) -> Vec<StageReport> {
        let stages = lock(&self.stages);
        let mut out: Vec<StageReport> = stages
            .iter()
            .map(|(name, slot)| {
                let loaded = slot
                    .progress
                    .loaded
                    .load(std::sync::atomic::Ordering::Relaxed);
                let total = slot
                    .progress
                    .total
                    .load(std::sync::atomic::Ordering::Relaxed);
                let mut report = StageReport {
                    pipeline: name.clone(),
                    generation: slot.want.config.generation,
                    index: slot.want.index,
                    layers: slot.want.config.stages[slot.want.index].layers,
                    phase: Phase::Loading,
                    loaded_bytes: loaded,
                    total_bytes: total,
                    memory_bytes: 0,
                    message: None,
                    ring: None,
                    sequences: 0,
                    attempts: slot.attempts,
                    compute_seconds: 0.0,
                    forward_passes: 0,
                    passes: Default::default(),
                };
                match &slot.state {
                    StageState::Loading
                        if slot
                            .progress
                            .fetching
                            .load(std::sync::atomic::Ordering::Relaxed) =>
                    {
                        report.message = Some(format!(
                            "fetching its weights: {} of {}",
                            cluster_api::human_bytes(loaded),
                            cluster_api::human_bytes(total)
                        ));
                    }
                    StageState::Loading => {}
                    StageState::Failed(why) => {
                        report.phase = Phase::Failed;
                        report.message = Some(format!(
                            "{why} (attempt {}, retrying in {:.0} s)",
                            slot.attempts,
                            slot.retry_at
                                .saturating_duration_since(Instant::now())
                                .as_secs_f64()
                        ));
                    }
                    StageState::Ready(node) => {
                        let shared = &node.shared;
                        report.phase = Phase::Ready;
                        report.memory_bytes = shared.stage.weight_bytes();
                        report.loaded_bytes = report.total_bytes.max(report.memory_bytes);
                        report.total_bytes = report.loaded_bytes;
                        report.sequences = shared.stage.sequences();
                        report.compute_seconds = shared.metrics.compute_seconds();
                        report.forward_passes = shared.metrics.compute_passes();
                        report.passes = shared.metrics.passes.stats();
                        if let Some(head) = &shared.head {
                            let ring = head.report(shared);
                            report.message = ring.message.clone();
                            report.ring = Some(ring);
                        }
                    }
                }
                report
            })
            .collect();
        out.sort_by(|a, b| a.pipeline.cmp(&b.pipeline));
        out
    }

    /// Bytes of weights held by stages here, counting unloaded ones until they are freed.
    pub fn held_bytes(&self) -> u64 {
        let loaded: u64 = lock(&self.stages)
            .values()
            .filter_map(|s| match &s.state {
                StageState::Ready(n) => Some(n.shared.stage.weight_bytes()),
                _ => None,
            })
            .sum();
        let mut draining = lock(&self.draining);
        draining.retain(|w| w.strong_count() > 0);
        let held: u64 = draining
            .iter()
            .filter_map(Weak::upgrade)
            .map(|s| s.weight_bytes())
            .sum();
        loaded + held
    }

    /// Reports of the endpoints here.
    pub fn endpoint_reports(&self) -> Vec<EndpointReport> {
        let mut out: Vec<EndpointReport> = lock(&self.endpoints)
            .iter()
            .map(|(name, slot)| EndpointReport {
                endpoint: name.clone(),
                phase: if slot.stop.is_some() {
                    Phase::Ready
                } else {
                    Phase::Failed
                },
                url: format!("http://{}", slot.want.address),
                message: slot.message.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        out
    }

    fn unload(&self, name: &str, slot: StageSlot) {
        if let StageState::Ready(node) = slot.state {
            node.shutdown();
            lock(&self.draining).push(Arc::downgrade(&node.shared.stage));
            tracing::info!(pipeline = name, "stage unloaded");
        }
    }

    /// Closes every endpoint listener (SIGTERM: no new requests).
    pub fn stop_endpoints(&self) {
        for (_, slot) in lock(&self.endpoints).iter_mut() {
            if let Some(stop) = slot.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    /// Unloads every stage.
    pub fn stop_all(&self) {
        self.stop_endpoints();
        let slots: Vec<(String, StageSlot)> = lock(&self.stages).drain().collect();
        for (name, slot) in slots {
            self.unload(&name, slot);
        }
    }
}

/// The ring configuration of one replica of a pipeline record, from the store's model and
/// nodes. Replicas share the pipeline's name: they run on nodes apart and each stage links only
/// to its own ring's neighbours, so a name is never ambiguous on a node.
pub fn ring_config(agent: &Agent, record: &Record, replica: usize) -> Result<RingConfig, String> {
    let spec = record.object.as_pipeline().ok_or("not a pipeline")?.clone();
    let placement = record
        .placement
        .as_ref()
        .ok_or("the pipeline has no placement")?;
    let rings = placement.rings();
    let ring = rings
        .get(replica)
        .ok_or_else(|| format!("the pipeline has no replica {replica}"))?;
    let model = agent
        .store
        .get(Kind::Model, &spec.model)
        .map_err(|e| e.to_string())?
        .filter(|r| !r.deleted)
        .ok_or_else(|| format!("model {} does not exist", spec.model))?;
    let source = model.model_source().ok_or("not a model")?;
    let model = model.object.as_model().ok_or("not a model")?.clone();
    let mut stages = Vec::new();
    for st in ring.iter() {
        let node = agent
            .store
            .get(Kind::Node, &st.node)
            .map_err(|e| e.to_string())?
            .filter(|r| !r.deleted)
            .ok_or_else(|| format!("node {} does not exist", st.node))?;
        let address = node.object.as_node().ok_or("not a node")?.ring_address();
        stages.push(RingStage {
            node: st.node.clone(),
            address,
            layers: st.layers,
        });
    }
    Ok(RingConfig {
        pipeline: record.object.metadata.name.clone(),
        generation: record.object.metadata.generation,
        model: crate::fetch::local_path(&agent.model_cache(), &source),
        fetch: source.is_remote().then(|| source.clone()),
        device: spec.device,
        dtype: model.dtype,
        prefill_chunk: spec.prefill_chunk.unwrap_or(128),
        max_sequences: spec.max_sequences.unwrap_or(64),
        first_token_timeout_ms: spec
            .first_token_timeout
            .map(|d| d.as_millis().min(u64::MAX as u128) as u64),
        token: agent.settings.token.clone(),
        stages,
    })
}

/// The control-plane address of the node an endpoint of `pipeline` forwards to, when it is
/// not this one: the first replica's stage 0 whose node is heard from (the first replica's
/// when none is), since that node's endpoint spreads the requests over every replica.
fn head_address(agent: &Agent, pipeline: &str) -> Option<String> {
    let record = agent.store.get(Kind::Pipeline, pipeline).ok()??;
    let placement = record.placement?;
    let heads: Vec<String> = placement
        .rings()
        .iter()
        .filter_map(|ring| ring.first().map(|s| s.node.clone()))
        .collect();
    if heads.iter().any(|h| h == agent.name()) {
        return None;
    }
    let node = heads
        .iter()
        .find(|h| agent.fresh_report(h).is_some())
        .or(heads.first())?;
    let node = agent.store.get(Kind::Node, node).ok()??;
    Some(node.object.as_node()?.address.clone())
}

/// Keeps the cache of fetched models under `max` bytes before a stage loads, removing models no
/// pipeline uses (least recently used first), each said in an event.
async fn evict_models(agent: &Arc<Agent>, max: u64) {
    let cache = agent.model_cache();
    let models: HashMap<String, cluster_api::manifest::ModelSource> = agent
        .store
        .live(Kind::Model)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| Some((r.object.name().to_string(), r.model_source()?)))
        .collect();
    let keep: Vec<std::path::PathBuf> = agent
        .store
        .live(Kind::Pipeline)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| models.get(&r.object.as_pipeline()?.model))
        .filter_map(|source| crate::fetch::model_root(&cache, source))
        .collect();
    let removed =
        tokio::task::spawn_blocking(move || crate::fetch::evict(&cache, max, &keep)).await;
    for (dir, bytes) in removed.unwrap_or_default() {
        agent.event(
            &format!("Node {}", agent.name()),
            false,
            "Evicted",
            format!(
                "removed {} ({}) from the model cache: no pipeline uses it, and the cache is capped at {}",
                dir.display(),
                cluster_api::human_bytes(bytes),
                cluster_api::human_bytes(max)
            ),
        );
    }
}

/// The peers a stage of a fetched model asks before the source: every other node that has
/// been heard from recently, in name order (the cluster is small; each is asked once per file).
fn fetch_peers(agent: &Arc<Agent>, want: &StageWant) -> crate::fetch::Peers {
    let model = agent
        .store
        .get(Kind::Pipeline, &want.config.pipeline)
        .ok()
        .flatten()
        .and_then(|r| r.object.as_pipeline().map(|p| p.model.clone()))
        .unwrap_or_default();
    let mut nodes: Vec<(String, String)> = agent
        .peer_addresses()
        .into_iter()
        .filter(|(node, _)| agent.fresh_report(node).is_some())
        .collect();
    nodes.sort();
    crate::fetch::Peers {
        model,
        token: agent.settings.token.clone(),
        nodes,
        book: Some(agent.clone()),
    }
}

/// What the store places on this node.
fn desired(agent: &Agent) -> (HashMap<String, StageWant>, HashMap<String, EndpointWant>) {
    let me = agent.name();
    let mut stages = HashMap::new();
    for record in agent.store.live(Kind::Pipeline).unwrap_or_default() {
        let Some(placement) = &record.placement else {
            continue;
        };
        let Some((replica, index)) = placement.find(me) else {
            continue;
        };
        match ring_config(agent, &record, replica) {
            Ok(config) => {
                stages.insert(
                    record.object.metadata.name.clone(),
                    StageWant { config, index },
                );
            }
            Err(why) => tracing::warn!(pipeline = record.object.name(), "cannot run: {why}"),
        }
    }
    let mut endpoints = HashMap::new();
    let host = agent
        .store
        .get(Kind::Node, me)
        .ok()
        .flatten()
        .and_then(|r| {
            let a = r.object.as_node()?.address.clone();
            split_host_port(&a).ok().map(|(h, _)| h.to_string())
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    for record in agent.store.live(Kind::Endpoint).unwrap_or_default() {
        if agent.endpoint_node(&record.object).as_deref() != Some(me) {
            continue;
        }
        let Some(spec) = record.object.as_endpoint() else {
            continue;
        };
        let address = if host.contains(':') {
            format!("[{host}]:{}", spec.port)
        } else {
            format!("{host}:{}", spec.port)
        };
        endpoints.insert(
            record.object.metadata.name.clone(),
            EndpointWant {
                pipeline: spec.pipeline.clone(),
                address,
                served_model: spec
                    .served_model_name
                    .clone()
                    .unwrap_or_else(|| spec.pipeline.clone()),
                api_keys: spec.api_keys.clone(),
                head: head_address(agent, &spec.pipeline),
            },
        );
    }
    (stages, endpoints)
}

/// Runs the reconcile loop until `stop`.
pub async fn reconcile_loop(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    loop {
        if !agent.is_shutting_down() {
            reconcile_once(&agent);
            replace::replace_lost(&agent);
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = agent.reconcile_now.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

fn reconcile_once(agent: &Arc<Agent>) {
    let (want_stages, want_endpoints) = desired(agent);
    let rt = &agent.runtime;
    // Stages: unload what is no longer wanted as it is, then start what is missing or due.
    let mut to_start = Vec::new();
    {
        let mut stages = lock(&rt.stages);
        let stale: Vec<String> = stages
            .iter()
            .filter(|(name, slot)| want_stages.get(*name) != Some(&slot.want))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(slot) = stages.remove(&name) {
                let why = if want_stages.contains_key(&name) {
                    "its placement or model changed"
                } else {
                    "it was deleted or moved to another node"
                };
                agent.event(
                    &format!("Pipeline {name}"),
                    false,
                    "Unloading",
                    format!("unloading stage {} here: {why}", slot.want.index),
                );
                drop(stages);
                rt.unload(&name, slot);
                stages = lock(&rt.stages);
            }
        }
        for (name, want) in &want_stages {
            let due = match stages.get(name) {
                None => true,
                Some(slot) => {
                    matches!(slot.state, StageState::Failed(_)) && Instant::now() >= slot.retry_at
                }
            };
            if !due {
                continue;
            }
            let epoch = rt.epochs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let attempts = stages.get(name).map(|s| s.attempts).unwrap_or(0);
            let progress = Arc::new(LoadProgress::default());
            stages.insert(
                name.clone(),
                StageSlot {
                    want: want.clone(),
                    state: StageState::Loading,
                    progress: progress.clone(),
                    attempts,
                    retry_at: Instant::now(),
                    epoch,
                },
            );
            to_start.push((name.clone(), want.clone(), progress, epoch));
        }
    }
    for (name, want, progress, epoch) in to_start {
        agent.event(
            &format!("Pipeline {name}"),
            false,
            "Loading",
            format!(
                "loading stage {} (layers {}) of generation {}",
                want.index, want.config.stages[want.index].layers, want.config.generation
            ),
        );
        tokio::spawn(load_stage(agent.clone(), name, want, progress, epoch));
    }
    // Endpoints.
    let mut endpoints = lock(&rt.endpoints);
    let stale: Vec<String> = endpoints
        .iter()
        .filter(|(name, slot)| want_endpoints.get(*name) != Some(&slot.want))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some(mut slot) = endpoints.remove(&name)
            && let Some(stop) = slot.stop.take()
        {
            let _ = stop.send(());
            agent.event(
                &format!("Endpoint {name}"),
                false,
                "Closed",
                "stopped listening",
            );
        }
    }
    for (name, want) in want_endpoints {
        let due = match endpoints.get(&name) {
            None => true,
            Some(slot) => slot.stop.is_none() && Instant::now() >= slot.retry_at,
        };
        if !due {
            continue;
        }
        let attempts = endpoints.get(&name).map(|s| s.attempts).unwrap_or(0);
        let slot = open_endpoint(agent, &name, want, attempts);
        endpoints.insert(name, slot);
    }
}
