//! Manifests: the objects users declare (`Node`, `Model`, `Pipeline`, `Endpoint`) in the
//! Kubernetes shape, how YAML or JSON text becomes them, and the checks that need nothing but
//! the documents themselves (schema, names, addresses, the shape of a split, references between
//! objects). Checks that need a model's files or a node's memory run in the agent.
//!
//! Every error names the document (its position in the file and, once known, its kind and
//! name), the field path (`spec.stages[1].layers`) and, for YAML syntax, the line and column.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::{DeviceKind, LayerRange, LayerSplit, WeightDType};

/// The only `apiVersion` so far.
pub const API_VERSION: &str = "v1";

/// The kinds of object, in the order an apply stores them (a pipeline after its model and
/// nodes, an endpoint after its pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// A host running `clusteragent`.
    Node,
    /// Where a model's weights are.
    Model,
    /// A model placed on nodes, layer range by layer range.
    Pipeline,
    /// Where a pipeline's inference API listens.
    Endpoint,
}

impl Kind {
    /// Every kind, in apply order.
    pub const ALL: [Kind; 4] = [Kind::Node, Kind::Model, Kind::Pipeline, Kind::Endpoint];

    /// The name as manifests write it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Node => "Node",
            Self::Model => "Model",
            Self::Pipeline => "Pipeline",
            Self::Endpoint => "Endpoint",
        }
    }

    /// The plural used in REST paths: `/api/v1/pipelines`.
    pub fn plural(&self) -> &'static str {
        match self {
            Self::Node => "nodes",
            Self::Model => "models",
            Self::Pipeline => "pipelines",
            Self::Endpoint => "endpoints",
        }
    }

    /// Parses a kind as a person types it: `Pipeline`, `pipeline`, `pipelines`, `pl`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "node" | "nodes" | "no" => Ok(Self::Node),
            "model" | "models" | "mo" => Ok(Self::Model),
            "pipeline" | "pipelines" | "pl" => Ok(Self::Pipeline),
            "endpoint" | "endpoints" | "ep" => Ok(Self::Endpoint),
            _ => Err(format!(
                "unknown kind {text:?}: expected one of Node, Model, Pipeline, Endpoint"
            )),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Metadata every object carries. Users write `name` (and may write `labels`); the agent sets
/// the rest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Unique among objects of its kind.
    pub name: String,
    /// Free-form labels, kept as given.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Set when the object is first created; a re-created object gets a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Bumped each time the spec changes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Version of the whole record in the cluster's logical clock: the higher one wins when two
    /// agents disagree. Given in an apply, it must match the stored one (optimistic locking).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resource_version: u64,
    /// When the object was created (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Name of the node whose agent wrote this version; breaks ties between equal versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A host: where its agent's control plane listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    /// `host:port` of the agent's REST control plane.
    pub address: String,
    /// `host:port` where the agent accepts ring connections; default: the same host, the
    /// control plane's port + 1 (the agent's own default for `--ring-listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_address: Option<String>,
    /// Drained (`clusterctl drain`): automatic placement puts nothing here and moves what it
    /// had placed here; listed stages stay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
}

impl NodeSpec {
    /// Where the node accepts ring connections.
    pub fn ring_address(&self) -> String {
        if let Some(a) = &self.ring_address {
            return a.clone();
        }
        match split_host_port(&self.address) {
            Ok((host, port)) => join_host_port(host, port.saturating_add(1)),
            Err(_) => self.address.clone(),
        }
    }
}

/// Where a model's files are: exactly one of `path`, `hf` and `url`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelSource {
    /// A Hugging Face model folder or a `.gguf` file, read on every node that runs a stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A repository on the Hugging Face Hub (or a mirror with its URL layout); each node
    /// fetches only the bytes of its own stage into its cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf: Option<HfSource>,
    /// One `.gguf` or `.safetensors` file over HTTP(S) (a `.safetensors` file's `config.json`
    /// and tokenizer files are fetched from beside it); fetched like `hf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A model repository on the Hugging Face Hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HfSource {
    /// `owner/name`.
    pub repo: String,
    /// A branch, tag or commit; `main` when absent.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// The files to use; absent, the model folder's usual files (`config.json`, the tokenizer
    /// files, `model.safetensors` or the shards its index lists). Name one `.gguf` file to run
    /// a GGUF model from the repository.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// The hub's address; absent, the agent's `HF_ENDPOINT` or `https://huggingface.co`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn default_revision() -> String {
    "main".into()
}

