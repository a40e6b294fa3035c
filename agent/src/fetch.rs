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
/// The piece record is updated within a range request once this many bytes and
/// [`CHECKPOINT_EVERY`] have passed since the last update: a stopped fetch fetches again at most
/// that much per file, and a fast one does not spend its time waiting on syncs.
const CHECKPOINT: u64 = 4 << 20;
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// The first request for a weights file's header. A safetensors file then says its header's
/// length; a GGUF header (megabytes where it holds the vocabulary) is fetched in doubling steps.
const FIRST_HEADER_BYTES: u64 = 64 << 10;
/// Headers longer than this are refused (real GGUF headers, vocabularies included, are a few MB).
const MAX_HEADER_BYTES: u64 = 256 << 20;
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

    fn gguf(&self) -> Option<&str> {
        self.named
            .iter()
            .find(|f| f.ends_with(".gguf"))
            .map(String::as_str)
    }
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

/// Byte ranges of one file that are present, kept beside it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Pieces {
    size: u64,
    have: Vec<(u64, u64)>,
}

impl Pieces {
    fn path(file: &Path) -> PathBuf {
        let mut name = file.as_os_str().to_owned();
        name.push(".pieces");
        PathBuf::from(name)
    }

    fn read(file: &Path) -> Option<Self> {
        let text = std::fs::read(Self::path(file)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write(&self, file: &Path) -> Result<(), String> {
        let path = Self::path(file);
        let tmp = path.with_extension("pieces.tmp");
        let text = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    fn add(&mut self, start: u64, end: u64) {
        self.have.push((start, end));
        self.have.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.have.len());
        for &(a, b) in &self.have {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.have = merged;
    }

    /// Forgets `[start, end)`: its bytes are no longer trusted.
    fn remove(&mut self, start: u64, end: u64) {
        let mut kept = Vec::with_capacity(self.have.len() + 1);
        for &(a, b) in &self.have {
            if b <= start || a >= end {
                kept.push((a, b));
                continue;
            }
            if a < start {
                kept.push((a, start));
            }
            if b > end {
                kept.push((end, b));
            }
        }
        self.have = kept;
    }

    /// The parts of `[start, end)` not present.
    fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for &(a, b) in &self.have {
            if b <= at {
                continue;
            }
            if a >= end {
                break;
            }
            if a > at {
                out.push((at, a));
            }
            at = at.max(b);
        }
        if at < end {
            out.push((at, end));
        }
        out
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

/// Files named in a repository may lie in its subfolders.
fn make_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(p) => std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display())),
        None => Ok(()),
    }
}

/// Total size from `Content-Range: bytes a-b/TOTAL`.
fn total_size(resp: &ureq::http::Response<ureq::Body>, url: &str) -> Result<u64, String> {
    resp.headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('/').next())
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| format!("GET {url}: a range reply without Content-Range: .../SIZE"))
}

