//! Moving bytes: small files whole, weights headers, byte ranges into sparse files, and the
//! record of the pieces present.

use super::*;

/// The piece record is updated within a range request once this many bytes and
/// [`CHECKPOINT_EVERY`] have passed since the last update: a stopped fetch fetches again at most
/// that much per file, and a fast one does not spend its time waiting on syncs.
pub(super) const CHECKPOINT: u64 = 4 << 20;
pub(super) const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// The first request for a weights file's header. A safetensors file then says its header's
/// length; a GGUF header (megabytes where it holds the vocabulary) is fetched in doubling steps.
pub(super) const FIRST_HEADER_BYTES: u64 = 64 << 10;
/// Headers longer than this are refused (real GGUF headers, vocabularies included, are a few MB).
pub(super) const MAX_HEADER_BYTES: u64 = 256 << 20;

/// Byte ranges of one file that are present, kept beside it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Pieces {
    pub(super) size: u64,
    pub(super) have: Vec<(u64, u64)>,
}

impl Pieces {
    pub(super) fn path(file: &Path) -> PathBuf {
        let mut name = file.as_os_str().to_owned();
        name.push(".pieces");
        PathBuf::from(name)
    }

    pub(super) fn read(file: &Path) -> Option<Self> {
        let text = std::fs::read(Self::path(file)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub(super) fn write(&self, file: &Path) -> Result<(), String> {
        let path = Self::path(file);
        let tmp = path.with_extension("pieces.tmp");
        let text = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    pub(super) fn add(&mut self, start: u64, end: u64) {
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
    pub(super) fn remove(&mut self, start: u64, end: u64) {
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
    pub(super) fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
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

/// Fetches a small file whole, unless it is already here.
pub(super) fn fetch_whole(
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

/// Bytes read from a reply before they are written out.
const CHUNK: usize = 1 << 20;

/// Writes one fetched range into the sparse file, recording it once it is all there; `sink`
/// sees each part as it lands (offset, bytes). Reading the reply and writing the file overlap:
/// a writer thread takes whole chunks, hands them to `sink` (which hashes them) and makes them
/// durable before it records them, while this thread reads the next ones.
pub(super) fn fetch_range(
    remote: &Remote,
    url: &str,
    path: &Path,
    pieces: &mut Pieces,
    (start, end): (u64, u64),
    stats: &mut Fetched,
    sink: &mut (dyn FnMut(u64, &[u8]) + Send),
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
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(3);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> Result<(), String> {
            let mut at = start;
            let (mut recorded, mut recorded_at) = (start, std::time::Instant::now());
            for buf in full_rx {
                sink(at, &buf);
                file.write_all(&buf)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                at += buf.len() as u64;
                let _ = empty_tx.send(buf);
                if at - recorded >= CHECKPOINT
                    && recorded_at.elapsed() >= CHECKPOINT_EVERY
                    && at < end
                {
                    record(&file, path, pieces, start, at)?;
                    (recorded, recorded_at) = (at, std::time::Instant::now());
                }
            }
            if at == end {
                record(&file, path, pieces, start, end)?;
            } else if at > recorded {
                // Cut short: what did arrive is kept for the next attempt.
                record(&file, path, pieces, start, at)?;
            }
            Ok(())
        });
        let mut at = start;
        let read = (|| -> Result<(), String> {
            while at < end {
                let mut buf = empty_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
                let want = CHUNK.min((end - at) as usize);
                buf.resize(want, 0);
                // Whole chunks, so that the writer makes few large writes.
                let mut filled = 0;
                while filled < want {
                    let n = reader
                        .read(&mut buf[filled..])
                        .map_err(|e| format!("GET {url} (bytes {start}-{end}): {e}"))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                if filled > 0 {
                    at += filled as u64;
                    stats.bytes += filled as u64;
                    if full_tx.send(buf).is_err() {
                        // The writer stopped; its error says why.
                        return Ok(());
                    }
                }
                if filled < want {
                    return Err(format!(
                        "GET {url}: the reply ended at byte {at} of the range {start}-{end}"
                    ));
                }
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(format!("writing {}: the writer panicked", path.display())));
        written.and(read)?;
        stats.requests += 1;
        Ok(())
    })
}

/// Records `[start, end)` as present once its bytes are on disk.
pub(super) fn record(
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
pub(super) fn fetch_header(
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

pub(super) fn write_at(mut file: &File, path: &Path, at: u64, bytes: &[u8]) -> Result<(), String> {
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.write_all(bytes))
        .and_then(|()| file.sync_data())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Where a safetensors header ends, when `prefix` holds its length.
pub(super) fn safetensors_header_end(prefix: &[u8]) -> Option<u64> {
    let len = u64::from_le_bytes(prefix.get(..8)?.try_into().ok()?);
    Some(8 + len)
}

/// Files named in a repository may lie in its subfolders.
pub(super) fn make_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(p) => std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display())),
        None => Ok(()),
    }
}

/// Total size from `Content-Range: bytes a-b/TOTAL`.
pub(super) fn total_size(
    resp: &ureq::http::Response<ureq::Body>,
    url: &str,
) -> Result<u64, String> {
    resp.headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('/').next())
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| format!("GET {url}: a range reply without Content-Range: .../SIZE"))
}
