//! `clusterctl events [--object "Pipeline qwen"]`: what the agent did and saw, oldest first.

use clap::Args;
use cluster_api::cluster::EventList;

use super::Outcome;
use crate::Env;
use crate::client::encode;
use crate::output::table;

/// Flags of `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events about this object: `Pipeline qwen` or `pipeline/qwen`.
    #[arg(long)]
    pub object: Option<String>,
    /// Most events to show.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

/// Runs `events`.
pub fn run(env: &Env, args: EventsArgs) -> Outcome {
    let mut path = format!("/api/v1/events?limit={}", args.limit);
    if let Some(o) = &args.object {
        let object = match o.split_once('/') {
            Some((k, n)) => {
                let kind = cluster_api::manifest::Kind::parse(k).map_err(crate::Usage)?;
                format!("{kind} {n}")
            }
            None => o.clone(),
        };
        path.push_str(&format!("&object={}", encode(&object)));
    }
    let items = env.client()?.get::<EventList>(&path)?.items;
    let rows: Vec<Vec<String>> = items
        .into_iter()
        .map(|e| vec![e.time, e.kind, e.reason, e.object, e.message])
        .collect();
    print!(
        "{}",
        table(&["TIME", "TYPE", "REASON", "OBJECT", "MESSAGE"], &rows)
    );
    Ok(())
}
