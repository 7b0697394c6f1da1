//! What happens to one job after the decision to render it (or not), in one place:
//!
//! * `Outcome::Completed`: encode off the async threads → store images and `result.json` → publish
//!   `job.succeeded` (confirmed) → reply → **then** ack.
//! * `Outcome::Rejected`: invalid input → `job.failed` (`invalid_input`, field, value, bound) →
//!   `nack(requeue=false)`, so the broker dead-letters it. Pipeline failures (OOM) likewise.
//! * `Outcome::Retry`: storage or broker trouble → a copy into the delayed-retry queue with the next
//!   attempt number, then ack; at the last attempt `job.failed` (retryable) and dead-letter.
//! * Expired and canceled jobs get their event and are acked.
//!
//! If the channel a delivery came on has died, acks fail and are ignored: the broker redelivers, and
//! deterministic keys and event ids make the second run overwrite rather than duplicate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sha2::Digest;
use time::OffsetDateTime;

use super::http::Metrics;
use crate::events::{
    CloudEvent, ErrorCode, ErrorInfo, EventData, EventKind, ImageRecord, ProgressInfo, TimingsMs,
};
use crate::image::{ImageMetadata, ParametersText, encode, parameters_text};
use crate::job::{Job, JobId, Rejection};
use crate::queue::{Lane, Publisher, QueueError};
use crate::storage::{ImageStore, ObjectKey, StorageError, Store};

/// Shared by every job of a session.
pub struct Ctx {
    pub publisher: Publisher,
    pub store: Arc<Store>,
    pub worker_id: String,
    /// As configured (`segmind/SSD-1B`), reported in events.
    pub model: String,
    pub metrics: Arc<Metrics>,
    /// Attempts before a transient failure becomes `job.failed` (the queue's delivery limit).
    pub max_attempts: u32,
    pub dtype: &'static str,
    /// Cancelled when a publish or an acknowledgement fails: the session reconnects, and closing
    /// the connection hands every unsettled delivery back to the broker at once (nothing waits
    /// for a consumer timeout).
    pub broken: tokio_util::sync::CancellationToken,
}

/// The broker's confirms of a batch's `job.started` events, still on their way.
pub struct StartedConfirms(Vec<(String, crate::queue::publisher::PendingConfirm)>);

impl StartedConfirms {
    /// Awaits every confirm, logging refusals (the events are informational).
    pub async fn confirm_all(self) {
        for (job, p) in self.0 {
            if let Err(e) = p.confirmed().await {
                tracing::warn!(%job, error = %e, "publishing job.started");
            }
        }
    }
}

/// A valid job with its delivery.
pub struct InHand {
    pub job: Job,
    pub delivery: Delivery,
    pub lane: Lane,
    pub attempt: u32,
    pub arrived: Instant,
    /// When it was published (AMQP timestamp), for queue-wait figures.
    pub published: Option<OffsetDateTime>,
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

/// Longest wait for an ack or nack to be written.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How one job ended, for the caller's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Rejected,
    Retry,
    /// The delivery could not be settled (channel gone); the broker will redeliver.
    Abandoned,
}

fn published_at(props: &BasicProperties) -> Option<OffsetDateTime> {
    props
        .timestamp()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t as i64).ok())
}

impl InHand {
    pub fn new(job: Job, delivery: Delivery, lane: Lane, attempt: u32) -> Self {
        let published = published_at(&delivery.properties);
        Self {
            job,
            delivery,
            lane,
            attempt,
            arrived: Instant::now(),
            published,
        }
    }
}

impl Ctx {
    /// A delivery this session cannot settle: ask for a reconnect, after which the broker
    /// redelivers it (a redelivered job whose `result.json` exists is only re-announced).
    fn abandoned(&self) -> Outcome {
        self.broken.cancel();
        Outcome::Abandoned
    }

