//! The engine's typed errors. Each names the file, tensor, field or value at fault.

use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or running a stage.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file a model folder must have is absent.
    #[error("{path}: not found ({what})")]
    MissingFile {
        /// Where it was looked for.
        path: PathBuf,
        /// What the file is for.
        what: String,
    },
    /// A JSON file that does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint, with line and column.
        source: serde_json::Error,
    },
    /// A configuration field that is missing or has a value we cannot use.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// The field, as a dotted path.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// An architecture this engine does not implement.
    #[error("{path}: architecture {name:?} is not supported; supported: {}", supported.join(", "))]
    UnsupportedArchitecture {
        /// The config file naming it.
        path: PathBuf,
        /// The architecture as written.
        name: String,
        /// The architectures we do support.
        supported: Vec<&'static str>,
    },
    /// A safetensors file whose header or layout is broken.
    #[error("{path}: {message}")]
    BadWeights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the stage needs is not in the weights.
    #[error("tensor {name} not found in {place}")]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The file or index that should list it.
        place: PathBuf,
    },
    /// A tensor whose shape differs from what the config implies.
    #[error("{path}: tensor {name} has shape {actual:?}, expected {expected:?} from config.json")]
    TensorShape {
        /// The file holding it.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        actual: Vec<usize>,
    },
    /// A layer range or split that does not fit the model.
    #[error("{0}")]
    Layers(#[from] cluster_api::LayerRangeError),
    /// A sequence that would exceed the model's context length.
    #[error(
        "sequence of {requested} tokens exceeds the model's context length of {limit} tokens (max_position_embeddings)"
    )]
    ContextOverflow {
        /// Tokens the sequence would hold.
        requested: usize,
        /// The model's limit.
        limit: usize,
    },
    /// A stage asked to continue a sequence it does not hold, or at the wrong position.
    #[error("stage {range}: sequence {seq}: {message}")]
    Sequence {
        /// The stage's layers.
        range: cluster_api::LayerRange,
        /// The sequence.
        seq: u64,
        /// What is wrong.
        message: String,
    },
    /// The input given to a stage does not fit it (tokens to a middle stage, say).
    #[error("stage {range}: {message}")]
    StageInput {
        /// The stage's layers.
        range: cluster_api::LayerRange,
        /// What is wrong.
        message: String,
    },
    /// Tokenizer failures, with the file or text concerned.
    #[error("tokenizer {context}: {message}")]
    Tokenizer {
        /// The file or operation.
        context: String,
        /// The tokenizer's complaint.
        message: String,
    },
    /// A chat template that fails to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A device that this build or this machine cannot provide.
    #[error("device {requested}: {message}")]
    Device {
        /// The device asked for.
        requested: String,
        /// Why it is not available.
        message: String,
    },
    /// Invalid request parameters (sampling values, empty prompts).
    #[error("{0}")]
    InvalidRequest(String),
    /// An error inside candle while computing (its backtrace left out: see [`plain`]).
    #[error("compute: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(plain(e))
    }
}

/// `e` without the backtraces candle attaches to its errors where `RUST_BACKTRACE` is set.
/// Its message is shown to users and sent to clients (an API error body): a backtrace there
/// is dozens of lines of source paths around one sentence, and tells a client about the
/// server's build.
pub fn plain(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => plain(*inner),
        Error::Context { inner, context } => Error::Context {
            inner: Box::new(plain(*inner)),
            context,
        },
        Error::WithPath { inner, path } => Error::WithPath {
            inner: Box::new(plain(*inner)),
            path,
        },
        other => other,
    }
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candles_backtraces_stay_out_of_messages() {
        let traced = |inner: candle_core::Error| candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = traced(candle_core::Error::Msg("shape mismatch".into()).with_path("m.gguf"));
        assert!(
            e.to_string().contains("candles_backtraces"),
            "a backtrace to remove"
        );
        let shown = EngineError::from(traced(e.context("loading"))).to_string();
        assert_eq!(shown, "compute: loading\npath: \"m.gguf\" shape mismatch");
    }
}
