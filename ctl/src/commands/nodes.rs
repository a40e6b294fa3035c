//! `clusterctl nodes`: the inventory of every node as a table.

use cluster_api::cluster::ObjectList;

use super::Outcome;
use crate::Env;
use crate::output::{bytes, table};

/// Runs `nodes`.
pub fn run(env: &Env) -> Outcome {
    let client = env.client()?;
    let items = client.get::<ObjectList>("/api/v1/nodes")?.items;
    if items.is_empty() {
        eprintln!("No nodes: apply Node manifests first.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|o| {
            let status = o.node_status();
            let report = status.and_then(|s| s.report.as_ref());
            let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
            let inv = report.map(|r| &r.inventory);
            vec![
                o.name().to_string(),
                format!(
                    "{}{}",
                    status.map(|s| s.phase.to_string()).unwrap_or_default(),
                    if o.as_node().is_some_and(|n| n.unschedulable) {
                        ",SchedulingDisabled"
                    } else {
                        ""
                    }
                ),
                or_dash(inv.map(|i| i.cpu_model.clone())),
                or_dash(inv.map(|i| format!("{}/{}", i.cpu_cores, i.cpu_threads))),
                or_dash(inv.map(|i| bytes(i.memory_total_bytes))),
                or_dash(inv.map(|i| bytes(i.memory_available_bytes))),
                or_dash(inv.map(|i| crate::output::gpus(Some(&i.gpus)))),
                or_dash(report.map(|r| bytes(r.stage_memory_bytes))),
                or_dash(inv.map(|i| i.os.clone())),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NAME",
                "STATUS",
                "CPU",
                "CORES/THREADS",
                "MEMORY",
                "AVAILABLE",
                "GPU",
                "STAGE-MEM",
                "OS"
            ],
            &rows
        )
    );
    Ok(())
}