    /// Awaits an ack or nack, within [`SETTLE_TIMEOUT`]: on a connection that died mid-write
    /// lapin may never resolve it.
    async fn settle(
        &self,
        r: impl std::future::Future<Output = lapin::Result<bool>>,
        ok: Outcome,
    ) -> Outcome {
        match tokio::time::timeout(SETTLE_TIMEOUT, r).await {
            Ok(Ok(_)) => ok,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not settle a delivery (channel gone?); the broker will redeliver");
                self.abandoned()
            }
            Err(_) => {
                tracing::warn!("settling a delivery timed out; the broker will redeliver");
                self.abandoned()
            }
        }
    }

    fn data(&self, job: &Job, attempt: u32, kind: EventKind) -> EventData {
        EventData {
            job_id: job.job_id.to_string(),
            status: kind.status().into(),
            attempt,
            worker: self.worker_id.clone(),
            model: self.model.clone(),
            params: serde_json::to_value(job).ok(),
            images: vec![],
            timings_ms: None,
            error: None,
            progress: None,
            prompt_truncated: false,
            batch: job
                .batch
                .as_ref()
                .and_then(|b| serde_json::to_value(b).ok()),
            metadata: job.metadata.clone(),
        }
    }

    /// Publishes a terminal event (confirmed) and the `reply_to` copy.
    async fn announce(
        &self,
        delivery: &Delivery,
        kind: EventKind,
        data: EventData,
    ) -> Result<(), QueueError> {
        let event = CloudEvent::new(kind, &self.worker_id, data, OffsetDateTime::now_utc());
        let routed = self.publisher.event(&event, kind).await?;
        if routed == crate::queue::publisher::Delivered::Unroutable {
            tracing::debug!(job = %event.subject, "event unroutable: no queue bound to the events exchange");
        }
        if let Some(reply_to) = delivery.properties.reply_to() {
            let corr = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str());
            // The requester may be gone (its exclusive queue deleted): an unroutable reply is fine.
            self.publisher
                .reply(reply_to.as_str(), corr, &event)
                .await?;
        }
        Ok(())
    }

    /// `job.started` for every job of a batch: informational, so the device does not wait for the
    /// broker. The frames are sent here, before the render, so a job's `started` precedes its
    /// terminal event on this channel; the returned confirms are awaited elsewhere.
    pub async fn started(&self, jobs: &[InHand]) -> StartedConfirms {
        // Sent concurrently: one wake-up of the connection's writer for the whole batch instead of
        // one per job (their relative order does not matter).
        let sends = jobs.iter().map(|h| async move {
            let event = CloudEvent::new(
                EventKind::Started,
                &self.worker_id,
                self.data(&h.job, h.attempt, EventKind::Started),
                OffsetDateTime::now_utc(),
            );
            match self.publisher.send_event(&event, EventKind::Started).await {
                Ok(p) => Some((h.job.job_id.to_string(), p)),
                Err(e) => {
                    tracing::warn!(job = %h.job.job_id, error = %e, "publishing job.started");
                    None
                }
            }
        });
        let pending = futures_util::future::join_all(sends).await;
        StartedConfirms(pending.into_iter().flatten().collect())
    }

    /// A throttled `job.progress` (transient). False when it could not be sent.
    pub async fn progress(&self, job: &Job, attempt: u32, step: usize, total: usize) -> bool {
        let mut data = self.data(job, attempt, EventKind::Progress);
        data.params = None;
        data.progress = Some(ProgressInfo { step, total });
        let event = CloudEvent::new(
            EventKind::Progress,
            &self.worker_id,
            data,
            OffsetDateTime::now_utc(),
        );
        self.publisher
            .event(&event, EventKind::Progress)
            .await
            .is_ok()
    }

    /// Invalid input: failure event keyed by the job id (or the message id, or a body hash), then
    /// dead-letter without retry.
    pub async fn reject_body(
        &self,
        delivery: Delivery,
        job_id: Option<JobId>,
        rejection: Rejection,
    ) -> Outcome {
        let key = job_id
            .map(|j| j.to_string())
            .or_else(|| {
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
                    .filter(|m| JobId::parse(m).is_ok())
            })
            .unwrap_or_else(|| {
                format!(
                    "body-sha256-{}",
                    &hex::encode(sha2::Sha256::digest(&delivery.data))[..32]
                )
            });
        let data = EventData {
            job_id: key.clone(),
            status: "failed".into(),
            attempt: 1,
            worker: self.worker_id.clone(),
            model: self.model.clone(),
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
        };
        tracing::info!(job = %key, field = %rejection.field, reason = %rejection.reason, "rejected");
        self.metrics.outcome("rejected");
        if let Err(e) = self.announce(&delivery, EventKind::Failed, data).await {
            tracing::warn!(job = %key, error = %e, "could not publish the rejection; leaving the message for redelivery");
            return self.abandoned();
        }
        self.settle(
            delivery.nack(BasicNackOptions {
                requeue: false,
                ..Default::default()
            }),
            Outcome::Rejected,
        )
        .await
    }

    /// A job whose `result.json` already exists (a redelivery after the work was done): re-announce.
    pub async fn reannounce(&self, h: InHand, stored: EventData) -> Outcome {
        self.metrics.outcome("reannounced");
        if let Err(e) = self
            .announce(&h.delivery, EventKind::Succeeded, stored)
            .await
        {
            tracing::warn!(job = %h.job.job_id, error = %e, "re-announcing");
            return self.abandoned();
        }
        self.settle(
            h.delivery.ack(BasicAckOptions::default()),
            Outcome::Completed,
        )
        .await
    }

    /// Deadline passed or canceled before or during rendering.
    pub async fn end_early(&self, h: InHand, kind: EventKind) -> Outcome {
        let (code, message) = match kind {
            EventKind::Expired => (
                ErrorCode::Expired,
                "the job's deadline passed before it finished",
            ),
            _ => (ErrorCode::Canceled, "the job was canceled"),
        };
        let mut data = self.data(&h.job, h.attempt, kind);
        data.error = Some(ErrorInfo {
            code,
            message: message.into(),
            field: None,
            retryable: false,
        });
        self.metrics.outcome(kind.status());
        if self.announce(&h.delivery, kind, data).await.is_err() {
            return self.abandoned();
        }
        self.settle(
            h.delivery.ack(BasicAckOptions::default()),
            Outcome::Completed,
        )
        .await
    }

    /// The pipeline failed for this job (OOM, device error, timeout): `job.failed`, dead-letter.
    pub async fn fail(&self, h: InHand, code: ErrorCode, message: String) -> Outcome {
        let mut data = self.data(&h.job, h.attempt, EventKind::Failed);
        data.error = Some(ErrorInfo {
            code,
            message,
            field: None,
            retryable: matches!(
                code,
                ErrorCode::Oom | ErrorCode::Timeout | ErrorCode::UploadFailed
            ),
        });
        self.metrics.outcome("failed");
        if self
            .announce(&h.delivery, EventKind::Failed, data)
            .await
            .is_err()
        {
            return self.abandoned();
        }
        self.settle(
            h.delivery.nack(BasicNackOptions {
                requeue: false,
                ..Default::default()
            }),
            Outcome::Rejected,
        )
        .await
    }

    /// Transient trouble: delayed retry, or `job.failed` at the last attempt.
    pub async fn retry_or_fail(&self, h: InHand, error: String) -> Outcome {
        if h.attempt < self.max_attempts {
            tracing::warn!(job = %h.job.job_id, attempt = h.attempt, %error, "transient failure; retrying later");
            match self
                .publisher
                .retry(h.lane, h.attempt, &h.delivery.data, &h.delivery.properties)
                .await
            {
                Ok(()) => {
                    self.metrics.outcome("retried");
                    return self
                        .settle(h.delivery.ack(BasicAckOptions::default()), Outcome::Retry)
                        .await;
                }
                Err(e) => {
                    tracing::warn!(job = %h.job.job_id, error = %e, "could not schedule the retry");
                    return self.abandoned();
                }
            }
        }
        self.fail(
            h,
            ErrorCode::UploadFailed,
            format!("giving up after attempt {}: {error}", self.max_attempts),
        )
        .await
    }

    /// Encodes, stores and announces one rendered job, then acks.
    pub async fn complete(
        &self,
        h: InHand,
        images: Vec<RgbImage>,
        truncated: bool,
        timing: BatchTiming,
    ) -> Outcome {
        let job = h.job.clone();
        let encode_start = Instant::now();
        let (ctx_model, dtype) = (self.model.clone(), self.dtype);
        let encoded =
            tokio::task::spawn_blocking(move || encode_all(&job, &images, &ctx_model, dtype)).await;
        let encoded = match encoded {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                return self
                    .fail(h, ErrorCode::Internal, format!("encoding: {e}"))
                    .await;
            }
            Err(e) => {
                return self
                    .fail(h, ErrorCode::Internal, format!("encoding task: {e}"))
                    .await;
            }
        };
        let encode_time = encode_start.elapsed();
        self.metrics
            .phase
            .with_label_values(&["encode"])
            .observe(encode_time.as_secs_f64());

        let upload_start = Instant::now();
        let records = match self.upload(&h.job, encoded).await {
            Ok(r) => r,
            Err(e) if e.is_retryable() => return self.retry_or_fail(h, e.to_string()).await,
            Err(e) => return self.fail(h, ErrorCode::UploadFailed, e.to_string()).await,
        };
        let upload_time = upload_start.elapsed();
        let queued = timing.queued.as_millis() as u64;
        let mut data = self.data(&h.job, h.attempt, EventKind::Succeeded);
        data.images = records;
        data.prompt_truncated = truncated;
        data.timings_ms = Some(TimingsMs {
            queued,
            inference: timing.inference.as_millis() as u64,
            encode: encode_time.as_millis() as u64,
            upload: upload_time.as_millis() as u64,
            total: queued + timing.started.elapsed().as_millis() as u64,
        });
        // result.json last: its presence means every image is stored.
        let result_key = ObjectKey::result(&h.job.output.key_prefix, &h.job.job_id);
        let body = serde_json::to_vec_pretty(&data).unwrap_or_default();
        if let Err(e) = self
            .store
            .put(
                &result_key,
                body,
                "application/json",
                &[],
                h.job.output.presign_ttl,
            )
            .await
        {
            return self.retry_or_fail(h, e.to_string()).await;
        }
        self.metrics
            .phase
            .with_label_values(&["upload"])
            .observe(upload_time.as_secs_f64());
        if let Err(e) = self.announce(&h.delivery, EventKind::Succeeded, data).await {
            tracing::warn!(job = %h.job.job_id, error = %e, "publishing job.succeeded; leaving for redelivery");
            return self.abandoned();
        }
        self.metrics.outcome("succeeded");
        self.metrics
            .images
            .inc_by(h.job.generation.num_images as u64);
        self.settle(
            h.delivery.ack(BasicAckOptions::default()),
            Outcome::Completed,
        )
        .await
    }

    async fn upload(
        &self,
        job: &Job,
        encoded: Vec<EncodedImage>,
    ) -> Result<Vec<ImageRecord>, StorageError> {
        let mut records = Vec::with_capacity(encoded.len());
        for e in encoded {
            let key = ObjectKey::image(
                &job.output.key_prefix,
                &job.job_id,
                e.index,
                job.output.format.extension(),
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
                    job.output.format.content_type(),
                    &meta,
                    job.output.presign_ttl,
                )
                .await?;
            records.push(ImageRecord {
                index: e.index,
                seed: e.seed,
                bucket: stored.bucket,
                key: stored.key,
                url: stored.url,
                url_expires_at: stored.url_expires_at.map(crate::events::rfc3339),
                content_type: job.output.format.content_type().into(),
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
