//! What agents store, exchange and report: records with their versions, resolved placements,
//! node inventories, stage reports and the statuses built from them, and the REST bodies
//! `clusterctl` reads.

use serde::{Deserialize, Serialize};

use crate::LayerRange;
use crate::manifest::{Kind, ManifestError, Object};

/// One stored object: the object with its metadata, whether it was deleted (a tombstone keeps
/// its version so that an agent that was away does not bring it back), and for a pipeline the
/// placement resolved when it was applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The object, status left out.
    pub object: Object,
    /// A tombstone.
    #[serde(default)]
    pub deleted: bool,
    /// A pipeline's stages as resolved at apply time (explicit or `placement: auto`), so that
    /// every agent runs the same split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<ResolvedPlacement>,
    /// For a model from the hub: the commit its `revision` named when it was applied, so that
    /// every node fetches the same bytes however the branch moves later (until the next apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

impl Record {
    /// A model's source as its nodes fetch it: a hub revision pinned to the commit it named at
    /// apply time. `None` when this is not a model.
    pub fn model_source(&self) -> Option<crate::manifest::ModelSource> {
        let spec = self.object.as_model()?;
        Some(spec.source.pinned(self.revision.as_deref()))
    }
}

impl Record {
    /// The version that orders two copies of this record: the logical clock, then the writer.
    pub fn version(&self) -> (u64, String) {
        (
            self.object.metadata.resource_version,
            self.object.metadata.updated_by.clone().unwrap_or_default(),
        )
    }
}

/// The digests of one weights file of a fetched model, published through the store by the
/// first node to hold the file whole, so that any node can check bytes a peer serves against
/// digests that did not come from that peer. Entries never change once written; a newer seal
/// of the same file (the model re-created, its branch moved) replaces an older one everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileDigests {
    /// The Model object's name.
    pub model: String,
    /// The model's source as it was when the file was sealed (`ModelSource::describe`): digests
    /// of another source are not used.
    pub source: String,
    /// The file's name within the source.
    pub file: String,
    /// The file's size in bytes.
    pub size: u64,
    /// sha256 of the whole file (hex).
    pub sha256: String,
    /// Whether `sha256` equals the digest the source itself gives (the hub's LFS oid).
    pub verified: bool,
    /// The node that sealed the file.
    pub sealed_by: String,
    /// When, in milliseconds since the Unix epoch: of two seals, the later is kept.
    pub sealed_at_ms: u64,
    /// sha256 of each tensor's bytes: (first byte, end byte, hex).
    pub tensors: Vec<(u64, u64, String)>,
}

impl FileDigests {
    /// The store's key: one entry per model and file.
    pub fn key(&self) -> String {
        format!("{}\n{}", self.model, self.file)
    }

    /// Whether this entry replaces `other` (same key): the later seal, then the greater node
    /// name, so that every agent keeps the same one whatever order they arrive in.
    pub fn supersedes(&self, other: &FileDigests) -> bool {
        (self.sealed_at_ms, &self.sealed_by, &self.sha256)
            > (other.sealed_at_ms, &other.sealed_by, &other.sha256)
    }
}

/// A pipeline's stages, decided once and stored with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPlacement {
    /// The stages in ring order (of the first replica, when there are several).
    pub stages: Vec<PlacedStage>,
    /// The stages of each further replica (replica 1 on), each in ring order, on nodes apart
    /// from every other replica's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Vec<PlacedStage>>,
    /// The model's layer count.
    pub layers: usize,
    /// How the split was chosen, for `describe`.
    pub reason: String,
}

impl ResolvedPlacement {
    /// Each replica's ring of stages, replica 0 first.
    pub fn rings(&self) -> Vec<&[PlacedStage]> {
        std::iter::once(self.stages.as_slice())
            .chain(self.replicas.iter().map(Vec::as_slice))
            .collect()
    }

