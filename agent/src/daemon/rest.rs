//! The REST control plane. Every route and its rules in one table:
//!
//! | route | token |
//! | --- | --- |
//! | `GET /healthz` | never |
//! | `GET /api/v1/info`, `/api/v1/status`, `/api/v1/events`, `/api/v1/{kind}[/{name}]` | unless `--open-reads` |
//! | `POST /api/v1/apply[?dryRun=true]`, `DELETE /api/v1/{kind}/{name}[?dryRun=true]` | always |
//! | `POST /internal/v1/sync`, `POST /internal/v1/inspect-model` (agents only) | always |
//! | `GET /internal/v1/models/{model}/digests/{file}`, `.../files/{file}` (a byte range of a file held whole, for peers fetching their stages) | always |
//! | `/internal/v1/endpoints/{name}/...` (an endpoint's requests forwarded by its node) | always, in `x-cluster-token` |
//!
//! The routes are declared as warp filters in one function, [`routes`]; authentication is one
//! filter ([`auth`]) placed on each route by its access. Errors are [`ApiError`]s, which render
//! themselves as [`ErrorBody`] JSON: a route's own, a refused authentication (401), a route
//! given another method (405), a body over the limit (413) or without a length (411), or a path
//! no route declares (404).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use cluster_api::cluster::{
    ApplyReply, DeleteAction, DeleteReply, ErrorBody, ErrorDetail, EventList, Health, ObjectList,
    Summary, SummaryItem,
};
use cluster_api::manifest::{Kind, ManifestError, ModelSpec, Object, Spec};
use tokio::net::TcpListener;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::agent::Agent;
use super::apply::{self, Refused};
use super::peers;

mod files;

use self::files::{model_bytes, model_digests};

fn reply_json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// An error answered by the control plane: its status, message and, for a refused apply, each
/// problem placed. It renders itself as [`ErrorBody`] JSON; routes return it as an error value,
/// and authentication, which runs before a route's handler, rejects with it.
#[derive(Debug)]
pub struct ApiError {
    code: StatusCode,
    message: String,
    details: Vec<ManifestError>,
}

impl ApiError {
    fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }
}

impl warp::reject::Reject for ApiError {}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        reply_json(
            self.code,
            &ErrorBody {
                error: ErrorDetail {
                    code: self.code.as_u16(),
                    message: self.message,
                    details: self.details,
                },
            },
        )
    }
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Invalid(details) => Self {
                code: StatusCode::BAD_REQUEST,
                message: format!(
                    "the apply was refused and nothing was stored:\n{}",
                    cluster_api::manifest::join_errors(&details)
                ),
                details,
            },
            Refused::Conflict(m) => Self::new(StatusCode::CONFLICT, m),
            Refused::NotFound(m) => Self::new(StatusCode::NOT_FOUND, m),
            Refused::Internal(m) => Self::internal(m),
        }
    }
}

/// What a route answers: a reply, or an error that renders itself.
type Answer = Result<Response, ApiError>;

fn answer(a: Answer) -> Result<Response, Infallible> {
    Ok(a.unwrap_or_else(Reply::into_response))
}

/// Who may call a route.
#[derive(Clone, Copy)]
enum Access {
    /// Anyone (`/healthz`).
    Anyone,
    /// Holders of the cluster token, or anyone under `--open-reads`.
    Read,
    /// Holders of the cluster token.
    Write,
}

/// The one place requests are authenticated: rejects with a 401 [`ApiError`] unless the
/// request may use a route of this `access`.
fn auth(
    agent: Arc<Agent>,
    access: Access,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::headers_cloned()
        .and_then(move |headers: HeaderMap| {
            let agent = agent.clone();
            async move {
                let open = match access {
                    Access::Anyone => true,
                    Access::Read => agent.settings.open_reads,
                    Access::Write => false,
                };
                if open {
                    return Ok(());
                }
                match crate::web::bearer(&headers) {
                    Some(t) if crate::web::same(t, &agent.settings.token) => Ok(()),
                    Some(_) => Err(warp::reject::custom(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "wrong cluster token",
                    ))),
                    None => Err(warp::reject::custom(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "this call needs the cluster token: send `Authorization: Bearer TOKEN` (clusterctl --token or CLUSTERCTL_TOKEN)",
                    ))),
                }
            }
        })
        .untuple_one()
}

