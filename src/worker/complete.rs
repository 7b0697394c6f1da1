//! The end of a job's path: carry out the [`Action`] decided for it (at intake or after its batch
//! rendered) against the image store and the event sink, and say how its delivery is to be settled.
//!
//! * `Complete`: encode off the async threads → store images, then `result.json` (its presence
//!   means every image is stored) → announce `job.succeeded` (confirmed) → [`Outcome::Completed`].
//! * `Reannounce` (a redelivery whose `result.json` exists): announce the stored result again,
//!   with freshly presigned URLs.
//! * `End` (deadline passed, canceled): `failure.json`, then `job.expired` / `job.canceled` →
//!   `Completed`.
//! * `Fail` (OOM, device error, timeout, encoding): `failure.json`, then `job.failed` →
//!   [`Outcome::Rejected`]. `Invalid` (a job valid on the wire whose LoRA adapters could not be
//!   fetched or do not fit the model): the same, with `invalid_input` and the field.
//! * `RetryOrFail` (storage trouble): [`Outcome::Retry`] before the last attempt, else `Fail`.
//! * An invalid body: `job.failed` (`invalid_input`, field, value, bound) → `Rejected`.
//!
//! The stored records (`status.json` at start, `failure.json`, `result.json`) are described in
//! [`crate::records`].
//!
//! An event that cannot be announced leaves the delivery unsettled ([`Outcome::Abandoned`]): the
//! session reconnects and the broker redelivers; deterministic keys and event ids make the second
//! run overwrite rather than duplicate. The handler is generic over [`ImageStore`] and
//! [`EventSink`] so its every outcome is unit-tested with in-memory fakes (`complete_tests.rs`); it
//! never sees a delivery — the session settles it ([`super::session`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use sha2::Digest;
use time::OffsetDateTime;

use super::metrics::Metrics;
use super::models::{Served, model_of};
use crate::events::{
    CloudEvent, ErrorCode, ErrorInfo, EventData, EventKind, ImageRecord, TimingsMs,
};
use crate::image::{ImageMetadata, ParametersText, encode, parameters_text};
use crate::job::{Job, JobId, Rejection};
use crate::queue::{Delivered, Publisher, QueueError, ReplyTo, Route};
use crate::records::{self, JobState, Record};
use crate::storage::{ImageStore, ObjectKey, StorageError};

/// Where terminal events go: the events exchange (confirmed) and the job's `reply_to`.
pub trait EventSink: Send + Sync + 'static {
    fn announce(
        &self,
        event: &CloudEvent,
        reply: Option<&ReplyTo>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
}

impl EventSink for Publisher {
    async fn announce(
        &self,
        event: &CloudEvent,
        reply: Option<&ReplyTo>,
    ) -> Result<(), QueueError> {
        let kind = EventKind::parse(&event.kind).unwrap_or(EventKind::Failed);
        if self.event(event, kind).await? == Delivered::Unroutable {
            tracing::debug!(job = %event.subject, "event unroutable: no queue bound to the events exchange");
        }
        if let Some(r) = reply {
            // The requester may be gone (its exclusive queue deleted): an unroutable reply is fine.
            self.reply(&r.queue, r.correlation_id.as_deref(), event)
                .await?;
        }
        Ok(())
    }
}

/// What the worker knows of a job's delivery, besides the job itself.
#[derive(Debug, Clone)]
pub struct JobMeta {
    /// The queue it came from: its lane (for the batcher) and pool (for a delayed retry).
    pub route: Route,
    /// 1 for the first delivery; retries carry the next number.
    pub attempt: u32,
    /// When this worker received it.
    pub arrived: Instant,
    /// When it was published (AMQP timestamp), for queue-wait figures.
    pub published: Option<OffsetDateTime>,
    pub reply_to: Option<ReplyTo>,
}

