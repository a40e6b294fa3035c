//! OpenAI's chat and text completions on a pipeline: the request's fields as OpenAI defines
//! them (unknown ones ignored, as OpenAI does), prompts rendered with the model's own chat
//! template, stop sequences matched across tokens, server-sent events when streaming, and
//! OpenAI's error body with the status that fits.

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use cluster_api::{FinishReason, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Reply, reply};

use super::EndpointState;
use super::replicas::Generation;
use super::stop::StopMatcher;
use crate::ring::head::{Event, Request};

mod request;

use self::request::{Kind, StreamUsage, prepare};

/// A stream that has sent nothing for this long gets an SSE comment (`: keep-alive`), which
/// clients ignore: a long prompt's prefill, or a slow stage's pass, can take many seconds before
/// the first token, and proxies and load balancers close connections that stay silent (nginx
/// after 60 s by default).
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// An error as OpenAI reports it: status, message, type, parameter and code.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    /// An error with OpenAI's fields.
    pub fn new(
        status: u16,
        message: impl Into<String>,
        kind: &'static str,
        param: Option<&'static str>,
        code: Option<&'static str>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param,
            code,
        }
    }

    /// OpenAI's error body with the status.
    pub fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        reply::with_status(reply::json(&body), status).into_response()
    }
}

/// OpenAI's error body as a response.
pub fn error(
    status: u16,
    message: impl Into<String>,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
) -> Response {
    ApiError::new(status, message, kind, param, code).into_response()
}

fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    format!(
        "{prefix}-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/models`.
pub fn models(state: &EndpointState) -> Response {
    reply::json(&json!({
        "object": "list",
        "data": [{
            "id": state.served_model,
            "object": "model",
            "created": state.created,
            "owned_by": "clusteragent",
        }],
    }))
    .into_response()
}

/// How a generation ended, as OpenAI says it.
fn finish_text(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// Token times for the latency histograms.
struct Clock {
    admitted: Instant,
    last: Option<Instant>,
}

impl Clock {
    fn tick(&mut self, state: &EndpointState) {
        let now = Instant::now();
        match self.last {
            None => state.metrics.ttft.observe(now - self.admitted),
            Some(t) => state.metrics.itl.observe(now - t),
        }
        self.last = Some(now);
        state
            .metrics
            .generated_tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `POST /v1/chat/completions` (`chat`) or `POST /v1/completions`.
pub async fn complete(
    state: std::sync::Arc<EndpointState>,
    chat: bool,
    headers: &warp::http::HeaderMap,
    body: Bytes,
) -> Response {
    let kind = if chat { Kind::Chat } else { Kind::Text };
    let route = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let shared = match state.source.get() {
        Ok(s) => s,
        Err(why) => {
            state.metrics.request(route, 503);
            return error(503, why, "service_unavailable", None, None);
        }
    };
    let Some(head) = shared.head.clone() else {
        state.metrics.request(route, 503);
        return error(
            503,
            "no generation loop here",
            "service_unavailable",
            None,
            None,
        );
    };
    let prepared = match prepare(&state, &head, kind, &body) {
        Ok(p) => p,
        Err(e) => {
            state.metrics.request(route, e.status);
            return e.into_response();
        }
    };
    let prompt_tokens = prepared.request.prompt_ids.len();
    drop(shared);
    let events = match Generation::start(state.clone(), prepared.request, headers).await {
        Ok(g) => g,
        Err(refusal) => {
            state.metrics.request(route, refusal.status);
            return match refusal.status {
                429 => {
                    let r = error(
                        429,
                        refusal.message,
                        "rate_limit_error",
                        None,
                        Some("rate_limit_exceeded"),
                    );
                    reply::with_header(r, "retry-after", "1").into_response()
                }
                503 => error(503, refusal.message, "service_unavailable", None, None),
                s => error(s, refusal.message, "invalid_request_error", None, None),
            };
        }
    };
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, std::sync::atomic::Ordering::Relaxed);
    state.metrics.request(route, 200);
    let id = random_id(if chat { "chatcmpl" } else { "cmpl" });
    let clock = Clock {
        admitted: Instant::now(),
        last: None,
    };
    let ctx = Ctx {
        state,
        kind,
        id,
        created: unix_now(),
        prompt_tokens,
        matcher: StopMatcher::new(prepared.stops),
        clock,
    };
    if prepared.stream {
        stream(ctx, events, prepared.usage)
    } else {
        whole(ctx, events).await
    }
}

struct Ctx {
    state: std::sync::Arc<EndpointState>,
    kind: Kind,
    id: String,
    created: u64,
    prompt_tokens: usize,
    matcher: StopMatcher,
    clock: Clock,
}

impl Ctx {
    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// One streamed chunk with `text` (or, for chat, the role) and maybe the finish reason;
    /// `generated` tokens so far, for the usage that `continuous_usage_stats` puts in each.
    fn chunk(
        &self,
        text: Option<&str>,
        finish: Option<&str>,
        usage: StreamUsage,
        generated: usize,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.state.served_model,
            "choices": [choice],
        });
        if usage.every_chunk {
            v["usage"] = self.usage(generated);
        } else if usage.last {
            v["usage"] = Value::Null;
        }
        v
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// A generation's outcome after stop sequences.
enum Step {
    Text(String),
    Finished(&'static str, usize),
    Failed(String),
}

/// Turns the next head event into what the client sees.
fn step(ctx: &mut Ctx, event: Option<Event>, generated: &mut usize) -> Step {
    match event {
        Some(Event::Token { text, .. }) => {
            *generated += 1;
            ctx.clock.tick(&ctx.state);
            let out = ctx.matcher.push(&text);
            if ctx.matcher.stopped() {
                // Release what came before the stop, then end.
                if out.is_empty() {
                    Step::Finished("stop", *generated)
                } else {
                    Step::Text(out)
                }
            } else {
                Step::Text(out)
            }
        }
        Some(Event::Done {
            finish_reason,
            completion_tokens,
            ..
        }) => {
            let rest = ctx.matcher.finish();
            if rest.is_empty() {
                Step::Finished(finish_text(finish_reason), completion_tokens)
            } else {
                // Released first; the finish comes with the next call (no more events).
                ctx.matcher = StopMatcher::new(Vec::new());
                Step::Text(rest)
            }
        }
        Some(Event::Error { message }) => Step::Failed(message),
        None => Step::Failed("the generation ended without a result".into()),
    }
}

async fn whole(mut ctx: Ctx, mut events: Generation) -> Response {
    let mut text = String::new();
    let mut generated = 0usize;
    let (finish, completion) = loop {
        if ctx.matcher.stopped() {
            break ("stop", generated);
        }
        let event = events.next().await;
        let done = matches!(event, Some(Event::Done { .. }));
        let (finish_reason, completion_tokens) = match &event {
            Some(Event::Done {
                finish_reason,
                completion_tokens,
                ..
            }) => (Some(finish_text(*finish_reason)), *completion_tokens),
            _ => (None, 0),
        };
        match step(&mut ctx, event, &mut generated) {
            Step::Text(t) => {
                text.push_str(&t);
                if done {
                    break (finish_reason.unwrap_or("stop"), completion_tokens);
                }
            }
            Step::Finished(f, n) => break (f, n),
            Step::Failed(message) => {
                return error(503, message, "service_unavailable", None, None);
            }
        }
    };
    // Dropping `events` here cancels a sequence stopped early, around the ring.
    drop(events);
    let choice = match ctx.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish,
        }),
        Kind::Text => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish,
        }),
    };
    reply::json(&json!({
        "id": ctx.id,
        "object": ctx.object(false),
        "created": ctx.created,
        "model": ctx.state.served_model,
        "choices": [choice],
        "usage": ctx.usage(completion),
    }))
    .into_response()
}

