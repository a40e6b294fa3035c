//! `clusterctl describe KIND NAME`: spec, status, each stage's node, layers and memory, and
//! recent events.

use clap::Args;
use cluster_api::cluster::{PassStats, PipelineStatus};
use cluster_api::manifest::Kind;
use serde_json::Value;

use super::Outcome;
use crate::client::encode;
use crate::output::{bytes, num, table, text};
use crate::{Env, Usage};

/// Flags of `describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Kind of object.
    pub kind: String,
    /// Its name.
    pub name: String,
}

/// A stage's recent passes in a few words: `last 0.41 s, slowest 0.52 s`, and the pass in
/// progress when one has run for a while (a slow stage shows here before anything fails).
fn passes(p: &PassStats) -> String {
    // Tiny models pass in microseconds, big ones in seconds.
    let time = |s: f64| {
        if s < 0.1 {
            format!("{:.2} ms", s * 1e3)
        } else {
            format!("{s:.2} s")
        }
    };
    let mut parts = Vec::new();
    if let Some(last) = p.last_seconds {
        parts.push(format!("last {}", time(last)));
    }
    if let Some(slowest) = p.slowest_recent_seconds {
        parts.push(format!("slowest {}", time(slowest)));
    }
    if let Some(running) = p.running_seconds.filter(|r| *r >= 1.0) {
        parts.push(format!(
            "running {running:.1} s of {:.0} s allowed",
            p.stall_after_seconds
        ));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// Runs `describe`.
pub fn run(env: &Env, args: DescribeArgs) -> Outcome {
    let kind = Kind::parse(&args.kind).map_err(Usage)?;
    let client = env.client()?;
    let o = client.get(&format!("/api/v1/{}/{}", kind.plural(), args.name))?;
    let mut out = String::new();
    out.push_str(&format!("Name:        {}\n", text(&o, "/metadata/name")));
    out.push_str(&format!("Kind:        {kind}\n"));
    out.push_str(&format!("UID:         {}\n", text(&o, "/metadata/uid")));
    out.push_str(&format!(
        "Generation:  {}   Resource version: {}   Written by: {}\n",
        num(&o, "/metadata/generation"),
        num(&o, "/metadata/resourceVersion"),
        text(&o, "/metadata/updatedBy")
    ));
    out.push_str(&format!(
        "Created:     {}\n",
        text(&o, "/metadata/creationTimestamp")
    ));
    out.push_str("Spec:\n");
    for line in crate::output::yaml(o.get("spec").unwrap_or(&Value::Null)).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    let status = o.get("status").cloned().unwrap_or(Value::Null);
    out.push_str("Status:\n");
    out.push_str(&format!("  Phase:     {}\n", text(&status, "/phase")));
    if let Some(m) = status.get("message").and_then(Value::as_str) {
        out.push_str(&format!("  Message:   {m}\n"));
    }
    match kind {
        Kind::Pipeline => {
            out.push_str(&format!("  Progress:  {:.0}%\n", num(&status, "/progress")));
            if let Some(p) = status.get("placement").and_then(Value::as_str) {
                out.push_str(&format!("  Placement: {p}\n"));
            }
            // Read as the agent's own type: a field renamed on one side fails to compile.
            let stages = serde_json::from_value::<PipelineStatus>(status.clone())
                .map(|s| s.stages)
                .unwrap_or_default();
            let rows: Vec<Vec<String>> = stages
                .iter()
                .map(|s| {
                    vec![
                        s.index.to_string(),
                        s.node.clone(),
                        s.layers.to_string(),
                        s.phase.to_string(),
                        format!("{:.0}%", s.progress),
                        bytes(s.memory_bytes),
                        bytes(s.weight_bytes),
                        passes(&s.passes),
                        s.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            out.push_str("Stages:\n");
            for line in table(
                &[
                    "STAGE", "NODE", "LAYERS", "PHASE", "LOADED", "MEMORY", "WEIGHTS", "PASSES",
                    "MESSAGE",
                ],
                &rows,
            )
            .lines()
            {
                out.push_str(&format!("  {line}\n"));
            }
        }
        Kind::Node => {
            if let Some(report) = status.get("report").filter(|r| !r.is_null()) {
                let inv = report.get("inventory").cloned().unwrap_or(Value::Null);
                out.push_str(&format!(
                    "  Host:      {} ({})\n  CPU:       {} ({} cores, {} threads)\n  Memory:    {} available of {}\n  Stages:    {} held\n",
                    text(&inv, "/hostname"),
                    text(&inv, "/os"),
                    text(&inv, "/cpuModel"),
                    num(&inv, "/cpuCores"),
                    num(&inv, "/cpuThreads"),
                    bytes(num(&inv, "/memoryAvailableBytes") as u64),
                    bytes(num(&inv, "/memoryTotalBytes") as u64),
                    bytes(num(report, "/stageMemoryBytes") as u64),
                ));
                if let Some(huge) = report.get("hugePageBytes").and_then(Value::as_u64) {
                    // Shown where the agent's OS tells: weights on small pages decode slower.
                    out.push_str(&format!(
                        "  Paging:    {} of the agent's memory in huge pages\n",
                        bytes(huge)
                    ));
                }
                for s in report
                    .get("stages")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.push_str(&format!(
                        "    pipeline {} stage {} layers {}: {} {}\n",
                        text(s, "/pipeline"),
                        num(s, "/index"),
                        text(s, "/layers"),
                        text(s, "/phase"),
                        bytes(num(s, "/memoryBytes") as u64)
                    ));
                }
            }
        }
        Kind::Endpoint => {
            out.push_str(&format!(
                "  Node:      {}\n  URL:       {}\n",
                text(&status, "/node"),
                text(&status, "/url")
            ));
        }
        Kind::Model => {
            if let Some(commit) = status.get("commit").and_then(Value::as_str) {
                out.push_str(&format!(
                    "  Commit:    {commit} (what the revision named at the last apply; every node fetches it)\n"
                ));
            }
            let files = status
                .get("files")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if !files.is_empty() {
                let rows: Vec<Vec<String>> = files
                    .iter()
                    .map(|f| {
                        vec![
                            text(f, "/file").to_string(),
                            bytes(num(f, "/size") as u64),
                            num(f, "/tensors").to_string(),
                            text(f, "/sha256").to_string(),
                            if f.get("verified").and_then(Value::as_bool) == Some(true) {
                                "yes".into()
                            } else {
                                "no digest given".into()
                            },
                            text(f, "/sealedBy").to_string(),
                        ]
                    })
                    .collect();
                out.push_str(
                    "Files held whole (digests peers check against):
",
                );
                for line in table(
                    &[
                        "FILE",
                        "SIZE",
                        "TENSORS",
                        "SHA256",
                        "SOURCE AGREES",
                        "SEALED BY",
                    ],
                    &rows,
                )
                .lines()
                {
                    out.push_str(&format!(
                        "  {line}
"
                    ));
                }
            }
        }
    }
    let object = format!("{kind} {}", args.name);
    let events = client
        .get(&format!(
            "/api/v1/events?limit=20&object={}",
            encode(&object)
        ))
        .ok()
        .and_then(|v| v.get("items").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let rows: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                vec![
                    text(e, "/time").to_string(),
                    text(e, "/type").to_string(),
                    text(e, "/reason").to_string(),
                    text(e, "/node").to_string(),
                    text(e, "/message").to_string(),
                ]
            })
            .collect();
        for line in table(&["TIME", "TYPE", "REASON", "NODE", "MESSAGE"], &rows).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    print!("{out}");
    Ok(())
}
