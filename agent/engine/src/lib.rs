//! The model engine: layer-range stages of Llama, Mistral, Qwen2, Qwen3 and Phi-3 models on candle.
//!
//! A [`Stage`] holds layers `a..=b` of a model (plus the embedding on the first stage and the
//! final norm and LM head on the last), reads only its own tensors from the checkpoint, and keeps
//! one KV cache per sequence. Chaining stages gives exactly the whole model's output; the
//! pipeline ring sends the hidden states between them over the network instead.
//!
//! # Layout
//!
//! - [`family`]: the model families' table: names, tensors, the numerics of their references.
//! - [`config`]: `config.json` as transformers 4 and 5 write it.
//! - [`weights`]: reading chosen tensors from single-file or sharded safetensors.
//! - [`gguf`]: GGUF files: metadata as a config, quantized tensors read one by one.
//! - [`gguf_tokenizer`]: the tokenizers GGUF metadata describes (byte-level BPE with llama.cpp's
//!   pre-tokenizers, SentencePiece), and where generation ends.
//! - [`stage`]: the decoder layers, the KV caches, [`Stage::forward`].
//! - [`matvec`]: decode-step products that read each weight row once for every sequence.
//! - [`qmatvec`]: the same for GGUF's block formats (the 32-value ones, Q4_K and Q6_K), with integer dot
//!   products, from the blocks as stored.
//! - [`rope`]: rotary tables with llama3 and linear scaling.
//! - [`folder`]: a model folder: config, tokenizer, chat template, EOS ids.
//! - [`tokenizer`], [`chat`], [`sampling`]: text in and out, chat templates, next-token choice.
//! - [`device`]: CPU, Metal or CUDA, and the weights' precision.
//! - [`generate`]: generation through stages in one process, the baseline of every benchmark.

pub mod chat;
pub mod config;
pub mod device;
pub mod error;
pub mod family;
pub mod folder;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod matvec;
pub mod qmatvec;
pub mod rope;
pub mod sampling;
pub mod stage;
pub mod tokenizer;
pub mod weights;

pub use candle_core;
pub use config::{Family, ModelConfig};
pub use error::{EngineError, Result};
pub use folder::ModelFolder;
pub use generate::{GenerateOptions, Generation, LoadOptions, LocalPipeline};
pub use stage::{SeqId, Stage, StageInput, StageOutput, StageSpec};
