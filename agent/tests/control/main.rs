//! End-to-end tests of the control plane: real `clusteragent` daemons on 127.0.0.1, driven
//! with the real `clusterctl` binary, generating through the rings they bring up.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod crash;
mod daemon;
mod harness;
mod hub;
mod invalid;
mod load;
mod openai;
mod partition;
mod placement;
mod real;
mod reference;
mod replicas;
mod seed;
mod slow;
mod soak;