/// What is to happen to a job, decided at intake or after its batch rendered.
pub enum Action {
    Complete {
        images: Vec<RgbImage>,
        truncated: bool,
        timing: BatchTiming,
    },
    Reannounce(Box<EventData>),
    End(EventKind),
    Fail(ErrorCode, String),
    /// The job is wrong for this worker in a way its parse could not see (a LoRA adapter): failed
    /// with `invalid_input`, naming the field.
    Invalid(Rejection),
    RetryOrFail(String),
}

/// How a delivery is to be settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done with (stored and announced, or ended early and announced): ack.
    Completed,
    /// Announced as failed for good: reject, so the broker dead-letters it.
    Rejected,
    /// Transient trouble before the last attempt: a delayed copy into the retry queue, then ack.
    Retry,
    /// The terminal event could not be announced: leave it unsettled and reconnect.
    Abandoned,
}

/// Timing of the batch a job was rendered in.
#[derive(Debug, Clone, Copy)]
pub struct BatchTiming {
    /// When the batch started rendering.
    pub started: Instant,
    /// Publication (or receipt) to `started`.
    pub queued: Duration,
    pub inference: Duration,
}

/// The completion handler of one worker.
pub struct Completion<St, Si> {
    pub store: Arc<St>,
    pub sink: Si,
    pub worker_id: String,
    /// The deployment's CloudEvents `source`, the same on every worker (`--event-source`).
    pub source: String,
    /// The served models, the default pool's first: a job's (its `spec` as configured,
    /// `segmind/SSD-1B`) is reported in its events and image metadata, with its safety checker
    /// (never run here) in every event of a model that ships one.
    pub models: Arc<Vec<Served>>,
    pub dtype: &'static str,
    /// Attempts before a transient failure becomes `job.failed` (the queue's delivery limit).
    pub max_attempts: u32,
    pub metrics: Arc<Metrics>,
}

impl<St: ImageStore, Si: EventSink> Completion<St, Si> {
    /// The `data` every event of `job` starts from.
    pub fn data(&self, job: &Job, attempt: u32, kind: EventKind) -> EventData {
        let served = self.served(job);
        let mut data =
            EventData::for_job(job, kind.status(), attempt, &self.worker_id, &served.spec);
        data.safety_checker = served.safety_checker;
        data
    }

    /// The served model `job` is for (the first for a job naming none, or one not served here:
    /// intake fails those before they render).
    fn served(&self, job: &Job) -> &Served {
        let i = model_of(&self.models, job.model.as_deref()).unwrap_or(0);
        &self.models[i]
    }

    pub fn event(&self, kind: EventKind, data: EventData) -> CloudEvent {
        CloudEvent::new(kind, &self.source, data, OffsetDateTime::now_utc())
    }

    /// Records that `job` is running, and where its objects are, off the render's path: a slow
    /// store delays nothing, and a lost write only leaves the job shown as not started until its
    /// terminal record (a different object, so a late `running` never hides it: [`records`]).
    pub fn record_started(&self, job: &Job, data: &EventData) {
        let store = self.store.clone();
        let (prefix, id) = (job.output.key_prefix.clone(), job.job_id.clone());
        let record = Record::new(JobState::Running, data.clone());
        tokio::spawn(async move {
            if let Err(e) = records::write_with_index(&*store, &prefix, &id, &record).await {
                tracing::warn!(job = %id, error = %e, "recording the running state");
            }
        });
    }

    /// Records a job's end without images (failed, canceled, expired) before it is announced. Best
    /// effort: the store may be what failed, and the event is the authority; a missing record
    /// leaves the job counted as pending by `t2i batch`.
    async fn record_end(&self, key_prefix: &str, job: &JobId, state: JobState, data: &EventData) {
        let record = Record::new(state, data.clone());
        if let Err(e) = records::write_with_index(&*self.store, key_prefix, job, &record).await {
            tracing::warn!(%job, error = %e, "recording the {} state", state.as_str());
        }
    }

