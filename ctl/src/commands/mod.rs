//! One file per verb.

pub mod apply;
pub mod bench;
pub mod chat;
pub mod config;
pub mod delete;
pub mod describe;
pub mod drain;
pub mod events;
pub mod get;
pub mod nodes;
pub mod validate;

use anyhow::Result;
use cluster_api::cluster::ErrorBody;

use crate::client::CallError;

/// Turns a refused call into an error whose text lists the server's problems one per line,
/// with `label_of` naming the file each object came from.
pub fn refused(e: CallError, label_of: &dyn Fn(&str) -> Option<String>) -> anyhow::Error {
    match &e {
        CallError::Refused {
            body: Some(ErrorBody { error }),
            ..
        } if !error.details.is_empty() => {
            let lines: Vec<String> = error
                .details
                .iter()
                .map(|d| {
                    let mut d = d.clone();
                    // Documents were renumbered when sent; the object and file place it.
                    d.document = None;
                    match d.object.as_deref().and_then(label_of) {
                        Some(file) => format!("{file}: {d}"),
                        None => d.to_string(),
                    }
                })
                .collect();
            anyhow::anyhow!(
                "the server refused the apply ({}); nothing was changed:\n{}",
                error.code,
                lines.join("\n")
            )
        }
        _ => anyhow::Error::new(e),
    }
}

/// The plural, lowercase name of a kind as `get` prints it: `pipeline/qwen`.
pub fn slug(kind: &str, name: &str) -> String {
    format!("{}/{name}", kind.to_ascii_lowercase())
}

/// Result alias.
pub type Outcome = Result<()>;
