//! What the agent's HTTP servers (the control plane and the endpoints) share: the bearer
//! credential of a request, a comparison that does not leak where two secrets differ, the
//! request body filter, and waiting for SIGTERM or SIGINT.

use bytes::Bytes;
use warp::Filter;
use warp::http::HeaderMap;

/// The credential of `Authorization: Bearer ...`, if the request has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110): `bearer` is as good as `Bearer`.
            let (scheme, credential) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(credential)
        })
        .map(str::trim)
}

/// Compares without stopping at the first differing byte, so timing does not reveal a secret.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request's body was refused before it was read.
#[derive(Debug)]
pub enum BodyRefused {
    /// `Content-Length` over the route's limit (413).
    TooLarge {
        /// What the request says it sends.
        length: u64,
        /// What the route takes.
        limit: u64,
    },
    /// A chunked body, whose size is not known before it is read (411).
    LengthRequired,
}

impl warp::reject::Reject for BodyRefused {}

impl BodyRefused {
    /// The HTTP status and a message for the client.
    pub fn answer(&self) -> (u16, String) {
        match self {
            Self::TooLarge { length, limit } => (
                413,
                format!("the request body is {length} bytes; this route takes at most {limit}"),
            ),
            Self::LengthRequired => (
                411,
                "send the body with a Content-Length (chunked bodies are not read)".into(),
            ),
        }
    }
}

/// The request body, at most `limit` bytes. A body must come with its length (clients and
/// agents always send one): a larger one is refused (413) and a chunked one too (411), before
/// anything is read; bodiless requests (GET, DELETE) get an empty one.
pub fn body(limit: u64) -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::header::optional::<String>("transfer-encoding"))
        .and_then(
            move |length: Option<u64>, coding: Option<String>| async move {
                match (length, coding) {
                    (Some(length), _) if length > limit => {
                        Err(warp::reject::custom(BodyRefused::TooLarge {
                            length,
                            limit,
                        }))
                    }
                    (None, Some(c)) if c.to_ascii_lowercase().contains("chunked") => {
                        Err(warp::reject::custom(BodyRefused::LengthRequired))
                    }
                    _ => Ok(()),
                }
            },
        )
        .untuple_one()
        .and(warp::body::bytes())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials_are_read_and_compared() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            "authorization",
            "Bearer s3cret ".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(bearer(&h), Some("s3cret"));
        h.insert(
            "authorization",
            "bearer s3cret".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(bearer(&h), Some("s3cret"));
        h.insert(
            "authorization",
            "Basic s3cret".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(bearer(&h), None);
        assert!(same("s3cret", "s3cret") && !same("s3cret", "s3creT") && !same("s3", "s3cret"));
    }
}
