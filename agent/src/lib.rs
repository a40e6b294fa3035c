//! `clusteragent`: runs a host's share of a model and, later, the cluster's control plane.
//!
//! # Layout
//!
//! - [`cli`]: flags, logging, exit codes; dispatches to one module per subcommand.
//! - [`commands`]: `generate` (one-process generation, the baseline of every pipeline
//!   benchmark), `make-model` (writes a random-weight model to try things with), and
//!   `inspect-stage` (loads one stage and reports its weights and resident memory).
//! - [`ring`]: the pipeline ring: frames, handshake, compute thread, the head's generation
//!   loop, and `clusteragent stage`, which runs one stage of a ring.
//! - [`memory`]: this process's resident memory, for reports.
//! - [`hugepages`]: the global allocator, which asks Linux for huge pages for large buffers
//!   (weights), and the thread count set at startup.
//! - [`daemon`]: the daemon: REST control plane, peers, reconcile loop.
//! - [`endpoint`]: an Endpoint's server: OpenAI routes, metrics, the ring's API.
//! - [`fetch`]: model files fetched from a hub or a URL, each node only its stage's bytes.
//! - [`store`]: the sled store of the cluster's desired state.
//! - [`inventory`]: CPU, memory, OS and GPUs of this host.
//! - [`web`]: what the HTTP servers share: bearer credentials, bodies, signals.

pub mod cli;
pub(crate) mod commands;
pub(crate) mod daemon;
pub(crate) mod endpoint;
pub(crate) mod fetch;
pub(crate) mod hugepages;
pub(crate) mod inventory;
pub(crate) mod memory;
pub mod ring;
pub(crate) mod store;
pub(crate) mod web;