    /// The replica `node` runs a stage of, and that stage's index in its ring.
    pub fn find(&self, node: &str) -> Option<(usize, usize)> {
        self.rings()
            .iter()
            .enumerate()
            .find_map(|(r, ring)| Some((r, ring.iter().position(|s| s.node == node)?)))
    }

    /// Every stage of every replica.
    pub fn all_stages(&self) -> impl Iterator<Item = &PlacedStage> {
        self.stages.iter().chain(self.replicas.iter().flatten())
    }
}

/// One resolved stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacedStage {
    /// The node that runs it.
    pub node: String,
    /// Its layers.
    pub layers: LayerRange,
    /// Estimated bytes of weights it holds.
    pub weight_bytes: u64,
}

/// How a model's weight bytes fall across its layers: enough to size any stage without the
/// files. A node that has the model sends it to the agent placing a pipeline that does not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ByteProfile {
    /// Bytes of each layer.
    pub per_layer: Vec<u64>,
    /// The embedding, held by stage 0.
    pub embed: u64,
    /// The final norm and LM head (the embedding again when tied), held by the last stage.
    pub head: u64,
    /// Whether a stage holding both the embedding and the head holds those bytes once (a
    /// tied head in safetensors).
    pub tied: bool,
    /// The widths a stage's working memory scales with (zero from agents that predate it).
    #[serde(default)]
    pub widths: ComputeWidths,
}

/// A model's widths, which size what a stage holds beside its weights while it computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputeWidths {
    /// Residual width.
    pub hidden: u64,
    /// MLP width.
    pub intermediate: u64,
    /// Query heads times head width.
    pub q_width: u64,
    /// Key/value heads times head width.
    pub kv_width: u64,
    /// Query heads.
    pub heads: u64,
    /// Embedding rows (logits per position).
    pub vocab: u64,
    /// The model's context length.
    pub context: u64,
    /// Whether the weights are half precision (bf16, f16), which products widen block by block.
    pub half: bool,
}

/// Positions of context the working-memory estimate assumes a long prompt's chunk attends to:
/// attention's transient scores and keys grow with the context, and reserving for a model's
/// whole context (40,960 positions for Qwen3) would refuse splits that serve ordinary prompts.
pub const WORKING_CONTEXT: u64 = 4096;

/// Bytes of half-precision weights a product widens at once (the engine's bound), and of the
/// buffers its threads widen decode blocks into.
pub const WIDEN_BYTES: u64 = (4 << 20) + (4 << 20);

impl ByteProfile {
    /// Bytes a stage needs beside its weights while it computes a prefill chunk of
    /// `prefill_chunk` tokens (in f32): the chunk's activations through a layer, attention's
    /// scores and grouped keys and values over [`WORKING_CONTEXT`] positions, the logits, and the
    /// widening buffers of half-precision weights. The KV caches come on top and grow with the
    /// sequences served; they are not counted here. Zero for a profile without widths.
    pub fn working_bytes(&self, prefill_chunk: usize) -> u64 {
        let w = &self.widths;
        let chunk = prefill_chunk as u64;
        let context = w.context.min(WORKING_CONTEXT);
        let activations = chunk * (4 * w.hidden + 3 * w.intermediate + w.q_width + 2 * w.kv_width);
        let attention = chunk * w.heads * context + 2 * context * w.q_width;
        let logits = 2 * w.vocab;
        let widening = if w.half { WIDEN_BYTES } else { 0 };
        4 * (activations + attention + logits) + widening
    }
    /// The model's layer count.
    pub fn layers(&self) -> usize {
        self.per_layer.len()
    }

    /// Bytes of weights of a stage holding `range`.
    pub fn stage_bytes(&self, range: LayerRange, first: bool, last: bool) -> u64 {
        let layers: u64 = self
            .per_layer
            .iter()
            .skip(range.first)
            .take(range.len())
            .sum();
        let mut bytes = layers;
        if first {
            bytes += self.embed;
        }
        if last {
            bytes += self.head;
            if first && self.tied {
                bytes -= self.embed.min(self.head);
            }
        }
        bytes
    }
}

