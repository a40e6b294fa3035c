//! An Endpoint's HTTP server: OpenAI's routes (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`), Prometheus `/metrics`, and the ring's own `/generate` and `/health`.
//!
//! # Layout
//!
//! - [`openai`]: the OpenAI-compatible routes.
//! - [`stop`]: stop sequences matched across token boundaries.
//! - [`metrics`]: counters, histograms and the text exposition.
//! - [`proxy`]: an endpoint on another node than stage 0's, forwarding to it.
//! - [`replicas`]: requests spread over the pipeline's replicas, and sequences moved to
//!   another replica when theirs fails.

pub mod metrics;
pub mod openai;
pub mod proxy;
pub mod replicas;
pub mod stop;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpListener;
use warp::http::{HeaderMap, Method};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::ring::http::{self, Source};

/// Per-stage figures of the pipeline, as the agent knows them from its nodes' reports.
pub type StageStats = Arc<dyn Fn() -> Vec<metrics::StageGauge> + Send + Sync>;

/// What an endpoint serves.
pub struct EndpointState {
    /// The Endpoint's name.
    pub name: String,
    /// Its pipeline.
    pub pipeline: String,
    /// The model name clients ask for.
    pub served_model: String,
    /// Bearer keys clients must present; empty means open.
    pub api_keys: Vec<String>,
    /// Stage 0 of the pipeline here, looked up per request: its tokenizer and chat template
    /// prepare every request, whichever replica serves it.
    pub source: Source,
    /// The pipeline's replicas, which serve the requests.
    pub router: Arc<replicas::Router>,
    /// Counters.
    pub metrics: metrics::Metrics,
    /// When the endpoint started (Unix seconds), for `/v1/models`.
    pub created: u64,
    /// The pipeline's stages' statistics.
    pub stage_stats: StageStats,
}

impl EndpointState {
    fn authorized(&self, headers: &HeaderMap) -> Result<(), openai::ApiError> {
        if self.api_keys.is_empty() {
            return Ok(());
        }
        match crate::web::bearer(headers) {
            Some(k) if self.api_keys.iter().any(|ok| crate::web::same(ok, k)) => Ok(()),
            Some(_) => Err(openai::ApiError::new(
                401,
                "Incorrect API key provided",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            )),
            None => Err(openai::ApiError::new(
                401,
                "You didn't provide an API key: send `Authorization: Bearer KEY`",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            )),
        }
    }

    fn gauges(&self) -> metrics::PipelineGauges {
        let mut g = metrics::PipelineGauges {
            stages: (self.stage_stats)(),
            ..metrics::PipelineGauges::default()
        };
        if let Ok(shared) = self.source.get() {
            g.max_sequences = shared.config.max_sequences;
            g.queue_depth = shared.jobs.max_capacity() - shared.jobs.capacity();
            if let Some(head) = &shared.head {
                g.in_flight = head.in_flight();
                g.hop_seconds = head.hop_seconds();
                g.serving =
                    Some(head.report(&shared).state == cluster_api::cluster::RingState::Serving);
            }
            // Pass times as the heartbeats brought them, fresher than the nodes' reports.
            let mut beats = vec![shared.own_beat(shared.own_link())];
            beats.extend(shared.links.with(|d| d.relayed()));
            for beat in beats {
                if let Some(st) = g.stages.iter_mut().find(|s| s.index == beat.index) {
                    st.passes = beat.passes;
                }
            }
        }
        g
    }
}

async fn handle(
    state: Arc<EndpointState>,
    method: Method,
    path: warp::path::FullPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Infallible> {
    Ok(respond(state, method, path.as_str(), headers, body).await)
}

/// Answers one request to the endpoint (here, or forwarded from another node).
pub async fn respond(
    state: Arc<EndpointState>,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = path.trim_end_matches('/');
    match (&method, p) {
        (&Method::GET, "/health") => http::health(state.source.clone()),
        (&Method::GET, "/metrics") => warp::reply::with_header(
            state
                .metrics
                .render(&state.name, &state.pipeline, &state.gauges()),
            "content-type",
            "text/plain; version=0.0.4",
        )
        .into_response(),
        (&Method::GET, "/v1/models") => match state.authorized(&headers) {
            Err(e) => e.into_response(),
            Ok(()) => openai::models(&state),
        },
        (&Method::POST, route @ ("/v1/chat/completions" | "/v1/completions")) => {
            match state.authorized(&headers) {
                Err(e) => {
                    state.metrics.request(route, 401);
                    e.into_response()
                }
                Ok(()) => match elsewhere(&state, &headers) {
                    Some(target) => {
                        let answer =
                            proxy::forward_to(&target, &method, route, &headers, body).await;
                        state.metrics.request(route, answer.status().as_u16());
                        answer
                    }
                    None => {
                        let chat = route == "/v1/chat/completions";
                        openai::complete(state.clone(), chat, &headers, body).await
                    }
                },
            }
        }
        (&Method::POST, "/generate") => match state.authorized(&headers) {
            Err(e) => e.into_response(),
            Ok(()) => match http::generate(state.source.clone(), body).await {
                Ok(r) => r,
                Err(never) => match never {},
            },
        },
        _ => openai::error(
            404,
            format!("no route {method} {path}"),
            "invalid_request_error",
            None,
            None,
        ),
    }
}

/// Another replica's agent to answer a completion when this node's own stage 0 is not there
/// to prepare it. A request another agent forwarded here (it carries the cluster token's
/// header) is never sent on again, so two agents never pass one back and forth.
fn elsewhere(state: &EndpointState, headers: &HeaderMap) -> Option<proxy::Target> {
    if state.source.get().is_ok() || headers.contains_key(proxy::TOKEN_HEADER) {
        return None;
    }
    state.router.elsewhere()
}

/// A request refused before its handler ran, answered with OpenAI's error body.
pub async fn refused_body(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let (status, message) = match rejection.find::<crate::web::BodyRefused>() {
        Some(r) => r.answer(),
        None => (400, format!("{rejection:?}")),
    };
    Ok(openai::error(
        status,
        message,
        "invalid_request_error",
        None,
        None,
    ))
}

/// Serves the endpoint on `listener` until `shutdown`.
pub async fn serve(
    state: Arc<EndpointState>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let routes = warp::any()
        .map(move || state.clone())
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(crate::web::body(crate::web::REQUEST_BODY_LIMIT))
        .and_then(handle)
        .recover(refused_body)
        .unify();
    crate::web::serve(routes, listener, shutdown).await;
}
