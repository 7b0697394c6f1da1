//! `t2i gateway`: the HTTP front door (axum).
//!
//! * `POST /v1/jobs`: a job of the contract (`job_id` optional: a UUIDv7 is assigned), checked with
//!   the workers' own `parse_job_body`, published with confirms; `202` with the id and a status URL.
//!   `?lane=bulk` queues it behind interactive work.
//! * `GET /v1/jobs/{id}`: the job's state in any of queued, running, succeeded, failed, canceled,
//!   expired, from the store's records, with URLs presigned on each read; `DELETE` cancels it
//!   ([`jobs`]). Jobs the gateway accepts are recorded as queued before they are published.
//! * `POST /generate-image`: `{"text": "...", ...contract fields}`; publishes with `reply_to` and waits
//!   for the terminal event (timeout: `--wait-timeout-s`), then answers with the image URLs or the
//!   error. The shape of the Flask demo this product replaces.
//! * `GET /openapi.json` ([`openapi`]: every `$ref` resolvable, every answer listed), and `/healthz`, `/readyz` (connected to the broker), `/metrics` from
//!   [`crate::health`], which also counts every request by route template and status, with its
//!   latency ([`HttpMetrics`]).
//!
//! Errors are JSON, on every route, unknown routes (404) and wrong methods (405) included:
//! `{"error": {"code", "message", "field"?, "value"?}}` with 400/401/404/405/409/413/422/502/503/
//! 504. With `--auth-token`, every `/v1` and `/generate-image` call needs `Authorization: Bearer
//! <token>`. Request bodies are limited to the contract's 64 KiB as the client sent them; the
//! `job_id` the gateway adds is not counted ([`body`]).

// Helpers return the finished error `Response` (128 bytes) as their `Err`, once per request.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{RwLock, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cli::GatewayArgs;
use crate::events::{CloudEvent, EventData};
use crate::health::{Health, HttpMetrics};
use crate::job::message::MAX_BODY_BYTES;
use crate::job::{Job, ModelDefaults, parse_job_body};
use crate::queue::{
    Connection, Consumer, Delivered, Lane, Publisher, Reconnect, ReplyTo, Route, Topology,
};
use crate::storage::Store;
use crate::unserved;
use body::BodyError;

mod body;
mod jobs;
mod openapi;

/// A live broker session: the confirming publisher and the reply queue's name.
struct Session {
    publisher: Publisher,
    reply_queue: String,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<CloudEvent>>>>;

struct App {
    topology: Topology,
    /// Ready while connected to the broker.
    health: Arc<Health>,
    session: RwLock<Option<Session>>,
    waiters: Waiters,
    store: Store,
    token: Option<String>,
    wait: Duration,
    model: String,
    /// The CloudEvents `source` of the failures the gateway announces (`--event-source`).
    source: String,
    limits: crate::job::Limits,
    /// Lifetime of the URLs presigned on each `GET /v1/jobs/{id}`.
    presign_ttl: Duration,
}

/// A JSON error response.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

impl App {
    fn authorized(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant-time comparison of the digests (lengths may differ).
        use sha2::{Digest, Sha256};
        let (a, b) = (
            Sha256::digest(given.as_bytes()),
            Sha256::digest(token.as_bytes()),
        );
        if a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
        {
            Ok(())
        } else {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
            Err(r)
        }
    }