/// Whether the request carries the cluster token (reads may be open without it).
fn has_token(agent: Arc<Agent>) -> impl Filter<Extract = (bool,), Error = Infallible> + Clone {
    warp::header::headers_cloned().map(move |headers: HeaderMap| {
        crate::web::bearer(&headers).is_some_and(|t| crate::web::same(t, &agent.settings.token))
    })
}

/// Whether `?key`, `?key=true` or `?key=1` is set.
#[derive(Debug, Default, serde::Deserialize)]
struct Query {
    #[serde(default, rename = "dryRun")]
    dry_run: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    object: Option<String>,
}

impl Query {
    fn dry_run(&self) -> bool {
        self.dry_run
            .as_deref()
            .is_some_and(|v| v.is_empty() || v == "true" || v == "1")
    }
}

fn kind_of(name: &str) -> Result<Kind, ApiError> {
    Kind::parse(name).map_err(|why| ApiError::new(StatusCode::NOT_FOUND, why))
}

fn healthz(agent: Arc<Agent>) -> Answer {
    Ok(reply_json(
        StatusCode::OK,
        &Health {
            status: "ok".into(),
            node: agent.name().to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    ))
}

fn events(agent: Arc<Agent>, q: Query) -> Answer {
    let events = agent.events(q.object.as_deref(), q.limit.unwrap_or(100));
    Ok(reply_json(StatusCode::OK, &EventList { items: events }))
}

async fn apply(agent: Arc<Agent>, q: Query, body: Bytes) -> Answer {
    if agent.is_shutting_down() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {} is shutting down", agent.name()),
        ));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the manifest is not UTF-8 text"))?
        .to_string();
    let dry = q.dry_run();
    let outcomes = tokio::task::spawn_blocking(move || apply::apply(&agent, &text, dry))
        .await
        .map_err(|e| ApiError::internal(format!("apply failed: {e}")))??;
    Ok(reply_json(
        StatusCode::OK,
        &ApplyReply {
            dry_run: dry,
            items: outcomes,
        },
    ))
}

/// What a reader without the cluster token (under `--open-reads`) sees in place of each of an
/// Endpoint's API keys, which would open its completions to all.
pub const HIDDEN_KEY: &str = "(hidden: shown with the cluster token)";

/// An object as a reader sees it (see [`HIDDEN_KEY`]).
fn shown(agent: &Agent, record: &cluster_api::cluster::Record, token: bool) -> Object {
    let mut object = agent.with_status(record);
    if !token && let Spec::Endpoint(e) = &mut object.spec {
        e.api_keys.iter_mut().for_each(|k| *k = HIDDEN_KEY.into());
    }
    object
}

fn list(agent: Arc<Agent>, kind: String, token: bool) -> Answer {
    let kind = kind_of(&kind)?;
    let records = agent
        .store
        .live(kind)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let items = records.iter().map(|r| shown(&agent, r, token)).collect();
    Ok(reply_json(StatusCode::OK, &ObjectList { kind, items }))
}

fn get_one(agent: Arc<Agent>, kind: String, name: String, token: bool) -> Answer {
    let kind = kind_of(&kind)?;
    match agent
        .store
        .get(kind, &name)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?
    {
        Some(r) if !r.deleted => Ok(reply_json(StatusCode::OK, &shown(&agent, &r, token))),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{kind} {name} does not exist"),
        )),
    }
}

fn delete(agent: Arc<Agent>, kind: String, name: String, q: Query) -> Answer {
    let kind = kind_of(&kind)?;
    let dry = q.dry_run();
    let version = apply::delete(&agent, kind, &name, dry)?;
    Ok(reply_json(
        StatusCode::OK,
        &DeleteReply {
            kind,
            name,
            action: DeleteAction::Deleted,
            dry_run: dry,
            resource_version: version,
        },
    ))
}

