//! Stage 0's HTTP API for callers of the ring: `POST /generate` streams newline-delimited JSON
//! events (one per token, then `done` or `error`); `GET /health` reports whether the ring is
//! whole. The OpenAI-compatible endpoint is built on the same head.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use cluster_api::SamplingParams;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::head::{Event, Request};
use super::node::Shared;

/// Body of `POST /generate`: exactly one of `prompt`, `messages` or `prompt_ids`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// Plain text, encoded with the tokenizer's special tokens.
    pub prompt: Option<String>,
    /// A chat, rendered with the model's template.
    pub messages: Option<serde_json::Value>,
    /// Token ids as they are.
    pub prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Keep going past EOS tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Sampling parameters (greedy when absent).
    #[serde(default)]
    pub sampling: SamplingParams,
    /// How many of `prompt_ids`' last ids a run of this sequence elsewhere already generated
    /// (an endpoint failing a stream over to this replica): see `head::Request::resumed`.
    #[serde(default)]
    pub resumed: usize,
}

fn default_max_tokens() -> usize {
    128
}

fn error_reply(status: u16, message: String) -> warp::reply::Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    warp::reply::with_status(warp::reply::json(&json!({"error": message})), status).into_response()
}

fn prompt_ids(shared: &Shared, body: &GenerateBody) -> Result<Vec<u32>, String> {
    let head = shared.head.as_ref().ok_or("this stage is not stage 0")?;
    let context = head.folder().config.max_position_embeddings;
    // Text far past the context is refused after counting a piece of it, not tokenized whole.
    let within =
        |text: &str, special: bool| match head.tokenizer().encode_within(text, special, context) {
            Ok(Ok(ids)) => Ok(ids),
            Ok(Err(n)) => Err(format!(
                "the prompt has at least {n} tokens but the model's context is {context} tokens"
            )),
            Err(e) => Err(e.to_string()),
        };
    match (&body.prompt, &body.messages, &body.prompt_ids) {
        (Some(p), None, None) => within(p, true),
        (None, Some(m), None) => {
            let template = head
                .folder()
                .chat_template
                .as_ref()
                .ok_or("the model has no chat template; send `prompt` instead")?;
            let text = template.render(m, true, None).map_err(|e| e.to_string())?;
            within(&text, false)
        }
        (None, None, Some(ids)) => Ok(ids.clone()),
        _ => Err("give exactly one of `prompt`, `messages` or `prompt_ids`".into()),
    }
}

/// Finds the stage-0 state a request goes to: always the same one under `clusteragent stage`;
/// looked up per request in the agent, where the stage may be reloaded (a new placement)
/// while its endpoint keeps listening. `Err` says why there is none (503).
#[derive(Clone)]
pub struct Source(Arc<dyn Fn() -> Result<Arc<Shared>, String> + Send + Sync + 'static>);

impl Source {
    /// A source that asks `find` on each request.
    pub fn new(find: impl Fn() -> Result<Arc<Shared>, String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(find))
    }

    /// Stage 0's state now, or why there is none.
    pub fn get(&self) -> Result<Arc<Shared>, String> {
        (self.0)()
    }
}

/// A source that always gives `shared`.
pub fn fixed(shared: Arc<Shared>) -> Source {
    Source::new(move || Ok(shared.clone()))
}

/// `POST /generate`: streams newline-delimited JSON events.
pub async fn generate(
    source: Source,
    raw: bytes::Bytes,
) -> Result<warp::reply::Response, Infallible> {
    let body: GenerateBody = match serde_json::from_slice(&raw) {
        Ok(b) => b,
        Err(e) => return Ok(error_reply(400, format!("request body: {e}"))),
    };
    let shared = match source.get() {
        Ok(s) => s,
        Err(why) => return Ok(error_reply(503, why)),
    };
    let Some(head) = shared.head.clone() else {
        return Ok(error_reply(404, "this stage is not stage 0".into()));
    };
    if body.resumed > 0 && body.prompt_ids.is_none() {
        return Ok(error_reply(
            400,
            "`resumed` needs `prompt_ids`: the original prompt's ids and the tokens generated so far".into(),
        ));
    }
    let ids = match prompt_ids(&shared, &body) {
        Ok(ids) => ids,
        Err(m) => return Ok(error_reply(400, m)),
    };
    let request = Request {
        prompt_ids: ids,
        max_tokens: body.max_tokens,
        sampling: body.sampling,
        ignore_eos: body.ignore_eos,
        resumed: body.resumed,
    };
    let mut events = match head.submit(&shared, request) {
        Ok(rx) => rx,
        Err(refusal) => return Ok(error_reply(refusal.status, refusal.message)),
    };
    // When the caller goes away, this stream (and the receiver in it) is dropped; the head
    // notices the closed channel and cancels the sequence around the ring.
    let stream = futures_util::stream::poll_fn(move |cx| {
        events.poll_recv(cx).map(|e| {
            e.map(|event: Event| {
                let mut line = serde_json::to_vec(&event).unwrap_or_default();
                line.push(b'\n');
                Ok::<_, Infallible>(bytes::Bytes::from(line))
            })
        })
    });
    let reply = warp::reply::stream(stream);
    Ok(warp::reply::with_header(reply, "content-type", "application/x-ndjson").into_response())
}

/// `GET /health`: whether the ring is whole, with stage 0's counters.
pub fn health(source: Source) -> warp::reply::Response {
    let shared = match source.get() {
        Ok(s) => s,
        Err(why) => {
            let body = json!({"ring": "down", "detail": why});
            return warp::reply::with_status(
                warp::reply::json(&body),
                StatusCode::SERVICE_UNAVAILABLE,
            )
            .into_response();
        }
    };
    let head = shared.head.as_ref();
    let report = head.map(|h| h.report(&shared));
    let up = report
        .as_ref()
        .is_some_and(|r| r.state == cluster_api::cluster::RingState::Serving);
    // Every stage's passes, as the heartbeats brought them round.
    let mut stages = vec![shared.own_beat(shared.own_link())];
    stages.extend(shared.links.with(|d| d.relayed()));
    let body = json!({
        "pipeline": shared.config.pipeline,
        "stage": shared.index,
        "ring": if up { "up" } else { "down" },
        "state": report.as_ref().map(|r| r.state),
        "detail": report.and_then(|r| r.message),
        "sequences": head.map(|h| h.in_flight()),
        "cached_sequences": shared.stage.sequences(),
        "metrics": shared.metrics.snapshot(),
        "stages": stages,
    });
    let code = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), code).into_response()
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    source: Source,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let with_shared = warp::any().map(move || source.clone());
    let generate_route = warp::post()
        .and(warp::path!("generate"))
        .and(with_shared.clone())
        .and(warp::body::content_length_limit(
            crate::web::REQUEST_BODY_LIMIT,
        ))
        .and(warp::body::bytes())
        .and_then(generate);
    let health_route = warp::get()
        .and(warp::path!("health"))
        .and(with_shared)
        .map(health);
    let routes = generate_route.or(health_route);
    crate::web::serve(routes, listener, shutdown).await;
}

/// Binds the API's address, naming it when that fails.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the HTTP API on {addr}: {e}"))
}
