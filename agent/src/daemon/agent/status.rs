//! The statuses an agent computes for `get` and `describe`: a node's (from its reports), a
//! pipeline's (its stages, its ring, its placement), an endpoint's and a model's.

use super::*;

impl Agent {
    /// A node's status as this agent sees it.
    pub fn node_status(&self, node: &str) -> NodeStatus {
        if node == self.settings.name {
            return NodeStatus {
                phase: Phase::Ready,
                message: None,
                last_seen_seconds: Some(0.0),
                report: Some(self.report()),
            };
        }
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(peer) = peers.get(node) else {
            return NodeStatus {
                phase: Phase::NotReady,
                message: Some("never heard from".into()),
                last_seen_seconds: None,
                report: None,
            };
        };
        let age = peer.last_seen.map(|t| t.elapsed());
        let fresh = age.is_some_and(|a| a < self.settings.node_timeout);
        NodeStatus {
            phase: if fresh { Phase::Ready } else { Phase::NotReady },
            message: if fresh {
                None
            } else {
                Some(match (&peer.error, age) {
                    (Some(e), Some(a)) => {
                        format!("not heard from for {:.1} s: {e}", a.as_secs_f64())
                    }
                    (Some(e), None) => format!("never heard from: {e}"),
                    (None, Some(a)) => format!("not heard from for {:.1} s", a.as_secs_f64()),
                    (None, None) => "never heard from".into(),
                })
            },
            last_seen_seconds: age.map(|a| a.as_secs_f64()),
            report: peer.report.clone(),
        }
    }

