//! The REST control plane. Every route and its rules in one table:
//!
//! | route | token |
//! | --- | --- |
//! | `GET /healthz` | never |
//! | `GET /api/v1/info`, `/api/v1/status`, `/api/v1/events`, `/api/v1/{kind}[/{name}]` | unless `--open-reads` |
//! | `POST /api/v1/apply[?dryRun=true]`, `DELETE /api/v1/{kind}/{name}[?dryRun=true]` | always |
//! | `POST /internal/v1/sync`, `POST /internal/v1/inspect-model` (agents only) | always |
//! | `/internal/v1/endpoints/{name}/...` (an endpoint's requests forwarded by its node) | always, in `x-cluster-token` |
//!
//! Errors are [`ErrorBody`] JSON with the status chosen in one place ([`reply_error`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use cluster_api::cluster::{ErrorBody, ErrorDetail};
use cluster_api::manifest::{Kind, ManifestError, ModelSpec};
use serde_json::json;
use tokio::net::TcpListener;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::agent::Agent;
use super::apply::{self, Refused};
use super::peers;

fn reply_json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// Maps an error to its status and body.
fn reply_error(code: StatusCode, message: String, details: Vec<ManifestError>) -> Response {
    reply_json(
        code,
        &ErrorBody {
            error: ErrorDetail {
                code: code.as_u16(),
                message,
                details,
            },
        },
    )
}

fn refused(r: Refused) -> Response {
    match r {
        Refused::Invalid(details) => {
            let message = format!(
                "the apply was refused and nothing was stored:\n{}",
                cluster_api::manifest::join_errors(&details)
            );
            reply_error(StatusCode::BAD_REQUEST, message, details)
        }
        Refused::Conflict(m) => reply_error(StatusCode::CONFLICT, m, Vec::new()),
        Refused::NotFound(m) => reply_error(StatusCode::NOT_FOUND, m, Vec::new()),
        Refused::Internal(m) => reply_error(StatusCode::INTERNAL_SERVER_ERROR, m, Vec::new()),
    }
}

fn authorized(agent: &Agent, headers: &HeaderMap) -> Result<(), Box<Response>> {
    match crate::web::bearer(headers) {
        Some(t) if crate::web::same(t, &agent.settings.token) => Ok(()),
        Some(_) => Err(Box::new(reply_error(
            StatusCode::UNAUTHORIZED,
            "wrong cluster token".into(),
            Vec::new(),
        ))),
        None => Err(Box::new(reply_error(
            StatusCode::UNAUTHORIZED,
            "this call needs the cluster token: send `Authorization: Bearer TOKEN` (clusterctl --token or CLUSTERCTL_TOKEN)".into(),
            Vec::new(),
        ))),
    }
}

fn flag(query: &HashMap<String, String>, key: &str) -> bool {
    query
        .get(key)
        .is_some_and(|v| v.is_empty() || v == "true" || v == "1")
}