/// One GPU (or other accelerator) the agent can use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    /// `metal` or `cuda`.
    pub kind: String,
    /// Device index.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Memory it may use, when known: Metal's recommended working set, CUDA's total memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// What a host has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// Host name.
    pub hostname: String,
    /// Operating system and version.
    pub os: String,
    /// CPU model.
    pub cpu_model: String,
    /// Physical cores.
    pub cpu_cores: usize,
    /// Logical CPUs.
    pub cpu_threads: usize,
    /// Total memory.
    pub memory_total_bytes: u64,
    /// Memory available now.
    pub memory_available_bytes: u64,
    /// The agent's own cap on the memory its stages may take (`--max-memory`), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// GPUs.
    #[serde(default)]
    pub gpus: Vec<Gpu>,
}

impl Inventory {
    /// Memory placement may count on for a stage: available memory plus what the same
    /// pipeline's stage already holds here (a re-placement frees it), within what the agent's
    /// limit leaves after the stages of other pipelines (`held_other`).
    pub fn placeable_bytes(&self, held_same: u64, held_other: u64) -> u64 {
        let free = self.memory_available_bytes.saturating_add(held_same);
        match self.memory_limit_bytes {
            Some(limit) => free.min(limit.saturating_sub(held_other)),
            None => free,
        }
    }
}

/// Phase of a stage, a pipeline, an endpoint or a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Declared, nothing done yet.
    Pending,
    /// Weights being read.
    Loading,
    /// Serving.
    Ready,
    /// Serving partly, or not at all because a part is down; the message says which.
    Degraded,
    /// Failed; retried with backoff, the message says why.
    Failed,
    /// A node that has not been heard from within the bound.
    NotReady,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pending => "Pending",
            Self::Loading => "Loading",
            Self::Ready => "Ready",
            Self::Degraded => "Degraded",
            Self::Failed => "Failed",
            Self::NotReady => "NotReady",
        })
    }
}

/// What an agent says about one stage it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageReport {
    /// The pipeline.
    pub pipeline: String,
    /// The pipeline generation the stage runs.
    pub generation: u64,
    /// Stage index.
    pub index: usize,
    /// Its layers.
    pub layers: LayerRange,
    /// Loading, Ready or Failed.
    pub phase: Phase,
    /// Bytes of weights read so far.
    pub loaded_bytes: u64,
    /// Bytes of weights to read.
    pub total_bytes: u64,
    /// Bytes of weights held in memory now (zero once unloaded).
    pub memory_bytes: u64,
    /// Why it failed, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Stage 0: whether the ring serves, and if not why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingReport>,
    /// Sequences with a cache on this stage.
    #[serde(default)]
    pub sequences: usize,
    /// Failed attempts so far (reset once it loads).
    #[serde(default)]
    pub attempts: u32,
    /// Seconds spent in forward passes since it loaded.
    #[serde(default)]
    pub compute_seconds: f64,
    /// Forward passes since it loaded (a batched pass counts once).
    #[serde(default)]
    pub forward_passes: u64,
    /// Its recent forward passes' times.
    #[serde(default)]
    pub passes: PassStats,
}

/// A stage's recent forward passes: what makes a slow stage visible, and a stalled one (a pass
/// running far longer than its recent ones) detectable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PassStats {
    /// Passes since the stage loaded (a batched pass counts once).
    #[serde(default)]
    pub passes: u64,
    /// Seconds of the latest finished pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seconds: Option<f64>,
    /// Mean seconds of the recent passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_recent_seconds: Option<f64>,
    /// Seconds of the slowest recent pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slowest_recent_seconds: Option<f64>,
    /// Seconds the pass in progress has run, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_seconds: Option<f64>,
    /// Tokens (positions of all its sequences) in the pass in progress.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub running_tokens: usize,
    /// How long the pass in progress may run before the stage counts as stalled.
    #[serde(default)]
    pub stall_after_seconds: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Whether a ring serves, as its stage 0 sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RingState {
    /// Every link is live, no stage is stalled, and a first pass went through every stage.
    Serving,
    /// Every link is live; the first pass through every stage since the ring (re)formed is on
    /// its way.
    WarmingUp,
    /// A link is missing: a stage is not connected or went away.
    NotConnected,
    /// A stage is alive but makes no progress: it answers no heartbeat, or its pass runs far
    /// past its recent ones.
    Stalled,
}

