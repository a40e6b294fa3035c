//! Re-placement: a pipeline under `placement: auto` whose node has not been heard from for
//! `spec.failover.replaceAfter`, or was drained, is applied again as it is stored, by the
//! first node that answers (one node acts, so the cluster re-places once). The apply keeps
//! every ring whose nodes still report and places the others over the nodes left; the lost
//! node is used again only by a later placement. A pipeline with listed stages is never moved:
//! it waits, Degraded, naming the node it waits for.

use super::*;

/// Between two attempts for one pipeline, at least this long (an apply reads model headers).
const RETRY: Duration = Duration::from_secs(5);

/// After an attempt that could not move anything, this long: it says so in an event each
/// time, and the cluster's room changes slowly.
const RETRY_UNPLACED: Duration = Duration::from_secs(30);

/// Applies again every pipeline of this cluster's that lost a node long enough ago, when this
/// node is the one to do it.
pub(super) fn replace_lost(agent: &Arc<Agent>) {
    let automatic: Vec<Record> = agent
        .store
        .live(Kind::Pipeline)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            r.placement.is_some()
                && r.object
                    .as_pipeline()
                    .is_some_and(|p| p.placement == Some(cluster_api::manifest::Placement::Auto))
        })
        .collect();
    if automatic.is_empty() {
        return;
    }
    let me = agent.name().to_string();
    let first_alive = agent
        .store
        .live(Kind::Node)
        .unwrap_or_default()
        .iter()
        .map(|r| r.object.name().to_string())
        .filter(|n| agent.silent_for(n).is_none())
        .chain(std::iter::once(me.clone()))
        .min();
    if first_alive.as_deref() != Some(me.as_str()) {
        return;
    }
    for record in automatic {
        let (Some(spec), Some(placement)) = (record.object.as_pipeline(), &record.placement) else {
            continue;
        };
        let after = spec.replace_after();
        let mut lost: Vec<(String, String)> = placement
            .all_stages()
            .filter_map(|s| {
                if !crate::daemon::apply::schedulable(agent, &s.node) {
                    return Some((s.node.clone(), format!("node {} is drained", s.node)));
                }
                let silent = agent.silent_for(&s.node).filter(|d| *d >= after)?;
                Some((
                    s.node.clone(),
                    format!(
                        "node {} has not been heard from for {:.0} s (failover.replaceAfter {})",
                        s.node,
                        silent.as_secs_f64(),
                        cluster_api::duration::format(after)
                    ),
                ))
            })
            .collect();
        lost.dedup_by(|a, b| a.0 == b.0);
        if lost.is_empty() {
            continue;
        }
        let name = record.object.name().to_string();
        {
            let mut next = lock(&agent.runtime.replacing);
            if next.get(&name).is_some_and(|t| Instant::now() < *t) {
                continue;
            }
            next.insert(name.clone(), Instant::now() + RETRY);
        }
        let why = lost
            .into_iter()
            .map(|(_, why)| why)
            .collect::<Vec<_>>()
            .join(", ");
        let object = record.object.clone();
        let agent = agent.clone();
        tokio::task::spawn_blocking(move || {
            let text = match serde_json::to_string(&object) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(pipeline = %name, "cannot write the pipeline to re-place it: {e}");
                    return;
                }
            };
            let subject = format!("Pipeline {name}");
            let later = || {
                lock(&agent.runtime.replacing)
                    .insert(name.clone(), Instant::now() + RETRY_UNPLACED);
            };
            match crate::daemon::apply::apply(&agent, &text, false) {
                Ok(outcomes) => {
                    let changes: Vec<String> = outcomes
                        .iter()
                        .filter(|o| o.kind == Kind::Pipeline && o.name == name)
                        .flat_map(|o| o.changes.clone())
                        .collect();
                    if changes.is_empty() {
                        later();
                        agent.event(
                            &subject,
                            true,
                            "NotReplaced",
                            format!("{why}, but no other placement fits: waiting for it"),
                        );
                    } else {
                        agent.event(
                            &subject,
                            false,
                            "Replaced",
                            format!("{why}: {}", changes.join("; ")),
                        );
                    }
                }
                Err(refused) => {
                    later();
                    agent.event(
                        &subject,
                        true,
                        "NotReplaced",
                        format!(
                            "{why}, but placing it again was refused: {}",
                            crate::daemon::apply::refusal_text(&refused)
                        ),
                    );
                }
            }
        });
    }
}
