//! I/O-free types shared by `clusteragent` and `clusterctl`.
//!
//! Nothing here touches the network, the disk or candle, so `clusterctl` builds without the engine.
//!
//! # Layout
//!
//! - [`layers`]: inclusive layer ranges as people write them (`"0-13"`), and splits of a model into
//!   stages.
//! - [`device`]: the device and weight precision a stage asks for.
//! - [`duration`]: durations as manifests write them (`30s`, `500ms`, `2m`).
//! - [`generation`]: sampling parameters and finish reasons shared by the engine, the ring and the
//!   inference API.
//! - [`ring`]: the typed configuration a pipeline ring starts from.
//! - [`manifest`]: the objects users declare, their parsing and the checks that need no I/O.
//! - [`cluster`]: records, placements, inventories, reports, statuses and REST bodies.

pub mod cluster;
pub mod device;
pub mod duration;
pub mod generation;
pub mod layers;
pub mod manifest;
pub mod ring;

pub use device::{DeviceKind, WeightDType};
pub use generation::{FinishReason, SamplingParams};
pub use layers::{LayerRange, LayerRangeError, LayerSplit};
pub use ring::{RingConfig, RingStage};

/// Deserializes `value` as `T`; the error is the path of the field at fault (`spec.port`) and
/// what is wrong there.
pub(crate) fn deserialize_at<'de, D, T>(value: D) -> Result<T, (String, String)>
where
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
    T: serde::Deserialize<'de>,
{
    serde_path_to_error::deserialize(value)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))
}

/// `1.5 GiB`, `312 MiB`, `4.0 KiB`, `12 B`: sizes as people read them.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