    /// Publishes a terminal event; `Completed`/`Rejected` as asked when it got out, else `Abandoned`.
    async fn announce(
        &self,
        kind: EventKind,
        data: EventData,
        reply: Option<&ReplyTo>,
        then: Outcome,
    ) -> Outcome {
        let event = self.event(kind, data);
        match self.sink.announce(&event, reply).await {
            Ok(()) => then,
            Err(e) => {
                tracing::warn!(job = %event.subject, error = %e, "publishing {}; leaving for redelivery", kind.routing_key());
                Outcome::Abandoned
            }
        }
    }

    /// Announces a terminal event and counts `outcome` once it is out: an announcement that fails
    /// leaves the delivery for redelivery, which counts it then (so every job counts once).
    async fn announce_terminal(
        &self,
        kind: EventKind,
        data: EventData,
        reply: Option<&ReplyTo>,
        then: Outcome,
        outcome: &str,
    ) -> Outcome {
        let settled = self.announce(kind, data, reply, then).await;
        if settled != Outcome::Abandoned {
            self.metrics.outcome(outcome);
        }
        settled
    }

    /// Carries out `action` for `job`.
    pub async fn act(&self, job: &Job, meta: &JobMeta, action: Action) -> Outcome {
        match action {
            Action::Complete {
                images,
                truncated,
                timing,
            } => self.complete(job, meta, images, truncated, timing).await,
            Action::Reannounce(stored) => {
                // The stored result holds keys; its URLs are made now, so they are fresh.
                let mut data = *stored;
                let ttl = job.output.presign_ttl;
                if let Err(e) = records::presign_images(&*self.store, &mut data, ttl).await {
                    tracing::warn!(job = %job.job_id, error = %e, "presigning a stored result");
                }
                let (kind, reply) = (EventKind::Succeeded, meta.reply_to.as_ref());
                self.announce_terminal(kind, data, reply, Outcome::Completed, "reannounced")
                    .await
            }
            Action::End(kind) => self.end_early(job, meta, kind).await,
            Action::Fail(code, message) => self.fail(job, meta, code, message).await,
            Action::Invalid(rejection) => {
                tracing::info!(job = %job.job_id, field = %rejection.field, reason = %rejection.reason, "failed: invalid for this worker");
                let error = ErrorInfo {
                    code: ErrorCode::InvalidInput,
                    message: rejection.to_string(),
                    field: Some(rejection.field),
                    retryable: false,
                };
                self.fail_with(job, meta, error).await
            }
            Action::RetryOrFail(error) => self.retry_or_fail(job, meta, error).await,
        }
    }

