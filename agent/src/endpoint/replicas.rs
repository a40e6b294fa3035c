//! An endpoint over its pipeline's replicas: each request goes to the serving replica with the
//! fewest of this endpoint's sequences on it, and a sequence whose replica fails in the middle
//! (a stage killed, a link cut) goes on at another: that replica prefills the prompt and the
//! tokens already sent, and samples on with the draws the first replica would have made, so the
//! client's stream continues with the tokens it would have had.
//!
//! A replica whose stage 0 runs here is asked in-process; another through its agent's
//! forwarded-endpoint route (`/internal/v1/endpoints/NAME/generate`, ring events as JSON lines).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use warp::http::{HeaderMap, Method};

use super::EndpointState;
use super::proxy;
use crate::ring::head::{Event, Refusal, Request};
use crate::ring::node::Shared;

/// Where a replica's requests go.
#[derive(Clone)]
pub enum Head {
    /// Its stage 0 runs in this process.
    Local(Arc<Shared>),
    /// Its stage 0 runs on the agent at this control-plane address.
    Remote(String),
}

/// One replica as the endpoint sees it when a request comes.
#[derive(Clone)]
pub struct Route {
    /// The replica's index.
    pub replica: usize,
    /// Its head, or why it has none (not placed, not loaded here).
    pub head: Result<Head, String>,
    /// Whether it is serving, as far as this node knows (a replica that says so and then
    /// refuses is passed over for the next).
    pub ready: bool,
}

/// The replicas of an endpoint's pipeline, looked up per request.
pub type Routes = Arc<dyn Fn() -> Vec<Route> + Send + Sync>;

/// Chooses replicas and counts this endpoint's sequences on each.
pub struct Router {
    routes: Routes,
    busy: Mutex<BTreeMap<usize, usize>>,
    /// The Endpoint's name, which another agent's forwarded route serves it under.
    endpoint: String,
    /// The cluster token that route requires.
    token: String,
}

impl Router {
    /// A router over `routes`, reaching other agents as endpoint `endpoint` with `token`.
    pub fn new(routes: Routes, endpoint: &str, token: &str) -> Self {
        Self {
            routes,
            busy: Mutex::new(BTreeMap::new()),
            endpoint: endpoint.to_string(),
            token: token.to_string(),
        }
    }

    /// The replicas now.
    pub fn routes(&self) -> Vec<Route> {
        (self.routes)()
    }