/// Fetches a small file whole, unless it is already here.
fn fetch_whole(
    remote: &Remote,
    dir: &Path,
    name: &str,
    required: bool,
    stats: &mut Fetched,
) -> Result<bool, String> {
    let path = dir.join(name);
    if path.is_file() {
        return Ok(true);
    }
    make_parent(&path)?;
    let url = remote.url(name);
    let Some(resp) = get(remote, &url, None)? else {
        return if required {
            Err(format!(
                "GET {url}: 404 Not Found (a model folder needs {name}; for a repository of GGUF files, name one in source.hf.files)"
            ))
        } else {
            Ok(false)
        };
    };
    let body = resp
        .into_body()
        .with_config()
        .limit(MAX_HEADER_BYTES)
        .read_to_vec()
        .map_err(|e| format!("GET {url}: {e}"))?;
    stats.bytes += body.len() as u64;
    stats.requests += 1;
    let tmp = path.with_file_name(format!(
        ".{}.part",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, &body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(true)
}

/// Writes one fetched range into the sparse file, recording it once it is all there; `sink`
/// sees each part as it lands (offset, bytes).
fn fetch_range(
    remote: &Remote,
    url: &str,
    path: &Path,
    pieces: &mut Pieces,
    (start, end): (u64, u64),
    stats: &mut Fetched,
    sink: &mut dyn FnMut(u64, &[u8]),
) -> Result<(), String> {
    let resp =
        get(remote, url, Some((start, end)))?.ok_or_else(|| format!("GET {url}: 404 Not Found"))?;
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    let (mut recorded, mut recorded_at) = (start, std::time::Instant::now());
    while at < end {
        let want = buf.len().min((end - at) as usize);
        let n = reader
            .read(&mut buf[..want])
            .map_err(|e| format!("GET {url} (bytes {start}-{end}): {e}"))?;
        if n == 0 {
            return Err(format!(
                "GET {url}: the reply ended at byte {at} of the range {start}-{end}"
            ));
        }
        file.write_all(&buf[..n])
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        sink(at, &buf[..n]);
        at += n as u64;
        stats.bytes += n as u64;
        if at - recorded >= CHECKPOINT && recorded_at.elapsed() >= CHECKPOINT_EVERY && at < end {
            record(&file, path, pieces, start, at)?;
            (recorded, recorded_at) = (at, std::time::Instant::now());
        }
    }
    stats.requests += 1;
    record(&file, path, pieces, start, end)
}

/// Records `[start, end)` as present once its bytes are on disk.
fn record(
    file: &File,
    path: &Path,
    pieces: &mut Pieces,
    start: u64,
    end: u64,
) -> Result<(), String> {
    file.sync_data()
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    pieces.add(start, end);
    pieces.write(path)
}

/// Makes the sparse file for a weights file and fetches its header, unless already here.
fn fetch_header(
    remote: &Remote,
    dir: &Path,
    name: &str,
    stats: &mut Fetched,
) -> Result<(), String> {
    let path = dir.join(name);
    make_parent(&path)?;
    let url = remote.url(name);
    let mut pieces = match Pieces::read(&path) {
        Some(p) if path.is_file() => p,
        _ => Pieces::default(),
    };
    if pieces.have.first().is_some_and(|&(a, _)| a == 0) && pieces.size > 0 {
        return Ok(());
    }
    let gguf = name.ends_with(".gguf");
    let kind = if gguf { "GGUF" } else { "safetensors" };
    // The prefix grows by fetching only what it lacks; all of it is kept.
    let mut prefix: Vec<u8> = Vec::new();
    let mut size = u64::MAX;
    let mut want = FIRST_HEADER_BYTES;
    loop {
        let from = prefix.len() as u64;
        let resp = get(remote, &url, Some((from, want.min(size))))?
            .ok_or_else(|| format!("GET {url}: 404 Not Found (the model names {name})"))?;
        size = total_size(&resp, &url)?;
        let part = resp
            .into_body()
            .with_config()
            .limit(want - from)
            .read_to_vec()
            .map_err(|e| format!("GET {url}: {e}"))?;
        stats.bytes += part.len() as u64;
        stats.requests += 1;
        prefix.extend_from_slice(&part);
        if prefix.len() >= 4 && gguf && !prefix.starts_with(b"GGUF") {
            return Err(format!(
                "{url}: not a GGUF file (it does not start with GGUF)"
            ));
        }
        let header_end = if gguf {
            cluster_engine::gguf::header_end(&prefix)
        } else {
            safetensors_header_end(&prefix)
        };
        let have = prefix.len() as u64;
        match header_end {
            Some(end) if end > size || end > MAX_HEADER_BYTES => {
                return Err(format!(
                    "{url}: not a readable {kind} file: its header would end at byte {end} of {size}"
                ));
            }
            Some(end) if end <= have => {
                if pieces.size != size {
                    // Another size than a previous attempt saw: the file changed; start over.
                    pieces = Pieces {
                        size,
                        have: Vec::new(),
                    };
                }
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| format!("creating {}: {e}", path.display()))?;
                file.set_len(size)
                    .map_err(|e| format!("sizing {}: {e}", path.display()))?;
                // All of the prefix is the file's own bytes: keep it, tensors' bytes included,
                // rather than fetch them again.
                write_at(&file, &path, 0, &prefix)?;
                pieces.add(0, have);
                return pieces.write(&path);
            }
            // A safetensors header says its length: fetch exactly the rest.
            Some(end) => want = end,
            None if have >= size || have >= MAX_HEADER_BYTES => {
                return Err(format!(
                    "{url}: not a readable {kind} file: no whole header in its first {have} of {size} bytes"
                ));
            }
            None => want = (want * 2).min(size).min(MAX_HEADER_BYTES),
        }
    }
}

fn write_at(mut file: &File, path: &Path, at: u64, bytes: &[u8]) -> Result<(), String> {
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.write_all(bytes))
        .and_then(|()| file.sync_data())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Where a safetensors header ends, when `prefix` holds its length.
fn safetensors_header_end(prefix: &[u8]) -> Option<u64> {
    let len = u64::from_le_bytes(prefix.get(..8)?.try_into().ok()?);
    Some(8 + len)
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

/// Bytes a folder's files take on disk: allocated blocks, so the holes of sparse files are free.
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = entry.metadata() else { continue };
        total += if m.is_dir() {
            disk_bytes(&entry.path())
        } else {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            }
            #[cfg(not(unix))]
            {
                m.len()
            }
        };
    }
    total
}

