//! `clusteragent install`: the plist parses as a property list with the expected keys and
//! values, the unit passes `systemd-analyze verify` where it exists, the files in `launchd/`
//! are what `install` writes, and `uninstall` removes them.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clusteragent"))
        .args(args)
        .output()
        .unwrap()
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

const MINI1: [&str; 12] = [
    "--binary",
    "/usr/local/bin/clusteragent",
    "--name",
    "mini1",
    "--listen",
    "192.168.5.1:7070",
    "--data-dir",
    "/Users/me/clusteragent",
    "--log-dir",
    "/Users/me/Library/Logs/clusteragent",
    "--token-file",
    "/Users/me/clusteragent/cluster-token",
];

#[test]
fn the_plist_is_a_property_list_with_the_expected_keys() {
    let out = agent(
        &[
            &["install", "--launchd", "--user", "--print"][..],
            &MINI1[..],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let committed =
        std::fs::read_to_string(repo().join("launchd/dev.clusteragent.agent.plist")).unwrap();
    assert_eq!(
        text, committed,
        "launchd/dev.clusteragent.agent.plist is out of date"
    );
    // Python's plistlib reads property lists as launchd does.
    let script =
        "import json, plistlib, sys; print(json.dumps(plistlib.loads(sys.stdin.buffer.read())))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(child.stdin.take());
    let parsed = child.wait_with_output().unwrap();
    assert!(parsed.status.success(), "not a property list");
    let v: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(v["Label"], "dev.clusteragent.agent");
    assert_eq!(v["RunAtLoad"], true);
    assert_eq!(v["KeepAlive"], true);
    assert_eq!(v["ThrottleInterval"], 10);
    assert_eq!(
        v["StandardErrorPath"],
        "/Users/me/Library/Logs/clusteragent/agent.log"
    );
    assert_eq!(v["EnvironmentVariables"]["RUST_LOG"], "info");
    assert_eq!(v["WorkingDirectory"], "/Users/me/clusteragent");
    for limits in ["SoftResourceLimits", "HardResourceLimits"] {
        assert_eq!(v[limits]["NumberOfFiles"], 65536, "{limits}");
    }
    let program: Vec<&str> = v["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        program,
        [
            "/usr/local/bin/clusteragent",
            "--name",
            "mini1",
            "--listen",
            "192.168.5.1:7070",
            "--data-dir",
            "/Users/me/clusteragent",
            "--token-file",
            "/Users/me/clusteragent/cluster-token"
        ]
    );
}

#[test]
fn the_unit_is_well_formed_and_the_committed_one_is_current() {
    let out = agent(&[
        "install",
        "--systemd",
        "--print",
        "--binary",
        "/usr/local/bin/clusteragent",
        "--name",
        "linux-gpu",
        "--listen",
        "192.168.1.20:7070",
        "--data-dir",
        "/var/lib/clusteragent",
        "--token-file",
        "/etc/clusteragent/cluster-token",
    ]);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(repo().join("launchd/clusteragent.service")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
    for line in [
        "Restart=always",
        "WantedBy=multi-user.target",
        "ExecStart=/usr/local/bin/clusteragent --name linux-gpu",
    ] {
        assert!(committed.contains(line), "{line}");
    }
    // systemd-analyze checks the unit for real, with a binary that exists.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("clusteragent.service");
    let out = agent(&[
        "install",
        "--systemd",
        "--out",
        unit.to_str().unwrap(),
        "--binary",
        env!("CARGO_BIN_EXE_clusteragent"),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--name",
        "n1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("systemctl enable --now clusteragent.service"),
        "{printed}"
    );
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
    {
        Ok(v) => assert!(
            v.status.success(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&v.stderr)
        ),
        Err(e) => {
            cluster_fixtures::skip(&format!("systemd-analyze is not installed here: {e}"));
        }
    }
    let out = agent(&["uninstall", "--systemd", "--out", unit.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(!unit.exists());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("systemctl disable --now clusteragent.service")
    );
}
