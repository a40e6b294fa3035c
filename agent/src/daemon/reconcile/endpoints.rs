//! The endpoints this node serves: opening an endpoint's listener (its own requests, or a
//! peer's forwarded to stage 0 here), and the state its requests are answered from.

use super::*;

pub(super) fn open_endpoint(
    agent: &Arc<Agent>,
    name: &str,
    want: EndpointWant,
    attempts: u32,
) -> EndpointSlot {
    let listener = std::net::TcpListener::bind(&want.address).and_then(|l| {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    });
    match listener {
        Ok(listener) => {
            let (tx, rx) = oneshot::channel();
            match &want.head {
                None => {
                    let state = endpoint_state(
                        agent,
                        name,
                        &want.pipeline,
                        &want.served_model,
                        &want.api_keys,
                    );
                    tokio::spawn(crate::endpoint::serve(state, listener, async move {
                        let _ = rx.await;
                    }));
                }
                Some(head) => {
                    let target = crate::endpoint::proxy::Target {
                        endpoint: name.to_string(),
                        head: head.clone(),
                        token: agent.settings.token.clone(),
                    };
                    tokio::spawn(crate::endpoint::proxy::serve(
                        target,
                        listener,
                        async move {
                            let _ = rx.await;
                        },
                    ));
                }
            }
            agent.event(
                &format!("Endpoint {name}"),
                false,
                "Listening",
                format!(
                    "serving pipeline {} on http://{}",
                    want.pipeline, want.address
                ),
            );
            EndpointSlot {
                want,
                stop: Some(tx),
                message: None,
                retry_at: Instant::now(),
                attempts: 0,
            }
        }
        Err(e) => {
            let attempts = attempts + 1;
            let wait = backoff(attempts);
            let message = format!("cannot listen on {}: {e}", want.address);
            agent.event(
                &format!("Endpoint {name}"),
                true,
                "ListenFailed",
                format!("{message}; retrying in {:.0} s", wait.as_secs_f64()),
            );
            EndpointSlot {
                want,
                stop: None,
                message: Some(message),
                retry_at: Instant::now() + wait,
                attempts,
            }
        }
    }
}

/// The state of an endpoint served from this node, which runs its pipeline's stage 0: here
/// when it listens here, or for a peer that listens for it and forwards its requests.
pub fn endpoint_state(
    agent: &Arc<Agent>,
    name: &str,
    pipeline: &str,
    served_model: &str,
    api_keys: &[String],
) -> Arc<crate::endpoint::EndpointState> {
    let want_pipeline = pipeline.to_string();
    let weak = Arc::downgrade(agent);
    let pipeline = want_pipeline.clone();
    let source = http::Source::new(move || {
        let agent = weak.upgrade().ok_or("the agent is stopping")?;
        if agent.is_shutting_down() {
            return Err(format!("node {} is shutting down", agent.name()));
        }
        if let Some(shared) = agent.runtime.head_of(&pipeline) {
            return Ok(shared);
        }
        let status = agent
            .store
            .get(Kind::Pipeline, &pipeline)
            .ok()
            .flatten()
            .filter(|r| !r.deleted)
            .map(|r| agent.pipeline_status(&r));
        Err(match status {
            Some(s) => format!(
                "pipeline {pipeline} is {}{}",
                s.phase,
                s.message.map(|m| format!(": {m}")).unwrap_or_default()
            ),
            None => format!("pipeline {pipeline} does not exist"),
        })
    });
    let routes_agent = Arc::downgrade(agent);
    let routes_pipeline = want_pipeline.clone();
    let routes: crate::endpoint::replicas::Routes =
        Arc::new(move || match routes_agent.upgrade() {
            Some(agent) => replica_routes(&agent, &routes_pipeline),
            None => Vec::new(),
        });
    let router = Arc::new(crate::endpoint::replicas::Router::new(
        routes,
        name,
        &agent.settings.token,
    ));
    let stats_agent = Arc::downgrade(agent);
    let stats_pipeline = want_pipeline.clone();
    let stage_stats: crate::endpoint::StageStats = Arc::new(move || {
        let Some(agent) = stats_agent.upgrade() else {
            return Vec::new();
        };
        let Ok(Some(record)) = agent.store.get(Kind::Pipeline, &stats_pipeline) else {
            return Vec::new();
        };
        agent
            .pipeline_status(&record)
            .stages
            .into_iter()
            .map(|s| crate::endpoint::metrics::StageGauge {
                index: s.index,
                node: s.node,
                compute_seconds: s.compute_seconds,
                forward_passes: s.forward_passes,
                cached_sequences: s.sequences,
                memory_bytes: s.memory_bytes,
                passes: s.passes,
            })
            .collect()
    });
    Arc::new(crate::endpoint::EndpointState {
        name: name.to_string(),
        pipeline: want_pipeline.clone(),
        served_model: served_model.to_string(),
        api_keys: api_keys.to_vec(),
        source,
        router,
        metrics: crate::endpoint::metrics::Metrics::default(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        stage_stats,
    })
}

/// The replicas of `pipeline` as an endpoint here sees them: the one whose stage 0 runs here
/// in-process, the others at their head's agent, each ready by its status as this agent knows
/// it (a replica that then refuses is passed over at once).
fn replica_routes(agent: &Arc<Agent>, pipeline: &str) -> Vec<crate::endpoint::replicas::Route> {
    use crate::endpoint::replicas::{Head, Route};
    let Ok(Some(record)) = agent.store.get(Kind::Pipeline, pipeline) else {
        return Vec::new();
    };
    let Some(placement) = record.placement.as_ref().filter(|_| !record.deleted) else {
        return Vec::new();
    };
    let rings = placement.rings();
    let local = |shared: Option<Arc<crate::ring::node::Shared>>| match shared {
        Some(s) => (Ok(Head::Local(s)), true),
        None => (
            Err(format!("its stage 0 on {} is not loaded", agent.name())),
            false,
        ),
    };
    if rings.len() == 1 {
        // One ring: its head is here (the endpoint listens on stage 0's node, or answers for
        // the node that forwards to it), and it says itself whether it serves.
        let (head, ready) = local(agent.runtime.head_of(pipeline));
        return vec![Route {
            replica: 0,
            head,
            ready,
        }];
    }
    let status = agent.pipeline_status(&record);
    rings
        .iter()
        .enumerate()
        .map(|(replica, ring)| {
            let node = ring.first().map(|s| s.node.clone()).unwrap_or_default();
            let (head, ready) = if node == agent.name() {
                local(agent.runtime.head_of(pipeline))
            } else {
                let address = agent
                    .store
                    .get(Kind::Node, &node)
                    .ok()
                    .flatten()
                    .and_then(|r| Some(r.object.as_node()?.address.clone()));
                let ready = status
                    .replicas
                    .get(replica)
                    .is_some_and(|r| r.phase == cluster_api::cluster::Phase::Ready);
                match address {
                    Some(a) => (Ok(Head::Remote(a)), ready),
                    None => (Err(format!("node {node} does not exist")), false),
                }
            };
            Route {
                replica,
                head,
                ready,
            }
        })
        .collect()
}