    /// A pipeline's status from its stages' reports: each replica's ring combined as one ring's
    /// stages are; the pipeline Ready while every replica is, Degraded while some serve and
    /// some do not (naming them), else as its first replica.
    pub fn pipeline_status(&self, record: &Record) -> PipelineStatus {
        let name = record.object.name();
        let generation = record.object.metadata.generation;
        let Some(placement) = &record.placement else {
            return PipelineStatus {
                phase: Phase::Pending,
                message: Some("not placed yet".into()),
                progress: 0.0,
                placement: None,
                stages: Vec::new(),
                replicas: Vec::new(),
            };
        };
        let rings = placement.rings();
        let mut stages = Vec::new();
        let mut replicas = Vec::new();
        let (mut loaded, mut total) = (0u64, 0u64);
        for (r, ring) in rings.iter().enumerate() {
            let one = self.ring_status(name, generation, r, rings.len(), ring);
            loaded += one.loaded;
            total += one.total;
            stages.extend(one.stages);
            replicas.push(cluster_api::cluster::ReplicaStatus {
                index: r,
                phase: one.phase,
                message: one.message,
                head: ring.first().map(|s| s.node.clone()).unwrap_or_default(),
            });
        }
        let progress = if total > 0 {
            100.0 * loaded as f64 / total as f64
        } else {
            0.0
        };
        let serving = replicas.iter().filter(|r| r.phase == Phase::Ready).count();
        let (phase, message) = if replicas.len() == 1 || serving == replicas.len() {
            (replicas[0].phase, replicas[0].message.clone())
        } else if serving > 0 {
            let down: Vec<String> = replicas
                .iter()
                .filter(|r| r.phase != Phase::Ready)
                .map(|r| {
                    format!(
                        "replica {} is {}{}",
                        r.index,
                        r.phase,
                        r.message
                            .as_ref()
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            (
                Phase::Degraded,
                Some(format!(
                    "{serving} of {} replicas serving; {}",
                    replicas.len(),
                    down.join("; ")
                )),
            )
        } else {
            (replicas[0].phase, replicas[0].message.clone())
        };
        PipelineStatus {
            phase,
            message,
            progress,
            placement: Some(placement.reason.clone()),
            stages,
            replicas: if replicas.len() > 1 {
                replicas
            } else {
                Vec::new()
            },
        }
    }

    /// One replica's ring: its stages' statuses and their phase combined.
    fn ring_status(
        &self,
        name: &str,
        generation: u64,
        replica: usize,
        replicas: usize,
        placed: &[cluster_api::cluster::PlacedStage],
    ) -> RingStatus {
        let mut stages = Vec::new();
        let (mut loaded, mut total) = (0u64, 0u64);
        let mut ring: Option<RingReport> = None;
        for (i, st) in placed.iter().enumerate() {
            let mut status = PipelineStageStatus {
                replica,
                index: i,
                node: st.node.clone(),
                layers: st.layers,
                phase: Phase::Pending,
                progress: 0.0,
                memory_bytes: 0,
                weight_bytes: st.weight_bytes,
                sequences: 0,
                compute_seconds: 0.0,
                forward_passes: 0,
                passes: Default::default(),
                message: None,
            };
            match self.fresh_report(&st.node) {
                None if self.never_heard(&st.node) => {
                    status.message = Some(format!("waiting for node {}'s first report", st.node));
                }
                None => {
                    status.phase = Phase::NotReady;
                    status.message = Some(
                        self.node_status(&st.node)
                            .message
                            .map(|m| format!("node {}: {m}", st.node))
                            .unwrap_or_else(|| format!("node {} is not ready", st.node)),
                    );
                }
                Some(report) => {
                    let found = report
                        .stages
                        .iter()
                        .find(|s| s.pipeline == name && s.index == i && s.generation == generation);
                    if let Some(s) = found {
                        status.phase = s.phase;
                        status.memory_bytes = s.memory_bytes;
                        status.sequences = s.sequences;
                        status.compute_seconds = s.compute_seconds;
                        status.forward_passes = s.forward_passes;
                        status.passes = s.passes.clone();
                        status.message = s.message.clone();
                        status.progress = if s.total_bytes > 0 {
                            100.0 * s.loaded_bytes as f64 / s.total_bytes as f64
                        } else if s.phase == Phase::Ready {
                            100.0
                        } else {
                            0.0
                        };
                        if i == 0 && s.phase == Phase::Ready {
                            ring = s.ring.clone();
                        }
                    }
                }
            }
            loaded += (status.progress / 100.0 * st.weight_bytes as f64) as u64;
            total += st.weight_bytes;
            stages.push(status);
        }
        let progress = if total > 0 {
            100.0 * loaded as f64 / total as f64
        } else {
            0.0
        };
        let describe = |s: &PipelineStageStatus| {
            if replicas > 1 {
                format!("replica {replica} stage {} on {}", s.index, s.node)
            } else {
                format!("stage {} on {}", s.index, s.node)
            }
        };
        let (phase, message) = if let Some(s) = stages.iter().find(|s| s.phase == Phase::Failed) {
            (
                Phase::Failed,
                Some(format!(
                    "{}: {}",
                    describe(s),
                    s.message.clone().unwrap_or_else(|| "failed".into())
                )),
            )
        } else if let Some(s) = stages.iter().find(|s| s.phase == Phase::NotReady) {
            (
                Phase::Degraded,
                Some(format!(
                    "{}: {}",
                    describe(s),
                    s.message.clone().unwrap_or_default()
                )),
            )
        } else if stages.iter().all(|s| s.phase == Phase::Ready) {
            // Loaded everywhere; whether it serves is stage 0's to say, from its links'
            // heartbeats: Ready only once a first pass went through every stage.
            match ring {
                Some(RingReport {
                    state: RingState::Serving,
                    ..
                })
                | None => (Phase::Ready, None),
                Some(RingReport {
                    state: RingState::WarmingUp,
                    message,
                }) => (Phase::Loading, message),
                Some(RingReport { message, .. }) => (Phase::Degraded, message),
            }
        } else if stages
            .iter()
            .any(|s| matches!(s.phase, Phase::Loading | Phase::Ready))
        {
            let fetching = stages.iter().any(|s| {
                s.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("fetching"))
            });
            let doing = if fetching { "fetching" } else { "loading" };
            (Phase::Loading, Some(format!("{doing}: {progress:.0}%")))
        } else {
            (
                Phase::Pending,
                Some("waiting for the nodes to start their stages".into()),
            )
        };
        RingStatus {
            phase,
            message,
            stages,
            loaded,
            total,
        }
    }

    /// The node an endpoint listens on: its own, or its pipeline's stage 0.
    pub fn endpoint_node(&self, object: &Object) -> Option<String> {
        let e = object.as_endpoint()?;
        if let Some(n) = &e.node {
            return Some(n.clone());
        }
        let pipeline = self.store.get(Kind::Pipeline, &e.pipeline).ok()??;
        if pipeline.deleted {
            return None;
        }
        pipeline
            .placement
            .and_then(|p| p.stages.first().map(|s| s.node.clone()))
    }

    /// An endpoint's status: its listener (from its node's report) and its pipeline.
    pub fn endpoint_status(&self, record: &Record) -> Option<EndpointStatus> {
        let name = record.object.name();
        let spec = record.object.as_endpoint()?;
        let node = self.endpoint_node(&record.object);
        let report: Option<EndpointReport> = node
            .as_deref()
            .and_then(|n| self.fresh_report(n))
            .and_then(|r| r.endpoints.into_iter().find(|e| e.endpoint == name));
        let pipeline = self
            .store
            .get(Kind::Pipeline, &spec.pipeline)
            .ok()
            .flatten()
            .filter(|r| !r.deleted)
            .map(|r| self.pipeline_status(&r));
        let (phase, message) = match (&report, &pipeline) {
            (None, _) => (
                Phase::Pending,
                Some(match &node {
                    Some(n) => format!("node {n} has not reported this endpoint listening"),
                    None => "its pipeline is not placed".to_string(),
                }),
            ),
            (Some(r), _) if r.phase != Phase::Ready => (r.phase, r.message.clone()),
            (Some(_), Some(p)) if p.phase != Phase::Ready => (
                Phase::Degraded,
                Some(format!(
                    "listening, but pipeline {} is {}{}",
                    spec.pipeline,
                    p.phase,
                    p.message
                        .as_ref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )),
            ),
            (Some(_), None) => (
                Phase::Degraded,
                Some(format!("pipeline {} does not exist", spec.pipeline)),
            ),
            (Some(_), Some(_)) => (Phase::Ready, None),
        };
        Some(EndpointStatus {
            phase,
            message,
            node,
            url: report.map(|r| r.url),
        })
    }

    /// The object with its status filled in.
    pub fn with_status(&self, record: &Record) -> Object {
        let mut object = record.object.clone();
        object.status = match object.kind {
            Kind::Node => Some(Status::Node(Box::new(self.node_status(object.name())))),
            Kind::Pipeline => Some(Status::Pipeline(self.pipeline_status(record))),
            Kind::Endpoint => self.endpoint_status(record).map(Status::Endpoint),
            Kind::Model => {
                let pipelines: Vec<String> = self
                    .store
                    .live(Kind::Pipeline)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| {
                        p.object
                            .as_pipeline()
                            .is_some_and(|s| s.model == object.name())
                    })
                    .map(|p| p.object.metadata.name)
                    .collect();
                // The files held whole somewhere in the cluster, as their digests were
                // published: what peers fetching stages check bytes against.
                let files = self
                    .store
                    .all_file_digests()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|d| d.model == object.name())
                    .map(|d| ModelFileStatus {
                        tensors: d.tensors.len(),
                        file: d.file,
                        size: d.size,
                        sha256: d.sha256,
                        verified: d.verified,
                        sealed_by: d.sealed_by,
                    })
                    .collect();
                Some(Status::Model(ModelStatus {
                    pipelines,
                    files,
                    commit: record.revision.clone(),
                }))
            }
        };
        object
    }
}

/// One replica's ring as [`Agent::ring_status`] combines it.
struct RingStatus {
    phase: Phase,
    message: Option<String>,
    stages: Vec<PipelineStageStatus>,
    loaded: u64,
    total: u64,
}