impl std::fmt::Display for RingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Serving => "Serving",
            Self::WarmingUp => "WarmingUp",
            Self::NotConnected => "NotConnected",
            Self::Stalled => "Stalled",
        })
    }
}

/// Stage 0's view of its ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RingReport {
    /// Serving or why not.
    pub state: RingState,
    /// What is happening, naming the stage and node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What an agent says about an endpoint it hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointReport {
    /// The endpoint.
    pub endpoint: String,
    /// Ready once listening.
    pub phase: Phase,
    /// `http://host:port`.
    pub url: String,
    /// Why it is not listening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What an agent says about itself: sent with every state pull, so it is also the heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The agent's node name.
    pub node: String,
    /// The agent's version.
    pub version: String,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
    /// The host.
    pub inventory: Inventory,
    /// Its stages.
    #[serde(default)]
    pub stages: Vec<StageReport>,
    /// Its endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointReport>,
    /// Bytes of weights its stages hold, counting stages being unloaded until their memory
    /// is actually freed.
    #[serde(default)]
    pub stage_memory_bytes: u64,
    /// Bytes of the agent's memory in transparent huge pages, where the OS tells (Linux): a
    /// CPU stage decodes markedly faster with its weights there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_page_bytes: Option<u64>,
}

/// A node's status as one agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Ready when heard from within the bound.
    pub phase: Phase,
    /// Why not Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Seconds since the last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_seconds: Option<f64>,
    /// The last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<NodeReport>,
}

/// One stage of a pipeline's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStageStatus {
    /// The replica it belongs to (0 when the pipeline has one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replica: usize,
    /// Stage index within its replica's ring.
    pub index: usize,
    /// Its node.
    pub node: String,
    /// Its layers.
    pub layers: LayerRange,
    /// Its phase as its node reports it.
    pub phase: Phase,
    /// Share of its weights loaded, 0-100.
    pub progress: f64,
    /// Bytes of weights held.
    pub memory_bytes: u64,
    /// Estimated bytes of weights.
    pub weight_bytes: u64,
    /// Sequences holding a cache on it.
    #[serde(default)]
    pub sequences: usize,
    /// Seconds spent in forward passes.
    #[serde(default)]
    pub compute_seconds: f64,
    /// Forward passes.
    #[serde(default)]
    pub forward_passes: u64,
    /// Its recent forward passes' times.
    #[serde(default)]
    pub passes: PassStats,
    /// What is wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A pipeline's status: its stages' statuses combined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// Pending, Loading, Ready, Degraded or Failed.
    pub phase: Phase,
    /// What is happening or wrong, naming the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Share of all stages' weights loaded, 0-100.
    pub progress: f64,
    /// How the split was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// Per stage, replica by replica.
    pub stages: Vec<PipelineStageStatus>,
    /// Per replica, when there are several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica of a pipeline: its own ring over its own nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Its index.
    pub index: usize,
    /// Its stages' phase combined, as a single ring's would be.
    pub phase: Phase,
    /// What is happening or wrong, naming the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The node of its stage 0, where its requests go.
    pub head: String,
}

/// An Endpoint's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// Ready while listening and its pipeline is Ready.
    pub phase: Phase,
    /// Why not Ready.
    #[serde(default)]
    pub message: Option<String>,
    /// The node it listens on, once its pipeline is placed.
    #[serde(default)]
    pub node: Option<String>,
    /// `http://host:port`, once that node reported it listening.
    #[serde(default)]
    pub url: Option<String>,
}