    /// Invalid input: a failure event keyed by the job id (or the message id, or a body hash); the
    /// message is dead-lettered without retry.
    pub async fn reject_body(
        &self,
        body: &[u8],
        message_id: Option<&str>,
        reply: Option<&ReplyTo>,
        job_id: Option<JobId>,
        rejection: Rejection,
    ) -> Outcome {
        let key = job_id
            .as_ref()
            .map(|j| j.to_string())
            .or_else(|| {
                message_id
                    .filter(|m| JobId::parse(m).is_ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| {
                format!(
                    "body-sha256-{}",
                    &hex::encode(sha2::Sha256::digest(body))[..32]
                )
            });
        let data = EventData {
            job_id: key.clone(),
            status: EventKind::Failed.status().into(),
            attempt: 1,
            worker: self.worker_id.clone(),
            model: self.models[0].spec.clone(),
            params: None,
            images: vec![],
            timings_ms: None,
            error: Some(ErrorInfo {
                code: ErrorCode::InvalidInput,
                message: rejection.to_string(),
                field: Some(rejection.field.clone()),
                retryable: false,
            }),
            progress: None,
            prompt_truncated: false,
            batch: None,
            metadata: None,
            safety_checker: None,
        };
        tracing::info!(job = %key, field = %rejection.field, reason = %rejection.reason, "rejected");
        // Its key prefix is part of what could not be read: the record goes to the store root.
        if let Ok(id) = JobId::parse(&key) {
            self.record_end("", &id, JobState::Failed, &data).await;
        }
        self.announce_terminal(
            EventKind::Failed,
            data,
            reply,
            Outcome::Rejected,
            "rejected",
        )
        .await
    }

    /// Deadline passed or canceled, before or during rendering.
    async fn end_early(&self, job: &Job, meta: &JobMeta, kind: EventKind) -> Outcome {
        let (code, message) = match kind {
            EventKind::Expired => (
                ErrorCode::Expired,
                "the job's deadline passed before it finished",
            ),
            _ => (ErrorCode::Canceled, "the job was canceled"),
        };
        let mut data = self.data(job, meta.attempt, kind);
        data.error = Some(ErrorInfo {
            code,
            message: message.into(),
            field: None,
            retryable: false,
        });
        let state = JobState::parse(kind.status()).unwrap_or(JobState::Canceled);
        self.record_end(&job.output.key_prefix, &job.job_id, state, &data)
            .await;
        let reply = meta.reply_to.as_ref();
        self.announce_terminal(kind, data, reply, Outcome::Completed, kind.status())
            .await
    }

    /// The job failed for good here (OOM, device error, timeout): `job.failed`, dead-letter.
    async fn fail(&self, job: &Job, meta: &JobMeta, code: ErrorCode, message: String) -> Outcome {
        let error = ErrorInfo {
            code,
            message,
            field: None,
            retryable: matches!(
                code,
                ErrorCode::Oom | ErrorCode::Timeout | ErrorCode::UploadFailed
            ),
        };
        self.fail_with(job, meta, error).await
    }

    /// `job.failed` with `error`, recorded first; dead-letter.
    async fn fail_with(&self, job: &Job, meta: &JobMeta, error: ErrorInfo) -> Outcome {
        let mut data = self.data(job, meta.attempt, EventKind::Failed);
        data.error = Some(error);
        let prefix = &job.output.key_prefix;
        self.record_end(prefix, &job.job_id, JobState::Failed, &data)
            .await;
        let reply = meta.reply_to.as_ref();
        self.announce_terminal(EventKind::Failed, data, reply, Outcome::Rejected, "failed")
            .await
    }

    /// Transient trouble: a delayed retry, or `job.failed` at the last attempt.
    async fn retry_or_fail(&self, job: &Job, meta: &JobMeta, error: String) -> Outcome {
        if meta.attempt < self.max_attempts {
            tracing::warn!(job = %job.job_id, attempt = meta.attempt, %error, "transient failure; retrying later");
            self.metrics.retries.inc();
            return Outcome::Retry;
        }
        let message = format!("giving up after attempt {}: {error}", self.max_attempts);
        self.fail(job, meta, ErrorCode::UploadFailed, message).await
    }

    /// Encodes, stores and announces one rendered job.
    async fn complete(
        &self,
        job: &Job,
        meta: &JobMeta,
        images: Vec<RgbImage>,
        truncated: bool,
        timing: BatchTiming,
    ) -> Outcome {
        let encode_start = Instant::now();
        let (owned, model, dtype) = (job.clone(), self.served(job).spec.clone(), self.dtype);
        let encoded =
            tokio::task::spawn_blocking(move || encode_all(&owned, &images, &model, dtype)).await;
        let encoded = match encoded {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                let message = format!("encoding: {e}");
                return self.fail(job, meta, ErrorCode::Internal, message).await;
            }
            Err(e) => {
                let message = format!("encoding task: {e}");
                return self.fail(job, meta, ErrorCode::Internal, message).await;
            }
        };
        let encode_time = encode_start.elapsed();
        self.metrics.job_encode.observe(encode_time.as_secs_f64());

        let upload_start = Instant::now();
        let records = match self.upload(job, encoded).await {
            Ok(r) => r,
            Err(e) if e.is_retryable() => {
                return self.retry_or_fail(job, meta, e.to_string()).await;
            }
            Err(e) => {
                let message = e.to_string();
                return self.fail(job, meta, ErrorCode::UploadFailed, message).await;
            }
        };
        let upload_time = upload_start.elapsed();
        let queued = timing.queued.as_millis() as u64;
        let mut data = self.data(job, meta.attempt, EventKind::Succeeded);
        data.images = records;
        data.prompt_truncated = truncated;
        data.timings_ms = Some(TimingsMs {
            queued,
            inference: timing.inference.as_millis() as u64,
            encode: encode_time.as_millis() as u64,
            upload: upload_time.as_millis() as u64,
            total: queued + timing.started.elapsed().as_millis() as u64,
        });
        // result.json last: its presence means every image is stored. It keeps the images' keys;
        // the event carries the URLs presigned for this announcement.
        let record = Record::new(JobState::Succeeded, data.clone());
        let prefix = &job.output.key_prefix;
        if let Err(e) = records::write(&*self.store, prefix, &job.job_id, &record).await {
            return self.retry_or_fail(job, meta, e.to_string()).await;
        }
        self.metrics.job_upload.observe(upload_time.as_secs_f64());
        let (kind, reply) = (EventKind::Succeeded, meta.reply_to.as_ref());
        let outcome = self
            .announce_terminal(kind, data, reply, Outcome::Completed, "succeeded")
            .await;
        if outcome == Outcome::Completed {
            self.metrics.images.inc_by(job.generation.num_images as u64);
        }
        outcome
    }

    async fn upload(
        &self,
        job: &Job,
        encoded: Vec<EncodedImage>,
    ) -> Result<Vec<ImageRecord>, StorageError> {
        let mut records = Vec::with_capacity(encoded.len());
        let format = job.output.format;
        for e in encoded {
            let key = ObjectKey::image(
                &job.output.key_prefix,
                &job.job_id,
                e.index,
                format.extension(),
            );
            let meta = vec![
                ("job-id".to_string(), job.job_id.to_string()),
                ("seed".to_string(), e.seed.to_string()),
                ("index".to_string(), e.index.to_string()),
            ];
            let bytes = e.bytes.len() as u64;
            let stored = self
                .store
                .put(
                    &key,
                    e.bytes,
                    format.content_type(),
                    &meta,
                    Some(job.output.presign_ttl),
                )
                .await?;
            records.push(ImageRecord {
                index: e.index,
                seed: e.seed,
                bucket: stored.bucket,
                key: stored.key,
                url: stored.url,
                url_expires_at: stored.url_expires_at.map(crate::events::rfc3339),
                content_type: format.content_type().into(),
                width: job.generation.width,
                height: job.generation.height,
                bytes,
                sha256: e.sha256,
            });
        }
        Ok(records)
    }
}

struct EncodedImage {
    index: u32,
    seed: u64,
    bytes: Vec<u8>,
    sha256: String,
}

fn encode_all(
    job: &Job,
    images: &[RgbImage],
    model: &str,
    dtype: &str,
) -> Result<Vec<EncodedImage>, crate::image::EncodeError> {
    let g = &job.generation;
    let model_name = crate::image::model_display_name(model);
    images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let seed = g.image_seed(i as u32);
            let parameters = parameters_text(&ParametersText::of(g, seed, model_name));
            let mut job_json = serde_json::to_value(job).unwrap_or_default();
            if let Some(o) = job_json.as_object_mut() {
                o.insert("seed".into(), seed.into());
                o.insert("index".into(), i.into());
                o.insert("model".into(), model.into());
                o.insert("dtype".into(), dtype.into());
            }
            let meta = ImageMetadata {
                parameters,
                job_json: job_json.to_string(),
            };
            let bytes = encode(img, job.output.format, job.output.quality, &meta)?;
            let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
            Ok(EncodedImage {
                index: i as u32,
                seed,
                bytes,
                sha256,
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "complete_tests.rs"]
mod tests;
