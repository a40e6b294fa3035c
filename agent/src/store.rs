//! The agent's copy of the cluster's desired state, in sled: one tree per kind, keyed by name,
//! each value a JSON [`Record`] (tombstones included, so that a deletion is not undone by a
//! peer that was away), and a `meta` tree holding the logical clock. Every write is one
//! transaction over the trees it touches and is flushed before it is acknowledged, so nothing
//! acknowledged is lost when the process is killed.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use cluster_api::cluster::{FileDigests, Record};
use cluster_api::manifest::{Kind, Object};
use sled::Transactional;

const CLOCK_KEY: &[u8] = b"clock";

/// The store.
pub struct Store {
    db: sled::Db,
    trees: HashMap<Kind, sled::Tree>,
    meta: sled::Tree,
    /// Published digests of fetched models' files ([`FileDigests`]), by model and file.
    digests: sled::Tree,
}

fn tree_name(kind: Kind) -> &'static str {
    kind.plural()
}

impl Store {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
        // The store holds Endpoints' API keys: only this user may read it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
                || format!("making the data directory {} private (0700)", dir.display()),
            )?;
        }
        let path = dir.join("store");
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::LowSpace)
            .open()
            .with_context(|| {
                format!(
                    "opening the store at {} (is another agent using this data directory?)",
                    path.display()
                )
            })?;
        let mut trees = HashMap::new();
        for kind in Kind::ALL {
            trees.insert(kind, db.open_tree(tree_name(kind))?);
        }
        let meta = db.open_tree("meta")?;
        let digests = db.open_tree("digests")?;
        Ok(Self {
            db,
            trees,
            meta,
            digests,
        })
    }

    fn tree(&self, kind: Kind) -> &sled::Tree {
        // Every kind's tree is opened in `open`.
        &self.trees[&kind]
    }

    /// The logical clock: the highest version written or seen.
    pub fn clock(&self) -> Result<u64> {
        Ok(self
            .meta
            .get(CLOCK_KEY)?
            .map(|v| decode_u64(&v))
            .unwrap_or(0))
    }

    /// One record, tombstone or not.
    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<Record>> {
        self.tree(kind)
            .get(name.as_bytes())?
            .map(|v| decode(kind, name, &v))
            .transpose()
    }

    /// Every record of a kind, tombstones included, by name.
    pub fn records(&self, kind: Kind) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for item in self.tree(kind).iter() {
            let (k, v) = item?;
            out.push(decode(kind, &String::from_utf8_lossy(&k), &v)?);
        }
        Ok(out)
    }

    /// Every record of every kind.
    pub fn all_records(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for kind in Kind::ALL {
            out.extend(self.records(kind)?);
        }
        Ok(out)
    }

    /// Live (not deleted) records of a kind.
    pub fn live(&self, kind: Kind) -> Result<Vec<Record>> {
        Ok(self
            .records(kind)?
            .into_iter()
            .filter(|r| !r.deleted)
            .collect())
    }

    /// Every live object.
    pub fn live_objects(&self) -> Result<Vec<Object>> {
        let mut out = Vec::new();
        for kind in Kind::ALL {
            out.extend(self.live(kind)?.into_iter().map(|r| r.object));
        }
        Ok(out)
    }

    /// Writes `records` in one transaction, raising the clock to their highest version, and
    /// flushes to disk before returning.
    pub fn write(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut encoded = Vec::with_capacity(records.len());
        for r in records {
            encoded.push((
                r.object.kind,
                r.object.metadata.name.clone(),
                serde_json::to_vec(r)?,
            ));
        }
        let top = records
            .iter()
            .map(|r| r.object.metadata.resource_version)
            .max()
            .unwrap_or(0);
        let mut trees: Vec<sled::Tree> = Kind::ALL.iter().map(|k| self.tree(*k).clone()).collect();
        trees.push(self.meta.clone());
        trees
            .as_slice()
            .transaction(|t| {
                for (kind, name, bytes) in &encoded {
                    let i = Kind::ALL.iter().position(|k| k == kind).unwrap_or(0);
                    t[i].insert(name.as_bytes(), bytes.as_slice())?;
                }
                let meta = &t[Kind::ALL.len()];
                let clock = meta.get(CLOCK_KEY)?.map(|v| decode_u64(&v)).unwrap_or(0);
                if top > clock {
                    meta.insert(CLOCK_KEY, &top.to_be_bytes())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| anyhow::anyhow!("writing to the store: {e:?}"))?;
        self.db.flush().context("flushing the store to disk")?;
        Ok(())
    }

    /// The published digests of `file` of model `model`, if any.
    pub fn file_digests(&self, model: &str, file: &str) -> Result<Option<FileDigests>> {
        let key = format!("{model}\n{file}");
        self.digests
            .get(key.as_bytes())?
            .map(|v| {
                serde_json::from_slice(&v)
                    .with_context(|| format!("the store's digests of {file} of model {model}"))
            })
            .transpose()
    }

    /// Every published digest entry.
    pub fn all_file_digests(&self) -> Result<Vec<FileDigests>> {
        let mut out = Vec::new();
        for item in self.digests.iter() {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).context("a digests entry in the store")?);
        }
        Ok(out)
    }

    /// Keeps each of `entries` that supersedes the stored one of its key (or has none), flushed
    /// to disk before returning. Returns how many were kept.
    pub fn merge_file_digests(&self, entries: &[FileDigests]) -> Result<usize> {
        let mut kept = 0;
        for e in entries {
            let key = e.key();
            let bytes = serde_json::to_vec(e)?;
            // Compare and swap, so that two writers racing keep the entry that supersedes.
            loop {
                let old = self.digests.get(key.as_bytes())?;
                if let Some(o) = &old {
                    let o: FileDigests =
                        serde_json::from_slice(o).context("a digests entry in the store")?;
                    if !e.supersedes(&o) {
                        break;
                    }
                }
                if self
                    .digests
                    .compare_and_swap(key.as_bytes(), old, Some(bytes.as_slice()))?
                    .is_ok()
                {
                    kept += 1;
                    break;
                }
            }
        }
        if kept > 0 {
            self.db.flush().context("flushing the store to disk")?;
        }
        Ok(kept)
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().context("flushing the store to disk")?;
        Ok(())
    }

    /// Raises the clock to at least `seen` (a version seen from a peer), so this agent's next
    /// write orders after it.
    pub fn observe(&self, seen: u64) -> Result<()> {
        let clock = self.clock()?;
        if seen > clock {
            self.meta.insert(CLOCK_KEY, &seen.to_be_bytes())?;
            self.db.flush()?;
        }
        Ok(())
    }
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(b)
}

