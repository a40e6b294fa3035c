//! Placement: resolving a pipeline's stages onto nodes, by hand (checked against the memory
//! each node offers) or automatically (layers split by the memory the nodes report).

use super::*;

/// Memory a node offers a stage of `pipeline` (see `Inventory::placeable_bytes`), or `None`
/// when the node has not reported.
fn offered(agent: &Agent, node: &str, pipeline: &str) -> Option<u64> {
    let report = agent.fresh_report(node)?;
    let held = |same: bool| -> u64 {
        report
            .stages
            .iter()
            .filter(|s| (s.pipeline == pipeline) == same)
            .map(|s| s.memory_bytes)
            .sum()
    };
    Some(report.inventory.placeable_bytes(held(true), held(false)))
}

/// Whether automatic placement may use `node`: not drained (`spec.unschedulable`).
pub(crate) fn schedulable(agent: &Agent, node: &str) -> bool {
    agent
        .store
        .get(Kind::Node, node)
        .ok()
        .flatten()
        .filter(|r| !r.deleted)
        .and_then(|r| r.object.as_node().map(|n| !n.unschedulable))
        .unwrap_or(true)
}

/// Resolves a pipeline's placement against its model and the nodes' memory.
pub(super) fn place(
    agent: &Agent,
    p: &Object,
    facts: &ModelFacts,
    previous: Option<&ResolvedPlacement>,
) -> Result<ResolvedPlacement, Vec<ManifestError>> {
    let spec = p.as_pipeline().ok_or_else(Vec::new)?;
    let profile = &facts.profile;
    let layers = profile.layers();
    // A stage needs room for its weights and for what it holds beside them while it computes.
    let working = profile.working_bytes(spec.prefill_chunk.unwrap_or(128));
    let bytes =
        |range: LayerRange, first: bool, last: bool| profile.stage_bytes(range, first, last);
    // `None`: as many as fit (`replicas: auto`).
    let wanted = spec.replica_count();
    if wanted == Some(0) {
        return Err(vec![ManifestError::field(
            p,
            "spec.replicas",
            "must be at least 1, got 0",
        )]);
    }
    match (&spec.stages, spec.placement) {
        (Some(stages), _) => {
            let replicas = wanted.unwrap_or(1);
            // The manifest's check made sure every replica has stages and its nodes are
            // its own.
            let mut rings: Vec<Vec<(usize, &StagePlacement)>> = vec![Vec::new(); replicas];
            for (i, s) in stages.iter().enumerate() {
                if let Some(ring) = rings.get_mut(s.replica.unwrap_or(0)) {
                    ring.push((i, s));
                }
            }
            let mut placed = Vec::new();
            let mut unchecked = Vec::new();
            for (r, ring) in rings.iter().enumerate() {
                let replica = (replicas > 1).then_some(r);
                let (stages, not_heard) =
                    place_listed(agent, p, ring, replica, layers, &bytes, working)?;
                placed.push(stages);
                unchecked.extend(not_heard);
            }
            let n = rings[0].len();
            let mut reason = if replicas == 1 {
                format!("as listed: {n} stage(s) over {layers} layers")
            } else {
                format!(
                    "as listed: {replicas} replicas of {} stage(s) over {layers} layers",
                    rings
                        .iter()
                        .map(|r| r.len().to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                )
            };
            if !unchecked.is_empty() {
                reason.push_str(&format!(
                    "; memory not checked on {} (not heard from yet)",
                    unchecked.join(", ")
                ));
            }
            let mut placed = placed.into_iter();
            Ok(ResolvedPlacement {
                stages: placed.next().unwrap_or_default(),
                replicas: placed.collect(),
                layers,
                reason,
            })
        }
        (None, Some(Placement::Auto)) => {
            auto_replicas(agent, p, wanted, previous, layers, &bytes, working)
        }
        (None, None) => Err(vec![ManifestError::field(p, "spec.stages", "missing")]),
    }
}

/// `placement: auto` for `wanted` replicas (`None`: as many as the nodes' memory holds, at
/// least one). Rings placed before whose every node still reports and is not drained stay as
/// they are; the others are placed anew over the nodes left.
fn auto_replicas(
    agent: &Agent,
    p: &Object,
    wanted: Option<usize>,
    previous: Option<&ResolvedPlacement>,
    layers: usize,
    bytes: &dyn Fn(LayerRange, bool, bool) -> u64,
    working: u64,
) -> Result<ResolvedPlacement, Vec<ManifestError>> {
    let alive = |ring: &[PlacedStage]| {
        ring.iter()
            .all(|s| offered(agent, &s.node, p.name()).is_some() && schedulable(agent, &s.node))
    };
    let before: Vec<Vec<PlacedStage>> = previous
        .map(|b| b.rings().iter().map(|r| r.to_vec()).collect())
        .unwrap_or_default();
    // With a count, the first `count` rings placed before are the candidates to keep; with
    // `auto`, all of them.
    let keep_at_most = wanted.unwrap_or(before.len());
    let mut kept: Vec<Option<Vec<PlacedStage>>> = before
        .into_iter()
        .take(keep_at_most)
        .map(|ring| alive(&ring).then_some(ring))
        .collect();
    if let Some(n) = wanted {
        kept.resize(n, None);
    }
    let mut taken: Vec<String> = kept
        .iter()
        .flatten()
        .flat_map(|ring| ring.iter().map(|s| s.node.clone()))
        .collect();
    let several = wanted != Some(1);
    let mut rings: Vec<Vec<PlacedStage>> = Vec::new();
    let mut reasons = Vec::new();
    let mut placed_anew = 0;
    let mut stopped: Option<String> = None;
    let mut r = 0;
    loop {
        let slot = kept.get_mut(r).and_then(Option::take);
        let to_place = match (slot, wanted) {
            (Some(ring), _) => {
                rings.push(ring);
                r += 1;
                continue;
            }
            (None, Some(n)) => r < n,
            // `auto`: a lost ring's place and then new ones, while they fit.
            (None, None) => true,
        };
        if !to_place {
            break;
        }
        let index = rings.len();
        match auto_place(agent, p, layers, bytes, working, &taken) {
            Ok((stages, reason)) => {
                taken.extend(stages.iter().map(|s| s.node.clone()));
                rings.push(stages);
                placed_anew += 1;
                reasons.push(if several {
                    format!("replica {index}: {reason}")
                } else {
                    reason
                });
            }
            // `auto`: a lost ring that no longer fits leaves its place to the others.
            Err(_) if wanted.is_none() && r < kept.len() => {
                r += 1;
                continue;
            }
            Err(errors) if wanted.is_none() && !rings.is_empty() => {
                stopped = errors.first().map(|e| e.message.clone());
                break;
            }
            Err(mut errors) => {
                if several {
                    for e in &mut errors {
                        e.message = format!("replica {index}: {}", e.message);
                    }
                }
                return Err(errors);
            }
        }
        r += 1;
    }
    let unchanged = previous.filter(|b| placed_anew == 0 && b.rings().len() == rings.len());
    let mut reason = match previous {
        // Nothing moved: the reason it was placed so stays true.
        Some(before) if unchanged.is_some() => before.reason.clone(),
        Some(_) if several && placed_anew < rings.len() => format!(
            "{}; the other replicas kept their nodes",
            reasons.join("; ")
        ),
        _ => reasons.join("; "),
    };
    if wanted.is_none() && unchanged.is_none() {
        reason = format!(
            "replicas: auto: {} replica(s), as many as the nodes' memory holds{}; {reason}",
            rings.len(),
            stopped
                .map(|m| format!(" (another: {m})"))
                .unwrap_or_default()
        );
    }
    let mut rings = rings.into_iter();
    Ok(ResolvedPlacement {
        stages: rings.next().unwrap_or_default(),
        replicas: rings.collect(),
        layers,
        reason,
    })
}

/// One replica's stages as listed (`(index in spec.stages, stage)`), checked against the layer
/// count and the memory each node offers; with the nodes whose memory was not checked (not
/// heard from yet).
fn place_listed(
    agent: &Agent,
    p: &Object,
    ring: &[(usize, &StagePlacement)],
    replica: Option<usize>,
    layers: usize,
    bytes: &dyn Fn(LayerRange, bool, bool) -> u64,
    working: u64,
) -> Result<(Vec<PlacedStage>, Vec<String>), Vec<ManifestError>> {
    let mut unchecked = Vec::new();
    let ranges: Vec<LayerRange> = ring.iter().map(|(_, s)| s.layers).collect();
    if let Err(e) = cluster_api::LayerSplit::new(ranges, layers) {
        let indices: Vec<usize> = ring.iter().map(|(i, _)| *i).collect();
        return Err(vec![ring_split_error(p, &e, &indices, replica)]);
    }
    let n = ring.len();
    let mut placed = Vec::new();
    let mut errors = Vec::new();
    for (j, (i, s)) in ring.iter().enumerate() {
        let need = bytes(s.layers, j == 0, j + 1 == n);
        match offered(agent, &s.node, p.name()) {
            Some(have) if need + working > have => errors.push(ManifestError::field(
                p,
                &format!("spec.stages[{i}]"),
                format!(
                    "layers {} need {} of weights and {} to compute in but node {} offers {} (available memory{})",
                    s.layers,
                    gib(need),
                    gib(working),
                    s.node,
                    gib(have),
                    if agent.fresh_report(&s.node).and_then(|r| r.inventory.memory_limit_bytes).is_some() {
                        ", capped by its --max-memory"
                    } else {
                        ""
                    }
                ),
            )),
            Some(_) => {}
            None => unchecked.push(s.node.clone()),
        }
        placed.push(PlacedStage {
            node: s.node.clone(),
            layers: s.layers,
            weight_bytes: need,
        });
    }
    if errors.is_empty() {
        Ok((placed, unchecked))
    } else {
        Err(errors)
    }
}

/// `placement: auto`: one node when the whole model fits on the one with the most room;
/// otherwise as few nodes as hold it, the most roomy first, layers in proportion to each
/// node's room.
fn auto_place(
    agent: &Agent,
    p: &Object,
    layers: usize,
    bytes: &dyn Fn(LayerRange, bool, bool) -> u64,
    working: u64,
    taken: &[String],
) -> Result<(Vec<PlacedStage>, String), Vec<ManifestError>> {
    let spec = p.as_pipeline().ok_or_else(Vec::new)?;
    let mut candidates: Vec<String> = if spec.nodes.is_empty() {
        agent
            .store
            .live(Kind::Node)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.object.metadata.name)
            .collect()
    } else {
        spec.nodes.clone()
    };
    // Another replica's nodes are not this one's to take, nor drained ones anyone's.
    candidates.retain(|n| !taken.contains(n) && schedulable(agent, n));
    let mut room: Vec<(String, u64)> = candidates
        .iter()
        .filter_map(|n| offered(agent, n, p.name()).map(|b| (n.clone(), b)))
        .collect();
    if room.is_empty() {
        return Err(vec![ManifestError::field(
            p,
            "spec.placement",
            format!(
                "no node to place on: none of [{}] has reported its memory (are their agents running?)",
                candidates.join(", ")
            ),
        )]);
    }
    room.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    // Each node's room for weights, once a stage's working memory is set aside.
    for (_, have) in room.iter_mut() {
        *have = have.saturating_sub(working);
    }
    let whole = LayerRange {
        first: 0,
        last: layers - 1,
    };
    let total = bytes(whole, true, true);
    if total <= room[0].1 {
        let (node, have) = &room[0];
        return Ok((
            vec![PlacedStage {
                node: node.clone(),
                layers: whole,
                weight_bytes: total,
            }],
            format!(
                "auto: the whole model ({}, and {} to compute in) fits on {node} ({} free), so it stays on one node",
                gib(total),
                gib(working),
                gib(*have + working)
            ),
        ));
    }
    // Fewest nodes whose room adds up to the model.
    let mut k = 0;
    let mut sum = 0u64;
    while k < room.len() && sum < total {
        sum += room[k].1;
        k += 1;
    }
    let chosen = &room[..k];
    if sum < total || k > layers {
        return Err(vec![ManifestError::field(
            p,
            "spec.placement",
            format!(
                "the model needs {} but the nodes offer {} in all once each keeps {} to compute in ({})",
                gib(total),
                gib(sum),
                gib(working),
                room.iter()
                    .map(|(n, b)| format!("{n}: {}", gib(*b)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )]);
    }
    // Layers in proportion to room, each node at least one.
    let mut counts: Vec<usize> = chosen
        .iter()
        .map(|(_, b)| {
            ((layers as f64) * (*b as f64) / (sum as f64))
                .floor()
                .max(1.0) as usize
        })
        .collect();
    while counts.iter().sum::<usize>() > layers {
        if let Some(i) = (0..counts.len())
            .filter(|&i| counts[i] > 1)
            .max_by_key(|&i| counts[i])
        {
            counts[i] -= 1;
        }
    }
    let mut i = 0;
    while counts.iter().sum::<usize>() < layers {
        counts[i % k] += 1;
        i += 1;
    }
    let mut stages = Vec::new();
    let mut first = 0;
    for (j, ((node, have), count)) in chosen.iter().zip(&counts).enumerate() {
        let range = LayerRange {
            first,
            last: first + count - 1,
        };
        let need = bytes(range, j == 0, j + 1 == k);
        if need > *have {
            return Err(vec![ManifestError::field(
                p,
                "spec.placement",
                format!(
                    "no split fits: layers {range} need {} but {node} offers {} once it keeps {} to compute in",
                    gib(need),
                    gib(*have),
                    gib(working)
                ),
            )]);
        }
        stages.push(PlacedStage {
            node: node.clone(),
            layers: range,
            weight_bytes: need,
        });
        first += count;
    }
    Ok((
        stages,
        format!(
            "auto: the model ({}) does not fit on one node; split over {k} nodes in proportion to their free memory",
            gib(total)
        ),
    ))
}
