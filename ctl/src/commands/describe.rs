//! `clusterctl describe KIND NAME`: spec, status, each stage's node, layers and memory, and
//! recent events.

use clap::Args;
use cluster_api::cluster::{EventList, PassStats};
use cluster_api::manifest::{Kind, Object};

use super::Outcome;
use crate::client::encode;
use crate::output::{bytes, table};
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
    let o: Object = client.get(&format!("/api/v1/{}/{}", kind.plural(), args.name))?;
    let meta = &o.metadata;
    let mut out = String::new();
    out.push_str(&format!("Name:        {}\n", meta.name));
    out.push_str(&format!("Kind:        {kind}\n"));
    out.push_str(&format!(
        "UID:         {}\n",
        meta.uid.as_deref().unwrap_or("")
    ));
    out.push_str(&format!(
        "Generation:  {}   Resource version: {}   Written by: {}\n",
        meta.generation,
        meta.resource_version,
        meta.updated_by.as_deref().unwrap_or("")
    ));
    out.push_str(&format!(
        "Created:     {}\n",
        meta.creation_timestamp.as_deref().unwrap_or("")
    ));
    out.push_str("Spec:\n");
    for line in crate::output::yaml(&serde_json::to_value(&o.spec)?).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str("Status:\n");
    let phase = o.status.as_ref().and_then(|s| s.phase());
    out.push_str(&format!(
        "  Phase:     {}\n",
        phase.map(|p| p.to_string()).unwrap_or_default()
    ));
    if let Some(m) = o.status.as_ref().and_then(|s| s.message()) {
        out.push_str(&format!("  Message:   {m}\n"));
    }
    match kind {
        Kind::Pipeline => {
            let status = o.pipeline_status();
            out.push_str(&format!(
                "  Progress:  {:.0}%\n",
                status.map_or(0.0, |s| s.progress)
            ));
            if let Some(p) = status.and_then(|s| s.placement.as_deref()) {
                out.push_str(&format!("  Placement: {p}\n"));
            }
            let replicas = status.map(|s| &s.replicas[..]).unwrap_or_default();
            if !replicas.is_empty() {
                out.push_str("Replicas:\n");
                for r in replicas {
                    out.push_str(&format!(
                        "  {}  head {}  {}{}\n",
                        r.index,
                        r.head,
                        r.phase,
                        r.message
                            .as_ref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ));
                }
            }
            let stages = status.map(|s| &s.stages[..]).unwrap_or_default();
            let rows: Vec<Vec<String>> = stages
                .iter()
                .map(|s| {
                    vec![
                        if replicas.is_empty() {
                            s.index.to_string()
                        } else {
                            format!("{}/{}", s.replica, s.index)
                        },
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
            if let Some(report) = o.node_status().and_then(|s| s.report.as_ref()) {
                let inv = &report.inventory;
                out.push_str(&format!(
                    "  Host:      {} ({})\n  CPU:       {} ({} cores, {} threads)\n  Memory:    {} available of {}\n  Stages:    {} held\n",
                    inv.hostname,
                    inv.os,
                    inv.cpu_model,
                    inv.cpu_cores,
                    inv.cpu_threads,
                    bytes(inv.memory_available_bytes),
                    bytes(inv.memory_total_bytes),
                    bytes(report.stage_memory_bytes),
                ));
                if let Some(huge) = report.huge_page_bytes {
                    // Shown where the agent's OS tells: weights on small pages decode slower.
                    out.push_str(&format!(
                        "  Paging:    {} of the agent's memory in huge pages\n",
                        bytes(huge)
                    ));
                }
                for s in &report.stages {
                    out.push_str(&format!(
                        "    pipeline {} stage {} layers {}: {} {}\n",
                        s.pipeline,
                        s.index,
                        s.layers,
                        s.phase,
                        bytes(s.memory_bytes)
                    ));
                }
            }
        }
        Kind::Endpoint => {
            let status = o.endpoint_status();
            out.push_str(&format!(
                "  Node:      {}\n  URL:       {}\n",
                status.and_then(|s| s.node.as_deref()).unwrap_or(""),
                status.and_then(|s| s.url.as_deref()).unwrap_or("")
            ));
        }
        Kind::Model => {
            let status = o.model_status();
            if let Some(commit) = status.and_then(|s| s.commit.as_deref()) {
                out.push_str(&format!(
                    "  Commit:    {commit} (what the revision named at the last apply; every node fetches it)\n"
                ));
            }
            let files = status.map(|s| &s.files[..]).unwrap_or_default();
            if !files.is_empty() {
                let rows: Vec<Vec<String>> = files
                    .iter()
                    .map(|f| {
                        vec![
                            f.file.clone(),
                            bytes(f.size),
                            f.tensors.to_string(),
                            f.sha256.clone(),
                            if f.verified {
                                "yes".into()
                            } else {
                                "no digest given".into()
                            },
                            f.sealed_by.clone(),
                        ]
                    })
                    .collect();
                out.push_str("Files held whole (digests peers check against):\n");
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
                    out.push_str(&format!("  {line}\n"));
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
        .map(|l: EventList| l.items)
        .unwrap_or_default();
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let rows: Vec<Vec<String>> = events
            .into_iter()
            .map(|e| vec![e.time, e.kind, e.reason, e.node, e.message])
            .collect();
        for line in table(&["TIME", "TYPE", "REASON", "NODE", "MESSAGE"], &rows).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    print!("{out}");
    Ok(())
}
