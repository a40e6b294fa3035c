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

/// The request body, at most `limit` bytes. A body must come with its length (clients and
/// agents always send one); bodiless requests (GET, DELETE) send none and get an empty one.
pub fn body(
    limit: u64,
) -> impl Filter<Extract = (Bytes,), Error = std::convert::Infallible> + Clone {
    warp::body::content_length_limit(limit)
        .and(warp::body::bytes())
        .or(warp::any().map(Bytes::new))
        .unify()
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
