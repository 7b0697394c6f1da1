//! Job events as CloudEvents 1.0 (structured JSON): `job.started`, `job.progress`, `job.succeeded`,
//! `job.failed`, `job.expired`, `job.canceled` (docs/architecture.md §2 "Events").
//!
//! Event ids are deterministic (UUIDv5 of job id and event type, plus the step for progress), so a
//! redelivered job re-emits the same ids and consumers can deduplicate. Pure: building and
//! serialising events; publishing lives in `queue::publisher`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Namespace for event ids: UUIDv5("t2i-worker events") in the URL namespace, fixed forever.
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5b0f_6d0e_8f4c_5a8e_9a39_2d0c_7e61_4b21);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Progress,
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

impl EventKind {
    /// Every event type, in the order a job can emit them.
    pub const ALL: [EventKind; 6] = [
        Self::Started,
        Self::Progress,
        Self::Succeeded,
        Self::Failed,
        Self::Expired,
        Self::Canceled,
    ];

    /// The events that end a job: exactly one of these per job (per delivery).
    pub const TERMINAL: [EventKind; 4] =
        [Self::Succeeded, Self::Failed, Self::Expired, Self::Canceled];

    /// What the webhook relay delivers: everything but `job.progress`, a transient, throttled hint.
    pub const RELAYED: [EventKind; 5] = [
        Self::Started,
        Self::Succeeded,
        Self::Failed,
        Self::Expired,
        Self::Canceled,
    ];

    /// The event type of a routing key (`job.failed`), or of a CloudEvents `type` (`t2i.job.failed`).
    pub fn parse(name: &str) -> Option<Self> {
        let key = name.strip_prefix("t2i.").unwrap_or(name);
        Self::ALL.into_iter().find(|k| k.routing_key() == key)
    }

    /// The routing key on `t2i.events` (`job.succeeded`).
    pub fn routing_key(self) -> &'static str {
        match self {
            Self::Started => "job.started",
            Self::Progress => "job.progress",
            Self::Succeeded => "job.succeeded",
            Self::Failed => "job.failed",
            Self::Expired => "job.expired",
            Self::Canceled => "job.canceled",
        }
    }

    /// The CloudEvents `type` (`t2i.job.succeeded`).
    pub fn cloudevent_type(self) -> String {
        format!("t2i.{}", self.routing_key())
    }

    pub fn status(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Progress => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Started | Self::Progress)
    }
}

/// Error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidInput,
    ModelUnavailable,
    Oom,
    UploadFailed,
    Timeout,
    Expired,
    Canceled,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Whether publishing the same job again could succeed.
    pub retryable: bool,
}

/// One stored image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImageRecord {
    pub index: u32,
    pub seed: u64,
    pub bucket: Option<String>,
    pub key: String,
    /// Presigned GET URL (S3) or `file://` URL (local storage).
    pub url: Option<String>,
    pub url_expires_at: Option<String>,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TimingsMs {
    /// From publication (AMQP timestamp) or first receipt to the start of rendering.
    pub queued: u64,
    pub inference: u64,
    pub encode: u64,
    pub upload: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProgressInfo {
    pub step: usize,
    pub total: usize,
}

/// The `data` of every event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventData {
    pub job_id: String,
    pub status: String,
    pub attempt: u32,
    pub worker: String,
    pub model: String,
    /// The normalized job (resolved seed and scheduler); absent when the message was not a valid job.
    pub params: Option<serde_json::Value>,
    #[serde(default)]
    pub images: Vec<ImageRecord>,
    pub timings_ms: Option<TimingsMs>,
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressInfo>,
    /// The prompt was longer than the 77-token CLIP context and was cut.
    #[serde(default)]
    pub prompt_truncated: bool,
    pub batch: Option<serde_json::Value>,
    pub metadata: Option<serde_json::Value>,
}

/// A CloudEvents 1.0 envelope in structured mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub time: String,
    pub datacontenttype: String,
    pub data: EventData,
}

/// Deterministic event id for (job, kind[, step]).
pub fn event_id(job_id: &str, kind: EventKind, step: Option<usize>) -> String {
    let name = match step {
        Some(s) => format!("{job_id}/{}/{s}", kind.routing_key()),
        None => format!("{job_id}/{}", kind.routing_key()),
    };
    uuid::Uuid::new_v5(&EVENT_NAMESPACE, name.as_bytes()).to_string()
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

impl CloudEvent {
    pub fn new(kind: EventKind, worker: &str, data: EventData, now: OffsetDateTime) -> Self {
        let step =
            (kind == EventKind::Progress).then(|| data.progress.as_ref().map_or(0, |p| p.step));
        Self {
            specversion: "1.0".into(),
            id: event_id(&data.job_id, kind, step),
            source: format!("t2i-worker/{worker}"),
            kind: kind.cloudevent_type(),
            subject: data.job_id.clone(),
            time: rfc3339(now),
            datacontenttype: "application/json".into(),
            data,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(job: &str) -> EventData {
        EventData {
            job_id: job.into(),
            status: "succeeded".into(),
            attempt: 1,
            worker: "w1".into(),
            model: "segmind/SSD-1B".into(),
            params: None,
            images: vec![],
            timings_ms: None,
            error: None,
            progress: None,
            prompt_truncated: false,
            batch: None,
            metadata: None,
        }
    }

    #[test]
    fn event_ids_are_deterministic_per_job_and_kind() {
        let now = OffsetDateTime::now_utc();
        let a = CloudEvent::new(EventKind::Succeeded, "w1", data("job-1"), now);
        let b = CloudEvent::new(
            EventKind::Succeeded,
            "w2",
            data("job-1"),
            now + time::Duration::hours(1),
        );
        assert_eq!(
            a.id, b.id,
            "a redelivery on another worker re-emits the same id"
        );
        let c = CloudEvent::new(EventKind::Failed, "w1", data("job-1"), now);
        assert_ne!(a.id, c.id);
        assert_ne!(
            a.id,
            CloudEvent::new(EventKind::Succeeded, "w1", data("job-2"), now).id
        );
    }

    #[test]
    fn envelopes_follow_cloudevents_1_0() {
        let e = CloudEvent::new(
            EventKind::Succeeded,
            "w1",
            data("job-1"),
            OffsetDateTime::UNIX_EPOCH,
        );
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "t2i.job.succeeded");
        assert_eq!(v["subject"], "job-1");
        assert_eq!(v["time"], "1970-01-01T00:00:00Z");
        assert_eq!(v["source"], "t2i-worker/w1");
    }
}
