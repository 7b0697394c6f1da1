//! Job events as CloudEvents 1.0 (structured JSON): `job.started`, `job.progress`, `job.succeeded`,
//! `job.failed`, `job.expired`, `job.canceled` (docs/architecture.md §2 "Events").
//!
//! Event ids are deterministic (UUIDv5 of job id and event type, plus the step for progress), so a
//! redelivered job re-emits the same ids and consumers can deduplicate. CloudEvents identifies an
//! event by `source` + `id`, so `source` names the deployment (every worker of it alike, see
//! [`default_source`]), never the worker: that is `data.worker`. `dataschema` is [`DATA_SCHEMA`].
//! Pure: building and serialising events; publishing lives in `queue::publisher`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Namespace for event ids: UUIDv5("t2i-worker events") in the URL namespace, fixed forever.
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5b0f_6d0e_8f4c_5a8e_9a39_2d0c_7e61_4b21);

/// The `$id` of the published event schema (`schemas/event.schema.json`); `v1` changes with any
/// incompatible change of the contract.
pub const EVENT_SCHEMA_ID: &str = "https://t2i-worker.dev/schemas/v1/event.schema.json";

/// Every event's `dataschema`: the `EventData` definition inside the published event schema, named by
/// the schema's `$id` and a JSON Pointer. It identifies what the code emits, so it is a constant of
/// the code (a new contract version gets a new URI), not a setting of a deployment.
pub const DATA_SCHEMA: &str =
    "https://t2i-worker.dev/schemas/v1/event.schema.json#/$defs/EventData";

/// The `source` of a deployment's events when `--event-source` is not set: `/t2i-worker/<prefix>`,
/// the AMQP prefix percent-encoded as one path segment. Every worker on the same exchanges gets the
/// same source, so a job announced twice (a redelivery on another worker) is one event to
/// CloudEvents consumers. A URI-reference, as the spec allows (its own examples include
/// `/sensors/tn-1234567/alerts`); deployments whose events meet others' should set an absolute URI
/// they own.
pub fn default_source(amqp_prefix: &str) -> String {
    let mut s = String::from("/t2i-worker/");
    for b in amqp_prefix.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Checks that `s` can be a CloudEvents `source`: a non-empty URI-reference (RFC 3986 characters
/// only, `%` followed by two hex digits). Syntax only; what it names is the operator's choice.
pub fn check_source(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        let allowed = c.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&c);
        if !allowed {
            return Err(format!(
                "`{s}` is not a URI-reference: percent-encode {:?}",
                s[i..].chars().next().unwrap_or(' ')
            ));
        }
        let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
        if c == b'%' && !(hex(i + 1) && hex(i + 2)) {
            return Err(format!(
                "`{s}` is not a URI-reference: `%` must start a %XX escape"
            ));
        }
    }
    Ok(())
}

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

/// Error codes of the contract. `model_not_served`: no worker pool serves the job's `model` (its
/// producer found no queue bound for the model's routing key, or a worker of another model got it).
/// `model_unavailable`: a worker serving the model could not load it, or its weights alone exceed
/// the worker's memory budget (`--memory-budget`).
// Plain comments on the variants: doc comments would turn the schema's `enum` into a `oneOf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidInput,
    ModelUnavailable,
    ModelNotServed,
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
    /// Part of the prompt was cut: past CLIP's 77 tokens with `long_prompt: "truncate"`, past 10
    /// chunks of 75 tokens with `chunk`.
    #[serde(default)]
    pub prompt_truncated: bool,
    pub batch: Option<serde_json::Value>,
    pub metadata: Option<serde_json::Value>,
    /// `not_run`: the model ships a safety checker (SD 1.x) and no worker runs it, so images are
    /// not screened. Absent when the model ships none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_checker: Option<SafetyChecker>,
}

/// What became of a model's safety checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SafetyChecker {
    /// Shipped in the model folder, not run.
    NotRun,
}

/// A CloudEvents 1.0 envelope in structured mode (`application/cloudevents+json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent {
    pub specversion: String,
    /// UUIDv5 of the job id and event type (and the step, for progress): the same on every
    /// redelivery, on any worker. Deduplicate on `source` + `id`.
    pub id: String,
    /// The deployment that emitted the event (`--event-source`, default `/t2i-worker/<amqp
    /// prefix>`): the same for every worker of it. The worker is `data.worker`.
    #[schemars(extend("format" = "uri-reference"))]
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub time: String,
    pub datacontenttype: String,
    /// The schema of `data`: `EventData` in this schema. Always set by this version; absent from
    /// events of versions before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", extend("format" = "uri"))]
    pub dataschema: Option<String>,
    pub data: EventData,
}