fn stream(mut ctx: Ctx, mut events: Generation, usage: StreamUsage) -> Response {
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let gone = |ctx: &Ctx| {
            ctx.state
                .metrics
                .cancelled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        if ctx.kind == Kind::Chat
            && tx
                .send(sse(&ctx.chunk(None, None, usage, 0)))
                .await
                .is_err()
        {
            gone(&ctx);
            return;
        }
        let mut generated = 0usize;
        let mut quiet =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        loop {
            if ctx.matcher.stopped() {
                let last = ctx.chunk(None, Some("stop"), usage, generated);
                let _ = tx.send(sse(&last)).await;
                if usage.last {
                    let _ = tx.send(usage_chunk(&ctx, generated)).await;
                }
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                return;
            }
            let event = tokio::select! {
                e = events.next() => e,
                _ = tx.closed() => {
                    gone(&ctx);
                    return;
                }
                _ = quiet.tick() => {
                    if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                        gone(&ctx);
                        return;
                    }
                    continue;
                }
            };
            quiet.reset();
            let done = match &event {
                Some(Event::Done {
                    finish_reason,
                    completion_tokens,
                    ..
                }) => Some((finish_text(*finish_reason), *completion_tokens)),
                _ => None,
            };
            let sent = match step(&mut ctx, event, &mut generated) {
                Step::Text(t) => {
                    let mut ok = true;
                    // A token's chunk with no text tells a client that counts tokens that
                    // one came; an end's chunk of no text has nothing to tell.
                    if !t.is_empty() || (usage.every_chunk && done.is_none()) {
                        ok = tx
                            .send(sse(&ctx.chunk(Some(&t), None, usage, generated)))
                            .await
                            .is_ok();
                    }
                    if let Some((finish, n)) = done {
                        finish_stream(&ctx, &tx, finish, n, usage).await;
                        return;
                    }
                    ok
                }
                Step::Finished(finish, n) => {
                    finish_stream(&ctx, &tx, finish, n, usage).await;
                    return;
                }
                Step::Failed(message) => {
                    let e = json!({"error": {"message": message, "type": "service_unavailable", "param": null, "code": null}});
                    let _ = tx.send(sse(&e)).await;
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
            };
            if !sent {
                gone(&ctx);
                return;
            }
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>))
    });
    let r = reply::stream(body);
    let r = reply::with_header(r, "content-type", "text/event-stream");
    reply::with_header(r, "cache-control", "no-cache").into_response()
}

fn usage_chunk(ctx: &Ctx, completion: usize) -> Bytes {
    sse(&json!({
        "id": ctx.id,
        "object": ctx.object(true),
        "created": ctx.created,
        "model": ctx.state.served_model,
        "choices": [],
        "usage": ctx.usage(completion),
    }))
}

async fn finish_stream(
    ctx: &Ctx,
    tx: &mpsc::Sender<Bytes>,
    finish: &str,
    completion: usize,
    usage: StreamUsage,
) {
    let _ = tx
        .send(sse(&ctx.chunk(None, Some(finish), usage, completion)))
        .await;
    if usage.last {
        let _ = tx.send(usage_chunk(ctx, completion)).await;
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}