/// Marks a fetched model's folder as used now, for [`evict`]'s order.
fn touch(dir: &Path) {
    let _ = std::fs::write(dir.join(".last-used"), b"");
}

/// Removes fetched models that are not in `keep` (the folders of models some pipeline uses),
/// least recently used first, until the cache takes at most `max` bytes on disk. Returns each
/// folder removed with the bytes it took. Models in use are never removed, even over the cap.
pub fn evict(cache: &Path, max: u64, keep: &[PathBuf]) -> Vec<(PathBuf, u64)> {
    let mut models: Vec<(std::time::SystemTime, PathBuf, u64)> = Vec::new();
    for kind in ["hf", "url"] {
        for entry in std::fs::read_dir(cache.join(kind))
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let used = std::fs::metadata(dir.join(".last-used"))
                .or_else(|_| std::fs::metadata(&dir))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let bytes = disk_bytes(&dir);
            models.push((used, dir, bytes));
        }
    }
    let mut total: u64 = models.iter().map(|(_, _, b)| b).sum();
    models.sort();
    let mut removed = Vec::new();
    for (_, dir, bytes) in models {
        if total <= max {
            break;
        }
        if keep.contains(&dir) {
            continue;
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            total -= bytes;
            removed.push((dir, bytes));
        }
    }
    removed
}

/// Other agents that may hold the model's files whole, asked before the hub.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    /// The Model object's name (peers find their copy by it).
    pub model: String,
    /// The cluster token the peers' routes need.
    pub token: String,
    /// (node name, control-plane address) of each peer.
    pub nodes: Vec<(String, String)>,
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
}

impl Digests {
    fn path(file: &Path) -> PathBuf {
        let mut name = file.as_os_str().to_owned();
        name.push(".digests");
        PathBuf::from(name)
    }

    /// The digests of `file`, when it is held whole.
    pub fn read(file: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::path(file)).ok()?).ok()
    }
}

/// The path of file `name` of a fetched model in `cache`, when `name` stays inside its folder.
pub fn model_file(cache: &Path, source: &ModelSource, name: &str) -> Option<PathBuf> {
    let plain = |p: &str| !p.is_empty() && p != "." && p != ".." && !p.contains('\\');
    if !source.is_remote() || !name.split('/').all(plain) {
        return None;
    }
    Some(model_dir(cache, source).join(name))
}

