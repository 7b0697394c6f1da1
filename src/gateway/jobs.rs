//! A job's state over HTTP, from the store's records ([`crate::records`]):
//!
//! * `GET /v1/jobs/{id}[?key_prefix=...]`: the latest record of any state (queued, running,
//!   succeeded, failed, canceled, expired), its image URLs presigned afresh on every read. The key
//!   prefix is the one given, else the store's id index (written for every prefixed job at submit
//!   and at start), else the root.
//! * `DELETE /v1/jobs/{id}`: asks every worker to cancel it (the control exchange, as `t2i
//!   cancel`); `409` when it has already ended. The worker that holds or next receives it records
//!   and announces `canceled`.
//!
//! A job submitted elsewhere (`t2i enqueue`, another producer) has no record until a worker starts
//! it: until then it reads `404`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{App, error, invalid, query_error};
use crate::control::ControlMessage;
use crate::events::EventData;
use crate::job::message::check_key_prefix;
use crate::job::{Job, JobId};
use crate::queue::Delivered;
use crate::records::{self, JobState, Record};
use crate::storage::StorageError;

#[derive(serde::Deserialize)]
pub(super) struct PrefixQuery {
    key_prefix: Option<String>,
}

fn unavailable(e: StorageError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("storage: {e}"),
    )
}

type IdPath = Result<Path<String>, PathRejection>;
type Prefix = Result<Query<PrefixQuery>, QueryRejection>;

/// The id and key prefix of a request, checked, and the job's latest record.
async fn lookup(
    app: &App,
    headers: &HeaderMap,
    id: IdPath,
    q: Prefix,
) -> Result<(JobId, Option<Record>), Response> {
    app.authorized(headers)?;
    // An id that is not UTF-8 once percent-decoded is as invalid as any other.
    let id = id.map(|Path(id)| id).unwrap_or_default();
    let Ok(job_id) = JobId::parse(&id) else {
        let reason = "1 to 128 characters of [A-Za-z0-9._:-], not . or ..";
        return Err(invalid("job_id", reason, &id));
    };
    let Query(q) = q.map_err(query_error)?;
    if let Some(p) = &q.key_prefix {
        check_key_prefix(p).map_err(|r| invalid("key_prefix", &r.reason, &r.value))?;
    }
    let store = &app.store;
    let prefix = records::key_prefix_of(store, &job_id, q.key_prefix.as_deref())
        .await
        .map_err(unavailable)?;
    let record = records::read(store, &prefix, &job_id)
        .await
        .map_err(unavailable)?;
    Ok((job_id, record))
}

pub(super) async fn status(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    id: IdPath,
    q: Prefix,
) -> Response {
    let mut record = match lookup(&app, &headers, id, q).await {
        Ok((_, Some(r))) => r,
        Ok((id, None)) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no record of {id}: unknown, or queued by another producer and not started yet"
                ),
            );
        }
        Err(r) => return r,
    };
    if let Err(e) = records::presign_images(&app.store, &mut record.data, app.presign_ttl).await {
        return unavailable(e);
    }
    Json(record).into_response()
}

pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    id: IdPath,
    q: Prefix,
) -> Response {
    let (job_id, record) = match lookup(&app, &headers, id, q).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let id = job_id.as_str();
    if let Some(state) = record.as_ref().and_then(Record::state)
        && state.is_terminal()
    {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": {"code": "conflict",
                "message": format!("{id} has already ended: {}", state.as_str())},
                "job_id": id, "status": state.as_str()})),
        )
            .into_response();
    }
    let message = ControlMessage {
        cancel_jobs: vec![job_id.to_string()],
        cancel_batches: vec![],
    };
    let guard = app.session.read().await;
    let Some(s) = guard.as_ref() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "not connected to the broker; retry shortly",
        );
    };
    match s.publisher.control(&message.to_json()).await {
        // Unroutable: no worker is running to hear it; a worker started later would not know.
        Ok(Delivered::Routed) => (
            StatusCode::ACCEPTED,
            Json(json!({"job_id": id, "status": "cancel_requested",
                "status_url": format!("/v1/jobs/{id}")})),
        )
            .into_response(),
        Ok(Delivered::Unroutable) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no worker is listening for cancellations",
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("publishing the cancellation: {e}"),
        ),
    }
}

/// Records a job the gateway is about to publish as queued (and where it lives, for lookups by id),
/// before it is published, so a worker's `running` always comes after. A store that cannot take it
/// does not stop the job: it reads 404 until a worker starts it.
pub(super) async fn record_queued(app: &App, job: &Job) {
    let (job_id, key_prefix) = (&job.job_id, job.output.key_prefix.as_str());
    let mut data = EventData::for_job(job, JobState::Queued.as_str(), 0, "", &app.model);
    // A seed drawn here is not the one the worker will draw: record none until it does.
    if job.generation.seed_was_random
        && let Some(p) = data.params.as_mut()
    {
        p["seed"] = serde_json::Value::Null;
    }
    let record = Record::new(JobState::Queued, data);
    if let Err(e) = records::write_with_index(&app.store, key_prefix, job_id, &record).await {
        tracing::warn!(job = %job_id, error = %e, "recording a queued job");
    }
}

/// The TTL `GET` presigns with.
pub(super) fn presign_ttl(secs: u64) -> Duration {
    Duration::from_secs(secs.clamp(1, 604_800))
}
