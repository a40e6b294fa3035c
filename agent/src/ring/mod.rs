//! The pipeline ring: hidden states flow from stage to stage over TCP, the last stage samples,
//! and the token travels back to stage 0, which runs the generation loop. Many sequences are in
//! flight at once; each stage computes whichever sequence's frame arrives next.
//!
//! # Layout
//!
//! - [`frame`]: the wire format (magic, version, size cap, header, raw tensor bytes).
//! - [`handshake`]: HMAC challenge proving both ends know the cluster token.
//! - [`compute`]: the compute thread that owns a stage's work, fed by a bounded queue and by
//!   the predecessor's frames, which it reads itself.
//! - [`inbound`]: the predecessor's connection as the compute thread reads it, and its sleep.
//! - [`head`]: stage 0's generation loop: admission, chunked prefill, stop conditions, events.
//! - [`health`]: liveness apart from work: pass clocks, heartbeats, the ring's verdict.
//! - [`links`]: the link thread: heartbeats back to the predecessor, the successor's read.
//! - [`watch`]: stage 0's watch: the verdict, the warm-up, failing a broken ring's sequences.
//! - [`link`]: the writing end of a link, written straight from the compute thread.
//! - [`node`]: a stage process: listener, connector with backoff, probes, failure handling.
//! - [`http`]: stage 0's HTTP API for callers (`POST /generate`, `GET /health`).

pub(crate) mod compute;
pub mod frame;
pub mod handshake;
pub(crate) mod head;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod hush;
pub(crate) mod inbound;
pub(crate) mod link;
pub(crate) mod links;
pub(crate) mod node;
pub(crate) mod watch;

pub use node::{Inbound, LoadProgress, NodeOptions, RingMux, RingNode};