/// Whether `revision` is a full commit hash (which never moves).
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ModelSource {
    /// This source with a hub revision replaced by `commit` (when given); other sources as
    /// they are.
    pub fn pinned(&self, commit: Option<&str>) -> ModelSource {
        let mut source = self.clone();
        if let (Some(hf), Some(commit)) = (source.hf.as_mut(), commit) {
            hf.revision = commit.to_string();
        }
        source
    }

    /// A local source.
    pub fn local(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            ..Self::default()
        }
    }

    /// Whether the files are fetched (hub or URL) rather than found on each node.
    pub fn is_remote(&self) -> bool {
        self.path.is_none()
    }

    /// One line for messages and tables: the path, `hf://owner/name@revision`, or the URL.
    pub fn describe(&self) -> String {
        match (&self.path, &self.hf, &self.url) {
            (Some(p), _, _) => p.display().to_string(),
            (None, Some(h), _) => {
                let files = match h.files.as_slice() {
                    [] => String::new(),
                    [one] => format!("/{one}"),
                    many => format!(" ({} files)", many.len()),
                };
                format!("hf://{}@{}{files}", h.repo, h.revision)
            }
            (None, None, Some(u)) => u.clone(),
            (None, None, None) => "(no source)".into(),
        }
    }

    fn check(&self, object: &Object, errors: &mut Vec<ManifestError>) {
        let given = [self.path.is_some(), self.hf.is_some(), self.url.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            errors.push(ManifestError::field(
                object,
                "spec.source",
                "give exactly one of path (files on every node), hf (a Hugging Face repository) and url (one file over HTTP)",
            ));
            return;
        }
        if let Some(p) = &self.path
            && p.as_os_str().is_empty()
        {
            errors.push(ManifestError::field(object, "spec.source.path", "is empty"));
        }
        if let Some(u) = &self.url {
            let name = u.rsplit('/').next().unwrap_or("");
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                errors.push(ManifestError::field(
                    object,
                    "spec.source.url",
                    format!("{u:?} is not an http:// or https:// address"),
                ));
            } else if !(name.ends_with(".gguf") || name.ends_with(".safetensors")) {
                errors.push(ManifestError::field(
                    object,
                    "spec.source.url",
                    format!("{u:?} does not name a .gguf or .safetensors file"),
                ));
            }
        }
        if let Some(h) = &self.hf {
            let parts: Vec<&str> = h.repo.split('/').collect();
            let plain = |s: &str| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            if parts.len() != 2 || !parts.iter().all(|p| plain(p)) {
                errors.push(ManifestError::field(
                    object,
                    "spec.source.hf.repo",
                    format!(
                        "{:?} is not a repository name of the form owner/name",
                        h.repo
                    ),
                ));
            }
            if h.revision.is_empty() || h.revision.contains("..") || h.revision.starts_with('/') {
                errors.push(ManifestError::field(
                    object,
                    "spec.source.hf.revision",
                    format!("{:?} is not a branch, tag or commit", h.revision),
                ));
            }
            for (i, f) in h.files.iter().enumerate() {
                if f.is_empty() || f.split('/').any(|p| !plain(p)) {
                    errors.push(ManifestError::field(
                        object,
                        &format!("spec.source.hf.files[{i}]"),
                        format!("{f:?} is not a file name within the repository"),
                    ));
                }
            }
            if h.files.iter().filter(|f| f.ends_with(".gguf")).count() > 1 {
                errors.push(ManifestError::field(
                    object,
                    "spec.source.hf.files",
                    "names more than one .gguf file: a model is one GGUF file",
                ));
            }
            if let Some(e) = &h.endpoint
                && !(e.starts_with("http://") || e.starts_with("https://"))
            {
                errors.push(ManifestError::field(
                    object,
                    "spec.source.hf.endpoint",
                    format!("{e:?} is not an http:// or https:// address"),
                ));
            }
        }
    }
}

/// A model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where its files are.
    pub source: ModelSource,
    /// Precision to hold the weights in; absent keeps the checkpoint's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<WeightDType>,
}

/// How a pipeline's stages are chosen when they are not listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Split in proportion to each node's free memory; one node when the model fits there.
    Auto,
}

/// One stage as a user places it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StagePlacement {
    /// The replica it belongs to when the pipeline has several (`0` to `replicas - 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<usize>,
    /// The node that runs it.
    pub node: String,
    /// Inclusive layer range: `"0-13"`.
    pub layers: LayerRange,
}

/// A model placed on nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PipelineSpec {
    /// Name of the `Model`.
    pub model: String,
    /// Device of every stage.
    #[serde(default)]
    pub device: DeviceKind,
    /// The stages in ring order; give this or `placement: auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StagePlacement>>,
    /// `auto` to let the cluster split the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Independent rings of the same model on nodes apart, behind the same endpoints
    /// (default 1): a count, or `auto` (with `placement: auto`) for as many as the nodes'
    /// memory holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Replicas>,
    /// What the cluster does when a node of the pipeline goes away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverSpec>,
    /// With `placement: auto`, the nodes to choose from (default: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Sequences served at once; more wait or are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequences: Option<usize>,
    /// Prompt tokens per prefill chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_chunk: Option<usize>,
    /// A request whose first token has not come within this long fails with an error saying
    /// so (`30s`, `2m`); absent, requests wait as long as the ring makes progress.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub first_token_timeout: Option<std::time::Duration>,
}

/// How many replicas a pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicas {
    /// This many.
    Count(usize),
    /// As many as the nodes' memory holds, each on nodes of its own (`placement: auto`).
    Auto,
}

