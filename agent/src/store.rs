//! The agent's copy of the cluster's desired state, in sled: one tree per kind, keyed by name,
//! each value a JSON [`Record`] (tombstones included, so that a deletion is not undone by a
//! peer that was away), and a `meta` tree holding the logical clock. Every write is one
//! transaction over the trees it touches and is flushed before it is acknowledged, so nothing
//! acknowledged is lost when the process is killed.
//!
//! Files can still be damaged or cut short (a disk, a copy, a restore), and sled then opens
//! the longest intact prefix of its log: an older state, without a word. So the store keeps a
//! witness beside it, outside sled ([`WITNESS_FILE`]): how many records it held after each
//! acknowledged write and a fingerprint of their names and versions. An agent whose store does
//! not match its witness refuses to start, naming both, rather than serve (and spread to its
//! peers) a past it does not know is past.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, bail};
use cluster_api::cluster::{FileDigests, Record};
use cluster_api::manifest::{Kind, Object};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;

const CLOCK_KEY: &[u8] = b"clock";

/// The witness's file, in the data directory beside the store's folder.
pub const WITNESS_FILE: &str = "store.witness";

/// The records a store holds, in brief: their count, and the XOR of a hash of each one's kind,
/// name, version and deletion, which a write updates from the records it replaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Summary {
    records: u64,
    fingerprint: u64,
}

impl Summary {
    fn of(record: &Record) -> u64 {
        let o = &record.object;
        let text = format!(
            "{}\n{}\n{}\n{}",
            o.kind, o.metadata.name, o.metadata.resource_version, record.deleted
        );
        let digest = Sha256::digest(text.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(b)
    }

    /// This summary with `new` written over `old` (absent: a record added).
    fn with(mut self, old: Option<&Record>, new: &Record) -> Self {
        match old {
            Some(o) => self.fingerprint ^= Self::of(o),
            None => self.records += 1,
        }
        self.fingerprint ^= Self::of(new);
        self
    }
}

/// The witness file: the summary after the last acknowledged write, and while a write is under
/// way the one it will leave (a kill between the two leaves the store at either).
#[derive(Debug, Serialize, Deserialize)]
struct Witness {
    committed: Summary,
    #[serde(default)]
    pending: Option<Summary>,
}

/// The store.
pub struct Store {
    db: sled::Db,
    trees: HashMap<Kind, sled::Tree>,
    meta: sled::Tree,
    /// Published digests of fetched models' files ([`FileDigests`]), by model and file.
    digests: sled::Tree,
    /// [`WITNESS_FILE`]'s path.
    witness: PathBuf,
    /// The summary of what the store holds; held through a write, which writes one at a time.
    summary: Mutex<Summary>,
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
            .map_err(|e| {
                // sled says a held lock only in its message.
                let held = matches!(&e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"));
                let why = if held {
                    "another agent is using this data directory; give each agent its own --data-dir"
                } else {
                    "its files are damaged or unreadable; restore the data directory from a backup, or move it aside and start again to take the cluster's state from the peers"
                };
                anyhow::anyhow!("opening the store at {}: {why} ({e})", path.display())
            })?;
        let mut trees = HashMap::new();
        for kind in Kind::ALL {
            trees.insert(kind, db.open_tree(tree_name(kind))?);
        }
        let meta = db.open_tree("meta")?;
        let digests = db.open_tree("digests")?;
        let mut store = Self {
            db,
            trees,
            meta,
            digests,
            witness: dir.join(WITNESS_FILE),
            summary: Mutex::new(Summary::default()),
        };
        let held = store
            .all_records()?
            .iter()
            .fold(Summary::default(), |s, r| s.with(None, r));
        store.check_witness(&path, held)?;
        *store
            .summary
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = held;
        store.write_witness(&Witness {
            committed: held,
            pending: None,
        })?;
        Ok(store)
    }

