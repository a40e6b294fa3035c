//! Peers: digests of the files a node holds whole (checked against the source), and fetching
//! a stage's ranges from a peer that holds them, each tensor checked as it arrives.

use super::*;
use cluster_api::cluster::FileDigests;
use std::sync::Arc;

/// Other agents that may hold the model's files whole, asked before the hub, and the book
/// of digests they are checked against.
#[derive(Clone, Default)]
pub struct Peers {
    /// The Model object's name (peers find their copy by it).
    pub model: String,
    /// The cluster token the peers' routes need.
    pub token: String,
    /// (node name, control-plane address) of each peer.
    pub nodes: Vec<(String, String)>,
    /// Where digests of whole files are published and read (the agent's store, which its
    /// peers share); without one, no peer is asked.
    pub book: Option<Arc<dyn DigestBook>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("model", &self.model)
            .field("nodes", &self.nodes)
            .field("book", &self.book.is_some())
            .finish()
    }
}

/// Digests of whole files published for the cluster: a peer's bytes are checked against the
/// entry published here, never against digests the same peer hands over with them.
pub trait DigestBook: Send + Sync {
    /// The entry for `file` of model `model`, if one is published.
    fn published(&self, model: &str, file: &str) -> Option<FileDigests>;
    /// Publishes this node's digests of a file it holds whole (kept unless a later seal of
    /// the same file is already published).
    fn publish(&self, entry: FileDigests);
}

/// Digests of a whole weights file held here (`FILE.digests`): what peers check the ranges
/// they fetch from this node against. Written once every byte of the file is present.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Digests {
    /// The file's size.
    pub size: u64,
    /// sha256 of the whole file (hex).
    pub sha256: String,
    /// Whether `sha256` equals the digest the source itself gives (the hub's LFS oid); false
    /// where the source gives none.
    pub verified: bool,
    /// sha256 of each tensor's bytes: (first byte, end byte, hex).
    pub tensors: Vec<(u64, u64, String)>,
    /// When the file was sealed (milliseconds since the Unix epoch; 0 in records written
    /// before this was kept).
    #[serde(default)]
    pub sealed_at_ms: u64,
}

impl Digests {
    pub(super) fn path(file: &Path) -> PathBuf {
        let mut name = file.as_os_str().to_owned();
        name.push(".digests");
        PathBuf::from(name)
    }

    /// The digests of `file`, when it is held whole.
    pub fn read(file: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::path(file)).ok()?).ok()
    }
}

impl Remote {
    /// A peer's route serving the model's files it holds.
    pub(super) fn peer(address: &str, peers: &Peers) -> Self {
        Self {
            base: format!("http://{address}/internal/v1/models/{}/files/", peers.model),
            named: Vec::new(),
            renamed_single: None,
            auth: Some(peers.token.clone()),
            http: http(),
        }
    }
}

/// sha256 of `[start, end)` of a file.
pub(super) fn digest_range(path: &Path, start: u64, end: u64) -> Result<String, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f.take(end - start), &mut h)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(hex(&h.finalize()))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 the source gives for a file, if any: the hub answers a HEAD of an LFS file with
/// a redirect carrying `X-Linked-Etag: "<sha256>"` (or, for a file it serves itself, an
/// `ETag` that is one).
pub(super) fn source_sha256(remote: &Remote, name: &str) -> Option<String> {
    let resp = remote.head(name)?;
    ["x-linked-etag", "etag"].iter().find_map(|h| {
        let v = resp.headers().get(*h)?.to_str().ok()?;
        let v = v
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_ascii_lowercase();
        (v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit())).then_some(v)
    })
}

/// For each weights file of the model now held whole and not yet sealed: checks it against the
/// source's sha256 where the source gives one (a mismatch discards the file's pieces, so the
/// next attempt fetches it again) and writes its [`Digests`]. Returns the files sealed.
pub fn seal(source: &ModelSource, folder: &ModelFolder) -> Result<Vec<PathBuf>, String> {
    let remote = Remote::of(source)?;
    let mut by_file: std::collections::BTreeMap<PathBuf, Vec<(u64, u64)>> = Default::default();
    for (path, _, a, b) in folder.all_ranges().map_err(|e| e.to_string())? {
        by_file.entry(path).or_default().push((a, b));
    }
    let mut sealed = Vec::new();
    for (path, mut tensors) in by_file {
        let Some(pieces) = Pieces::read(&path) else {
            continue;
        };
        if Digests::read(&path).is_some() || !pieces.missing(0, pieces.size).is_empty() {
            continue;
        }
        tensors.sort_unstable();
        let mut f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut whole = Sha256::new();
        let mut each: Vec<Sha256> = tensors.iter().map(|_| Sha256::new()).collect();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            whole.update(chunk);
            let end = at + n as u64;
            for (h, &(a, b)) in each.iter_mut().zip(&tensors) {
                let (lo, hi) = (a.max(at), b.min(end));
                if lo < hi {
                    h.update(&chunk[(lo - at) as usize..(hi - at) as usize]);
                }
            }
            at = end;
        }
        let sha256 = hex(&whole.finalize());
        let name = file_name_in(&remote, &path)?;
        let verified = match source_sha256(&remote, &name) {
            Some(want) if want != sha256 => {
                let _ = std::fs::remove_file(Pieces::path(&path));
                let _ = std::fs::remove_file(&path);
                return Err(format!(
                    "{}: the fetched file's sha256 is {sha256}, the source says {want}; discarded, it will be fetched again",
                    remote.url(&name)
                ));
            }
            Some(_) => true,
            None => false,
        };
        let digests = Digests {
            size: pieces.size,
            sha256,
            verified,
            tensors: tensors
                .iter()
                .zip(each)
                .map(|(&(a, b), h)| (a, b, hex(&h.finalize())))
                .collect(),
            sealed_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let target = Digests::path(&path);
        let tmp = target.with_extension("digests.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&digests).map_err(|e| e.to_string())?,
        )
        .and_then(|()| std::fs::rename(&tmp, &target))
        .map_err(|e| format!("writing {}: {e}", target.display()))?;
        sealed.push(path);
    }
    Ok(sealed)
}

