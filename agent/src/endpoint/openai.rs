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
use super::stop::StopMatcher;
use crate::ring::head::{Event, Request};

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

fn bad(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    ApiError::new(400, message, "invalid_request_error", param, None)
}

/// A prompt's ids from [`TextTokenizer::encode_within`](cluster_engine::tokenizer::TextTokenizer::encode_within),
/// or OpenAI's context error when it holds more tokens than the model's `context`.
fn within_context(
    encoded: cluster_engine::Result<Result<Vec<u32>, usize>>,
    context: usize,
    param: &'static str,
) -> Result<Vec<u32>, ApiError> {
    match encoded {
        Ok(Ok(ids)) => Ok(ids),
        Ok(Err(n)) => Err(ApiError::new(
            400,
            format!(
                "This model's maximum context length is {context} tokens; your prompt has at least {n} tokens"
            ),
            "invalid_request_error",
            Some(param),
            Some("context_length_exceeded"),
        )),
        Err(e) => Err(bad(e.to_string(), Some(param))),
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A message whose `content` is a list of parts (as many OpenAI clients send it) with its text
/// parts joined into one string, which text models' chat templates expect; any other part is
/// refused by name.
fn flatten_content(i: usize, msg: &Value) -> Result<Value, ApiError> {
    let Some(Value::Array(parts)) = msg.get("content") else {
        return Ok(msg.clone());
    };
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            (kind, _) => {
                return Err(ApiError::new(
                    400,
                    format!(
                        "messages[{i}].content[{j}] is a part of type {}: this model reads text parts only",
                        kind.map(|k| format!("{k:?}"))
                            .unwrap_or_else(|| "(none)".into())
                    ),
                    "invalid_request_error",
                    Some("messages"),
                    None,
                ));
            }
        }
    }
    let mut out = msg.clone();
    out["content"] = Value::String(text);
    Ok(out)
}

/// The fields of a chat or text completion request this server reads; others are ignored.
#[derive(Debug, Default, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    messages: Option<Value>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    ignore_eos: Option<bool>,
    repetition_penalty: Option<f32>,
    tools: Option<Value>,
    logprobs: Option<Value>,
    echo: Option<bool>,
    best_of: Option<i64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
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

fn stops(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    bad("`stop` must be a string or a list of strings", Some("stop"))
                })
            })
            .collect(),
        Some(_) => Err(bad(
            "`stop` must be a string or a list of strings",
            Some("stop"),
        )),
    }
}