    /// Refuses a store that does not hold what its witness says the last acknowledged write
    /// left (or the write under way when the agent stopped).
    fn check_witness(&self, store: &Path, held: Summary) -> Result<()> {
        let text = match std::fs::read_to_string(&self.witness) {
            Ok(t) => t,
            // A new data directory, or one an older agent kept: nothing to compare with yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", self.witness.display()));
            }
        };
        let w: Witness = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a store witness; remove it to start without the check",
                self.witness.display()
            )
        })?;
        if held == w.committed || Some(held) == w.pending {
            return Ok(());
        }
        let what = if held.records != w.committed.records {
            format!(
                "it holds {} records, and the last write this agent acknowledged left {}",
                held.records, w.committed.records
            )
        } else {
            format!(
                "it holds {} records, but not the versions the last write this agent acknowledged left",
                held.records
            )
        };
        bail!(
            "the store at {} does not hold what it held when this agent last wrote to it: {what} \
             (recorded in {}). Its files were damaged or cut short, and starting from them would \
             serve, and spread to the peers, an older state. Restore the data directory from a \
             backup; or, where other agents hold the cluster's state, move {} and {} aside and \
             start again: the agent then takes the state from its peers.",
            store.display(),
            self.witness.display(),
            store.display(),
            self.witness.display()
        )
    }

    /// Replaces the witness file whole (written beside it, synced, renamed over it).
    fn write_witness(&self, w: &Witness) -> Result<()> {
        use std::io::Write;
        let tmp = self.witness.with_extension("witness.tmp");
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(w)?)?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.witness)
            .with_context(|| format!("replacing {}", self.witness.display()))?;
        if let Some(dir) = self.witness.parent() {
            // The rename itself must reach the disk before the write it vouches for.
            std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
        }
        Ok(())
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
    /// flushes to disk before returning; the witness says what the write will leave before it
    /// and what it left after.
    pub fn write(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut summary = self.summary.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = *summary;
        let mut written: HashMap<(Kind, &str), &Record> = HashMap::new();
        for r in records {
            let (kind, name) = (r.object.kind, r.object.metadata.name.as_str());
            let old = match written.get(&(kind, name)) {
                Some(earlier) => Some((*earlier).clone()),
                None => self.get(kind, name)?,
            };
            next = next.with(old.as_ref(), r);
            written.insert((kind, name), r);
        }
        self.write_witness(&Witness {
            committed: *summary,
            pending: Some(next),
        })?;
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
        // The store holds `next` now (later writes build on it), whether or not the flush and
        // the witness manage to say so: a witness left at `pending: next` matches either state.
        *summary = next;
        self.db.flush().context("flushing the store to disk")?;
        self.write_witness(&Witness {
            committed: next,
            pending: None,
        })
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

    fn nodes(n: usize, version: u64) -> Vec<Record> {
        (0..n)
            .map(|i| {
                record(
                    &format!(
                        "apiVersion: v1\nkind: Node\nmetadata: {{name: n{i}}}\nspec: {{address: 127.0.0.1:{}}}\n",
                        7000 + i
                    ),
                    version + i as u64,
                )
            })
            .collect()
    }

    /// The finding: a store whose files lost their last writes opened with 9 of 10 objects and
    /// said nothing. Here a record goes missing behind the store's back (as a log cut short
    /// loses it), and the agent refuses to open it, naming the store and the witness.
    #[test]
    fn a_store_that_lost_acknowledged_writes_is_refused_naming_its_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path()).expect("opens");
            store.write(&nodes(10, 1)).expect("writes");
        }
        {
            let db = sled::open(dir.path().join("store")).expect("sled opens");
            let nodes = db.open_tree("nodes").expect("tree");
            nodes.remove("n9").expect("removes");
            db.flush().expect("flushes");
        }
        let err = format!("{:#}", Store::open(dir.path()).err().expect("refused"));
        assert!(
            err.contains("it holds 9 records, and the last write this agent acknowledged left 10")
                && err.contains(&dir.path().join("store").display().to_string())
                && err.contains(WITNESS_FILE),
            "{err}"
        );
        // The same count with an older version of one record is refused too.
        {
            let db = sled::open(dir.path().join("store")).expect("sled opens");
            let older = &nodes(10, 0)[9];
            db.open_tree("nodes")
                .expect("tree")
                .insert("n9", serde_json::to_vec(older).expect("encodes"))
                .expect("inserts");
            db.flush().expect("flushes");
        }
        let err = format!("{:#}", Store::open(dir.path()).err().expect("refused"));
        assert!(err.contains("not the versions"), "{err}");
        // Moved aside, as the message says, the agent starts afresh.
        std::fs::rename(dir.path().join("store"), dir.path().join("store.old")).expect("moves");
        std::fs::rename(
            dir.path().join(WITNESS_FILE),
            dir.path().join("witness.old"),
        )
        .expect("moves");
        let store = Store::open(dir.path()).expect("opens empty");
        assert!(store.all_records().expect("lists").is_empty());
    }

    /// A kill between the witness and the store's own write leaves the store at the state
    /// before the write or the one after: both open, and so do stores kept by an older agent
    /// (no witness yet) and rewrites of records already there.
    #[test]
    fn a_write_cut_short_at_any_point_and_a_store_without_witness_still_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let witness = dir.path().join(WITNESS_FILE);
        let (before, after);
        {
            let store = Store::open(dir.path()).expect("opens");
            store.write(&nodes(3, 1)).expect("writes");
            before = std::fs::read_to_string(&witness).expect("witness");
            // A record rewritten at a newer version, and one written twice in one write.
            let mut again = nodes(4, 10);
            again.push(nodes(4, 20).remove(3));
            store.write(&again).expect("writes");
            after = std::fs::read_to_string(&witness).expect("witness");
        }
        let parse = |t: &str| serde_json::from_str::<Witness>(t).expect("a witness");
        let (before, after) = (parse(&before).committed, parse(&after).committed);
        assert_eq!((before.records, after.records), (3, 4));
        // Killed after the store's write, before the witness caught up.
        let cut = Witness {
            committed: before,
            pending: Some(after),
        };
        std::fs::write(&witness, serde_json::to_vec(&cut).expect("encodes")).expect("writes");
        Store::open(dir.path()).expect("opens after the store's write");
        // Killed before the store's write: the witness announced a state never reached.
        let cut = Witness {
            committed: after,
            pending: Some(Summary {
                records: 99,
                fingerprint: 1,
            }),
        };
        std::fs::write(&witness, serde_json::to_vec(&cut).expect("encodes")).expect("writes");
        let store = Store::open(dir.path()).expect("opens before the store's write");
        assert_eq!(
            store
                .get(Kind::Node, "n3")
                .expect("reads")
                .expect("present")
                .object
                .metadata
                .resource_version,
            23
        );
        drop(store);
        std::fs::remove_file(&witness).expect("removes");
        Store::open(dir.path()).expect("opens without a witness");
        assert!(witness.is_file(), "the witness is written again");
    }

    /// Two agents on one data directory: the second is told so; a damaged store is told
    /// otherwise (it was told "is another agent using this data directory?" too).
    #[test]
    fn a_store_in_use_and_a_damaged_one_say_which_they_are() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = Store::open(dir.path()).expect("opens");
        let err = format!("{:#}", Store::open(dir.path()).err().expect("refused"));
        assert!(
            err.contains("another agent is using this data directory"),
            "{err}"
        );
        drop(first);
        std::fs::write(
            dir.path().join("store").join("conf"),
            b"\xff\xfe not a config",
        )
        .expect("damages");
        let err = format!("{:#}", Store::open(dir.path()).err().expect("refused"));
        assert!(
            err.contains("damaged or unreadable") && !err.contains("another agent"),
            "{err}"
        );
    }
}
