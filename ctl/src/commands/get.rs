//! `clusterctl get KIND [NAME] [-o wide|yaml|json]`: kubectl-like tables.

use clap::Args;
use cluster_api::manifest::Kind;
use serde_json::{Value, json};

use super::Outcome;
use crate::output::{age, bytes, num, table, text};
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
    let items: Vec<Value> = match &args.name {
        Some(name) => vec![client.get(&format!("/api/v1/{}/{name}", kind.plural()))?],
        None => client
            .get(&format!("/api/v1/{}", kind.plural()))?
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    };
    let whole = if args.name.is_some() {
        items.first().cloned().unwrap_or(Value::Null)
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
pub fn render(kind: Kind, items: &[Value], wide: bool) -> String {
    let created = |o: &Value| {
        age(o
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str))
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
            let rows =
                items
                    .iter()
                    .map(|o| {
                        let r = "/status/report";
                        let has_report = o.pointer(r).is_some_and(|v| !v.is_null());
                        let mut row = vec![
                            text(o, "/metadata/name").to_string(),
                            text(o, "/spec/address").to_string(),
                            text(o, "/status/phase").to_string(),
                            if has_report {
                                format!("{}", num(o, &format!("{r}/inventory/cpuThreads")))
                            } else {
                                "-".into()
                            },
                            if has_report {
                                format!(
                                    "{}/{}",
                                    bytes(num(o, &format!("{r}/inventory/memoryAvailableBytes"))
                                        as u64),
                                    bytes(num(o, &format!("{r}/inventory/memoryTotalBytes")) as u64)
                                )
                            } else {
                                "-".into()
                            },
                            o.pointer(&format!("{r}/stages"))
                                .and_then(Value::as_array)
                                .map(|s| s.len().to_string())
                                .unwrap_or_else(|| "-".into()),
                            if has_report {
                                bytes(num(o, &format!("{r}/stageMemoryBytes")) as u64)
                            } else {
                                "-".into()
                            },
                            created(o),
                        ];
                        if wide {
                            row.push(text(o, &format!("{r}/inventory/os")).to_string());
                            row.push(crate::output::gpus(
                                o.pointer(&format!("{r}/inventory/gpus")),
                            ));
                            row.push(text(o, "/status/message").to_string());
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
                    vec![
                        text(o, "/metadata/name").to_string(),
                        o.pointer("/spec/source")
                            .and_then(|s| {
                                serde_json::from_value::<cluster_api::manifest::ModelSource>(
                                    s.clone(),
                                )
                                .ok()
                            })
                            .map(|s| s.describe())
                            .unwrap_or_default(),
                        o.pointer("/spec/dtype")
                            .and_then(Value::as_str)
                            .unwrap_or("checkpoint")
                            .to_string(),
                        o.pointer("/status/pipelines")
                            .and_then(Value::as_array)
                            .map(|p| {
                                p.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
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
                    let stages: Vec<&Value> = o
                        .pointer("/status/stages")
                        .and_then(Value::as_array)
                        .map(|s| s.iter().collect())
                        .unwrap_or_default();
                    let ready = stages
                        .iter()
                        .filter(|s| text(s, "/phase") == "Ready")
                        .count();
                    let mut row = vec![
                        text(o, "/metadata/name").to_string(),
                        text(o, "/spec/model").to_string(),
                        format!("{ready}/{}", stages.len()),
                        text(o, "/status/phase").to_string(),
                        format!("{:.0}%", num(o, "/status/progress")),
                        created(o),
                    ];
                    if wide {
                        row.push(
                            stages
                                .iter()
                                .map(|s| format!("{}:{}", text(s, "/node"), text(s, "/layers")))
                                .collect::<Vec<_>>()
                                .join(","),
                        );
                        row.push(text(o, "/status/message").to_string());
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
                    vec![
                        text(o, "/metadata/name").to_string(),
                        text(o, "/spec/pipeline").to_string(),
                        text(o, "/status/node").to_string(),
                        format!("{}", num(o, "/spec/port")),
                        text(o, "/status/phase").to_string(),
                        text(o, "/status/url").to_string(),
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
