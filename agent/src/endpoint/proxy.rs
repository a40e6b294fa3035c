//! An endpoint listening on a node that does not run its pipeline's stage 0: every request is
//! forwarded to the agent of the node that does (which answers it with the endpoint's own
//! keys, model name and limits), and the answer streams back as it comes. A client that goes
//! away closes the forwarded connection, which cancels its sequence on the head as usual.

use std::convert::Infallible;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::openai;

/// Where an endpoint's requests go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The Endpoint's name.
    pub endpoint: String,
    /// The control-plane address of the node that runs stage 0.
    pub head: String,
    /// The cluster token, which the head's agent requires of forwarded requests.
    pub token: String,
}

/// The header that carries the cluster token on forwarded requests (the client's own
/// `Authorization`, its API key, travels unchanged).
pub const TOKEN_HEADER: &str = "x-cluster-token";

/// Headers passed on, both ways.
const PASSED: [&str; 4] = [
    "authorization",
    "content-type",
    "retry-after",
    "cache-control",
];

type Head = Result<(u16, Vec<(String, String)>), String>;

fn forward_blocking(
    target: &Target,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    head_tx: oneshot::Sender<Head>,
    chunks: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!(
        "http://{}/internal/v1/endpoints/{}{path}",
        target.head, target.endpoint
    );
    let mut req = ureq::http::Request::builder()
        .method(method.as_str())
        .uri(&url)
        .header(TOKEN_HEADER, &target.token);
    for name in PASSED {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            req = req.header(name, v);
        }
    }
    let req = match req.body(body.to_vec()) {
        Ok(r) => r,
        Err(e) => {
            let _ = head_tx.send(Err(e.to_string()));
            return;
        }
    };
    let resp = match http.run(req) {
        Ok(r) => r,
        Err(e) => {
            let _ = head_tx.send(Err(e.to_string()));
            return;
        }
    };
    let status = resp.status().as_u16();
    let passed: Vec<(String, String)> = PASSED
        .iter()
        .filter_map(|n| {
            resp.headers()
                .get(*n)
                .and_then(|v| v.to_str().ok())
                .map(|v| (n.to_string(), v.to_string()))
        })
        .collect();
    if head_tx.send(Ok((status, passed))).is_err() {
        return;
    }
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                // The client went away: returning drops the connection to the head, which
                // cancels the sequence there.
                if chunks
                    .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = chunks.blocking_send(Err(e));
                return;
            }
        }
    }
}

async fn forward(
    target: Arc<Target>,
    method: Method,
    path: warp::path::FullPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Infallible> {
    let (head_tx, head_rx) = oneshot::channel();
    let (tx, mut rx) = mpsc::channel(16);
    let path = path.as_str().to_string();
    let t = target.clone();
    tokio::task::spawn_blocking(move || {
        forward_blocking(&t, &method, &path, &headers, body, head_tx, tx)
    });
    let (status, passed) = match head_rx.await {
        Ok(Ok(h)) => h,
        Ok(Err(why)) => {
            return Ok(openai::error(
                503,
                format!(
                    "endpoint {} forwards to the node of stage 0 at {}, which did not answer: {why}",
                    target.endpoint, target.head
                ),
                "service_unavailable",
                None,
                None,
            ));
        }
        Err(_) => {
            return Ok(openai::error(
                503,
                "the forwarded request ended without an answer",
                "service_unavailable",
                None,
                None,
            ));
        }
    };
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = warp::reply::stream(stream).into_response();
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in passed {
        if let (Ok(n), Ok(v)) = (
            warp::http::header::HeaderName::from_bytes(name.as_bytes()),
            warp::http::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(n, v);
        }
    }
    Ok(response)
}

/// Serves the forwarding endpoint on `listener` until `shutdown`.
pub async fn serve(
    target: Target,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let target = Arc::new(target);
    let routes = warp::any()
        .map(move || target.clone())
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(crate::web::body(16 << 20))
        .and_then(forward)
        .recover(super::refused_body)
        .unify();
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}