async fn handle(
    agent: Arc<Agent>,
    method: Method,
    path: warp::path::FullPath,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Infallible> {
    let segments: Vec<&str> = path
        .as_str()
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let read = || {
        if agent.settings.open_reads {
            Ok(())
        } else {
            authorized(&agent, &headers)
        }
    };
    let write = || authorized(&agent, &headers);
    let reply = match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => reply_json(
            StatusCode::OK,
            &json!({"status": "ok", "node": agent.name(), "version": env!("CARGO_PKG_VERSION")}),
        ),
        (&Method::GET, ["api", "v1", "info"]) => match read() {
            Err(r) => *r,
            Ok(()) => reply_json(StatusCode::OK, &agent.report()),
        },
        (&Method::GET, ["api", "v1", "status"]) => match read() {
            Err(r) => *r,
            Ok(()) => status(&agent),
        },
        (&Method::GET, ["api", "v1", "events"]) => match read() {
            Err(r) => *r,
            Ok(()) => {
                let limit = query
                    .get("limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(100);
                let events = agent.events(query.get("object").map(String::as_str), limit);
                reply_json(StatusCode::OK, &json!({"items": events}))
            }
        },
        (&Method::POST, ["api", "v1", "apply"]) => match write() {
            Err(r) => *r,
            Ok(()) if agent.is_shutting_down() => reply_error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("node {} is shutting down", agent.name()),
                Vec::new(),
            ),
            Ok(()) => match std::str::from_utf8(&body) {
                Err(_) => reply_error(
                    StatusCode::BAD_REQUEST,
                    "the manifest is not UTF-8 text".into(),
                    Vec::new(),
                ),
                Ok(text) => {
                    let agent2 = agent.clone();
                    let text = text.to_string();
                    let dry = flag(&query, "dryRun");
                    match tokio::task::spawn_blocking(move || apply::apply(&agent2, &text, dry))
                        .await
                    {
                        Ok(Ok(outcomes)) => {
                            reply_json(StatusCode::OK, &json!({"dryRun": dry, "items": outcomes}))
                        }
                        Ok(Err(r)) => refused(r),
                        Err(e) => reply_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("apply failed: {e}"),
                            Vec::new(),
                        ),
                    }
                }
            },
        },
        (&Method::GET, ["api", "v1", kind]) => match (read(), Kind::parse(kind)) {
            (Err(r), _) => *r,
            (Ok(()), Err(why)) => reply_error(StatusCode::NOT_FOUND, why, Vec::new()),
            (Ok(()), Ok(kind)) => match agent.store.live(kind) {
                Ok(records) => {
                    let items: Vec<_> = records.iter().map(|r| agent.with_status(r)).collect();
                    reply_json(StatusCode::OK, &json!({"kind": kind, "items": items}))
                }
                Err(e) => reply_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e:#}"),
                    Vec::new(),
                ),
            },
        },
        (&Method::GET, ["api", "v1", kind, name]) => match (read(), Kind::parse(kind)) {
            (Err(r), _) => *r,
            (Ok(()), Err(why)) => reply_error(StatusCode::NOT_FOUND, why, Vec::new()),
            (Ok(()), Ok(kind)) => match agent.store.get(kind, name) {
                Ok(Some(r)) if !r.deleted => reply_json(StatusCode::OK, &agent.with_status(&r)),
                Ok(_) => reply_error(
                    StatusCode::NOT_FOUND,
                    format!("{kind} {name} does not exist"),
                    Vec::new(),
                ),
                Err(e) => reply_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e:#}"),
                    Vec::new(),
                ),
            },
        },
        (&Method::DELETE, ["api", "v1", kind, name]) => match (write(), Kind::parse(kind)) {
            (Err(r), _) => *r,
            (Ok(()), Err(why)) => reply_error(StatusCode::NOT_FOUND, why, Vec::new()),
            (Ok(()), Ok(kind)) => {
                let dry = flag(&query, "dryRun");
                match apply::delete(&agent, kind, name, dry) {
                    Ok(version) => reply_json(
                        StatusCode::OK,
                        &json!({"kind": kind, "name": name, "action": "deleted", "dryRun": dry, "resourceVersion": version}),
                    ),
                    Err(r) => refused(r),
                }
            }
        },
        (&Method::POST, ["internal", "v1", "inspect-model"]) => match write() {
            Err(r) => *r,
            Ok(()) => match serde_json::from_slice::<ModelSpec>(&body) {
                Err(e) => reply_error(
                    StatusCode::BAD_REQUEST,
                    format!("model spec: {e}"),
                    Vec::new(),
                ),
                Ok(spec) => {
                    let cache = agent.model_cache();
                    let opened = tokio::task::spawn_blocking(move || {
                        crate::fetch::open(&cache, &spec.source).map(|f| f.byte_profile(spec.dtype))
                    })
                    .await;
                    match opened {
                        Ok(Ok(profile)) => reply_json(StatusCode::OK, &profile),
                        Ok(Err(why)) => reply_error(StatusCode::BAD_REQUEST, why, Vec::new()),
                        Err(e) => reply_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            e.to_string(),
                            Vec::new(),
                        ),
                    }
                }
            },
        },
        (&Method::POST, ["internal", "v1", "sync"]) => match write() {
            Err(r) => *r,
            Ok(()) => match serde_json::from_slice::<peers::SyncBody>(&body) {
                Err(e) => reply_error(
                    StatusCode::BAD_REQUEST,
                    format!("sync body: {e}"),
                    Vec::new(),
                ),
                Ok(theirs) => {
                    let agent2 = agent.clone();
                    let done = tokio::task::spawn_blocking(move || {
                        peers::take_theirs(&agent2, theirs)?;
                        peers::our_side(&agent2)
                    })
                    .await;
                    match done {
                        Ok(Ok(ours)) => reply_json(StatusCode::OK, &ours),
                        Ok(Err(e)) => {
                            reply_error(StatusCode::CONFLICT, format!("{e:#}"), Vec::new())
                        }
                        Err(e) => reply_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            e.to_string(),
                            Vec::new(),
                        ),
                    }
                }
            },
        },
        (_, ["internal", "v1", "endpoints", name, rest @ ..]) => {
            let token = headers
                .get(crate::endpoint::proxy::TOKEN_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !crate::web::same(token, &agent.settings.token) {
                reply_error(
                    StatusCode::UNAUTHORIZED,
                    "forwarded endpoint requests need the cluster token".into(),
                    Vec::new(),
                )
            } else {
                match agent.runtime.forwarded_endpoint(&agent, name) {
                    Ok(state) => {
                        let path = format!("/{}", rest.join("/"));
                        crate::endpoint::respond(
                            state,
                            method.clone(),
                            &path,
                            headers.clone(),
                            body,
                        )
                        .await
                    }
                    Err(why) => crate::endpoint::openai::error(
                        404,
                        why,
                        "invalid_request_error",
                        None,
                        None,
                    ),
                }
            }
        }
        _ => reply_error(
            StatusCode::NOT_FOUND,
            format!("no route {method} {}", path.as_str()),
            Vec::new(),
        ),
    };
    Ok(reply)
}

fn status(agent: &Agent) -> Response {
    let nodes: Vec<_> = agent
        .store
        .live(Kind::Node)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let s = agent.node_status(r.object.name());
            json!({"name": r.object.name(), "phase": s.phase, "message": s.message})
        })
        .collect();
    let pipelines: Vec<_> = agent
        .store
        .live(Kind::Pipeline)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let s = agent.pipeline_status(r);
            json!({"name": r.object.name(), "phase": s.phase, "message": s.message, "progress": s.progress})
        })
        .collect();
    reply_json(
        StatusCode::OK,
        &json!({"node": agent.name(), "nodes": nodes, "pipelines": pipelines}),
    )
}

/// Serves the control plane on `listener` until `shutdown`.
pub async fn serve(
    agent: Arc<Agent>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let routes = warp::any()
        .map(move || agent.clone())
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::headers_cloned())
        .and(crate::web::body(64 << 20))
        .and_then(handle);
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}
