//! Contexts: saved, listed, switched, and overridden by flags and the environment.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn ctl(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clusterctl"));
    cmd.args(args)
        .env("CLUSTERCTL_CONFIG", config)
        .env_remove("CLUSTERCTL_SERVER")
        .env_remove("CLUSTERCTL_TOKEN")
        .env_remove("CLUSTERCTL_TOKEN_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn contexts_are_saved_switched_and_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sub/config.yaml");
    // Ports nobody listens on: the error names the server each call chose.
    let a = "http://127.0.0.1:9";
    let b = "http://127.0.0.1:19";
    let out = ctl(
        &config,
        &[
            "config",
            "set-context",
            "home",
            "--server",
            a,
            "--token",
            "s3cret",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ctl(
        &config,
        &["config", "set-context", "lab", "--server", b],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = String::from_utf8_lossy(&ctl(&config, &["config", "get-contexts"], &[]).stdout)
        .into_owned();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('*') && l.contains("home")),
        "{listed}"
    );
    let viewed =
        String::from_utf8_lossy(&ctl(&config, &["config", "view"], &[]).stdout).into_owned();
    assert!(
        !viewed.contains("s3cret") && viewed.contains("<hidden>"),
        "{viewed}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    let out = ctl(&config, &["get", "nodes"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the agent at http://127.0.0.1:9 "),
        "{}",
        stderr(&out)
    );
    assert!(
        ctl(&config, &["config", "use-context", "lab"], &[])
            .status
            .success()
    );
    assert!(stderr(&ctl(&config, &["get", "nodes"], &[])).contains("127.0.0.1:19 "));
    let env = ctl(
        &config,
        &["get", "nodes"],
        &[("CLUSTERCTL_SERVER", "127.0.0.1:29")],
    );
    assert!(
        stderr(&env).contains("http://127.0.0.1:29 "),
        "{}",
        stderr(&env)
    );
    let flag = ctl(
        &config,
        &["get", "nodes", "--server", "127.0.0.1:39"],
        &[("CLUSTERCTL_SERVER", "127.0.0.1:29")],
    );
    assert!(
        stderr(&flag).contains("http://127.0.0.1:39 "),
        "{}",
        stderr(&flag)
    );
    let named = ctl(&config, &["get", "nodes", "--context", "home"], &[]);
    assert!(
        stderr(&named).contains("127.0.0.1:9 "),
        "{}",
        stderr(&named)
    );

    let out = ctl(&config, &["config", "use-context", "nope"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = ctl(&config, &["get", "nodes", "--context", "nope"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no context named \"nope\""),
        "{}",
        stderr(&out)
    );
    assert!(
        ctl(&config, &["config", "delete-context", "lab"], &[])
            .status
            .success()
    );
    let listed = String::from_utf8_lossy(&ctl(&config, &["config", "get-contexts"], &[]).stdout)
        .into_owned();
    assert!(!listed.contains("lab"), "{listed}");
}
