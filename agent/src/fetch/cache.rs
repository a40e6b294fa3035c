//! The cache's size: fetched models no pipeline uses are removed, least recently used first.

use super::*;

/// Bytes a folder's files take on disk: allocated blocks, so the holes of sparse files are free.
pub(super) fn disk_bytes(dir: &Path) -> u64 {
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
pub(super) fn touch(dir: &Path) {
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
