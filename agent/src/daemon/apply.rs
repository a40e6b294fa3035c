//! Applies and deletes: every check runs before anything is written (schema and references,
//! then the model's files, the split against its layer count and each node's memory), the
//! placement is resolved once and stored with the pipeline, versions come from the store's
//! logical clock, and the whole apply is one transaction.

use std::collections::BTreeMap;
use std::sync::PoisonError;

use cluster_api::LayerRange;
use cluster_api::cluster::{
    ApplyAction, ApplyOutcome, ByteProfile, PlacedStage, Record, ResolvedPlacement,
};
use cluster_api::manifest::{
    Kind, ManifestError, Object, Placement, Spec, StagePlacement, check_references,
    parse_manifests, referrers, ring_split_error,
};

use super::agent::Agent;

mod placement;

use self::placement::place;
pub(crate) use self::placement::schedulable;

/// Why an apply or delete was refused.
#[derive(Debug)]
pub enum Refused {
    /// Invalid input (400), with each problem placed.
    Invalid(Vec<ManifestError>),
    /// A version precondition or a reference held (409).
    Conflict(String),
    /// Not found (404).
    NotFound(String),
    /// The store failed (500).
    Internal(String),
}

/// A refusal in a line, for events.
pub fn refusal_text(refused: &Refused) -> String {
    match refused {
        Refused::Invalid(errors) => errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; "),
        Refused::Conflict(m) | Refused::NotFound(m) | Refused::Internal(m) => m.clone(),
    }
}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Self {
        Self::Internal(format!("{e:#}"))
    }
}

/// What is known of a model's files: how its bytes fall across layers.
struct ModelFacts {
    profile: ByteProfile,
}

/// Reads a model's byte profile here or, when its files are not on this node, on the first
/// peer that has them (they only need to be on the nodes that run stages).
fn inspect_model(
    agent: &Agent,
    object: &Object,
    revision: Option<&str>,
    cache: &mut BTreeMap<String, Result<ModelFacts, String>>,
) {
    let Some(spec) = object.as_model() else {
        return;
    };
    // The files of the commit the nodes will fetch, not of whatever the branch names later.
    let mut spec = spec.clone();
    spec.source = spec.source.pinned(revision);
    let spec = &spec;
    let facts = match crate::fetch::open(&agent.model_cache(), &spec.source) {
        Ok(folder) => Ok(ModelFacts {
            profile: folder.byte_profile(spec.dtype),
        }),
        Err(e) => {
            let mut reasons = vec![format!("on {} (this node): {e}", agent.name())];
            let mut found = None;
            for (node, address) in agent.peer_addresses() {
                if agent.fresh_report(&node).is_none() {
                    continue;
                }
                match super::peers::inspect_remote(agent, &address, spec) {
                    Ok(profile) => {
                        found = Some(ModelFacts { profile });
                        break;
                    }
                    Err(why) => reasons.push(format!("on {node}: {why}")),
                }
            }
            found.ok_or_else(|| {
                format!(
                    "cannot open the model at {}: {}",
                    spec.source.describe(),
                    reasons.join("; ")
                )
            })
        }
    };
    cache.insert(object.name().to_string(), facts);
}