/// One weights file of a model that some node holds whole, as its digests were published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelFileStatus {
    /// The file's name within the source.
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
    /// sha256 of the whole file (hex).
    pub sha256: String,
    /// Whether the source's own digest agrees.
    pub verified: bool,
    /// The node that sealed it.
    pub sealed_by: String,
    /// How many tensors have a digest of their own.
    pub tensors: usize,
}

/// A Model's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// The pipelines that run it.
    pub pipelines: Vec<String>,
    /// Its files held whole somewhere: what peers fetching stages check bytes against.
    pub files: Vec<ModelFileStatus>,
    /// For a hub model, the commit its revision named at the last apply.
    #[serde(default)]
    pub commit: Option<String>,
}

/// What the cluster reports about an object, by kind (the `status` of REST replies).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Status {
    /// A `Node`'s (boxed: it carries the node's whole report).
    Node(Box<NodeStatus>),
    /// A `Model`'s.
    Model(ModelStatus),
    /// A `Pipeline`'s.
    Pipeline(PipelineStatus),
    /// An `Endpoint`'s.
    Endpoint(EndpointStatus),
}

impl Status {
    /// Reads the status of an object of `kind`; the error names the field at fault.
    pub fn parse(kind: Kind, value: serde_json::Value) -> Result<Self, (String, String)> {
        use crate::deserialize_at as typed;
        Ok(match kind {
            Kind::Node => Status::Node(Box::new(typed(value)?)),
            Kind::Model => Status::Model(typed(value)?),
            Kind::Pipeline => Status::Pipeline(typed(value)?),
            Kind::Endpoint => Status::Endpoint(typed(value)?),
        })
    }

    /// The phase, for kinds that have one.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Status::Node(s) => Some(s.phase),
            Status::Pipeline(s) => Some(s.phase),
            Status::Endpoint(s) => Some(s.phase),
            Status::Model(_) => None,
        }
    }

    /// What is happening or wrong, for kinds that say.
    pub fn message(&self) -> Option<&str> {
        match self {
            Status::Node(s) => s.message.as_deref(),
            Status::Pipeline(s) => s.message.as_deref(),
            Status::Endpoint(s) => s.message.as_deref(),
            Status::Model(_) => None,
        }
    }
}

/// What an apply did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    /// It did not exist.
    Created,
    /// Its spec changed.
    Configured,
    /// Nothing changed.
    Unchanged,
}

impl std::fmt::Display for ApplyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        })
    }
}

/// What an apply did to one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyOutcome {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// What was done.
    pub action: ApplyAction,
    /// Generation after the apply.
    pub generation: u64,
    /// What changed, for `--dry-run` and messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
}

/// Error body of every REST route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// HTTP status.
    pub code: u16,
    /// What went wrong, in one message.
    pub message: String,
    /// For a refused apply: each problem, placed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ManifestError>,
}

/// One event: something an agent did or saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// RFC 3339 time.
    pub time: String,
    /// The node that recorded it.
    pub node: String,
    /// `Pipeline qwen`.
    pub object: String,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short CamelCase reason: `Applied`, `Loaded`, `LoadFailed`, `NodeNotReady`.
    pub reason: String,
    /// Details.
    pub message: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The answering node.
    pub node: String,
    /// Its `clusteragent` version.
    pub version: String,
}

/// `GET /api/v1/{kind}`: the live objects of one kind, with their statuses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectList {
    /// The kind listed.
    pub kind: Kind,
    /// The objects.
    pub items: Vec<Object>,
}

/// `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    /// Newest last.
    pub items: Vec<Event>,
}

/// `POST /api/v1/apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReply {
    /// Whether nothing was stored.
    pub dry_run: bool,
    /// One per object, in the order sent.
    pub items: Vec<ApplyOutcome>,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeleteAction {
    /// The object is gone (a tombstone keeps its version).
    Deleted,
}

