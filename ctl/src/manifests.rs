//! Reading manifests: a file, every `.yaml`/`.yml`/`.json` file of a folder (sorted), or `-`
//! for stdin; parsed here first so that errors name the file.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cluster_api::manifest::{Object, join_errors, parse_manifests};

use crate::Usage;

/// One source of manifests.
pub struct Source {
    /// The file's path, or `<stdin>`.
    pub label: String,
    /// Its text.
    pub text: String,
}

/// Reads `path` (a file, a folder or `-`).
pub fn read(path: &Path) -> Result<Vec<Source>> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading manifests from stdin")?;
        return Ok(vec![Source {
            label: "<stdin>".into(),
            text,
        }]);
    }
    if !path.exists() {
        return Err(Usage(format!("{}: no such file or folder", path.display())).into());
    }
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Usage(format!("{}: no .yaml, .yml or .json files", path.display())).into());
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            Ok(Source {
                label: f.display().to_string(),
                text,
            })
        })
        .collect()
}

/// Parses every source; the error lists each problem prefixed by its file.
pub fn parse(sources: &[Source]) -> Result<Vec<(String, Object)>> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for s in sources {
        match parse_manifests(&s.text) {
            Ok(found) => objects.extend(found.into_iter().map(|o| (s.label.clone(), o))),
            Err(errors) => {
                for line in join_errors(&errors).lines() {
                    problems.push(format!("{}: {line}", s.label));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("invalid manifests:\n{}", problems.join("\n"));
    }
    Ok(objects)
}
