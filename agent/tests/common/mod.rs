//! Helpers the agent's integration test binaries share: each includes this file with
//! `#[path]`, since one test binary cannot depend on another.

// Each binary uses its own subset.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

/// A port nobody listens on right now, and one this test process has not handed out before:
/// the port is released before an agent binds it, and the OS may give a just-released port to
/// the next `bind(0)`, so two clusters started side by side in one test once got the same port
/// (one agent failed to bind, and the other cluster's stages connected to the survivor).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(port)
        {
            return port;
        }
    }
}

/// Writes a random-weight model with the project's own generator:
/// `clusteragent make-model --out DIR ARGS...`.
pub fn make_model(dir: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_clusteragent"))
        .args(["make-model", "--out", dir.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-model {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `python3` can import `module`; under `CI=true` a missing one fails the test.
pub fn python_has(module: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        cluster_fixtures::skip(&format!(
            "python3 with {module} not found (pip install {module})"
        ));
    }
    ok
}