async fn inspect_model(agent: Arc<Agent>, body: Bytes) -> Answer {
    let spec = serde_json::from_slice::<ModelSpec>(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("model spec: {e}")))?;
    let cache = agent.model_cache();
    let profile = tokio::task::spawn_blocking(move || {
        crate::fetch::open(&cache, &spec.source).map(|f| f.byte_profile(spec.dtype))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    Ok(reply_json(StatusCode::OK, &profile))
}

async fn sync(agent: Arc<Agent>, body: Bytes) -> Answer {
    let theirs = serde_json::from_slice::<peers::SyncBody>(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("sync body: {e}")))?;
    let ours = tokio::task::spawn_blocking(move || {
        peers::take_theirs(&agent, theirs)?;
        peers::our_side(&agent)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::new(StatusCode::CONFLICT, format!("{e:#}")))?;
    Ok(reply_json(StatusCode::OK, &ours))
}

/// An endpoint's request forwarded by the node that serves the endpoint to the node of its
/// pipeline's stage 0. Authenticated by the cluster token in its own header (the request's
/// `Authorization` is the client's API key, passed on), and answered with OpenAI's error body.
async fn forwarded(
    agent: Arc<Agent>,
    name: String,
    tail: warp::path::Tail,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Infallible> {
    let token = headers
        .get(crate::endpoint::proxy::TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !crate::web::same(token, &agent.settings.token) {
        return Ok(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "forwarded endpoint requests need the cluster token",
        )
        .into_response());
    }
    Ok(match agent.runtime.forwarded_endpoint(&agent, &name) {
        Ok(state) => {
            let path = format!("/{}", tail.as_str());
            crate::endpoint::respond(state, method, &path, headers, body).await
        }
        Err(why) => crate::endpoint::openai::error(404, why, "invalid_request_error", None, None),
    })
}

/// Every route of the control plane, in one place (the table at the top of this file).
fn routes(agent: Arc<Agent>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let a = agent.clone();
    let with_agent = warp::any().map(move || a.clone());
    let read = auth(agent.clone(), Access::Read);
    let write = auth(agent.clone(), Access::Write);
    let query = warp::query::<Query>()
        .or(warp::any().map(Query::default))
        .unify();

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(auth(agent.clone(), Access::Anyone))
        .and(with_agent.clone())
        .map(healthz);
    let info = warp::path!("api" / "v1" / "info")
        .and(warp::get())
        .and(read.clone())
        .and(with_agent.clone())
        .map(|agent: Arc<Agent>| Ok(reply_json(StatusCode::OK, &agent.report())));
    let status = warp::path!("api" / "v1" / "status")
        .and(warp::get())
        .and(read.clone())
        .and(with_agent.clone())
        .map(|agent: Arc<Agent>| Ok(status(&agent)));
    let events = warp::path!("api" / "v1" / "events")
        .and(warp::get())
        .and(read.clone())
        .and(with_agent.clone())
        .and(query)
        .map(events);
    let apply = warp::path!("api" / "v1" / "apply")
        .and(warp::post())
        .and(write.clone())
        .and(with_agent.clone())
        .and(query)
        .and(crate::web::body(crate::web::CONTROL_BODY_LIMIT))
        .then(apply);
    let list = warp::path!("api" / "v1" / String)
        .and(warp::get())
        .and(read.clone())
        .and(with_agent.clone())
        .and(has_token(agent.clone()))
        .map(|kind, agent, token| list(agent, kind, token));
    let get_one = warp::path!("api" / "v1" / String / String)
        .and(warp::get())
        .and(read)
        .and(with_agent.clone())
        .and(has_token(agent.clone()))
        .map(|kind, name, agent, token| get_one(agent, kind, name, token));
    let delete = warp::path!("api" / "v1" / String / String)
        .and(warp::delete())
        .and(write.clone())
        .and(with_agent.clone())
        .and(query)
        .map(|kind, name, agent, q| delete(agent, kind, name, q));
    let inspect = warp::path!("internal" / "v1" / "inspect-model")
        .and(warp::post())
        .and(write.clone())
        .and(with_agent.clone())
        .and(crate::web::body(crate::web::CONTROL_BODY_LIMIT))
        .then(inspect_model);
    let sync = warp::path!("internal" / "v1" / "sync")
        .and(warp::post())
        .and(write)
        .and(with_agent.clone())
        .and(crate::web::body(crate::web::CONTROL_BODY_LIMIT))
        .then(sync);
    let digests = warp::path!("internal" / "v1" / "models" / String / "digests" / ..)
        .and(warp::path::tail())
        .and(warp::get())
        .and(auth(agent.clone(), Access::Write))
        .and(with_agent.clone())
        .map(|model, tail, agent| model_digests(agent, model, tail));
    let bytes = warp::path!("internal" / "v1" / "models" / String / "files" / ..)
        .and(warp::path::tail())
        .and(warp::get())
        .and(auth(agent.clone(), Access::Write))
        .and(with_agent.clone())
        .and(warp::header::optional::<String>("range"))
        .then(|model, tail, agent, range| model_bytes(agent, model, tail, range));
    let forward = warp::path!("internal" / "v1" / "endpoints" / String / ..)
        .and(warp::path::tail())
        .and(with_agent.clone())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(crate::web::body(crate::web::REQUEST_BODY_LIMIT))
        .and_then(|name, tail, agent, method, headers, body| {
            forwarded(agent, name, tail, method, headers, body)
        });
    // Boxed in two groups: one chain of every route is a type deep enough to overflow the
    // compiler's recursion limit in release builds.
    let public = healthz
        .or(info)
        .unify()
        .or(status)
        .unify()
        .or(events)
        .unify()
        .or(apply)
        .unify()
        .or(list)
        .unify()
        .or(get_one)
        .unify()
        .or(delete)
        .unify()
        .boxed();
    let internal = inspect
        .or(sync)
        .unify()
        .or(digests)
        .unify()
        .or(bytes)
        .unify()
        .boxed();
    let declared = public
        .or(internal)
        .unify()
        .and_then(|a: Answer| async move { answer(a) })
        .or(forward)
        .unify();
    // Rejections become error bodies; a path no route declares gets one naming it.
    let no_route =
        warp::method()
            .and(warp::path::full())
            .map(|method: Method, path: warp::path::FullPath| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no route {method} {}", path.as_str()),
                )
                .into_response()
            });
    declared
        .recover(|rejection: warp::Rejection| async move {
            if rejection.is_not_found() {
                return Err(rejection);
            }
            Ok(rejected(rejection))
        })
        .unify()
        .or(no_route)
        .unify()
}

