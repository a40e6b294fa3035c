//! Model files fetched over HTTP: from the Hugging Face Hub (or a mirror with its URL layout)
//! or from one file's URL, each node fetching only what it needs.
//!
//! A model lives in the agent's cache (`DATA_DIR/models/`) as the folder (or `.gguf` file) the
//! loader already reads. Small files (`config.json`, tokenizer files, the shard index) are
//! fetched whole. A weights file is a *sparse* file of its full size into which only fetched
//! byte ranges are written: first its header (enough for the loader to open the model and say
//! where each tensor lies), then, before a stage loads, exactly the ranges of that stage's
//! tensors. A `FILE.pieces` record beside it lists the ranges present, written after every
//! piece, so a fetch that stops resumes where it stopped and the loader never reads a hole:
//! [`fetch_stage`] fills every range of the stage before it returns.
//!
//! # Layout
//!
//! - this file: sources and cache paths, [`prepare`] (small files and headers), [`fetch_stage`].
//! - `transfer`: requests, the sparse files and their piece records.
//! - `peers`: digests of files held whole ([`seal`]) and checked fetching from peers.
//! - `cache`: the cap on the cache's size ([`evict`]).

mod cache;
mod peers;
mod transfer;

pub use cache::evict;
use cache::touch;
pub use peers::{DigestBook, Digests, Peers, publish_held, seal};
use peers::{Streamed, digest_range, peer_with};
use transfer::{Pieces, fetch_header, fetch_range, fetch_whole};

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_api::LayerRange;
use cluster_api::manifest::ModelSource;
use cluster_engine::ModelFolder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes asked for in one range request.
const PIECE: u64 = 16 << 20;
/// Bound on connecting and on any silence of the server.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Small files the loader reads when the model has them; the rest are required.
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Where a source's files are fetched from.
struct Remote {
    /// URL of a file named `f` (relative to the model's folder): `base + f`.
    base: String,
    /// The files as named there, when the source names them (`hf.files`, or the URL's file);
    /// otherwise discovered from the folder's usual names.
    named: Vec<String>,
    /// For a URL to a `.safetensors` file: its name there (it is kept as `model.safetensors`).
    renamed_single: Option<String>,
    /// The hub token, sent to the hub only (never to a `url` source).
    auth: Option<String>,
    http: ureq::Agent,
}

/// The Hugging Face token as its own tools find it: `HF_TOKEN`, else the file `HF_TOKEN_PATH`
/// names, else `~/.cache/huggingface/token`. Never in a manifest (the store is replicated).
fn hub_token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token"))
        })?;
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

impl Remote {
    fn of(source: &ModelSource) -> Result<Self, String> {
        if let Some(h) = &source.hf {
            let endpoint = h
                .endpoint
                .clone()
                .or_else(|| std::env::var("HF_ENDPOINT").ok())
                .unwrap_or_else(|| "https://huggingface.co".into());
            return Ok(Self {
                base: format!(
                    "{}/{}/resolve/{}/",
                    endpoint.trim_end_matches('/'),
                    h.repo,
                    h.revision
                ),
                named: h.files.clone(),
                renamed_single: None,
                auth: hub_token(),
                http: http(),
            });
        }
        if let Some(u) = &source.url {
            let (dir, name) = u
                .rsplit_once('/')
                .ok_or_else(|| format!("{u:?} names no file"))?;
            let base = format!("{dir}/");
            return Ok(if name.ends_with(".safetensors") {
                Self {
                    base,
                    named: Vec::new(),
                    renamed_single: Some(name.to_string()),
                    auth: None,
                    http: http(),
                }
            } else {
                Self {
                    base,
                    named: vec![name.to_string()],
                    renamed_single: None,
                    auth: None,
                    http: http(),
                }
            });
        }
        Err("the model's files are local (source.path): nothing to fetch".into())
    }

    fn url(&self, local_name: &str) -> String {
        match (&self.renamed_single, local_name) {
            (Some(remote), SINGLE) => format!("{}{remote}", self.base),
            _ => format!("{}{local_name}", self.base),
        }
    }

    /// A HEAD of file `name` that does not follow a redirect: the hub answers an LFS file with
    /// a redirect to storage whose headers carry what we ask for (commit, sha256). `None` when
    /// there is no answer.
    fn head(&self, name: &str) -> Option<ureq::http::Response<ureq::Body>> {
        let mut req = self
            .http
            .head(&self.url(name))
            .config()
            .max_redirects(0)
            .max_redirects_will_error(false)
            .build();
        if let Some(token) = &self.auth {
            req = req.header("Authorization", &format!("Bearer {token}"));
        }
        req.call().ok()
    }

