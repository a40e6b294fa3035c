//! Model files served to peers fetching their stages: a file's digests, and byte ranges of a
//! file this node holds whole, streamed as they are read.

use super::*;

/// The file `name` of model `model` when this node holds it whole, with its digests.
fn held_file(
    agent: &Agent,
    model: &str,
    name: &str,
) -> Result<(std::path::PathBuf, crate::fetch::Digests), ApiError> {
    let record = agent
        .store
        .get(Kind::Model, model)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?
        .filter(|r| !r.deleted)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("model {model} does not exist"),
            )
        })?;
    let source = record
        .model_source()
        .ok_or_else(|| ApiError::internal("not a model"))?;
    let path = crate::fetch::model_file(&agent.model_cache(), &source, name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model {model} has no fetched file {name:?}"),
        )
    })?;
    let digests = crate::fetch::Digests::read(&path).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "node {} does not hold {name} of model {model} whole",
                agent.name()
            ),
        )
    })?;
    Ok((path, digests))
}

pub(super) fn model_digests(agent: Arc<Agent>, model: String, tail: warp::path::Tail) -> Answer {
    let (_, digests) = held_file(&agent, &model, tail.as_str())?;
    Ok(reply_json(StatusCode::OK, &digests))
}

/// Bytes read from disk and sent as one piece of a model file's range.
const SERVE_CHUNK: usize = 1 << 20;

/// The most bytes one request for a model file's range may ask for.
const MAX_RANGE_BYTES: u64 = 64 << 20;

/// A byte range of a model file this node holds whole, for a peer fetching its stage.
pub(super) async fn model_bytes(
    agent: Arc<Agent>,
    model: String,
    tail: warp::path::Tail,
    range: Option<String>,
) -> Answer {
    let name = tail.as_str().to_string();
    let (path, digests) = held_file(&agent, &model, &name)?;
    let size = digests.size;
    let bad = |why: String| ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, why);
    let (start, end) = range
        .as_deref()
        .and_then(|r| r.trim().strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()? + 1)))
        .ok_or_else(|| bad("ask for one range: `Range: bytes=FIRST-LAST`".into()))?;
    if start >= end || end > size || end - start > MAX_RANGE_BYTES {
        return Err(bad(format!(
            "bytes {start}-{} of {name} ({size} bytes): ask for at most {MAX_RANGE_BYTES} bytes within the file",
            end.saturating_sub(1)
        )));
    }
    // Streamed as it is read, a chunk at a time, so that sending overlaps reading and a
    // request holds a few chunks of memory, not its whole range.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let corrupt = std::env::var_os("CLUSTERAGENT_TEST_CORRUPT_SERVED_BYTES").is_some();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut at = start;
        let opened = std::fs::File::open(&path).and_then(|mut f| {
            f.seek(SeekFrom::Start(start))?;
            Ok(f)
        });
        let mut f = match opened {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        while at < end {
            let mut chunk = vec![0u8; SERVE_CHUNK.min((end - at) as usize)];
            let read = f.read_exact(&mut chunk);
            // A test hook standing in for a peer whose disk or link damages what it serves.
            if corrupt && at == start {
                chunk[0] ^= 0x5a;
            }
            let failed = read.is_err();
            if tx.blocking_send(read.map(|()| chunk.into())).is_err() || failed {
                // The client went away, or the file could not be read: the reply ends short
                // and the client sees fewer bytes than Content-Length says.
                return;
            }
            at += SERVE_CHUNK as u64;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = warp::reply::stream(stream).into_response();
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    let headers = resp.headers_mut();
    let value = |s: String| warp::http::HeaderValue::from_str(&s).map_err(ApiError::internal);
    headers.insert(
        "content-range",
        value(format!("bytes {start}-{}/{size}", end - 1))?,
    );
    headers.insert("content-length", value((end - start).to_string())?);
    headers.insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}
