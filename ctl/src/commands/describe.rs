//! `clusterctl describe KIND NAME`: spec, status, each stage's node, layers and memory, and
//! recent events.

use clap::Args;
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
            let rows: Vec<Vec<String>> = status
                .get("stages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|s| {
                    vec![
                        format!("{}", num(s, "/index")),
                        text(s, "/node").to_string(),
                        text(s, "/layers").to_string(),
                        text(s, "/phase").to_string(),
                        format!("{:.0}%", num(s, "/progress")),
                        bytes(num(s, "/memoryBytes") as u64),
                        bytes(num(s, "/weightBytes") as u64),
                        text(s, "/message").to_string(),
                    ]
                })
                .collect();
            out.push_str("Stages:\n");
            for line in table(
                &[
                    "STAGE", "NODE", "LAYERS", "PHASE", "LOADED", "MEMORY", "WEIGHTS", "MESSAGE",
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
        Kind::Model => {}
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
