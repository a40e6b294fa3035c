//! End-to-end tests of the pipeline ring: real `clusteragent stage` processes on 127.0.0.1,
//! driven over HTTP, compared token for token with the one-process engine.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod faults;
mod generation;
mod harness;
mod stalls;
