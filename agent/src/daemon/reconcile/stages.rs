//! Starting a stage this node runs: the model cache made room for it, its ring node started
//! (fetching what it lacks from peers), and the outcome recorded in its slot and the events.

use super::*;

pub(super) async fn load_stage(
    agent: Arc<Agent>,
    name: String,
    want: StageWant,
    progress: Arc<LoadProgress>,
    epoch: u64,
) {
    if let Some(max) = agent.settings.model_cache_max {
        evict_models(&agent, max).await;
    }
    let started = Instant::now();
    // A test hook standing in for a big model's load (seconds from disk): the stage starts
    // loading this many milliseconds late. Unset: no delay.
    if let Some(ms) = std::env::var("CLUSTERAGENT_TEST_LOAD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let result = match crate::ring::node::PassFloor::from_env() {
        Ok(pass_floor) => {
            let options = NodeOptions {
                index: want.index,
                compute_spin: agent.runtime.compute_spin,
                pass_floor,
                peers: fetch_peers(&agent, &want),
            };
            RingNode::start_with(
                want.config.clone(),
                options,
                Inbound::Shared(agent.runtime.mux.clone()),
                Some(progress.clone()),
            )
            .await
        }
        Err(e) => Err(e),
    };
    let notes = std::mem::take(&mut *progress.notes.lock().unwrap_or_else(|e| e.into_inner()));
    for note in notes {
        agent.event(
            &format!("Pipeline {name}"),
            true,
            "FetchTrouble",
            format!("stage {}: {note}", want.index),
        );
    }
    let mut stages = lock(&agent.runtime.stages);
    let current = stages.get_mut(&name).filter(|s| s.epoch == epoch);
    match (result, current) {
        (Ok(node), Some(slot)) => {
            slot.state = StageState::Ready(Arc::new(node));
            slot.attempts = 0;
            drop(stages);
            agent.event(
                &format!("Pipeline {name}"),
                false,
                "Loaded",
                format!(
                    "stage {} loaded in {:.1} s{}",
                    want.index,
                    started.elapsed().as_secs_f64(),
                    match (
                        &want.config.fetch,
                        progress.fetched.load(std::sync::atomic::Ordering::Relaxed)
                    ) {
                        (Some(_), n) if n > 0 => format!(
                            ", after fetching {} of its weights from {}",
                            cluster_api::human_bytes(n),
                            progress
                                .fetched_from
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                        ),
                        (Some(_), _) => ", its weights all in this node's cache".into(),
                        (None, _) => String::new(),
                    }
                ),
            );
        }
        (Ok(node), None) => {
            // Deleted or changed while loading.
            drop(stages);
            node.shutdown();
            lock(&agent.runtime.draining).push(Arc::downgrade(&node.shared.stage));
        }
        (Err(e), Some(slot)) => {
            slot.attempts += 1;
            let wait = backoff(slot.attempts);
            slot.retry_at = Instant::now() + wait;
            let why = format!("{e:#}");
            slot.state = StageState::Failed(why.clone());
            drop(stages);
            agent.event(
                &format!("Pipeline {name}"),
                true,
                "LoadFailed",
                format!(
                    "stage {}: {why}; retrying in {:.0} s",
                    want.index,
                    wait.as_secs_f64()
                ),
            );
        }
        (Err(_), None) => {}
    }
}