/// `DELETE /api/v1/{kind}/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteReply {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// What was done.
    pub action: DeleteAction,
    /// Whether nothing was stored.
    pub dry_run: bool,
    /// The tombstone's version.
    pub resource_version: u64,
}

/// One object in [`Summary`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryItem {
    /// Its name.
    pub name: String,
    /// Its phase.
    pub phase: Phase,
    /// Why not Ready.
    #[serde(default)]
    pub message: Option<String>,
    /// A pipeline's share of weights loaded, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
}

/// `GET /api/v1/status`: every node and pipeline in a line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The answering node.
    pub node: String,
    /// Nodes.
    pub nodes: Vec<SummaryItem>,
    /// Pipelines.
    pub pipelines: Vec<SummaryItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply's object comes back with its kind's status type; one whose status does not
    /// match is refused naming the field, while a manifest's status is ignored as documented.
    #[test]
    fn replies_read_statuses_by_kind_and_manifests_ignore_them() {
        let endpoint = serde_json::json!({
            "apiVersion": "v1", "kind": "Endpoint", "metadata": {"name": "api"},
            "spec": {"pipeline": "p", "port": 8080},
            "status": {"phase": "Ready", "message": null, "node": "a", "url": "http://a:8080"},
        });
        let list: ObjectList = serde_json::from_value(serde_json::json!({
            "kind": "Endpoint", "items": [endpoint.clone()],
        }))
        .unwrap();
        let status = list.items[0].endpoint_status().unwrap();
        assert_eq!(status.phase, Phase::Ready);
        assert_eq!(status.url.as_deref(), Some("http://a:8080"));
        assert!(list.items[0].pipeline_status().is_none());
        // What the agent writes is what clusterctl reads.
        let again: ObjectList =
            serde_json::from_str(&serde_json::to_string(&list).unwrap()).unwrap();
        assert_eq!(again, list);

        let mut wrong = endpoint.clone();
        wrong["status"]["phase"] = serde_json::json!("Sleeping");
        let e = Object::from_json(&wrong).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("status.phase"), "{e}");

        let yaml: serde_yaml::Value = serde_yaml::to_value(&wrong).unwrap();
        let applied = Object::from_value(yaml).unwrap();
        assert_eq!(applied.status, None);

        let apply: ApplyReply = serde_json::from_str(
            r#"{"dryRun":true,"items":[{"kind":"Model","name":"m","action":"configured","generation":2,"changes":["spec.dtype"]}]}"#,
        )
        .unwrap();
        assert_eq!(apply.items[0].action, ApplyAction::Configured);
        assert_eq!(apply.items[0].action.to_string(), "configured");
    }

    #[test]
    fn working_memory_grows_with_the_chunk_and_counts_widening_only_for_half_weights() {
        // The seed's Qwen3-1.7B in bf16.
        let mut profile = ByteProfile {
            per_layer: vec![0; 28],
            embed: 0,
            head: 0,
            tied: true,
            widths: ComputeWidths {
                hidden: 2048,
                intermediate: 6144,
                q_width: 2048,
                kv_width: 1024,
                heads: 16,
                vocab: 151_936,
                context: 40_960,
                half: true,
            },
        };
        let mb = |b: u64| b as f64 / 1e6;
        let seed = mb(profile.working_bytes(128));
        assert!((120.0..135.0).contains(&seed), "{seed} MB");
        assert!(profile.working_bytes(512) > profile.working_bytes(128));
        profile.widths.half = false;
        assert_eq!(
            profile.working_bytes(128) + WIDEN_BYTES,
            (seed * 1e6).round() as u64
        );
        // A report from an agent that predates the widths asks for nothing.
        profile.widths = ComputeWidths::default();
        assert_eq!(profile.working_bytes(128), 0);
    }
}
