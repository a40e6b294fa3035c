//! `clusterctl get KIND [NAME] [-o wide|yaml|json]`: kubectl-like tables.

use clap::Args;
use cluster_api::cluster::{ObjectList, Phase};
use cluster_api::manifest::{Kind, Object};
use serde_json::json;

use super::Outcome;
use crate::output::{age, bytes, table};
use crate::{Env, Usage};

/// Flags of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Kind: nodes, models, pipelines, endpoints (singular and short forms work too).
    pub kind: String,
    /// One object's name.
    pub name: Option<String>,
    /// Output format: wide, yaml or json.
    #[arg(short = 'o', long)]
    pub output: Option<String>,
}

/// Runs `get`.
pub fn run(env: &Env, args: GetArgs) -> Outcome {
    let kind = Kind::parse(&args.kind).map_err(Usage)?;
    let format = args.output.as_deref().unwrap_or("");
    if !matches!(format, "" | "wide" | "yaml" | "json") {
        return Err(Usage(format!("-o {format}: use wide, yaml or json")).into());
    }
    let client = env.client()?;
    let items: Vec<Object> = match &args.name {
        Some(name) => vec![client.get(&format!("/api/v1/{}/{name}", kind.plural()))?],
        None => {
            client
                .get::<ObjectList>(&format!("/api/v1/{}", kind.plural()))?
                .items
        }
    };
    let whole = if args.name.is_some() {
        serde_json::to_value(&items[0])?
    } else {
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    };
    match format {
        "yaml" => print!("{}", crate::output::yaml(&whole)),
        "json" => print!("{}", crate::output::json(&whole)),
        _ => {
            if items.is_empty() {
                eprintln!("No {} found.", kind.plural());
                return Ok(());
            }
            print!("{}", render(kind, &items, format == "wide"));
        }
    }
    Ok(())
}

/// The table for `items` of `kind`.
pub fn render(kind: Kind, items: &[Object], wide: bool) -> String {
    let created = |o: &Object| age(o.metadata.creation_timestamp.as_deref());
    let dash = || "-".to_string();
    let phase = |p: Option<Phase>| p.map(|p| p.to_string()).unwrap_or_default();
    let message = |o: &Object| {
        o.status
            .as_ref()
            .and_then(|s| s.message())
            .unwrap_or("")
            .to_string()
    };
    match kind {
        Kind::Node => {
            let mut headers = vec![
                "NAME",
                "ADDRESS",
                "STATUS",
                "CPUS",
                "MEMORY",
                "STAGES",
                "STAGE-MEM",
                "AGE",
            ];
            if wide {
                headers.extend(["OS", "GPUS", "MESSAGE"]);
            }
            let rows = items
                .iter()
                .map(|o| {
                    let status = o.node_status();
                    let report = status.and_then(|s| s.report.as_ref());
                    let inv = report.map(|r| &r.inventory);
                    let mut row = vec![
                        o.name().to_string(),
                        o.as_node().map(|n| n.address.clone()).unwrap_or_default(),
                        // As kubectl shows a cordoned node.
                        format!(
                            "{}{}",
                            phase(status.map(|s| s.phase)),
                            if o.as_node().is_some_and(|n| n.unschedulable) {
                                ",SchedulingDisabled"
                            } else {
                                ""
                            }
                        ),
                        inv.map_or_else(dash, |i| i.cpu_threads.to_string()),
                        inv.map_or_else(dash, |i| {
                            format!(
                                "{}/{}",
                                bytes(i.memory_available_bytes),
                                bytes(i.memory_total_bytes)
                            )
                        }),
                        report.map_or_else(dash, |r| r.stages.len().to_string()),
                        report.map_or_else(dash, |r| bytes(r.stage_memory_bytes)),
                        created(o),
                    ];
                    if wide {
                        row.push(inv.map(|i| i.os.clone()).unwrap_or_default());
                        row.push(crate::output::gpus(inv.map(|i| &i.gpus[..])));
                        row.push(message(o));
                    }
                    row
                })
                .collect::<Vec<_>>();
            table(&headers, &rows)
        }
        Kind::Model => {
            let rows = items
                .iter()
                .map(|o| {
                    let spec = o.as_model();
                    vec![
                        o.name().to_string(),
                        spec.map(|s| s.source.describe()).unwrap_or_default(),
                        spec.and_then(|s| s.dtype)
                            .map_or_else(|| "checkpoint".to_string(), |d| d.to_string()),
                        o.model_status()
                            .map(|s| s.pipelines.join(","))
                            .unwrap_or_default(),
                        created(o),
                    ]
                })
                .collect::<Vec<_>>();
            table(&["NAME", "PATH", "DTYPE", "PIPELINES", "AGE"], &rows)
        }
        Kind::Pipeline => {
            let mut headers = vec!["NAME", "MODEL", "STAGES", "PHASE", "PROGRESS", "AGE"];
            if wide {
                headers.extend(["PLACEMENT", "MESSAGE"]);
            }
            let rows = items
                .iter()
                .map(|o| {
                    let status = o.pipeline_status();
                    let stages = status.map(|s| &s.stages[..]).unwrap_or_default();
                    let ready = stages.iter().filter(|s| s.phase == Phase::Ready).count();
                    let mut row = vec![
                        o.name().to_string(),
                        o.as_pipeline().map(|p| p.model.clone()).unwrap_or_default(),
                        format!("{ready}/{}", stages.len()),
                        phase(status.map(|s| s.phase)),
                        format!("{:.0}%", status.map_or(0.0, |s| s.progress)),
                        created(o),
                    ];
                    if wide {
                        // Replicas' rings apart: `a:0-5,b:6-11 | c:0-5,d:6-11`.
                        let mut rings: Vec<Vec<String>> = Vec::new();
                        for s in stages {
                            if rings.len() <= s.replica {
                                rings.resize(s.replica + 1, Vec::new());
                            }
                            rings[s.replica].push(format!("{}:{}", s.node, s.layers));
                        }
                        row.push(
                            rings
                                .iter()
                                .map(|r| r.join(","))
                                .collect::<Vec<_>>()
                                .join(" | "),
                        );
                        row.push(message(o));
                    }
                    row
                })
                .collect::<Vec<_>>();
            table(&headers, &rows)
        }
        Kind::Endpoint => {
            let rows = items
                .iter()
                .map(|o| {
                    let status = o.endpoint_status();
                    let spec = o.as_endpoint();
                    vec![
                        o.name().to_string(),
                        spec.map(|e| e.pipeline.clone()).unwrap_or_default(),
                        status.and_then(|s| s.node.clone()).unwrap_or_default(),
                        spec.map(|e| e.port.to_string()).unwrap_or_default(),
                        phase(status.map(|s| s.phase)),
                        status.and_then(|s| s.url.clone()).unwrap_or_default(),
                        created(o),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                &["NAME", "PIPELINE", "NODE", "PORT", "PHASE", "URL", "AGE"],
                &rows,
            )
        }
    }
}
