//! The typed configuration a pipeline ring starts from: the stages in order, where each one
//! listens, which layers it holds, and the cluster token that guards the ring's connections.
//!
//! The control plane will build this from manifests; until then it is read from a JSON file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{DeviceKind, LayerRange, LayerSplit, WeightDType};

/// One stage of a ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RingStage {
    /// Name of the node (host) that runs the stage, for messages.
    pub node: String,
    /// `host:port` where the stage accepts its predecessor's connection.
    pub address: String,
    /// Inclusive layer range the stage holds.
    pub layers: LayerRange,
}

/// A pipeline ring: stage 0 embeds and runs the generation loop, the last stage samples, and
/// the token travels back to stage 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RingConfig {
    /// The pipeline's name: every frame carries it, and a connection for another is refused.
    pub pipeline: String,
    /// Bumped whenever the pipeline's placement changes, so stages of an old placement cannot
    /// join a new one.
    #[serde(default)]
    pub generation: u64,
    /// The model folder, read on every stage's host.
    pub model: PathBuf,
    /// Where the model's files come from when they are fetched (hub or URL): `model` is then
    /// their place in this node's cache, and a stage fetches its own bytes there before loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<crate::manifest::ModelSource>,
    /// Device of every stage.
    #[serde(default)]
    pub device: DeviceKind,
    /// Weight precision; absent takes the checkpoint's.
    #[serde(default)]
    pub dtype: Option<WeightDType>,
    /// Prompt tokens per prefill chunk: smaller chunks overlap stages sooner on long prompts.
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
    /// Sequences admitted at once; more are refused until one ends.
    #[serde(default = "default_max_sequences")]
    pub max_sequences: usize,
    /// A request whose first token has not come after this many milliseconds fails with an
    /// error saying so; absent, requests wait as long as the ring makes progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_timeout_ms: Option<u64>,
    /// The cluster token. Never sent on the wire: connections prove they know it by HMAC.
    #[serde(default)]
    pub token: String,
    /// The stages in ring order.
    pub stages: Vec<RingStage>,
}

fn default_prefill_chunk() -> usize {
    128
}

fn default_max_sequences() -> usize {
    64
}

impl RingConfig {
    /// Checks the ring against a model with `layers` layers: at least one stage, ranges that
    /// cover every layer once, a positive chunk and sequence limit, a non-empty token.
    pub fn validate(&self, layers: usize) -> Result<(), String> {
        let ranges: Vec<LayerRange> = self.stages.iter().map(|s| s.layers).collect();
        LayerSplit::new(ranges, layers).map_err(|e| format!("pipeline {}: {e}", self.pipeline))?;
        if self.prefill_chunk == 0 {
            return Err(format!(
                "pipeline {}: prefillChunk must be at least 1",
                self.pipeline
            ));
        }
        if self.max_sequences == 0 {
            return Err(format!(
                "pipeline {}: maxSequences must be at least 1",
                self.pipeline
            ));
        }
        if self.token.is_empty() {
            return Err(format!(
                "pipeline {}: the cluster token is empty",
                self.pipeline
            ));
        }
        Ok(())
    }

    /// Name of stage `index`'s node and its address, for messages: `stage 1 (mini2 at 10.0.0.2:7071)`.
    pub fn describe_stage(&self, index: usize) -> String {
        match self.stages.get(index) {
            Some(s) => format!("stage {index} ({} at {})", s.node, s.address),
            None => format!("stage {index}"),
        }
    }

    /// Index of the stage after `index` in the ring.
    pub fn successor(&self, index: usize) -> usize {
        (index + 1) % self.stages.len().max(1)
    }
}