    fn gguf(&self) -> Option<&str> {
        self.named
            .iter()
            .find(|f| f.ends_with(".gguf"))
            .map(String::as_str)
    }
}

/// The commit a hub source's revision names now: the hub's `X-Repo-Commit` on a HEAD of one of
/// the model's files, not following the redirect to storage. `None` for other sources, for a
/// revision that is already a commit, and where the hub does not say (a mirror without the
/// header, or no answer: fetching the files then says what is wrong).
pub fn resolve_commit(source: &ModelSource) -> Option<String> {
    let h = source.hf.as_ref()?;
    if cluster_api::manifest::is_commit(&h.revision) {
        return None;
    }
    let remote = Remote::of(source).ok()?;
    let probe = remote
        .named
        .first()
        .cloned()
        .unwrap_or_else(|| REQUIRED[0].to_string());
    let resp = remote.head(&probe)?;
    let commit = resp.headers().get("x-repo-commit")?.to_str().ok()?.trim();
    cluster_api::manifest::is_commit(commit).then(|| commit.to_ascii_lowercase())
}

/// The folder in `cache` that holds a remote source's files.
fn model_dir(cache: &Path, source: &ModelSource) -> PathBuf {
    let digest = |text: &str| {
        let h = Sha256::digest(text.as_bytes());
        h.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    match (&source.hf, &source.url) {
        (Some(h), _) => {
            // The endpoint is part of the identity: a mirror may serve other bytes.
            let endpoint = h.endpoint.clone().unwrap_or_default();
            cache.join("hf").join(format!(
                "{}-{}-{}",
                h.repo.replace('/', "--"),
                h.revision.replace('/', "--"),
                digest(&endpoint)
            ))
        }
        (None, Some(u)) => cache.join("url").join(digest(u)),
        (None, None) => cache.join("none"),
    }
}

/// What the loader opens for `source`: its path, or its place in the agent's `cache`.
pub fn local_path(cache: &Path, source: &ModelSource) -> PathBuf {
    if let Some(p) = &source.path {
        return p.clone();
    }
    let dir = model_dir(cache, source);
    match Remote::of(source).ok().as_ref().and_then(Remote::gguf) {
        Some(gguf) => dir.join(gguf),
        None => dir,
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(TIMEOUT))
        .timeout_recv_response(Some(TIMEOUT))
        .timeout_recv_body(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Bytes moved by a fetch.
#[derive(Debug, Default, Clone)]
pub struct Fetched {
    /// Bytes received.
    pub bytes: u64,
    /// Range requests made.
    pub requests: u64,
    /// Of `bytes`, those that came from peers.
    pub peer_bytes: u64,
    /// The peers that served some.
    pub peers: std::collections::BTreeSet<String>,
    /// Bytes from peers that did not match their digests (fetched again from the source).
    pub rejected_bytes: u64,
}

/// GETs `url` (a byte range of it when `range` is given): the response, refused with the
/// address and status when it is not what was asked.
fn get(
    remote: &Remote,
    url: &str,
    range: Option<(u64, u64)>,
) -> Result<Option<ureq::http::Response<ureq::Body>>, String> {
    let mut req = remote.http.get(url);
    if let Some(token) = &remote.auth {
        req = req.header("Authorization", &format!("Bearer {token}"));
    }
    if let Some((a, b)) = range {
        req = req.header("Range", &format!("bytes={a}-{}", b - 1));
    }
    let resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    match resp.status().as_u16() {
        200 if range.is_none() => Ok(Some(resp)),
        206 if range.is_some() => Ok(Some(resp)),
        200 => Err(format!(
            "GET {url}: the server ignored the byte range it was asked for (it must serve ranges, as the Hugging Face Hub does)"
        )),
        404 => Ok(None),
        401 | 403 => Err(format!(
            "GET {url}: {} (the repository is private or gated, or the address is wrong)",
            resp.status()
        )),
        _ => Err(format!("GET {url}: {}", resp.status())),
    }
}

/// Fetches what opening the model needs into `local` (its [`local_path`]): its small files
/// whole, and the header of each weights file. Does nothing for what is already there.
pub fn prepare(local: &Path, source: &ModelSource) -> Result<Fetched, String> {
    let remote = Remote::of(source)?;
    // A GGUF model's path is the file (perhaps in a subfolder of the repository's folder).
    let dir = match remote.gguf() {
        Some(g) => local
            .ancestors()
            .nth(g.split('/').count())
            .unwrap_or(local)
            .to_path_buf(),
        None => local.to_path_buf(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    touch(&dir);
    let mut stats = Fetched::default();
    if let Some(gguf) = remote.gguf() {
        let gguf = gguf.to_string();
        for other in remote.named.iter().filter(|f| **f != gguf) {
            fetch_whole(&remote, &dir, other, true, &mut stats)?;
        }
        fetch_header(&remote, &dir, &gguf, &mut stats)?;
        return Ok(stats);
    }
    let required: Vec<&str> = if remote.named.is_empty() {
        REQUIRED.to_vec()
    } else {
        remote.named.iter().map(String::as_str).collect()
    };
    for name in required
        .iter()
        .filter(|n| !n.ends_with(".safetensors") && **n != INDEX)
    {
        fetch_whole(&remote, &dir, name, true, &mut stats)?;
    }
    if remote.named.is_empty() {
        for name in OPTIONAL {
            fetch_whole(&remote, &dir, name, false, &mut stats)?;
        }
    }
    let sharded =
        remote.renamed_single.is_none() && fetch_whole(&remote, &dir, INDEX, false, &mut stats)?;
    let shards = if sharded {
        let text = std::fs::read(dir.join(INDEX)).map_err(|e| e.to_string())?;
        let index: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", remote.url(INDEX)))?;
        let mut files: Vec<String> = index["weight_map"]
            .as_object()
            .ok_or_else(|| format!("{}: no weight_map", remote.url(INDEX)))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(format!(
                    "{}: {f:?} is not a plain file name",
                    remote.url(INDEX)
                ));
            }
        }
        files
    } else {
        vec![SINGLE.to_string()]
    };
    for shard in &shards {
        fetch_header(&remote, &dir, shard, &mut stats)?;
    }
    Ok(stats)
}

/// Opens a model for its facts (config, tokenizer, where its tensors lie): in place when its
/// files are local, after [`prepare`] in `cache` when they are fetched.
pub fn open(cache: &Path, source: &ModelSource) -> Result<ModelFolder, String> {
    let path = local_path(cache, source);
    if source.is_remote() {
        prepare(&path, source)?;
    }
    ModelFolder::open(&path).map_err(|e| e.to_string())
}

/// The folder of a fetched model in `cache` (`None` for a local source).
pub fn model_root(cache: &Path, source: &ModelSource) -> Option<PathBuf> {
    source.is_remote().then(|| model_dir(cache, source))
}

/// The path of file `name` of a fetched model in `cache`, when `name` stays inside its folder.
pub fn model_file(cache: &Path, source: &ModelSource, name: &str) -> Option<PathBuf> {
    let plain = |p: &str| !p.is_empty() && p != "." && p != ".." && !p.contains('\\');
    if !source.is_remote() || !name.split('/').all(plain) {
        return None;
    }
    Some(model_dir(cache, source).join(name))
}

/// The name of a weights file of the model as its source (and peers) know it.
fn file_name_in(remote: &Remote, path: &Path) -> Result<String, String> {
    // A GGUF model is the one file named (perhaps in a subfolder); safetensors shards lie
    // beside the index, in the model's top folder.
    Ok(match remote.gguf() {
        Some(g) => g.to_string(),
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{}: not a file name", path.display()))?
            .to_string(),
    })
}

/// Fetches every byte of the weights a stage holding `range` needs that is not in the cache
/// yet: from a peer holding the file whole when there is one (each tensor checked against the
/// digests published for the file, not the peer's own; a mismatch is reported through `note`
/// and fetched from the source instead),
/// else from the source, in pieces of at most [`PIECE`] bytes. `progress` gets (bytes present,
/// bytes needed).
#[allow(clippy::too_many_arguments)]
pub fn fetch_stage(
    source: &ModelSource,
    folder: &ModelFolder,
    range: LayerRange,
    first: bool,
    last: bool,
    peers: &Peers,
    note: &mut dyn FnMut(String),
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Fetched, String> {
    let remote = Remote::of(source)?;
    let wanted = folder
        .stage_ranges(range, first, last)
        .map_err(|e| e.to_string())?;
    let mut stats = Fetched::default();
    let mut by_file: std::collections::BTreeMap<PathBuf, Vec<(u64, u64)>> = Default::default();
    let mut needed = 0u64;
    for (path, a, b) in wanted {
        needed += b - a;
        by_file.entry(path).or_default().push((a, b));
    }
    let mut plan = Vec::new();
    let mut missing_total = 0u64;
    for (path, mut tensors) in by_file {
        let pieces = Pieces::read(&path).ok_or_else(|| {
            format!(
                "{}: no record of its fetched pieces (was its header fetched?)",
                path.display()
            )
        })?;
        tensors.sort_unstable();
        tensors.dedup();
        missing_total += missing_pieces(&pieces, &tensors)
            .iter()
            .map(|(a, b)| b - a)
            .sum::<u64>();
        plan.push((path, pieces, tensors));
    }
    let mut present = needed - missing_total;
    progress(present, needed);
    let mut bad_peers = std::collections::BTreeSet::new();
    for (path, mut pieces, tensors) in plan {
        let name = file_name_in(&remote, &path)?;
        let missing = missing_pieces(&pieces, &tensors);
        if missing.is_empty() {
            continue;
        }
        if let Some((node, peer, digests)) =
            peer_with(source, peers, &bad_peers, &name, pieces.size)
        {
            let url = peer.url(&name);
            let mut got = 0u64;
            let mut failed = None;
            let mut streamed = Streamed::new(&tensors);
            for r in &missing {
                let mut sink = |at: u64, bytes: &[u8]| {
                    streamed.feed(at, bytes);
                    got += bytes.len() as u64;
                    present += bytes.len() as u64;
                    progress(present, needed);
                };
                if let Err(e) =
                    fetch_range(&peer, &url, &path, &mut pieces, *r, &mut stats, &mut sink)
                {
                    failed = Some(e);
                    break;
                }
            }
            stats.peer_bytes += got;
            stats.peers.insert(node.clone());
            if let Some(e) = failed {
                note(format!(
                    "fetching {name} from {node} failed ({e}); the rest comes from {}",
                    source.describe()
                ));
            }
            // Every tensor this stage needs from that file is checked against the published
            // digests (those already held were checked when they came).
            let mut rejected = 0u64;
            for (i, &(a, b)) in tensors.iter().enumerate() {
                let fetched_now = missing.iter().any(|&(x, y)| x < b && a < y);
                if !fetched_now {
                    continue;
                }
                let lacking: u64 = pieces.missing(a, b).iter().map(|(x, y)| y - x).sum();
                if lacking > 0 {
                    // Cut short: what came of it cannot be checked alone; fetch it whole.
                    pieces.remove(a, b);
                    present -= (b - a) - lacking;
                    continue;
                }
                let want = digests
                    .tensors
                    .iter()
                    .find(|(x, y, _)| (*x, *y) == (a, b))
                    .map(|(_, _, d)| d.as_str());
                // A tensor partly held before this fetch is hashed from the disk.
                let got = match streamed.digest(i) {
                    Some(d) => d,
                    None => digest_range(&path, a, b)?,
                };
                let ok = want == Some(got.as_str());
                if !ok {
                    pieces.remove(a, b);
                    rejected += b - a;
                }
            }
            pieces.write(&path)?;
            if rejected > 0 {
                // Its other files are not asked for either.
                bad_peers.insert(node.clone());
                present -= rejected;
                progress(present, needed);
                stats.rejected_bytes += rejected;
                note(format!(
                    "{rejected} bytes of {name} from {node} did not match the digests published for it: discarded, fetched from {} instead",
                    source.describe()
                ));
            }
        }
        let url = remote.url(&name);
        for r in missing_pieces(&pieces, &tensors) {
            fetch_range(
                &remote,
                &url,
                &path,
                &mut pieces,
                r,
                &mut stats,
                &mut |_, b| {
                    present += b.len() as u64;
                    progress(present, needed);
                },
            )?;
        }
    }
    Ok(stats)
}

/// The parts of `tensors` (sorted byte ranges) not in `pieces`, neighbours merged, cut into
/// requests of at most [`PIECE`] bytes.
fn missing_pieces(pieces: &Pieces, tensors: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in tensors {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
        .iter()
        .flat_map(|&(a, b)| pieces.missing(a, b))
        .flat_map(|(a, b)| {
            (a..b)
                .step_by(PIECE as usize)
                .map(move |s| (s, (s + PIECE).min(b)))
        })
        .collect()
}

#[cfg(test)]
mod tests;