fn decode(kind: Kind, name: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes)
        .with_context(|| format!("the store's record of {kind} {name} is unreadable"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_api::manifest::parse_manifests;

    fn record(text: &str, rv: u64) -> Record {
        let mut object = parse_manifests(text)
            .expect("parses")
            .into_iter()
            .next()
            .expect("one object");
        object.metadata.resource_version = rv;
        Record {
            object,
            deleted: false,
            placement: None,
            revision: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_the_clock_follows_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path()).expect("opens");
            let node = record(
                "apiVersion: v1\nkind: Node\nmetadata: {name: a}\nspec: {address: 127.0.0.1:7070}\n",
                3,
            );
            store.write(&[node]).expect("writes");
            assert_eq!(store.clock().expect("clock"), 3);
        }
        let store = Store::open(dir.path()).expect("reopens");
        let got = store.get(Kind::Node, "a").expect("reads").expect("present");
        assert_eq!(got.object.metadata.resource_version, 3);
        assert_eq!(store.live_objects().expect("lists").len(), 1);
        assert_eq!(store.clock().expect("clock"), 3);
        store.observe(10).expect("observes");
        assert_eq!(store.clock().expect("clock"), 10);
    }

    fn digests(file: &str, node: &str, at: u64, sha: &str) -> FileDigests {
        FileDigests {
            model: "m".into(),
            source: "hf://o/r@main".into(),
            file: file.into(),
            size: 10,
            sha256: sha.into(),
            verified: true,
            sealed_by: node.into(),
            sealed_at_ms: at,
            tensors: vec![(0, 10, sha.into())],
        }
    }

    /// Two agents seal the same file: whichever order the entries arrive in, every store keeps
    /// the later seal, a repeat of a kept entry changes nothing, and entries survive reopening.
    #[test]
    fn published_digests_converge_on_the_later_seal_and_persist() {
        let older = digests("a.safetensors", "node-b", 100, "aa");
        let newer = digests("a.safetensors", "node-a", 200, "bb");
        let other = digests("b.safetensors", "node-a", 50, "cc");
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for (dir, (order, want_kept)) in dirs.iter().zip([
            (vec![older.clone(), newer.clone(), other.clone()], 3),
            (vec![other.clone(), newer.clone(), older.clone()], 2),
        ]) {
            let store = Store::open(dir.path()).unwrap();
            let kept: usize = order
                .iter()
                .map(|e| store.merge_file_digests(std::slice::from_ref(e)).unwrap())
                .sum();
            assert_eq!(kept, want_kept);
            assert_eq!(
                store
                    .merge_file_digests(std::slice::from_ref(&newer))
                    .unwrap(),
                0
            );
        }
        for dir in &dirs {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.file_digests("m", "a.safetensors").unwrap(),
                Some(newer.clone())
            );
            assert_eq!(
                store.file_digests("m", "b.safetensors").unwrap(),
                Some(other.clone())
            );
            assert_eq!(store.file_digests("m", "c.safetensors").unwrap(), None);
            assert_eq!(store.all_file_digests().unwrap().len(), 2);
        }
    }
}