/// Validates and applies `text`; with `dry_run` only says what would change.
pub fn apply(agent: &Agent, text: &str, dry_run: bool) -> Result<Vec<ApplyOutcome>, Refused> {
    let objects = parse_manifests(text).map_err(Refused::Invalid)?;
    // Positions in the input, for messages about later checks.
    let position: BTreeMap<(Kind, String), usize> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| ((o.kind, o.name().to_string()), i + 1))
        .collect();
    let _guard = agent
        .write_lock
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let stored = agent.store.live_objects()?;
    let mut errors = check_references(&objects, &stored);
    // Every object as it will be after this apply.
    let mut after: BTreeMap<(Kind, String), Object> = stored
        .into_iter()
        .map(|o| ((o.kind, o.name().to_string()), o))
        .collect();
    for o in &objects {
        after.insert((o.kind, o.name().to_string()), o.clone());
    }
    // Models read here: those applied, and those of applied pipelines.
    let mut models: BTreeMap<String, Result<ModelFacts, String>> = BTreeMap::new();
    // A hub model's revision is resolved to a commit once, here: every node fetches that
    // commit, however the branch moves, until the model is applied again.
    let mut revisions: BTreeMap<String, Option<String>> = BTreeMap::new();
    for o in &objects {
        if o.kind == Kind::Model {
            let revision = o
                .as_model()
                .and_then(|m| crate::fetch::resolve_commit(&m.source));
            inspect_model(agent, o, revision.as_deref(), &mut models);
            revisions.insert(o.name().to_string(), revision);
            if let Some(Err(why)) = models.get(o.name()) {
                let field = if o.as_model().is_some_and(|m| m.source.is_remote()) {
                    "spec.source"
                } else {
                    "spec.source.path"
                };
                errors.push(ManifestError::field(o, field, why.clone()));
            }
        }
    }
    // Pipelines to (re)place: those applied, and those whose model is applied.
    let mut pipelines: Vec<Object> = objects
        .iter()
        .filter(|o| o.kind == Kind::Pipeline)
        .cloned()
        .collect();
    for o in after.values() {
        if let Some(p) = o.as_pipeline()
            && objects
                .iter()
                .any(|a| a.kind == Kind::Model && a.name() == p.model)
            && !pipelines.iter().any(|x| x.name() == o.name())
        {
            pipelines.push(o.clone());
        }
    }
    let mut placements: BTreeMap<String, ResolvedPlacement> = BTreeMap::new();
    if errors.is_empty() {
        for p in &pipelines {
            let spec = p.as_pipeline().cloned();
            let Some(spec) = spec else { continue };
            if !models.contains_key(&spec.model)
                && let Some(m) = after.get(&(Kind::Model, spec.model.clone()))
            {
                let stored = agent.store.get(Kind::Model, &spec.model).ok().flatten();
                let revision = stored.and_then(|r| r.revision);
                inspect_model(agent, m, revision.as_deref(), &mut models);
            }
            let facts = match models.get(&spec.model) {
                Some(Ok(f)) => f,
                Some(Err(why)) => {
                    errors.push(ManifestError::field(p, "spec.model", why.clone()));
                    continue;
                }
                None => continue,
            };
            // An unchanged spec keeps its placement where its nodes still answer: applying
            // the same manifest again (or the cluster re-placing a lost node's stages) moves
            // nothing that runs.
            let stored = agent
                .store
                .get(Kind::Pipeline, p.name())
                .ok()
                .flatten()
                .filter(|r| !r.deleted && r.object.spec == p.spec);
            let previous = stored.as_ref().and_then(|r| r.placement.as_ref());
            match place(agent, p, facts, previous) {
                Ok(placement) => {
                    placements.insert(p.name().to_string(), placement);
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
    }
    if !errors.is_empty() {
        let errors = errors
            .into_iter()
            .map(|mut e| {
                if e.document.is_none()
                    && let Some(o) = &e.object
                    && let Some((k, n)) = o.split_once(' ')
                    && let Ok(kind) = Kind::parse(k)
                {
                    e.document = position.get(&(kind, n.to_string())).copied();
                }
                e
            })
            .collect();
        return Err(Refused::Invalid(errors));
    }
    // Versions.
    let mut clock = agent.store.clock()?;
    let mut records = Vec::new();
    let mut outcomes = Vec::new();
    let mut changed_pipelines: Vec<Object> = pipelines;
    changed_pipelines.retain(|p| {
        !objects
            .iter()
            .any(|o| o.kind == Kind::Pipeline && o.name() == p.name())
    });
    for o in objects.iter().chain(changed_pipelines.iter()) {
        let existing = agent.store.get(o.kind, o.name())?;
        let live = existing.as_ref().filter(|r| !r.deleted);
        let asked = o.metadata.resource_version;
        if asked != 0 && objects.contains(o) {
            let have = live
                .map(|r| r.object.metadata.resource_version)
                .unwrap_or(0);
            if have != asked {
                return Err(Refused::Conflict(format!(
                    "{}: the apply is based on resourceVersion {asked} but the stored one is {have}; get it again and reapply",
                    o.describe()
                )));
            }
        }
        let placement = placements
            .get(o.name())
            .filter(|_| o.kind == Kind::Pipeline)
            .cloned();
        let revision = revisions
            .get(o.name())
            .filter(|_| o.kind == Kind::Model)
            .cloned()
            .flatten();
        let mut changes = Vec::new();
        let action = match live {
            None => ApplyAction::Created,
            Some(r) => {
                if r.object.spec != o.spec {
                    changes.push(spec_diff(&r.object.spec, &o.spec));
                }
                if r.object.metadata.labels != o.metadata.labels {
                    changes.push("labels".into());
                }
                if o.kind == Kind::Model && r.revision != revision {
                    let named = o
                        .as_model()
                        .and_then(|m| m.source.hf.as_ref())
                        .map(|h| h.revision.clone())
                        .unwrap_or_default();
                    let short = |c: &Option<String>| {
                        c.as_deref().map_or("unresolved".to_string(), |c| {
                            c.get(..12).unwrap_or(c).to_string()
                        })
                    };
                    changes.push(format!(
                        "revision {named} now at commit {} (was {})",
                        short(&revision),
                        short(&r.revision)
                    ));
                }
                let stages = |p: &Option<ResolvedPlacement>| {
                    p.as_ref().map(|p| {
                        p.rings()
                            .iter()
                            .map(|ring| {
                                ring.iter()
                                    .map(|s| (s.node.clone(), s.layers))
                                    .collect::<Vec<_>>()
                            })
                            .collect::<Vec<_>>()
                    })
                };
                if o.kind == Kind::Pipeline && stages(&r.placement) != stages(&placement) {
                    changes.push(format!(
                        "placement: {} -> {}",
                        describe_placement(r.placement.as_ref()),
                        describe_placement(placement.as_ref())
                    ));
                }
                if changes.is_empty() {
                    ApplyAction::Unchanged
                } else {
                    ApplyAction::Configured
                }
            }
        };
        let mut object = o.clone();
        object.status = None;
        let generation = match (action, live) {
            (ApplyAction::Unchanged, Some(r)) => r.object.metadata.generation,
            (_, Some(r)) => r.object.metadata.generation + 1,
            // A re-created object continues past its tombstone's generation, so that stages
            // of the old one never accept the new one's ring.
            _ => existing
                .as_ref()
                .map(|r| r.object.metadata.generation + 1)
                .unwrap_or(1),
        };
        outcomes.push(ApplyOutcome {
            kind: o.kind,
            name: o.name().to_string(),
            action,
            generation,
            changes,
        });
        if action == ApplyAction::Unchanged {
            continue;
        }
        clock += 1;
        object.metadata.generation = generation;
        object.metadata.resource_version = clock;
        object.metadata.updated_by = Some(agent.name().to_string());
        object.metadata.uid = live
            .and_then(|r| r.object.metadata.uid.clone())
            .or_else(|| Some(new_uid()));
        object.metadata.creation_timestamp = live
            .and_then(|r| r.object.metadata.creation_timestamp.clone())
            .or_else(|| Some(crate::inventory::now()));
        records.push(Record {
            object,
            deleted: false,
            placement,
            revision,
        });
    }
    if dry_run || records.is_empty() {
        return Ok(outcomes);
    }
    agent.store.write(&records)?;
    for (r, o) in records.iter().zip(
        outcomes
            .iter()
            .filter(|o| o.action != ApplyAction::Unchanged),
    ) {
        let mut message = format!("{} (generation {})", o.action, o.generation);
        if let Some(p) = &r.placement {
            message.push_str(&format!(": {}", p.reason));
        }
        agent.event(&r.object.describe(), false, "Applied", message);
    }
    drop(_guard);
    agent.reconcile_now.notify_one();
    agent.sync_now.notify_one();
    Ok(outcomes)
}

fn spec_diff(old: &Spec, new: &Spec) -> String {
    let a = serde_json::to_value(old).unwrap_or_default();
    let b = serde_json::to_value(new).unwrap_or_default();
    let mut fields = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for key in a.keys().chain(b.keys()) {
            if a.get(key) != b.get(key) && !fields.contains(key) {
                fields.push(key.clone());
            }
        }
    }
    format!("spec.{{{}}}", fields.join(","))
}

fn describe_placement(p: Option<&ResolvedPlacement>) -> String {
    match p {
        None => "none".into(),
        Some(p) => p
            .rings()
            .iter()
            .map(|ring| {
                ring.iter()
                    .map(|s| format!("{}:{}", s.node, s.layers))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect::<Vec<_>>()
            .join(" | "),
    }
}

fn new_uid() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn gib(bytes: u64) -> String {
    cluster_api::human_bytes(bytes)
}

/// Deletes one object (a tombstone with a new version); refused while others refer to it.
pub fn delete(agent: &Agent, kind: Kind, name: &str, dry_run: bool) -> Result<u64, Refused> {
    let _guard = agent
        .write_lock
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let Some(record) = agent.store.get(kind, name)?.filter(|r| !r.deleted) else {
        return Err(Refused::NotFound(format!("{kind} {name} does not exist")));
    };
    let live = agent.store.live_objects()?;
    let users = referrers(kind, name, &live);
    if !users.is_empty() {
        return Err(Refused::Conflict(format!(
            "{kind} {name} is used by {}: delete those first",
            users
                .iter()
                .map(|o| o.describe())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if dry_run {
        return Ok(record.object.metadata.resource_version);
    }
    let mut tomb = record;
    let version = agent.store.clock()? + 1;
    tomb.deleted = true;
    tomb.object.metadata.resource_version = version;
    tomb.object.metadata.updated_by = Some(agent.name().to_string());
    agent.store.write(std::slice::from_ref(&tomb))?;
    agent.event(
        &tomb.object.describe(),
        false,
        "Deleted",
        format!("version {version}"),
    );
    drop(_guard);
    agent.reconcile_now.notify_one();
    agent.sync_now.notify_one();
    Ok(version)
}
