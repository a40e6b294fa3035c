//! `clusterctl validate -f FILE|DIR`: checks manifests offline: the schema, references between
//! the documents given, and each explicit split against its model's layer count when the
//! model's folder is readable here.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;
use cluster_api::LayerSplit;
use cluster_api::manifest::{Kind, check_references, ring_split_error};

use super::Outcome;
use crate::manifests;

/// Flags of `validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Manifest file, folder or -.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
}

/// The layer count in a model folder's config.json, when it can be read here.
fn layer_count(path: &Path) -> Result<Option<usize>, String> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return Ok(None);
    }
    let config = path.join("config.json");
    // Only a plain file of a plausible size is read: a FIFO would block, a device never end.
    match std::fs::metadata(&config) {
        Ok(m) if m.is_file() && m.len() <= 64 << 20 => {}
        Ok(_) => {
            return Err(format!(
                "{} is not a regular JSON file of at most 64 MiB",
                config.display()
            ));
        }
        Err(_) => return Ok(None),
    }
    let Ok(text) = std::fs::read_to_string(&config) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not JSON: {e}", config.display()))?;
    let n = v
        .get("num_hidden_layers")
        .or_else(|| v.pointer("/text_config/num_hidden_layers"))
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("{} has no num_hidden_layers", config.display()))?;
    Ok(Some(n as usize))
}

/// Runs `validate`.
pub fn run(args: ValidateArgs) -> Outcome {
    let sources = manifests::read(&args.file)?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut all = Vec::new();
    for s in &sources {
        match cluster_api::manifest::parse_manifests(&s.text) {
            Ok(objects) => all.extend(objects.into_iter().map(|o| (s.label.clone(), o))),
            Err(errors) => problems.extend(errors.iter().map(|e| format!("{}: {e}", s.label))),
        }
    }
    let objects: Vec<_> = all.iter().map(|(_, o)| o.clone()).collect();
    // Each file as if applied alone, finding what it refers to in the other files given (a
    // folder may split one cluster over several files, or hold independent examples).
    for s in &sources {
        let mine: Vec<_> = all
            .iter()
            .filter(|(l, _)| *l == s.label)
            .map(|(_, o)| o.clone())
            .collect();
        let others: Vec<_> = all
            .iter()
            .filter(|(l, o)| {
                *l != s.label
                    && !mine
                        .iter()
                        .any(|m| m.kind == o.kind && m.name() == o.name())
            })
            .map(|(_, o)| o.clone())
            .collect();
        for e in check_references(&mine, &others) {
            problems.push(format!("{}: {e}", s.label));
        }
    }
    for (file, o) in &all {
        let Some(p) = o.as_pipeline() else { continue };
        let Some(stages) = &p.stages else { continue };
        let Some(model) = objects
            .iter()
            .find(|m| m.kind == Kind::Model && m.name() == p.model)
            .and_then(|m| m.as_model())
        else {
            continue;
        };
        let Some(path) = &model.source.path else {
            notes.push(format!(
                "{file}: {}: layer ranges not checked offline ({} is fetched by the agents, which check them at apply)",
                o.describe(),
                model.source.describe()
            ));
            continue;
        };
        match layer_count(path) {
            Ok(Some(n)) => {
                // Each replica's ring covers the layers on its own.
                let replicas = p.replica_count().unwrap_or(1).max(1);
                for r in 0..replicas {
                    let ring: Vec<usize> = (0..stages.len())
                        .filter(|&i| stages[i].replica.unwrap_or(0) == r)
                        .collect();
                    let ranges = ring.iter().map(|&i| stages[i].layers).collect();
                    if let Err(e) = LayerSplit::new(ranges, n) {
                        let replica = (replicas > 1).then_some(r);
                        problems.push(format!(
                            "{file}: {}",
                            ring_split_error(o, &e, &ring, replica)
                        ));
                    }
                }
            }
            Ok(None) => notes.push(format!(
                "{file}: {}: layer ranges not checked against the model ({} is not readable here)",
                o.describe(),
                path.display()
            )),
            Err(why) => problems.push(format!("{file}: {}: spec.model: {why}", o.describe())),
        }
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    if !problems.is_empty() {
        bail!("invalid manifests:\n{}", problems.join("\n"));
    }
    for s in &sources {
        let count = all.iter().filter(|(l, _)| *l == s.label).count();
        println!("{}: {count} object(s) valid", s.label);
    }
    Ok(())
}