impl Serialize for Replicas {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Count(n) => s.serialize_u64(*n as u64),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Replicas;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of replicas or `auto`")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Replicas, E> {
                usize::try_from(n)
                    .map(Replicas::Count)
                    .map_err(|_| E::custom(format!("{n} replicas is past any cluster")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Replicas, E> {
                Err(E::custom(format!(
                    "expected a number of replicas or `auto`, got {n}"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Replicas, E> {
                match v {
                    "auto" => Ok(Replicas::Auto),
                    _ => Err(E::custom(format!(
                        "expected a number of replicas or `auto`, got {v:?}"
                    ))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What the cluster does when a node of a pipeline goes away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailoverSpec {
    /// Under `placement: auto`, how long a node may stay unheard from before its stages are
    /// placed on other nodes (`60s` when absent).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub replace_after: Option<std::time::Duration>,
}

impl FailoverSpec {
    /// How long a pipeline's node may stay away before its stages are re-placed by default.
    pub const DEFAULT_REPLACE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
}

impl PipelineSpec {
    /// The replicas asked for: a count (1 when absent), or `None` for `auto`.
    pub fn replica_count(&self) -> Option<usize> {
        match self.replicas {
            None => Some(1),
            Some(Replicas::Count(n)) => Some(n),
            Some(Replicas::Auto) => None,
        }
    }

    /// How long a node may stay away before its stages are re-placed (under `placement: auto`).
    pub fn replace_after(&self) -> std::time::Duration {
        self.failover
            .as_ref()
            .and_then(|f| f.replace_after)
            .unwrap_or(FailoverSpec::DEFAULT_REPLACE_AFTER)
    }
}

/// Where a pipeline's inference API listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    /// Name of the `Pipeline`.
    pub pipeline: String,
    /// The node that listens; default: the node of the pipeline's stage 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// TCP port on that node.
    pub port: u16,
    /// The model name clients ask for; default: the pipeline's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
    /// Bearer keys clients must present; none means open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
}

/// The spec of an object, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    /// A `Node`.
    Node(NodeSpec),
    /// A `Model`.
    Model(ModelSpec),
    /// A `Pipeline`.
    Pipeline(PipelineSpec),
    /// An `Endpoint`.
    Endpoint(EndpointSpec),
}

/// An object: what a manifest document declares, plus the status the agent reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// The kind.
    pub kind: Kind,
    /// Name and versions.
    pub metadata: ObjectMeta,
    /// What the user declared.
    pub spec: Spec,
    /// What the cluster reports; ignored in an apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<crate::cluster::Status>,
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Object::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// What [`Object::read`] does with a `status`.
#[derive(Clone, Copy)]
enum Statuses {
    /// Drops it: a manifest's status is ignored (`get -o yaml` output can be applied back).
    Ignore,
    /// Reads it as the kind's status type, refusing one that does not match (a reply).
    Read,
}

/// A document as written, with the spec of one kind: unknown fields are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc<S> {
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: S,
    // `get -o yaml` output carries a status; applying it back is allowed and ignores it.
    #[serde(default)]
    status: Option<serde_json::Value>,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestError {
    /// 1-based position of the document in its file or request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    /// `Pipeline qwen`, once the kind and name are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The field at fault: `spec.stages[1].layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 1-based line, for YAML syntax errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// 1-based column, for YAML syntax errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ManifestError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            document: None,
            object: None,
            path: None,
            line: None,
            column: None,
            message: message.into(),
        }
    }

    /// An error about one field of an object.
    pub fn field(object: &Object, path: &str, message: impl Into<String>) -> Self {
        Self {
            object: Some(object.describe()),
            path: Some(path.to_string()),
            ..Self::new(message)
        }
    }

    /// An error about an object as a whole.
    pub fn object(object: &Object, message: impl Into<String>) -> Self {
        Self {
            object: Some(object.describe()),
            ..Self::new(message)
        }
    }

    /// The same error, placed in document `n` (1-based).
    pub fn in_document(mut self, n: usize) -> Self {
        self.document = Some(n);
        self
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut prefix = Vec::new();
        if let Some(d) = self.document {
            prefix.push(format!("document {d}"));
        }
        if let Some(o) = &self.object {
            prefix.push(o.clone());
        }
        if let (Some(l), Some(c)) = (self.line, self.column) {
            prefix.push(format!("line {l}, column {c}"));
        }
        if !prefix.is_empty() {
            write!(f, "{}: ", prefix.join(", "))?;
        }
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Several errors, shown one per line.
pub fn join_errors(errors: &[ManifestError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Object {
    /// `Pipeline qwen`.
    pub fn describe(&self) -> String {
        format!("{} {}", self.kind, self.metadata.name)
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The spec when this is a `Node`.
    pub fn as_node(&self) -> Option<&NodeSpec> {
        match &self.spec {
            Spec::Node(s) => Some(s),
            _ => None,
        }
    }

    /// The spec when this is a `Model`.
    pub fn as_model(&self) -> Option<&ModelSpec> {
        match &self.spec {
            Spec::Model(s) => Some(s),
            _ => None,
        }
    }

    /// The spec when this is a `Pipeline`.
    pub fn as_pipeline(&self) -> Option<&PipelineSpec> {
        match &self.spec {
            Spec::Pipeline(s) => Some(s),
            _ => None,
        }
    }

    /// The spec when this is an `Endpoint`.
    pub fn as_endpoint(&self) -> Option<&EndpointSpec> {
        match &self.spec {
            Spec::Endpoint(s) => Some(s),
            _ => None,
        }
    }

    /// A Node's status, when this is a Node and the reply carried one.
    pub fn node_status(&self) -> Option<&crate::cluster::NodeStatus> {
        match &self.status {
            Some(crate::cluster::Status::Node(s)) => Some(&**s),
            _ => None,
        }
    }

    /// A Model's status, likewise.
    pub fn model_status(&self) -> Option<&crate::cluster::ModelStatus> {
        match &self.status {
            Some(crate::cluster::Status::Model(s)) => Some(s),
            _ => None,
        }
    }

    /// A Pipeline's status, likewise.
    pub fn pipeline_status(&self) -> Option<&crate::cluster::PipelineStatus> {
        match &self.status {
            Some(crate::cluster::Status::Pipeline(s)) => Some(s),
            _ => None,
        }
    }

    /// An Endpoint's status, likewise.
    pub fn endpoint_status(&self) -> Option<&crate::cluster::EndpointStatus> {
        match &self.status {
            Some(crate::cluster::Status::Endpoint(s)) => Some(s),
            _ => None,
        }
    }

    /// Builds an object from any self-describing value (parsed YAML or JSON), refusing unknown
    /// kinds and fields; the error names the field path.
    pub fn from_value<'de, D>(value: D) -> Result<Self, ManifestError>
    where
        D: Deserializer<'de> + Clone,
        D::Error: fmt::Display,
    {
        Self::read(value, Statuses::Ignore)
    }

    fn read<'de, D>(value: D, statuses: Statuses) -> Result<Self, ManifestError>
    where
        D: Deserializer<'de> + Clone,
        D::Error: fmt::Display,
    {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head {
            kind: Option<String>,
            metadata: Option<serde_json::Value>,
        }
        let head = Head::deserialize(value.clone()).map_err(|e| {
            ManifestError::new(format!(
                "not a manifest object (apiVersion, kind, metadata, spec): {e}"
            ))
        })?;
        let name = head
            .metadata
            .as_ref()
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let Some(kind_text) = head.kind else {
            return Err(ManifestError {
                path: Some("kind".into()),
                ..ManifestError::new("missing: expected one of Node, Model, Pipeline, Endpoint")
            });
        };
        let kind = match kind_text.as_str() {
            "Node" => Kind::Node,
            "Model" => Kind::Model,
            "Pipeline" => Kind::Pipeline,
            "Endpoint" => Kind::Endpoint,
            other => {
                return Err(ManifestError {
                    path: Some("kind".into()),
                    ..ManifestError::new(format!(
                        "unknown kind {other:?}: expected one of Node, Model, Pipeline, Endpoint"
                    ))
                });
            }
        };
        let label = name.map(|n| format!("{kind} {n}"));
        let fail = |path: String, message: String| ManifestError {
            object: label.clone(),
            path: (!path.is_empty() && path != ".").then_some(path),
            ..ManifestError::new(message)
        };
        fn typed<'de, D, S>(value: D) -> Result<Doc<S>, (String, String)>
        where
            D: Deserializer<'de>,
            D::Error: fmt::Display,
            S: DeserializeOwned,
        {
            crate::deserialize_at(value)
        }
        fn build<S>(
            kind: Kind,
            statuses: Statuses,
            d: Doc<S>,
            wrap: fn(S) -> Spec,
        ) -> Result<Object, (String, String)> {
            let status = match (statuses, d.status) {
                (Statuses::Read, Some(v)) if !v.is_null() => Some(
                    crate::cluster::Status::parse(kind, v)
                        .map_err(|(path, why)| (format!("status.{path}"), why))?,
                ),
                _ => None,
            };
            Ok(Object {
                api_version: d.api_version,
                kind,
                metadata: d.metadata,
                spec: wrap(d.spec),
                status,
            })
        }
        let object = match kind {
            Kind::Node => typed(value).and_then(|d| build(kind, statuses, d, Spec::Node)),
            Kind::Model => typed(value).and_then(|d| build(kind, statuses, d, Spec::Model)),
            Kind::Pipeline => typed(value).and_then(|d| build(kind, statuses, d, Spec::Pipeline)),
            Kind::Endpoint => typed(value).and_then(|d| build(kind, statuses, d, Spec::Endpoint)),
        }
        .map_err(|(path, message)| fail(path, message))?;
        Ok(object)
    }

    /// Builds an object from JSON (a stored record, a REST body), its status read as its
    /// kind's status type.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ManifestError> {
        Self::read(value, Statuses::Read)
    }

    /// Checks what the object says about itself: version, name, addresses, the shape of a
    /// split. Returns every problem found.
    pub fn check(&self) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        if self.api_version != API_VERSION {
            errors.push(ManifestError::field(
                self,
                "apiVersion",
                format!(
                    "unsupported apiVersion {:?}: expected {API_VERSION:?}",
                    self.api_version
                ),
            ));
        }
        if let Err(why) = check_name(&self.metadata.name) {
            errors.push(ManifestError::field(self, "metadata.name", why));
        }
        match &self.spec {
            Spec::Node(s) => {
                if let Err(why) = split_host_port(&s.address) {
                    errors.push(ManifestError::field(self, "spec.address", why));
                }
                if let Some(r) = &s.ring_address
                    && let Err(why) = split_host_port(r)
                {
                    errors.push(ManifestError::field(self, "spec.ringAddress", why));
                }
                if s.ring_address.as_deref() == Some(s.address.as_str()) {
                    errors.push(ManifestError::field(
                        self,
                        "spec.ringAddress",
                        "must differ from spec.address (the control plane listens there)",
                    ));
                }
            }
            Spec::Model(s) => s.source.check(self, &mut errors),
            Spec::Pipeline(s) => check_pipeline(self, s, &mut errors),
            Spec::Endpoint(s) => {
                if s.port == 0 {
                    errors.push(ManifestError::field(
                        self,
                        "spec.port",
                        "port 0 is not a port clients can reach: give 1-65535",
                    ));
                }
                if let Some(n) = &s.served_model_name
                    && n.trim().is_empty()
                {
                    errors.push(ManifestError::field(
                        self,
                        "spec.servedModelName",
                        "is empty",
                    ));
                }
                for (i, k) in s.api_keys.iter().enumerate() {
                    if k.trim().is_empty() {
                        errors.push(ManifestError::field(
                            self,
                            &format!("spec.apiKeys[{i}]"),
                            "is empty",
                        ));
                    }
                }
            }
        }
        errors
    }
}

fn check_pipeline(object: &Object, s: &PipelineSpec, errors: &mut Vec<ManifestError>) {
    match (&s.stages, s.placement) {
        (Some(_), Some(_)) => errors.push(ManifestError::field(
            object,
            "spec.placement",
            "give either `stages` or `placement: auto`, not both",
        )),
        (None, None) => errors.push(ManifestError::field(
            object,
            "spec.stages",
            "missing: list the stages ({node, layers: \"0-13\"}, ...) or set `placement: auto`",
        )),
        (Some(stages), None) => {
            if stages.is_empty() {
                errors.push(ManifestError::field(
                    object,
                    "spec.stages",
                    "is empty: a pipeline needs at least one stage",
                ));
            } else {
                if s.replicas == Some(Replicas::Auto) {
                    errors.push(ManifestError::field(
                        object,
                        "spec.replicas",
                        "`auto` needs `placement: auto`: with listed stages, give the number of replicas they make",
                    ));
                }
                let replicas = s.replica_count().unwrap_or(1).max(1);
                // Which replica runs each node: one contiguous range per node, replicas apart.
                let mut owner: BTreeMap<&str, usize> = BTreeMap::new();
                for (i, st) in stages.iter().enumerate() {
                    let r = st.replica.unwrap_or(0);
                    if r >= replicas {
                        errors.push(ManifestError::field(
                            object,
                            &format!("spec.stages[{i}].replica"),
                            format!(
                                "is {r} but the pipeline has {replicas} replica(s) (spec.replicas), numbered from 0"
                            ),
                        ));
                        continue;
                    }
                    match owner.insert(st.node.as_str(), r) {
                        Some(other) if other == r => errors.push(ManifestError::field(
                            object,
                            &format!("spec.stages[{i}].node"),
                            format!(
                                "node {:?} already runs another stage of this {}: give each node one contiguous range",
                                st.node,
                                if replicas > 1 { "replica" } else { "pipeline" }
                            ),
                        )),
                        Some(other) => errors.push(ManifestError::field(
                            object,
                            &format!("spec.stages[{i}].node"),
                            format!(
                                "node {} already runs a stage of replica {other}: replicas run on nodes apart, so that losing one node leaves the others serving",
                                st.node
                            ),
                        )),
                        None => {}
                    }
                }
                for r in 0..replicas {
                    let ring: Vec<usize> = (0..stages.len())
                        .filter(|&i| stages[i].replica.unwrap_or(0) == r)
                        .collect();
                    if ring.is_empty() {
                        errors.push(ManifestError::field(
                            object,
                            "spec.stages",
                            format!(
                                "replica {r} has no stages: give each of the {replicas} replicas its stages, with `replica: {r}` on its entries"
                            ),
                        ));
                        continue;
                    }
                    // The model's layer count is checked later; here: in order, no gap, no
                    // overlap.
                    let ranges: Vec<LayerRange> = ring.iter().map(|&i| stages[i].layers).collect();
                    let end = ranges.iter().map(|r| r.last + 1).max().unwrap_or(0);
                    if let Err(e) = LayerSplit::new(ranges, end) {
                        errors.push(ring_split_error(
                            object,
                            &e,
                            &ring,
                            (replicas > 1).then_some(r),
                        ));
                    }
                }
            }
            if !s.nodes.is_empty() {
                errors.push(ManifestError::field(
                    object,
                    "spec.nodes",
                    "only means something with `placement: auto`",
                ));
            }
        }
        (None, Some(Placement::Auto)) => {}
    }
    if s.replicas == Some(Replicas::Count(0)) {
        errors.push(ManifestError::field(
            object,
            "spec.replicas",
            "must be at least 1, got 0",
        ));
    }
    if let Some(after) = s.failover.as_ref().and_then(|f| f.replace_after)
        && after < std::time::Duration::from_secs(1)
    {
        errors.push(ManifestError::field(
            object,
            "spec.failover.replaceAfter",
            format!(
                "is {} but must be at least 1s: a node that misses a heartbeat or two is not gone",
                crate::duration::format(after)
            ),
        ));
    }
    if s.max_sequences == Some(0) {
        errors.push(ManifestError::field(
            object,
            "spec.maxSequences",
            "must be at least 1",
        ));
    }
    if s.prefill_chunk == Some(0) {
        errors.push(ManifestError::field(
            object,
            "spec.prefillChunk",
            "must be at least 1",
        ));
    }
}

/// A split error of one replica's ring, whose stage `k` is `spec.stages[ring[k]]`, as one that
/// names the stage's field; the message names the replica when the pipeline has several.
pub fn ring_split_error(
    object: &Object,
    e: &crate::LayerRangeError,
    ring: &[usize],
    replica: Option<usize>,
) -> ManifestError {
    let path = match e {
        crate::LayerRangeError::NotContiguous { index, .. } => {
            format!("spec.stages[{}].layers", ring.get(*index).unwrap_or(index))
        }
        _ => "spec.stages".to_string(),
    };
    let message = match replica {
        Some(r) => format!("replica {r}: {e}"),
        None => e.to_string(),
    };
    ManifestError::field(object, &path, message)
}

/// Names are DNS labels, as in Kubernetes: they appear in URLs, file names and log lines.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > 63 {
        return Err(format!("{name:?} is longer than 63 characters"));
    }
    if !name.chars().all(ok_char) || name.starts_with(['-', '.']) || name.ends_with(['-', '.']) {
        return Err(format!(
            "{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Splits `host:port` (`[::1]:80` for IPv6), refusing an empty host or a port outside 1-65535.
pub fn split_host_port(address: &str) -> Result<(&str, u16), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "{address:?} is not host:port (for example 192.168.5.1:7070)"
        ));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{address:?} has no host"));
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok((host, p as u16)),
        _ => Err(format!(
            "{address:?} has port {port:?}, which is not a port number (1-65535)"
        )),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses a file or request body: one or more YAML documents separated by `---` (JSON is YAML
/// too, and a JSON array or a `List` of `items` is taken as several objects). Empty documents
/// are skipped. Returns every error found, each placed in its document.
pub fn parse_manifests(text: &str) -> Result<Vec<Object>, Vec<ManifestError>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let mut number = 0;
    for doc in serde_yaml::Deserializer::from_str(text) {
        number += 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                let location = e.location();
                let message = e.to_string();
                // serde_yaml appends " at line L column C"; the fields carry that already.
                let message = match message.find(" at line ") {
                    Some(i) if location.is_some() => message[..i].to_string(),
                    _ => message,
                };
                errors.push(ManifestError {
                    document: Some(number),
                    line: location.as_ref().map(|l| l.line()),
                    column: location.as_ref().map(|l| l.column()),
                    ..ManifestError::new(format!("YAML syntax: {message}"))
                });
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        };
        let items: Vec<serde_yaml::Value> = match value {
            serde_yaml::Value::Null => continue,
            serde_yaml::Value::Sequence(items) => items,
            serde_yaml::Value::Mapping(ref m)
                if m.get("kind").and_then(|k| k.as_str()) == Some("List") =>
            {
                match m.get("items") {
                    Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                    _ => {
                        errors.push(ManifestError {
                            document: Some(number),
                            path: Some("items".into()),
                            ..ManifestError::new("a List needs a sequence of `items`")
                        });
                        continue;
                    }
                }
            }
            other => vec![other],
        };
        for item in items {
            match Object::from_value(item) {
                Ok(o) => {
                    let found = o.check();
                    if found.is_empty() {
                        objects.push(o);
                    } else {
                        errors.extend(found.into_iter().map(|e| e.in_document(number)));
                    }
                }
                Err(e) => errors.push(e.in_document(number)),
            }
        }
    }
    if errors.is_empty() {
        if objects.is_empty() {
            return Err(vec![ManifestError::new(
                "no objects: the input holds no manifest documents",
            )]);
        }
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// Checks references among `objects` being applied and those already stored (`stored`, which
/// the applied ones replace by kind and name): the model and nodes of each pipeline, the
/// pipeline and node of each endpoint, ports used twice on one node, and duplicates within
/// the apply.
pub fn check_references(objects: &[Object], stored: &[Object]) -> Vec<ManifestError> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for o in objects {
        if !seen.insert((o.kind, o.name().to_string())) {
            errors.push(ManifestError::object(
                o,
                "appears twice in this apply: give each object once",
            ));
        }
    }
    let mut all: BTreeMap<(Kind, String), &Object> = stored
        .iter()
        .map(|o| ((o.kind, o.name().to_string()), o))
        .collect();
    for o in objects {
        all.insert((o.kind, o.name().to_string()), o);
    }
    let has = |kind: Kind, name: &str| all.contains_key(&(kind, name.to_string()));
    // Each node's address and each (node, port) of an endpoint looked up once, not compared
    // with every other object: 50,000 nodes in one apply took 15 s pairwise, under the
    // store's write lock.
    let mut by_address: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for o in all.values() {
        if let Some(n) = o.as_node() {
            by_address
                .entry(n.address.as_str())
                .or_default()
                .push(o.name());
        }
    }
    let missing = |kind: Kind, name: &str| {
        format!("{kind} {name:?} does not exist: apply it first or in the same file")
    };
    for o in objects {
        match &o.spec {
            Spec::Pipeline(p) => {
                if !has(Kind::Model, &p.model) {
                    errors.push(ManifestError::field(
                        o,
                        "spec.model",
                        missing(Kind::Model, &p.model),
                    ));
                }
                for (i, st) in p.stages.iter().flatten().enumerate() {
                    if !has(Kind::Node, &st.node) {
                        errors.push(ManifestError::field(
                            o,
                            &format!("spec.stages[{i}].node"),
                            missing(Kind::Node, &st.node),
                        ));
                    }
                }
                for (i, n) in p.nodes.iter().enumerate() {
                    if !has(Kind::Node, n) {
                        errors.push(ManifestError::field(
                            o,
                            &format!("spec.nodes[{i}]"),
                            missing(Kind::Node, n),
                        ));
                    }
                }
            }
            Spec::Endpoint(e) => {
                if !has(Kind::Pipeline, &e.pipeline) {
                    errors.push(ManifestError::field(
                        o,
                        "spec.pipeline",
                        missing(Kind::Pipeline, &e.pipeline),
                    ));
                }
                if let Some(n) = &e.node
                    && !has(Kind::Node, n)
                {
                    errors.push(ManifestError::field(o, "spec.node", missing(Kind::Node, n)));
                }
            }
            Spec::Node(n) => {
                for other in by_address.get(n.address.as_str()).into_iter().flatten() {
                    if *other != o.name() {
                        errors.push(ManifestError::field(
                            o,
                            "spec.address",
                            format!("{} is already the address of node {other}", n.address),
                        ));
                    }
                }
            }
            Spec::Model(_) => {}
        }
    }
    // Ports: two endpoints on one node cannot share a port. An endpoint's node defaults to its
    // pipeline's first stage, known here only for explicit stages.
    let endpoint_node = |e: &EndpointSpec| -> Option<String> {
        e.node.clone().or_else(|| {
            all.get(&(Kind::Pipeline, e.pipeline.clone()))
                .and_then(|p| p.as_pipeline())
                .and_then(|p| p.stages.as_ref())
                .and_then(|s| s.first())
                .map(|s| s.node.clone())
        })
    };
    let mut by_port: BTreeMap<(String, u16), Vec<&str>> = BTreeMap::new();
    for other in all.values() {
        if let Some(oe) = other.as_endpoint()
            && let Some(node) = endpoint_node(oe)
        {
            by_port
                .entry((node, oe.port))
                .or_default()
                .push(other.name());
        }
    }
    for o in objects {
        let Some(e) = o.as_endpoint() else { continue };
        let Some(node) = endpoint_node(e) else {
            continue;
        };
        for other in by_port.get(&(node.clone(), e.port)).into_iter().flatten() {
            if *other != o.name() {
                errors.push(ManifestError::field(
                    o,
                    "spec.port",
                    format!(
                        "port {} on node {node} is already taken by endpoint {other}",
                        e.port
                    ),
                ));
            }
        }
    }
    errors
}

/// Objects that refer to `(kind, name)`: a model's pipelines, a pipeline's endpoints, a node's
/// pipelines and endpoints. Deleting a referenced object is refused while these exist.
pub fn referrers<'a>(kind: Kind, name: &str, objects: &'a [Object]) -> Vec<&'a Object> {
    objects
        .iter()
        .filter(|o| match (&o.spec, kind) {
            (Spec::Pipeline(p), Kind::Model) => p.model == name,
            (Spec::Pipeline(p), Kind::Node) => {
                p.stages.iter().flatten().any(|s| s.node == name)
                    || p.nodes.iter().any(|n| n == name)
            }
            (Spec::Endpoint(e), Kind::Pipeline) => e.pipeline == name,
            (Spec::Endpoint(e), Kind::Node) => e.node.as_deref() == Some(name),
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: mini1}
spec: {address: 192.168.5.1:7070}
---
apiVersion: v1
kind: Node
metadata: {name: mini2}
spec: {address: 192.168.5.2:7070}
---
apiVersion: v1
kind: Model
metadata: {name: qwen3-1.7b}
spec:
  source: {path: /Users/me/models/Qwen3-1.7B}
  dtype: bf16
---
apiVersion: v1
kind: Pipeline
metadata: {name: qwen}
spec:
  model: qwen3-1.7b
  device: metal
  stages:
    - {node: mini1, layers: "0-13"}
    - {node: mini2, layers: "14-27"}
---
apiVersion: v1
kind: Endpoint
metadata: {name: qwen-api}
spec: {pipeline: qwen, node: mini1, port: 8000, servedModelName: qwen3-1.7b}
"#;

    fn one_error(text: &str) -> ManifestError {
        let errors = parse_manifests(text).expect_err("should be refused");
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().expect("one error")
    }

    #[test]
    fn the_design_example_parses_and_its_references_hold() {
        let objects = parse_manifests(GOOD).expect("parses");
        assert_eq!(objects.len(), 5);
        let p = objects[3].as_pipeline().expect("pipeline");
        assert_eq!(p.stages.as_ref().map(Vec::len), Some(2));
        assert_eq!(p.device, DeviceKind::Metal);
        assert!(check_references(&objects, &[]).is_empty());
        assert_eq!(
            objects[0].as_node().map(|n| n.ring_address()),
            Some("192.168.5.1:7071".to_string())
        );
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = one_error("apiVersion: v1\nkind: Node\nmetadata: {name: a\nspec: {}\n");
        assert_eq!(e.document, Some(1));
        assert!(e.line.is_some() && e.column.is_some(), "{e:?}");
        assert!(e.to_string().contains("YAML syntax"), "{e}");
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        let text = GOOD.replace("device: metal", "device: metal\n  replica: 2");
        let e = one_error(&text);
        assert_eq!(e.document, Some(4));
        assert_eq!(e.object.as_deref(), Some("Pipeline qwen"));
        assert!(e.message.contains("unknown field `replica`"), "{e}");
        let text = GOOD.replace("layers: \"14-27\"", "layers: \"14-27\", gpu: 1");
        let e = one_error(&text);
        assert_eq!(e.path.as_deref(), Some("spec.stages[1].gpu"), "{e}");
    }

    #[test]
    fn overlapping_ranges_name_the_stage() {
        let e = one_error(&GOOD.replace("\"14-27\"", "\"13-27\""));
        assert_eq!(e.path.as_deref(), Some("spec.stages[1].layers"), "{e}");
        assert!(e.message.contains("should start at layer 14"), "{e}");
    }

    #[test]
    fn ports_names_and_addresses_are_checked() {
        let e = one_error(&GOOD.replace("port: 8000", "port: 70000"));
        assert_eq!(e.path.as_deref(), Some("spec.port"), "{e}");
        let e = one_error(&GOOD.replace("port: 8000", "port: 0"));
        assert!(e.message.contains("port 0"), "{e}");
        let e = one_error(&GOOD.replace("name: mini2", "name: Mini_2"));
        assert_eq!(e.path.as_deref(), Some("metadata.name"), "{e}");
        let e = one_error(&GOOD.replace("192.168.5.2:7070", "192.168.5.2"));
        assert_eq!(e.path.as_deref(), Some("spec.address"), "{e}");
    }

    #[test]
    fn model_sources_are_one_of_path_hub_and_url_and_are_checked() {
        let with = |source: &str| GOOD.replace("{path: /Users/me/models/Qwen3-1.7B}", source);
        let objects = parse_manifests(&with("{hf: {repo: Qwen/Qwen3-1.7B}}")).expect("parses");
        let m = objects[2].as_model().expect("model");
        assert_eq!(m.source.describe(), "hf://Qwen/Qwen3-1.7B@main");
        assert!(m.source.is_remote());
        parse_manifests(&with(
            "{hf: {repo: unsloth/Qwen3-1.7B-GGUF, revision: v1, files: [Qwen3-1.7B-Q4_K_M.gguf]}}",
        ))
        .expect("parses");
        parse_manifests(&with("{url: \"https://example.com/m/model.gguf\"}")).expect("parses");
        for (source, path, says) in [
            ("{}", "spec.source", "exactly one of"),
            (
                "{path: /m, url: \"http://h/m.gguf\"}",
                "spec.source",
                "exactly one of",
            ),
            (
                "{url: \"ftp://h/m.gguf\"}",
                "spec.source.url",
                "not an http",
            ),
            (
                "{url: \"http://h/m.bin\"}",
                "spec.source.url",
                ".gguf or .safetensors",
            ),
            (
                "{hf: {repo: just-a-name}}",
                "spec.source.hf.repo",
                "owner/name",
            ),
            ("{hf: {repo: a/../b}}", "spec.source.hf.repo", "owner/name"),
            (
                "{hf: {repo: a/b, files: [../x]}}",
                "spec.source.hf.files[0]",
                "within the repository",
            ),
            (
                "{hf: {repo: a/b, files: [x.gguf, y.gguf]}}",
                "spec.source.hf.files",
                "more than one",
            ),
            (
                "{hf: {repo: a/b, endpoint: mirror}}",
                "spec.source.hf.endpoint",
                "not an http",
            ),
            (
                "{hf: {repo: a/b, token: x}}",
                "spec.source.hf.token",
                "unknown field",
            ),
        ] {
            let e = one_error(&with(source));
            assert_eq!(e.path.as_deref(), Some(path), "{source}: {e}");
            assert!(e.message.contains(says), "{source}: {e}");
        }
    }

    #[test]
    fn references_must_exist() {
        let objects = parse_manifests(&GOOD.replace("node: mini2", "node: mini3")).expect("parses");
        let errors = check_references(&objects, &[]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0]
                .to_string()
                .contains("Node \"mini3\" does not exist")
        );
        assert!(referrers(Kind::Model, "qwen3-1.7b", &objects).len() == 1);
    }

    #[test]
    fn an_address_or_a_port_taken_twice_is_found_among_thousands_of_objects() {
        // Twenty thousand nodes, as a large apply might hold, one of them given n17's address.
        let mut text: String = (0..20_000)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: n{i}}}\nspec: {{address: 10.0.{}.{}:7070}}\n---\n",
                    i / 256,
                    i % 256
                )
            })
            .collect();
        text.push_str(
            "apiVersion: v1\nkind: Node\nmetadata: {name: late}\nspec: {address: 10.0.0.17:7070}\n",
        );
        let objects = parse_manifests(&text).expect("parses");
        let errors: Vec<String> = check_references(&objects, &[])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors.iter().any(|e| e.contains("n17")
                && e.contains("spec.address")
                && e.contains("already the address of node late")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("late") && e.contains("already the address of node n17")),
            "{errors:?}"
        );
        // A stored endpoint and an applied one on one node's port; another port is free.
        let stored = parse_manifests(GOOD).expect("parses");
        let second = |port: u16| {
            parse_manifests(&format!(
                "{GOOD}---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: other-api}}\nspec: {{pipeline: qwen, node: mini1, port: {port}}}\n"
            ))
            .expect("parses")
            .split_off(5)
        };
        let errors = check_references(&second(8000), &stored);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0]
                .to_string()
                .contains("port 8000 on node mini1 is already taken by endpoint qwen-api"),
            "{errors:?}"
        );
        assert!(check_references(&second(8001), &stored).is_empty());
    }
}
