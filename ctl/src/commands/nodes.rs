//! `clusterctl nodes`: the inventory of every node as a table.

use serde_json::Value;

use super::Outcome;
use crate::Env;
use crate::output::{bytes, num, table, text};

/// Runs `nodes`.
pub fn run(env: &Env) -> Outcome {
    let client = env.client()?;
    let items = client
        .get("/api/v1/nodes")?
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if items.is_empty() {
        eprintln!("No nodes: apply Node manifests first.");
        return Ok(());
    }
    let r = "/status/report/inventory";
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|o| {
            let known = o.pointer(r).is_some();
            let or_dash = |s: String| if known { s } else { "-".into() };
            vec![
                text(o, "/metadata/name").to_string(),
                text(o, "/status/phase").to_string(),
                or_dash(text(o, &format!("{r}/cpuModel")).to_string()),
                or_dash(format!(
                    "{}/{}",
                    num(o, &format!("{r}/cpuCores")),
                    num(o, &format!("{r}/cpuThreads"))
                )),
                or_dash(bytes(num(o, &format!("{r}/memoryTotalBytes")) as u64)),
                or_dash(bytes(num(o, &format!("{r}/memoryAvailableBytes")) as u64)),
                or_dash(crate::output::gpus(o.pointer(&format!("{r}/gpus")))),
                or_dash(bytes(num(o, "/status/report/stageMemoryBytes") as u64)),
                or_dash(text(o, &format!("{r}/os")).to_string()),
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
