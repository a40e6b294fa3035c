//! An endpoint listening on a node that does not run its pipeline's stage 0: every request is
//! forwarded to the agent of the node that does (which answers it with the endpoint's own
//! keys, model name and limits), and the answer streams back as it comes. A client that goes
//! away closes the forwarded connection, which cancels its sequence on the head as usual.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
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

/// How long connecting to the head may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the head may take to answer a request's headers (a long prompt is prefilled
/// before the first byte of a non-streamed answer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends the request to the head on a connection of its own and returns the answer's status,
/// the headers passed back, and its body as it arrives. Dropping the body closes the
/// connection, which cancels the sequence on the head.
pub(super) async fn send(
    target: &Target,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target.head))
        .await
        .map_err(|_| format!("connecting took over {} s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("forwarded connection: {e}");
        }
    });
    let mut req = hyper::Request::builder()
        .method(method.as_str())
        .uri(format!("/internal/v1/endpoints/{}{path}", target.endpoint))
        .header("host", &target.head)
        .header(TOKEN_HEADER, &target.token);
    for name in PASSED {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| format!("no answer within {} s", ANSWER_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())
}

async fn forward(
    target: Arc<Target>,
    method: Method,
    path: warp::path::FullPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Infallible> {
    Ok(forward_to(&target, &method, path.as_str(), &headers, body).await)
}

/// Sends the request to `target`'s agent and streams its answer back.
pub(super) async fn forward_to(
    target: &Target,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let answer = match send(target, method, path, headers, body).await {
        Ok(a) => a,
        Err(why) => {
            return openai::error(
                503,
                format!(
                    "endpoint {} forwards to the node of stage 0 at {}, which did not answer: {why}",
                    target.endpoint, target.head
                ),
                "service_unavailable",
                None,
                None,
            );
        }
    };
    let status = answer.status().as_u16();
    let passed: Vec<(String, String)> = PASSED
        .iter()
        .filter_map(|n| {
            answer
                .headers()
                .get(*n)
                .and_then(|v| v.to_str().ok())
                .map(|v| (n.to_string(), v.to_string()))
        })
        .collect();
    // The body's chunks go to the client as they come; a task of its own owns the head's
    // connection, so a client that goes away (the receiver dropped) ends it.
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let mut incoming = answer.into_body();
    tokio::spawn(async move {
        loop {
            // A client that goes away is noticed at once, not at the head's next chunk (during
            // a long prefill that is seconds away).
            let frame = tokio::select! {
                frame = incoming.frame() => frame,
                () = tx.closed() => return,
            };
            let Some(frame) = frame else { return };
            let chunk = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => Ok(data),
                    // Trailers: nothing to pass on.
                    Err(_) => continue,
                },
                Err(e) => Err(std::io::Error::other(e)),
            };
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
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
    response
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
        .and(crate::web::body(crate::web::REQUEST_BODY_LIMIT))
        .and_then(forward)
        .recover(super::refused_body)
        .unify();
    crate::web::serve(routes, listener, shutdown).await;
}