/// The error body of a request no route accepted for a reason other than its path. The
/// rejections of every route are combined: what the route whose path matched said comes first,
/// then "another method" from the others.
fn rejected(rejection: warp::Rejection) -> Response {
    if let Some(e) = rejection.find::<ApiError>() {
        return ApiError {
            code: e.code,
            message: e.message.clone(),
            details: e.details.clone(),
        }
        .into_response();
    }
    if let Some(refused) = rejection.find::<crate::web::BodyRefused>() {
        let (code, message) = refused.answer();
        return ApiError::new(
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
            message,
        )
        .into_response();
    }
    if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "this route does not take that method (see docs/reference.md)",
        )
        .into_response();
    }
    ApiError::new(StatusCode::BAD_REQUEST, format!("{rejection:?}")).into_response()
}

fn status(agent: &Agent) -> Response {
    let nodes: Vec<_> = agent
        .store
        .live(Kind::Node)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let s = agent.node_status(r.object.name());
            SummaryItem {
                name: r.object.name().to_string(),
                phase: s.phase,
                message: s.message,
                progress: None,
            }
        })
        .collect();
    let pipelines: Vec<_> = agent
        .store
        .live(Kind::Pipeline)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let s = agent.pipeline_status(r);
            SummaryItem {
                name: r.object.name().to_string(),
                phase: s.phase,
                message: s.message,
                progress: Some(s.progress),
            }
        })
        .collect();
    reply_json(
        StatusCode::OK,
        &Summary {
            node: agent.name().to_string(),
            nodes,
            pipelines,
        },
    )
}

/// Serves the control plane on `listener` until `shutdown`.
pub async fn serve(
    agent: Arc<Agent>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    crate::web::serve(routes(agent), listener, shutdown).await;
}