/// sha256 of tensors computed as their bytes arrive, so that checking a peer's bytes costs no
/// second read.
pub(super) struct Streamed {
    tensors: Vec<(u64, u64)>,
    hashers: Vec<Sha256>,
    fed: Vec<u64>,
}

impl Streamed {
    pub(super) fn new(tensors: &[(u64, u64)]) -> Self {
        Self {
            tensors: tensors.to_vec(),
            hashers: tensors.iter().map(|_| Sha256::new()).collect(),
            fed: vec![0; tensors.len()],
        }
    }

    /// Bytes at `at`, arriving in increasing order within each tensor.
    pub(super) fn feed(&mut self, at: u64, bytes: &[u8]) {
        let end = at + bytes.len() as u64;
        let first = self.tensors.partition_point(|&(_, b)| b <= at);
        for i in first..self.tensors.len() {
            let (a, b) = self.tensors[i];
            if a >= end {
                break;
            }
            let (lo, hi) = (a.max(at), b.min(end));
            // Only a tensor whose bytes all stream through, from its first, is hashed here.
            if lo < hi && self.fed[i] == lo - a {
                self.hashers[i].update(&bytes[(lo - at) as usize..(hi - at) as usize]);
                self.fed[i] += hi - lo;
            }
        }
    }

    /// The digest of tensor `i` if all of its bytes streamed through.
    pub(super) fn digest(&mut self, i: usize) -> Option<String> {
        let (a, b) = self.tensors[i];
        (self.fed[i] == b - a).then(|| hex(&std::mem::take(&mut self.hashers[i]).finalize()))
    }
}

/// Publishes this node's digests of every weights file of the model it holds whole, for
/// `node`; entries already published stay as they are.
pub fn publish_held(
    source: &ModelSource,
    folder: &ModelFolder,
    peers: &Peers,
    node: &str,
) -> Result<usize, String> {
    let Some(book) = &peers.book else {
        return Ok(0);
    };
    let remote = Remote::of(source)?;
    let mut files: Vec<PathBuf> = folder
        .all_ranges()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(path, ..)| path)
        .collect();
    files.sort();
    files.dedup();
    let mut published = 0;
    for path in files {
        let Some(d) = Digests::read(&path) else {
            continue;
        };
        let file = file_name_in(&remote, &path)?;
        let entry = FileDigests {
            model: peers.model.clone(),
            source: source.describe(),
            file,
            size: d.size,
            sha256: d.sha256,
            verified: d.verified,
            sealed_by: node.to_string(),
            sealed_at_ms: d.sealed_at_ms,
            tensors: d.tensors,
        };
        let current = book.published(&entry.model, &entry.file);
        if current.as_ref().is_none_or(|c| entry.supersedes(c)) {
            book.publish(entry);
            published += 1;
        }
    }
    Ok(published)
}

/// The first peer holding file `name` whole, as published: the entry in the book for this
/// model's source and that size, and a peer whose copy has the entry's sha256. The bytes it
/// serves are checked against the published entry.
pub(super) fn peer_with(
    source: &ModelSource,
    peers: &Peers,
    bad: &std::collections::BTreeSet<String>,
    name: &str,
    size: u64,
) -> Option<(String, Remote, FileDigests)> {
    let published = peers
        .book
        .as_ref()?
        .published(&peers.model, name)
        .filter(|d| d.size == size && d.source == source.describe())?;
    for (node, address) in peers.nodes.iter().filter(|(n, _)| !bad.contains(n)) {
        let remote = Remote::peer(address, peers);
        let url = format!(
            "http://{address}/internal/v1/models/{}/digests/{name}",
            peers.model
        );
        let Ok(Some(resp)) = get(&remote, &url, None) else {
            continue;
        };
        let Ok(theirs) = resp.into_body().read_json::<Digests>() else {
            continue;
        };
        if theirs.size == size && theirs.sha256 == published.sha256 {
            return Some((node.clone(), remote, published));
        }
    }
    None
}