    /// Where to send a whole request when this node cannot prepare it (its own stage 0 is not
    /// loaded: the agent restarted, or its ring was placed anew): the least busy serving
    /// replica on another node, whose agent answers it as this endpoint.
    pub fn elsewhere(&self) -> Option<proxy::Target> {
        let (candidates, _) = self.candidates(&[]);
        candidates
            .into_iter()
            .find_map(|(_, head, ready)| match head {
                Head::Remote(address) if ready => Some(proxy::Target {
                    endpoint: self.endpoint.clone(),
                    head: address,
                    token: self.token.clone(),
                }),
                _ => None,
            })
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, usize>> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The replicas worth trying, least busy first (ready ones before the rest, lower index on
    /// a tie), each with whether it is ready, leaving out `exclude`.
    fn candidates(&self, exclude: &[usize]) -> (Vec<(usize, Head, bool)>, Vec<String>) {
        let busy = self.busy().clone();
        let mut heads = Vec::new();
        let mut why = Vec::new();
        for route in self.routes() {
            if exclude.contains(&route.replica) {
                continue;
            }
            match route.head {
                Ok(head) => heads.push((
                    !route.ready,
                    busy.get(&route.replica).copied().unwrap_or(0),
                    route.replica,
                    head,
                )),
                Err(w) => why.push(format!("replica {}: {w}", route.replica)),
            }
        }
        heads.sort_by_key(|(unready, busy, replica, _)| (*unready, *busy, *replica));
        let heads = heads
            .into_iter()
            .map(|(unready, _, r, h)| (r, h, !unready))
            .collect();
        (heads, why)
    }

    /// Admits `request` at the least busy replica that takes it, skipping `exclude`; returns
    /// the replica and its events, or the refusal to give the client when none takes it
    /// (400 at once: no replica would take that request either).
    async fn admit(
        self: &Arc<Self>,
        request: &Request,
        headers: &HeaderMap,
        exclude: &[usize],
    ) -> Result<(usize, Feed), Refusal> {
        let (candidates, mut why) = self.candidates(exclude);
        let mut refusal: Option<Refusal> = None;
        for (replica, head, _) in candidates {
            // Counted before it is asked, so that requests arriving while a remote replica
            // answers spread over the others; given back if it refuses.
            let place = Place::take(self, replica);
            match self.submit(&head, request, headers).await {
                Ok(events) => {
                    return Ok((
                        replica,
                        Feed {
                            events,
                            replica,
                            _place: place,
                        },
                    ));
                }
                Err(r) if r.status == 400 => return Err(r),
                Err(r) => {
                    why.push(format!("replica {replica}: {}", r.message));
                    // A full replica's 429 tells the client to retry; it wins over a 503.
                    if refusal.as_ref().is_none_or(|old| old.status != 429) {
                        refusal = Some(r);
                    }
                }
            }
        }
        Err(match refusal {
            Some(r) if why.len() == 1 => r,
            Some(r) => Refusal {
                status: r.status,
                message: why.join("; "),
            },
            None if why.is_empty() => Refusal {
                status: 503,
                message: "no replica of the pipeline is placed".into(),
            },
            None => Refusal {
                status: 503,
                message: why.join("; "),
            },
        })
    }

    async fn submit(
        &self,
        head: &Head,
        request: &Request,
        headers: &HeaderMap,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Refusal> {
        match head {
            Head::Local(shared) => match &shared.head {
                Some(h) => h.submit(shared, request.clone()),
                None => Err(Refusal {
                    status: 503,
                    message: "no generation loop here".into(),
                }),
            },
            Head::Remote(address) => self.remote(address, request, headers).await,
        }
    }

    /// Starts `request` at the agent at `address`, whose events come back as JSON lines.
    async fn remote(
        &self,
        address: &str,
        request: &Request,
        headers: &HeaderMap,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Refusal> {
        let target = proxy::Target {
            endpoint: self.endpoint.clone(),
            head: address.to_string(),
            token: self.token.clone(),
        };
        let body = serde_json::json!({
            "prompt_ids": request.prompt_ids,
            "max_tokens": request.max_tokens,
            "ignore_eos": request.ignore_eos,
            "sampling": request.sampling,
            "resumed": request.resumed,
        });
        let mut passed = HeaderMap::new();
        if let Some(v) = headers.get("authorization") {
            passed.insert("authorization", v.clone());
        }
        passed.insert(
            "content-type",
            warp::http::HeaderValue::from_static("application/json"),
        );
        let unreachable = |why: String| Refusal {
            status: 503,
            message: format!("the agent at {address} did not answer: {why}"),
        };
        let answer = proxy::send(
            &target,
            &Method::POST,
            "/generate",
            &passed,
            Bytes::from(body.to_string()),
        )
        .await
        .map_err(unreachable)?;
        let status = answer.status().as_u16();
        let mut incoming = answer.into_body();
        if status != 200 {
            let text = tokio::time::timeout(std::time::Duration::from_secs(5), incoming.collect())
                .await
                .ok()
                .and_then(|b| b.ok())
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    let e = &v["error"];
                    e["message"].as_str().or(e.as_str()).map(str::to_string)
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&text).into_owned());
            return Err(Refusal { status, message });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut pending = BytesMut::new();
            loop {
                // A caller that goes away drops the connection at once, which cancels the
                // sequence on the other agent.
                let frame = tokio::select! {
                    frame = incoming.frame() => frame,
                    () = tx.closed() => return,
                };
                let data = match frame {
                    None => return,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                    Some(Err(e)) => {
                        let _ = tx.send(Event::Error {
                            message: format!("the connection to its head broke: {e}"),
                        });
                        return;
                    }
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line = pending.split_to(end + 1);
                    match serde_json::from_slice::<Event>(&line[..end]) {
                        Ok(event) => {
                            if tx.send(event).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Event::Error {
                                message: format!(
                                    "its head sent an event this agent cannot read: {e}"
                                ),
                            });
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// A sequence of this endpoint counted at a replica, until dropped.
struct Place {
    router: Arc<Router>,
    replica: usize,
}

impl Place {
    fn take(router: &Arc<Router>, replica: usize) -> Self {
        *router.busy().entry(replica).or_insert(0) += 1;
        Self {
            router: router.clone(),
            replica,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(n) = self.router.busy().get_mut(&self.replica) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One replica's events for a sequence.
struct Feed {
    events: mpsc::UnboundedReceiver<Event>,
    replica: usize,
    _place: Place,
}

/// A caller's sequence: its events in order, across failovers. Dropping it cancels the
/// sequence wherever it runs.
pub struct Generation {
    state: Arc<EndpointState>,
    request: Request,
    headers: HeaderMap,
    feed: Feed,
    /// Replicas this sequence failed on.
    failed: Vec<usize>,
    /// Tokens sent so far.
    generated: Vec<u32>,
    /// What went wrong at each replica it left.
    errors: Vec<String>,
    /// When it last lost its replica, until the next token.
    lost_at: Option<Instant>,
}

impl Generation {
    /// Admits `request` at a replica of `state`'s pipeline.
    pub async fn start(
        state: Arc<EndpointState>,
        request: Request,
        headers: &HeaderMap,
    ) -> Result<Self, Refusal> {
        let router = state.router.clone();
        let (replica, feed) = router.admit(&request, headers, &[]).await?;
        state.metrics.routed(replica);
        Ok(Self {
            state,
            request,
            headers: headers.clone(),
            feed,
            failed: Vec::new(),
            generated: Vec::new(),
            errors: Vec::new(),
            lost_at: None,
        })
    }

    /// The next event: tokens, then one `Done` or one `Error`. A failure of the replica is
    /// not an event while another replica can go on with the sequence. Cancel-safe: a call
    /// dropped while it waits loses nothing.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            let event = self.feed.events.recv().await;
            match event {
                Some(Event::Token { id, text }) => {
                    self.generated.push(id);
                    if let Some(at) = self.lost_at.take() {
                        self.state.metrics.failover_gap.observe(at.elapsed());
                    }
                    return Some(Event::Token { id, text });
                }
                Some(Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    time_to_first_token_ms,
                    decode_tokens_per_s,
                }) => {
                    // Counted as the client sees the sequence: the tokens generated before a
                    // failover are its completion, not its prompt.
                    let before = self.request.resumed;
                    return Some(Event::Done {
                        finish_reason,
                        prompt_tokens: prompt_tokens.saturating_sub(before),
                        completion_tokens: completion_tokens + before,
                        time_to_first_token_ms,
                        decode_tokens_per_s,
                    });
                }
                Some(Event::Error { message }) => {
                    if let Some(e) = self.fail_over(message).await {
                        return Some(e);
                    }
                }
                None => {
                    let message = "its events ended without a result".to_string();
                    if let Some(e) = self.fail_over(message).await {
                        return Some(e);
                    }
                }
            }
        }
    }

    /// Moves the sequence to another replica after its own failed with `message`; the
    /// error to give the client when none takes it.
    async fn fail_over(&mut self, message: String) -> Option<Event> {
        if self.state.router.routes().len() < 2 {
            // One replica: its error, as it said it.
            return Some(Event::Error { message });
        }
        let lost = self.feed.replica;
        if !self.failed.contains(&lost) {
            self.failed.push(lost);
            self.errors.push(format!("replica {lost}: {message}"));
            self.lost_at.get_or_insert_with(Instant::now);
        }
        let original = self.original_prompt().to_vec();
        let before = self.generated.len();
        if before >= self.original_max_tokens() {
            // Every token was sent; only the end was lost.
            return Some(Event::Done {
                finish_reason: cluster_api::FinishReason::Length,
                prompt_tokens: self.original_prompt().len(),
                completion_tokens: before,
                time_to_first_token_ms: 0.0,
                decode_tokens_per_s: 0.0,
            });
        }
        let mut prompt_ids = original;
        prompt_ids.extend(&self.generated);
        let resumed = Request {
            prompt_ids,
            max_tokens: self.original_max_tokens() - before,
            sampling: self.request.sampling.clone(),
            ignore_eos: self.request.ignore_eos,
            resumed: before,
        };
        let router = self.state.router.clone();
        match router.admit(&resumed, &self.headers, &self.failed).await {
            Ok((replica, feed)) => {
                tracing::info!(
                    endpoint = %self.state.name,
                    from = lost,
                    to = replica,
                    tokens = before,
                    "a sequence failed over to another replica: {message}"
                );
                self.state.metrics.failed_over();
                self.state.metrics.routed(replica);
                self.feed = feed;
                self.request = resumed;
                None
            }
            Err(refusal) => {
                self.errors.push(format!(
                    "no other replica could go on with it: {}",
                    refusal.message
                ));
                Some(self.error())
            }
        }
    }

    /// The client's own prompt, without the tokens a failover added to it.
    fn original_prompt(&self) -> &[u32] {
        let ids = &self.request.prompt_ids;
        &ids[..ids.len() - self.request.resumed]
    }

    /// The client's own `max_tokens`.
    fn original_max_tokens(&self) -> usize {
        self.request.max_tokens + self.request.resumed
    }

    fn error(&self) -> Event {
        Event::Error {
            message: self.errors.join("; "),
        }
    }
}