    /// The common start of a POST: the bearer token, then the body (size limit, readable).
    fn admit(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Bytes, Response> {
        self.authorized(headers)?;
        body.map_err(body_error)
    }

    /// Body → checked job and the message to publish (with a job id), or the structured 4xx.
    fn job_from(&self, body: &[u8], text_field: bool) -> Result<(Job, Vec<u8>), Response> {
        let new_id = || uuid::Uuid::now_v7().to_string();
        let message = body::into_message(body, text_field, new_id).map_err(|e| match e {
            BodyError::TooLarge => too_large(),
            BodyError::NotJson(why) => error(StatusCode::BAD_REQUEST, "invalid_json", why),
            BodyError::Invalid(field, reason, value) => invalid(field, reason, &value),
        })?;
        match parse_job_body(&message, &self.limits, &ModelDefaults::default()) {
            Ok(job) => Ok((job, message)),
            Err(bad) => {
                let r = bad.rejection;
                Err(invalid(&r.field, &r.reason, &r.value))
            }
        }
    }

    /// Publishes a checked job on its lane and its model's route. A job for a model no pool serves
    /// comes back unroutable: it is failed at once (`failure.json`, `job.failed` with
    /// `model_not_served`) and the request answered 422.
    async fn publish(
        &self,
        lane: Lane,
        job: &Job,
        message: &[u8],
        reply: bool,
    ) -> Result<(), Response> {
        let job_id = job.job_id.as_str();
        // The parser checked the model's name already.
        let route = Route::of(lane, job.model.as_deref())
            .map_err(|r| invalid(&r.field, &r.reason, &r.value))?;
        let guard = self.session.read().await;
        let Some(s) = guard.as_ref() else {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "not connected to the broker; retry shortly",
            ));
        };
        let reply = reply.then(|| ReplyTo {
            queue: s.reply_queue.clone(),
            correlation_id: Some(job_id.to_string()),
        });
        match s
            .publisher
            .job(&route, job_id, message, reply.as_ref())
            .await
        {
            Ok(Delivered::Routed) => Ok(()),
            Ok(Delivered::Unroutable) if route.pool.is_some() => {
                let (store, source) = (&self.store, self.source.as_str());
                let failed =
                    unserved::fail(&s.publisher, store, source, PRODUCER, job, &route, None);
                if let Err(e) = failed.await {
                    tracing::warn!(job = %job_id, error = %e, "announcing a job no pool serves");
                }
                let model = job.model.as_deref().unwrap_or_default();
                Err(not_served(model, &route))
            }
            Ok(Delivered::Unroutable) => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "no job queue is bound",
            )),
            Err(e) => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("publishing failed: {e}"),
            )),
        }
    }
}

/// The name of the gateway as a job's producer (`data.worker` of the failures it announces).
const PRODUCER: &str = "t2i gateway";

/// 422 for a job whose model no worker pool serves; the job has been failed with the same code.
fn not_served(model: &str, route: &Route) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"error": {
            "code": "model_not_served", "message": unserved::message(model, route),
            "field": "model", "value": model,
        }})),
    )
        .into_response()
}

fn too_large() -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("bodies are at most {MAX_BODY_BYTES} bytes as sent"),
    )
}

/// A body axum could not read (over the size limit, broken stream) as a JSON error.
fn body_error(e: BytesRejection) -> Response {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large()
    } else {
        error(status, "bad_request", e.body_text())
    }
}

/// A query string that does not deserialise (a repeated or malformed parameter) as a JSON 400,
/// where axum's own rejection would answer `text/plain`.
fn query_error(e: QueryRejection) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text())
}

/// Unknown routes: a JSON 404 like every other error.
async fn no_route(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {method} {}", uri.path()),
    )
}

/// A known route with another method: a JSON 405 (axum adds the `Allow` header).
async fn wrong_method(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

fn invalid(field: &str, reason: &str, value: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"error": {
            "code": "invalid_input", "message": format!("{field}: {reason}"),
            "field": field, "value": value,
        }})),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct LaneQuery {
    lane: Option<String>,
}

async fn submit(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    q: Result<Query<LaneQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match app.admit(&headers, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return query_error(e),
    };
    let lane = match q.lane.as_deref().map(Lane::parse) {
        None => Lane::Interactive,
        Some(Ok(lane)) => lane,
        Some(Err(e)) => return invalid("lane", "must be interactive or bulk", &e.0),
    };
    let (parsed, message) = match app.job_from(&body, false) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let id = parsed.job_id.to_string();
    jobs::record_queued(&app, &parsed).await;
    if let Err(r) = app.publish(lane, &parsed, &message, false).await {
        return r;
    }
    let url = format!("/v1/jobs/{id}");
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, url.clone())],
        Json(json!({"job_id": id, "status": "queued", "status_url": url})),
    )
        .into_response()
}

async fn generate(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match app.admit(&headers, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (parsed, message) = match app.job_from(&body, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let id = parsed.job_id.to_string();
    jobs::record_queued(&app, &parsed).await;
    let (tx, rx) = oneshot::channel();
    app.waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), tx);
    if let Err(r) = app
        .publish(Lane::Interactive, &parsed, &message, true)
        .await
    {
        app.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        return r;
    }
    let event = tokio::time::timeout(app.wait, rx).await;
    app.waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let event = match event {
        Ok(Ok(e)) => e,
        _ => {
            return (
                StatusCode::GATEWAY_TIMEOUT,
                Json(json!({"error": {"code": "timeout",
                    "message": format!("no result within {} s; the job goes on", app.wait.as_secs())},
                    "job_id": id, "status_url": format!("/v1/jobs/{id}")})),
            )
                .into_response();
        }
    };
    respond(&event.data)
}

