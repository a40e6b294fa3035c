//! `clusterctl drain NODE` and `clusterctl uncordon NODE`, as kubectl's: a drained node is
//! marked `spec.unschedulable`, automatic placement moves the stages it had placed there to
//! other nodes (streams on them go on at another replica, or end as they would if the node
//! died), and puts nothing new there until it is uncordoned. Stages a pipeline lists by hand
//! stay: drain names those pipelines.

use std::time::{Duration, Instant};

use clap::Args;
use cluster_api::cluster::{ApplyReply, ObjectList, Phase};
use cluster_api::manifest::{Object, Placement, Spec};

use super::{Outcome, slug};
use crate::Env;

/// Flags of `drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The node.
    pub node: String,
    /// Seconds to wait for automatically placed stages to leave it and serve elsewhere.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// Flags of `uncordon`.
#[derive(Debug, Args)]
pub struct UncordonArgs {
    /// The node.
    pub node: String,
}

/// Sets `spec.unschedulable` of `node`, based on its stored version (a concurrent change is
/// refused rather than overwritten).
fn mark(env: &Env, node: &str, unschedulable: bool) -> anyhow::Result<bool> {
    let client = env.client()?;
    let mut object: Object = client.get(&format!("/api/v1/nodes/{node}"))?;
    let Spec::Node(spec) = &mut object.spec else {
        anyhow::bail!("node/{node}: the agent answered with another kind");
    };
    if spec.unschedulable == unschedulable {
        return Ok(false);
    }
    spec.unschedulable = unschedulable;
    object.status = None;
    let body = serde_json::to_string(&object)?;
    let _: ApplyReply = client.post_text("/api/v1/apply", &body)?;
    Ok(true)
}

/// Runs `drain`.
pub fn drain(env: &Env, args: DrainArgs) -> Outcome {
    let node = &args.node;
    if mark(env, node, true)? {
        println!("node/{node} cordoned: placement puts nothing new on it");
    } else {
        println!("node/{node} already cordoned");
    }
    let client = env.client()?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut said_listed = Vec::new();
    // Pipelines seen with a stage on the node, until they serve without it.
    let mut moving: Vec<String> = Vec::new();
    loop {
        let pipelines = client.get::<ObjectList>("/api/v1/pipelines")?.items;
        let mut waiting = Vec::new();
        for p in &pipelines {
            let Some(spec) = p.as_pipeline() else {
                continue;
            };
            let status = p.pipeline_status();
            let stages = status.map(|s| &s.stages[..]).unwrap_or_default();
            let here = stages.iter().any(|s| &s.node == node);
            let name = p.name().to_string();
            if spec.placement != Some(Placement::Auto) {
                if here && !said_listed.contains(&name) {
                    println!(
                        "{} lists node {node} in its stages: it stays there until its stages change",
                        slug("Pipeline", &name)
                    );
                    said_listed.push(name);
                }
                continue;
            }
            let ready = status.is_some_and(|s| s.phase == Phase::Ready);
            if here && !moving.contains(&name) {
                moving.push(name.clone());
            }
            if !moving.contains(&name) {
                continue;
            }
            if here || !ready {
                waiting.push(format!(
                    "{} ({})",
                    slug("Pipeline", &name),
                    if here {
                        format!("still has a stage on {node}")
                    } else {
                        status.map_or("no status".to_string(), |s| s.phase.to_string())
                    }
                ));
            } else {
                let placed: Vec<String> = stages
                    .iter()
                    .map(|s| format!("{}:{}", s.node, s.layers))
                    .collect();
                println!(
                    "{} serves from {}",
                    slug("Pipeline", &name),
                    placed.join(",")
                );
                moving.retain(|m| m != &name);
            }
        }
        if waiting.is_empty() {
            println!("node/{node} drained");
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "node/{node} is cordoned, but after {} s: {}",
                args.timeout,
                waiting.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `uncordon`.
pub fn uncordon(env: &Env, args: UncordonArgs) -> Outcome {
    let node = &args.node;
    if mark(env, node, false)? {
        println!("node/{node} uncordoned: later placements may use it again");
    } else {
        println!("node/{node} was not cordoned");
    }
    Ok(())
}