impl EventData {
    /// The `data` every event (and stored record) of `job` starts from: its id and normalized
    /// parameters, its batch and metadata; no images, timings or error yet.
    pub fn for_job(
        job: &crate::job::Job,
        status: &str,
        attempt: u32,
        worker: &str,
        model: &str,
    ) -> Self {
        Self {
            job_id: job.job_id.to_string(),
            status: status.into(),
            attempt,
            worker: worker.into(),
            model: model.into(),
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
            safety_checker: None,
        }
    }
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
    /// An event of `kind` from the deployment `source` (see [`default_source`]).
    pub fn new(kind: EventKind, source: &str, data: EventData, now: OffsetDateTime) -> Self {
        let step =
            (kind == EventKind::Progress).then(|| data.progress.as_ref().map_or(0, |p| p.step));
        Self {
            specversion: "1.0".into(),
            id: event_id(&data.job_id, kind, step),
            source: source.to_string(),
            kind: kind.cloudevent_type(),
            subject: data.job_id.clone(),
            time: rfc3339(now),
            datacontenttype: "application/json".into(),
            dataschema: Some(DATA_SCHEMA.into()),
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

    const SOURCE: &str = "/t2i-worker/t2i";

    fn data(job: &str, worker: &str) -> EventData {
        EventData {
            job_id: job.into(),
            status: "succeeded".into(),
            attempt: 1,
            worker: worker.into(),
            model: "segmind/SSD-1B".into(),
            params: None,
            images: vec![],
            timings_ms: None,
            error: None,
            progress: None,
            prompt_truncated: false,
            batch: None,
            metadata: None,
            safety_checker: None,
        }
    }

    #[test]
    fn event_ids_are_deterministic_per_job_and_kind() {
        let now = OffsetDateTime::now_utc();
        let a = CloudEvent::new(EventKind::Succeeded, SOURCE, data("job-1", "w1"), now);
        let b = CloudEvent::new(
            EventKind::Succeeded,
            SOURCE,
            data("job-1", "w2"),
            now + time::Duration::hours(1),
        );
        assert_eq!(
            (&a.source, &a.id),
            (&b.source, &b.id),
            "a redelivery on another worker is the same CloudEvent (source + id)"
        );
        assert_eq!(b.data.worker, "w2", "the worker is in the data");
        let c = CloudEvent::new(EventKind::Failed, SOURCE, data("job-1", "w1"), now);
        assert_ne!(a.id, c.id);
        assert_ne!(
            a.id,
            CloudEvent::new(EventKind::Succeeded, SOURCE, data("job-2", "w1"), now).id
        );
    }

    #[test]
    fn envelopes_follow_cloudevents_1_0() {
        let e = CloudEvent::new(
            EventKind::Succeeded,
            SOURCE,
            data("job-1", "w1"),
            OffsetDateTime::UNIX_EPOCH,
        );
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "t2i.job.succeeded");
        assert_eq!(v["subject"], "job-1");
        assert_eq!(v["time"], "1970-01-01T00:00:00Z");
        assert_eq!(v["source"], SOURCE);
        assert_eq!(v["dataschema"], DATA_SCHEMA);
        assert_eq!(v["datacontenttype"], "application/json");
    }

    #[test]
    fn event_ids_are_unchanged() {
        // The dedup key of every consumer: these values (UUIDv5 of "job/type[/step]" in
        // EVENT_NAMESPACE, computed outside this code) must never change.
        assert_eq!(
            event_id("job-1", EventKind::Succeeded, None),
            "0e030135-a5ef-5a7f-a88a-2eceaf6d6415"
        );
        assert_eq!(
            event_id("fox-0001", EventKind::Progress, Some(3)),
            "6e3459f8-9b96-5057-b04b-47bd5241f65e"
        );
    }

    #[test]
    fn events_without_dataschema_still_parse() {
        let mut v: serde_json::Value = serde_json::from_slice(
            &CloudEvent::new(
                EventKind::Started,
                SOURCE,
                data("j", "w1"),
                OffsetDateTime::now_utc(),
            )
            .to_json(),
        )
        .unwrap();
        v.as_object_mut().unwrap().remove("dataschema");
        let e: CloudEvent = serde_json::from_value(v).unwrap();
        assert_eq!(e.dataschema, None);
    }

    #[test]
    fn the_default_source_is_one_uri_reference_per_prefix() {
        assert_eq!(default_source("t2i"), "/t2i-worker/t2i");
        assert_eq!(default_source("a b/c"), "/t2i-worker/a%20b%2Fc");
        assert_eq!(default_source("préfixe"), "/t2i-worker/pr%C3%A9fixe");
        for p in ["t2i", "a b/c", "préfixe", "%"] {
            assert_eq!(check_source(&default_source(p)), Ok(()), "{p}");
        }
        for ok in [
            "https://images.example.com/t2i",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
            "/sensors/tn-1234567/alerts",
        ] {
            assert_eq!(check_source(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a b", "t2i/%zz", "t2i/%4", "é", "a\nb"] {
            assert!(check_source(bad).is_err(), "{bad:?}");
        }
    }
}