/// Everything checked and prepared before admission.
struct Prepared {
    request: Request,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn prepare(
    state: &EndpointState,
    head: &crate::ring::head::Head,
    kind: Kind,
    body: &[u8],
) -> Result<Prepared, ApiError> {
    let req: CompletionRequest = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the request body is not valid: {e}"), None))?;
    let Some(model) = &req.model else {
        return Err(bad("you must give `model`", Some("model")));
    };
    if *model != state.served_model {
        return Err(ApiError::new(
            404,
            format!(
                "The model `{model}` does not exist: this endpoint serves `{}`",
                state.served_model
            ),
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ));
    }
    if let Some(n) = req.n
        && n != 1
    {
        return Err(bad(
            format!("n = {n} is not supported: this server returns one choice per request"),
            Some("n"),
        ));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(bad(
            "best_of other than 1 is not supported",
            Some("best_of"),
        ));
    }
    if req.echo == Some(true) {
        return Err(bad("echo is not supported", Some("echo")));
    }
    let wants_logprobs = match &req.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(_) => true,
    };
    if wants_logprobs {
        return Err(bad("logprobs are not supported", Some("logprobs")));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            format!("temperature {temperature} is outside 0-2"),
            Some("temperature"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            format!("top_p {top_p} is outside (0, 1]"),
            Some("top_p"),
        ));
    }
    let stops = stops(&req.stop)?;
    let tokenizer = head.tokenizer();
    let context = head.folder().config.max_position_embeddings;
    let prompt_ids = match kind {
        Kind::Chat => {
            let messages = match &req.messages {
                Some(Value::Array(m)) if !m.is_empty() => Value::Array(
                    m.iter()
                        .enumerate()
                        .map(|(i, msg)| flatten_content(i, msg))
                        .collect::<Result<_, _>>()?,
                ),
                _ => {
                    return Err(bad(
                        "`messages` must be a non-empty list of messages",
                        Some("messages"),
                    ));
                }
            };
            let template = head.folder().chat_template.as_ref().ok_or_else(|| {
                bad(
                    "the model has no chat template: use /v1/completions with a prompt",
                    Some("messages"),
                )
            })?;
            let mut extra = serde_json::Map::new();
            if let Some(t) = &req.tools {
                extra.insert("tools".into(), t.clone());
            }
            let text = template
                .render(&messages, true, (!extra.is_empty()).then_some(&extra))
                .map_err(|e| {
                    bad(
                        format!("rendering the chat template: {e}"),
                        Some("messages"),
                    )
                })?;
            within_context(
                tokenizer.encode_within(&text, false, context),
                context,
                "messages",
            )?
        }
        Kind::Text => {
            let one = match &req.prompt {
                Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
                    Value::Array(items.clone())
                }
                Some(Value::Array(items)) if items.len() == 1 => items[0].clone(),
                Some(Value::Array(_)) => {
                    return Err(bad(
                        "one prompt per request: a list of several prompts is not supported",
                        Some("prompt"),
                    ));
                }
                Some(v) => v.clone(),
                None => return Err(bad("you must give `prompt`", Some("prompt"))),
            };
            match one {
                Value::String(s) => within_context(
                    tokenizer.encode_within(&s, true, context),
                    context,
                    "prompt",
                )?,
                Value::Array(ids) => {
                    let ids = ids
                        .iter()
                        .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
                        .collect::<Option<Vec<u32>>>()
                        .ok_or_else(|| {
                            bad("a token-id prompt must hold integers", Some("prompt"))
                        })?;
                    let vocab = head.folder().config.vocab_size;
                    if let Some((at, id)) = ids
                        .iter()
                        .enumerate()
                        .find(|(_, id)| **id as usize >= vocab)
                    {
                        return Err(bad(
                            format!(
                                "token id {id} at position {at} is outside the model's vocabulary (ids 0-{})",
                                vocab - 1
                            ),
                            Some("prompt"),
                        ));
                    }
                    ids
                }
                _ => {
                    return Err(bad(
                        "`prompt` must be a string or a list of token ids",
                        Some("prompt"),
                    ));
                }
            }
        }
    };
    let room = context.saturating_sub(prompt_ids.len());
    if room == 0 {
        return Err(ApiError::new(
            400,
            format!(
                "This model's maximum context length is {context} tokens; your prompt has {} tokens",
                prompt_ids.len()
            ),
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ));
    }
    let asked = req.max_completion_tokens.or(req.max_tokens);
    let (param, max_tokens) = match asked {
        None => ("max_tokens", room),
        Some(n) if n < 1 => {
            return Err(bad(
                format!("max_tokens must be at least 1, got {n}"),
                Some("max_tokens"),
            ));
        }
        Some(n) => ("max_tokens", n as usize),
    };
    if max_tokens > room {
        return Err(ApiError::new(
            400,
            format!(
                "This model's maximum context length is {context} tokens; the prompt has {} tokens and {max_tokens} more were requested",
                prompt_ids.len()
            ),
            "invalid_request_error",
            Some(param),
            Some("context_length_exceeded"),
        ));
    }
    let seed = match req.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    let sampling = SamplingParams {
        temperature,
        top_p: (top_p < 1.0).then_some(top_p),
        top_k: req.top_k.filter(|k| *k > 0).map(|k| k as usize),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        seed,
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .map_err(|m| bad(m, Some("repetition_penalty")))?;
    Ok(Prepared {
        request: Request {
            prompt_ids,
            max_tokens,
            sampling,
            ignore_eos: req.ignore_eos.unwrap_or(false),
        },
        stops,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
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
pub async fn complete(state: std::sync::Arc<EndpointState>, chat: bool, body: Bytes) -> Response {
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
    let events = match head.submit(&shared, prepared.request) {
        Ok(rx) => rx,
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
        stream(ctx, events, prepared.include_usage)
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

    /// One streamed chunk with `text` (or, for chat, the role) and maybe the finish reason.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, usage_field: bool) -> Value {
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
        if usage_field {
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

async fn whole(mut ctx: Ctx, mut events: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut generated = 0usize;
    let (finish, completion) = loop {
        if ctx.matcher.stopped() {
            break ("stop", generated);
        }
        let event = events.recv().await;
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

fn stream(
    mut ctx: Ctx,
    mut events: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
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
                .send(sse(&ctx.chunk(None, None, include_usage)))
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
                let last = ctx.chunk(None, Some("stop"), include_usage);
                let _ = tx.send(sse(&last)).await;
                if include_usage {
                    let _ = tx.send(usage_chunk(&ctx, generated)).await;
                }
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                return;
            }
            let event = tokio::select! {
                e = events.recv() => e,
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
                    if !t.is_empty() {
                        ok = tx
                            .send(sse(&ctx.chunk(Some(&t), None, include_usage)))
                            .await
                            .is_ok();
                    }
                    if let Some((finish, n)) = done {
                        finish_stream(&ctx, &tx, finish, n, include_usage).await;
                        return;
                    }
                    ok
                }
                Step::Finished(finish, n) => {
                    finish_stream(&ctx, &tx, finish, n, include_usage).await;
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
    include_usage: bool,
) {
    let _ = tx
        .send(sse(&ctx.chunk(None, Some(finish), include_usage)))
        .await;
    if include_usage {
        let _ = tx.send(usage_chunk(ctx, completion)).await;
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}
