//! What the agent's HTTP servers (the control plane, the endpoints and their forwarders, a
//! stage's API) share: the one [`serve`] that runs them (header timeout, graceful shutdown), the
//! request body filter and its limits, the bearer credential of a request, a comparison that
//! does not leak where two secrets differ, and waiting for SIGTERM or SIGINT.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use warp::http::HeaderMap;
use warp::{Filter, Reply};

/// Largest body of an OpenAI request (an endpoint's, forwarded or not) and of a stage's API:
/// a prompt of a whole context in JSON fits many times over.
pub const REQUEST_BODY_LIMIT: u64 = 16 << 20;

/// Largest body of a control-plane call (an apply of many manifests, a sync of the store).
pub const CONTROL_BODY_LIMIT: u64 = 64 << 20;

/// How long a client may take to send a request's headers, and how long a kept-alive
/// connection may sit idle before the next request: the connection is closed after it, so a
/// client that opens connections and sends nothing holds no task for long. Longer than the
/// idle age of the agents' own connection pools (ureq keeps one 15 s).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long requests in flight may run on after a server is told to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Connections one source address may hold open at once on one server; a further one is closed
/// as it is accepted. Far above what a client, a benchmark's 128 streams or the agents' own
/// pools open, far below the 65,536 files the service files allow, so one host cannot take
/// every descriptor.
pub const CONNECTIONS_PER_SOURCE: usize = 1024;

/// What one server lets a client do.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_timeout: Duration,
    per_source: usize,
}

/// Open connections by source address.
#[derive(Default)]
struct Sources {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection counted against its source until dropped.
struct Counted {
    sources: std::sync::Arc<Sources>,
    ip: std::net::IpAddr,
}

impl Sources {
    /// Counts a connection from `ip`, unless it already holds `cap`.
    fn enter(self: &std::sync::Arc<Self>, ip: std::net::IpAddr, cap: usize) -> Option<Counted> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Counted {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self
            .sources
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `routes` on `listener` until `shutdown` resolves, then stops accepting and lets the
/// requests in flight finish for at most [`SHUTDOWN_GRACE`]. Every server of the agent runs
/// through here, so the header timeout ([`HEADER_READ_TIMEOUT`]) holds for all of them.
pub async fn serve<F>(
    routes: F,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let limits = Limits {
        header_timeout: HEADER_READ_TIMEOUT,
        per_source: CONNECTIONS_PER_SOURCE,
    };
    serve_with(routes, listener, shutdown, limits).await;
}

async fn serve_with<F>(
    routes: F,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let service = warp::service(routes);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let sources = std::sync::Arc::new(Sources::default());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, counted) = match accepted {
            Ok((stream, peer)) => match sources.enter(peer.ip(), limits.per_source) {
                Some(counted) => (stream, counted),
                None => {
                    tracing::debug!(
                        %peer,
                        "closed a connection: its address holds {} already",
                        limits.per_source
                    );
                    continue;
                }
            },
            // A client that went away before its connection was accepted: nothing to wait for.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                tracing::debug!("accepting a connection: {e}");
                continue;
            }
            Err(e) => {
                // Out of file descriptors, most likely: give connections time to close rather
                // than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("HTTP connection: {e}");
            }
            drop(counted);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still running {} s after shutdown; leaving them",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

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

/// Compares without stopping at the first differing byte, so timing does not reveal a secret
/// (only its length).
pub fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
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

    /// A server of `GET /healthz` under `limits` on a free port: its address, the sender that
    /// stops it, and its task.
    async fn healthz_server(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let routes = warp::path!("healthz").map(|| "ok");
        let server = tokio::spawn(serve_with(
            routes,
            listener,
            async {
                let _ = stopped.await;
            },
            limits,
        ));
        (addr, stop, server)
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off_and_others_are_served() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, stop, server) = healthz_server(Limits {
            header_timeout: Duration::from_millis(300),
            per_source: 8,
        })
        .await;
        let mut slow = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // A whole request on another connection meanwhile is answered.
        let mut quick = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        quick
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut answer = String::new();
        quick
            .read_to_string(&mut answer)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        // The slow one is closed once the timeout passes, without an answer.
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the half-sent request was never cut off");
        assert!(
            !String::from_utf8_lossy(&rest).contains("200 OK"),
            "{rest:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap_or_else(|_| panic!("the server did not stop"))
            .unwrap_or_else(|e| panic!("{e}"));
    }

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

    #[tokio::test]
    async fn connections_past_a_sources_cap_are_closed_and_its_room_comes_back() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, stop, _server) = healthz_server(Limits {
            header_timeout: Duration::from_secs(30),
            per_source: 3,
        })
        .await;
        let connect = || async {
            tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let mut held = vec![connect().await, connect().await, connect().await];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fourth = connect().await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(2), fourth.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "not closed: {read:?}"
        );
        // One of the three goes; a new connection is served.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut next = connect().await;
        next.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), next.read_to_string(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("no answer"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _ = stop.send(());
    }
}