/// A terminal event → the /generate-image answer.
fn respond(d: &EventData) -> Response {
    if d.status == "succeeded" {
        let images: Vec<Value> = d
            .images
            .iter()
            .map(|i| {
                json!({"url": i.url, "url_expires_at": i.url_expires_at, "key": i.key, "seed": i.seed,
                       "width": i.width, "height": i.height, "content_type": i.content_type,
                       "sha256": i.sha256})
            })
            .collect();
        let url = images.first().and_then(|i| i.get("url")).cloned();
        return Json(
            json!({"job_id": d.job_id, "status": "succeeded", "image_url": url,
                           "images": images, "timings_ms": d.timings_ms}),
        )
        .into_response();
    }
    let (status, code) = match d.error.as_ref().map(|e| e.code) {
        Some(crate::events::ErrorCode::InvalidInput) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input")
        }
        Some(crate::events::ErrorCode::ModelNotServed) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "model_not_served")
        }
        Some(crate::events::ErrorCode::Expired) => (StatusCode::GATEWAY_TIMEOUT, "expired"),
        Some(crate::events::ErrorCode::Canceled) => (StatusCode::CONFLICT, "canceled"),
        _ => (StatusCode::BAD_GATEWAY, "failed"),
    };
    let mut body = json!({"error": {"code": code,
        "message": d.error.as_ref().map(|e| e.message.clone()).unwrap_or_else(|| d.status.clone())},
        "job_id": d.job_id, "status": d.status});
    // Absent rather than null, as in every other error.
    if let Some(field) = d.error.as_ref().and_then(|e| e.field.clone()) {
        body["error"]["field"] = field.into();
    }
    (status, Json(body)).into_response()
}

/// Keeps a broker session up: connect, declare, open the publisher and the reply queue, dispatch
/// replies to waiting requests; on loss, reconnect (the queue module's one policy).
async fn maintain(app: Arc<App>, url: String, shutdown: CancellationToken) {
    let reconnect = Reconnect::new(&url, "t2i gateway");
    while let Some(conn) = reconnect.connect(&shutdown).await {
        match open_session(&app, &conn).await {
            Ok(mut replies) => {
                app.health.set_ready(true);
                tracing::info!("gateway connected to the broker");
                loop {
                    let d = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        d = replies.next() => d,
                    };
                    let Some(Ok(d)) = d else { break };
                    let Ok(event) = serde_json::from_slice::<CloudEvent>(d.body()) else {
                        continue;
                    };
                    let key = d
                        .correlation_id()
                        .map(str::to_string)
                        .unwrap_or_else(|| event.subject.clone());
                    let waiter = app
                        .waiters
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                    if let Some(tx) = waiter {
                        let _ = tx.send(event);
                    }
                }
                app.health.set_ready(false);
                *app.session.write().await = None;
                tracing::warn!("gateway lost the broker; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "gateway cannot reach the broker"),
        }
        conn.close("reconnecting").await;
        if !reconnect.pause(&shutdown).await {
            break;
        }
    }
}

async fn open_session(app: &Arc<App>, conn: &Connection) -> Result<Consumer> {
    conn.declare(&app.topology).await?;
    let (reply_queue, replies) = conn.reply_queue().await?;
    let publisher = conn.publisher(&app.topology).await?;
    *app.session.write().await = Some(Session {
        publisher,
        reply_queue,
    });
    Ok(replies)
}

fn router(app: Arc<App>) -> Router {
    let health = app.health.router();
    let http_metrics = HttpMetrics::new(app.health.registry());
    let routes = Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/generate-image", post(generate))
        .route("/openapi.json", get(openapi::openapi))
        // One byte over the contract's limit reaches the handler, which answers 413 in JSON.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES + 1))
        .with_state(app)
        .merge(health)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method);
    // Last, so it sees every route (health ones included) and the fallback.
    http_metrics.layer(routes)
}

pub async fn run(args: GatewayArgs, shutdown: CancellationToken) -> Result<()> {
    let store = Store::open(&args.storage.storage, &args.storage.s3_options())
        .await
        .with_context(|| format!("opening the store {}", args.storage.storage))?;
    let topology = crate::config::topology(&args.broker)?;
    let app = Arc::new(App {
        source: crate::config::event_source(args.event_source.as_deref(), &topology.prefix)?,
        topology,
        health: Health::new(),
        session: RwLock::new(None),
        waiters: Arc::default(),
        store,
        token: args.auth_token.filter(|t| !t.is_empty()),
        wait: Duration::from_secs(args.wait_timeout_s.max(1)),
        model: args.model.clone(),
        limits: args.limits.limits(),
        presign_ttl: jobs::presign_ttl(args.presign_ttl_s),
    });
    tokio::spawn(maintain(
        app.clone(),
        args.broker.amqp_url.clone(),
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    tracing::info!(addr = %args.addr, "gateway listening");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