impl Remote {
    /// A peer's route serving the model's files it holds.
    fn peer(address: &str, peers: &Peers) -> Self {
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
fn digest_range(path: &Path, start: u64, end: u64) -> Result<String, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f.take(end - start), &mut h)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 the source gives for a file, if any: the hub answers a HEAD of an LFS file with
/// a redirect carrying `X-Linked-Etag: "<sha256>"` (or, for a file it serves itself, an
/// `ETag` that is one).
fn source_sha256(remote: &Remote, name: &str) -> Option<String> {
    let url = remote.url(name);
    let mut req = remote
        .http
        .head(&url)
        .config()
        .max_redirects(0)
        .max_redirects_will_error(false)
        .build();
    if let Some(token) = &remote.auth {
        req = req.header("Authorization", &format!("Bearer {token}"));
    }
    let resp = req.call().ok()?;
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

/// sha256 of tensors computed as their bytes arrive, so that checking a peer's bytes costs no
/// second read.
struct Streamed {
    tensors: Vec<(u64, u64)>,
    hashers: Vec<Sha256>,
    fed: Vec<u64>,
}

impl Streamed {
    fn new(tensors: &[(u64, u64)]) -> Self {
        Self {
            tensors: tensors.to_vec(),
            hashers: tensors.iter().map(|_| Sha256::new()).collect(),
            fed: vec![0; tensors.len()],
        }
    }

    /// Bytes at `at`, arriving in increasing order within each tensor.
    fn feed(&mut self, at: u64, bytes: &[u8]) {
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
    fn digest(&mut self, i: usize) -> Option<String> {
        let (a, b) = self.tensors[i];
        (self.fed[i] == b - a).then(|| hex(&std::mem::take(&mut self.hashers[i]).finalize()))
    }
}

/// The first peer holding file `name` whole, with its digests.
fn peer_with(
    peers: &Peers,
    bad: &std::collections::BTreeSet<String>,
    name: &str,
    size: u64,
) -> Option<(String, Remote, Digests)> {
    for (node, address) in peers.nodes.iter().filter(|(n, _)| !bad.contains(n)) {
        let remote = Remote::peer(address, peers);
        let url = format!(
            "http://{address}/internal/v1/models/{}/digests/{name}",
            peers.model
        );
        let Ok(Some(resp)) = get(&remote, &url, None) else {
            continue;
        };
        let Ok(digests) = resp.into_body().read_json::<Digests>() else {
            continue;
        };
        if digests.size == size {
            return Some((node.clone(), remote, digests));
        }
    }
    None
}

/// Fetches every byte of the weights a stage holding `range` needs that is not in the cache
/// yet: from a peer holding the file whole when there is one (each tensor checked against the
/// peer's digests; a mismatch is reported through `note` and fetched from the source instead),
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
    progress: &mut dyn FnMut(u64, u64),
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
        if let Some((node, peer, digests)) = peer_with(peers, &bad_peers, &name, pieces.size) {
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
            // Every tensor this stage needs from that file is checked against the peer's
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
                    "{rejected} bytes of {name} from {node} did not match its digests: discarded, fetched from {} instead",
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
mod tests {
    use super::*;

    #[test]
    fn pieces_merge_and_say_what_is_missing() {
        let mut p = Pieces::default();
        p.add(10, 20);
        p.add(30, 40);
        p.add(20, 25);
        assert_eq!(p.have, vec![(10, 25), (30, 40)]);
        assert_eq!(p.missing(0, 50), vec![(0, 10), (25, 30), (40, 50)]);
        assert_eq!(p.missing(12, 24), vec![]);
        assert_eq!(p.missing(24, 31), vec![(25, 30)]);
        p.add(0, 100);
        assert_eq!(p.have, vec![(0, 100)]);
        p.remove(10, 20);
        p.remove(90, 120);
        assert_eq!(p.have, vec![(0, 10), (20, 90)]);
        assert_eq!(
            missing_pieces(&p, &[(5, 12), (12, 15), (80, 95)]),
            vec![(10, 15), (90, 95)]
        );
    }

    #[test]
    fn tensors_streamed_whole_are_hashed_as_they_arrive_and_others_are_not() {
        let data: Vec<u8> = (0..100u8).collect();
        let tensors = [(0, 10), (10, 40), (40, 100)];
        let mut s = Streamed::new(&tensors);
        // The first tensor was held before: only bytes 10.. stream through, in uneven parts.
        s.feed(10, &data[10..25]);
        s.feed(25, &data[25..70]);
        s.feed(70, &data[70..100]);
        assert_eq!(s.digest(0), None);
        let sha = |r: std::ops::Range<usize>| hex(&Sha256::digest(&data[r]));
        assert_eq!(s.digest(1), Some(sha(10..40)));
        assert_eq!(s.digest(2), Some(sha(40..100)));
        // A tensor whose start never streamed is not hashed from its middle.
        let mut s = Streamed::new(&tensors);
        s.feed(50, &data[50..100]);
        assert_eq!(s.digest(2), None);
    }

    #[test]
    fn cache_paths_keep_sources_apart() {
        let cache = Path::new("/c");
        let hf = |rev: &str, files: &[&str]| ModelSource {
            hf: Some(cluster_api::manifest::HfSource {
                repo: "org/model".into(),
                revision: rev.into(),
                files: files.iter().map(|f| f.to_string()).collect(),
                endpoint: None,
            }),
            ..ModelSource::default()
        };
        let a = local_path(cache, &hf("main", &[]));
        assert!(a.starts_with("/c/hf") && a.to_string_lossy().contains("org--model-main-"));
        assert_ne!(a, local_path(cache, &hf("v2", &[])));
        assert!(local_path(cache, &hf("main", &["m.Q4_K_M.gguf"])).ends_with("m.Q4_K_M.gguf"));
        let url = ModelSource {
            url: Some("http://h/x/model.gguf".into()),
            ..ModelSource::default()
        };
        assert!(local_path(cache, &url).ends_with("model.gguf"));
        assert_eq!(
            local_path(cache, &ModelSource::local("/m")),
            PathBuf::from("/m")
        );
    }
}
