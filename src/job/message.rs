//! The job message of the contract (docs/architecture.md §2 "Job message"): `JobRequest` as it arrives on the queue, `Job` once
//! [`Job::parse`] has checked it. [`parse_job_body`] is the one entry point for raw message bodies: size
//! limit, JSON, unknown fields and every bound, each failure a [`Rejection`] naming the field.
//!
//! Pure: no broker, no storage. The JSON Schema in `schemas/job.schema.json` is generated from
//! `JobRequest` (`t2i schemas`), so the published contract and this code cannot drift.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::ImageFormat;
use super::{Generation, GenerationRequest, Limits, ModelDefaults, Rejection};
use crate::events::EventKind;

/// Largest job body a producer writes: an HTTP request body, a JSONL line.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest message body a worker accepts: a producer's [`MAX_BODY_BYTES`] plus room for what the
/// gateway adds on the way (an assigned `job_id` member, at most 140 bytes for a 128-character id;
/// `text` renamed `prompt`), so that a body the gateway took is never refused for its size later.
pub const MAX_MESSAGE_BYTES: usize = MAX_BODY_BYTES + 256;
/// Largest `metadata` object, serialised.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// S3 presigned URLs live at most 7 days (SigV4 limit).
pub const MAX_PRESIGN_TTL_S: u64 = 7 * 24 * 3600;

/// A prompt job as published on `t2i.jobs`. Only `job_id` and `prompt` are required; unknown fields
/// are rejected so that a typo cannot silently change an image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "t2i job", description = "A text-to-image job (contract v1).")]
pub struct JobRequest {
    /// Idempotency key: 1 to 128 characters of `[A-Za-z0-9._:-]`, not `.`, `..` or `_index`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9._:-]+$"),
        extend("not" = {"enum": [".", "..", "_index"]})
    )]
    pub job_id: String,
    /// At most 4000 characters; CLIP sees the first 77 tokens (truncation is reported).
    #[schemars(length(max = 4000))]
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4000))]
    pub negative_prompt: Option<String>,
    /// Pixels, a multiple of 8 within the worker's bounds [default: the model's, 1024 for SSD-1B].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8), extend("multipleOf" = 8))]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8), extend("multipleOf" = 8))]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 150))]
    pub steps: Option<u32>,
    /// Classifier-free guidance; ≤ 1 disables it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub guidance_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "pndm"]))]
    pub scheduler: Option<String>,
    /// Seed of image 0; image i uses seed + i. Drawn and reported when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub num_images: Option<u32>,
    /// The model the job expects; a worker serving another model rejects it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchRef>,
    /// RFC 3339 time after which the job is not started (a `job.expired` event instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub deadline: Option<String>,
    /// Echoed back verbatim in events; at most 8 KiB serialised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// JPEG quality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub quality: Option<u8>,
    /// Prepended to every object key (`datasets/wolves/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), regex(pattern = r"^[A-Za-z0-9._/=+-]*$"))]
    pub key_prefix: Option<String>,
    /// Lifetime of the presigned GET URLs in events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub presign_ttl_s: Option<u64>,
}

/// Where the relay (`t2i webhooks`) delivers the job's events: a receiver configured in the relay
/// by id, and/or a URL. A URL under a configured receiver's URL is signed with that receiver's
/// secrets; any other URL with its own per-URL secret (or not delivered when the relay has no
/// URL key). The job never carries a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("anyOf" = [{"required": ["url"]}, {"required": ["receiver"]}]))]
pub struct WebhookRequest {
    /// http(s); with `receiver`, a URL under that receiver's (e.g. a per-job path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), extend("format" = "uri"))]
    pub url: Option<String>,
    /// The id of a receiver configured in the relay (its URL and secrets live there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
    )]
    pub receiver: Option<String>,
    /// Event types to deliver (default: the terminal ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRef {
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9._:-]+$"),
        extend("not" = {"enum": [".", "..", "_index"]})
    )]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// A job id: 1..=128 characters of `[A-Za-z0-9._:-]`, safe in object keys and AMQP properties.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    pub fn parse(s: &str) -> Result<Self, Rejection> {
        if is_id(s) {
            Ok(Self(s.to_string()))
        } else {
            Err(Rejection::new(
                "job_id",
                format!("{:?}", truncate(s, 80)),
                "must be 1 to 128 characters of [A-Za-z0-9._:-], not ., .. or _index",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Ids name a folder of the store (`{key_prefix}{job_id}/result.json`), so `.` and `..` (which
/// would name the prefix itself or its parent) and `_index` (the store's id index,
/// `crate::storage::INDEX_PREFIX`) are refused, as the property run (`fuzz`) found.
fn is_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && !matches!(s, "." | ".." | "_index")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn truncate(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out
}

/// Where and how the images are written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputSpec {
    pub format: ImageFormat,
    pub quality: u8,
    pub key_prefix: String,
    #[serde(rename = "presign_ttl_s", with = "secs")]
    pub presign_ttl: Duration,
}

/// `output.key_prefix`: relative, no `..` segments, outside the store's reserved id index, in a
/// character set safe as both an S3 key and a path.
pub fn check_key_prefix(key_prefix: &str) -> Result<(), Rejection> {
    let ok = key_prefix.len() <= 512
        && !key_prefix.starts_with('/')
        && !key_prefix.split('/').any(|seg| seg == "..")
        // The store's id index lives there (`crate::storage::INDEX_PREFIX`).
        && !key_prefix.starts_with("_index/")
        && key_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/=+-".contains(&b));
    if ok {
        return Ok(());
    }
    Err(Rejection::new(
        "output.key_prefix",
        format!("{:?}", truncate(key_prefix, 80)),
        "at most 512 characters of [A-Za-z0-9._/=+-], not starting with '/' or '_index/', no '..' segments",
    ))
}

mod secs {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

/// A job the worker can run as is. Only [`Job::parse`] makes one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub job_id: JobId,
    #[serde(flatten)]
    pub generation: Generation,
    pub model: Option<String>,
    pub output: OutputSpec,
    pub webhook: Option<WebhookRequest>,
    pub batch: Option<BatchRef>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub deadline: Option<OffsetDateTime>,
    pub metadata: Option<serde_json::Value>,
}

impl Job {
    /// Checks every field of `req`; `model` is the model this worker serves (a job naming another one
    /// is rejected rather than rendered with the wrong weights).
    pub fn parse(
        req: JobRequest,
        limits: &Limits,
        defaults: &ModelDefaults,
        model: &str,
    ) -> Result<Self, Rejection> {
        let job_id = JobId::parse(&req.job_id)?;
        if let Some(m) = &req.model
            && !model_matches(m, model)
        {
            return Err(Rejection::new(
                "model",
                format!("{m:?}"),
                format!("this worker serves {model:?}"),
            ));
        }
        let generation = Generation::parse(
            GenerationRequest {
                prompt: req.prompt,
                negative_prompt: req.negative_prompt,
                width: req.width,
                height: req.height,
                steps: req.steps,
                guidance_scale: req.guidance_scale,
                scheduler: req.scheduler,
                seed: req.seed,
                num_images: req.num_images,
            },
            limits,
            defaults,
        )?;
        let out = req.output.unwrap_or_default();
        let quality = out.quality.unwrap_or(90);
        if !(1..=100).contains(&quality) {
            return Err(Rejection::new(
                "output.quality",
                quality,
                "must be in 1..=100",
            ));
        }
        let key_prefix = out.key_prefix.unwrap_or_default();
        check_key_prefix(&key_prefix)?;
        let ttl = out.presign_ttl_s.unwrap_or(3600);
        if ttl == 0 || ttl > MAX_PRESIGN_TTL_S {
            return Err(Rejection::new(
                "output.presign_ttl_s",
                ttl,
                format!("must be in 1..={MAX_PRESIGN_TTL_S}"),
            ));
        }
        if let Some(w) = &req.webhook {
            if let Some(url) = &w.url {
                let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
                if !scheme_ok || url.len() > 2048 {
                    return Err(Rejection::new(
                        "webhook.url",
                        format!("{:?}", truncate(url, 80)),
                        "must be an http(s) URL of at most 2048 characters",
                    ));
                }
            }
            match &w.receiver {
                Some(r) if !crate::webhooks::receivers::is_receiver_id(r) => {
                    return Err(Rejection::new(
                        "webhook.receiver",
                        format!("{:?}", truncate(r, 80)),
                        "must be 1 to 64 characters of [A-Za-z0-9._-], not starting with '.'",
                    ));
                }
                None if w.url.is_none() => {
                    return Err(Rejection::new("webhook", "{}", "needs a url or a receiver"));
                }
                _ => {}
            }
            if let Some(bad) = w
                .events
                .iter()
                .flatten()
                .find(|e| EventKind::parse(e).is_none_or(|k| k.routing_key() != e.as_str()))
            {
                let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.routing_key()).collect();
                return Err(Rejection::new(
                    "webhook.events",
                    format!("{bad:?}"),
                    format!("must be among {}", names.join(", ")),
                ));
            }
        }
        if let Some(b) = &req.batch
            && !is_id(&b.id)
        {
            return Err(Rejection::new(
                "batch.id",
                format!("{:?}", truncate(&b.id, 80)),
                "must be 1 to 128 characters of [A-Za-z0-9._:-], not ., .. or _index",
            ));
        }
        let deadline = match &req.deadline {
            None => None,
            Some(d) => Some(
                OffsetDateTime::parse(d, &time::format_description::well_known::Rfc3339).map_err(
                    |_| {
                        Rejection::new(
                            "deadline",
                            format!("{d:?}"),
                            "must be an RFC 3339 date-time",
                        )
                    },
                )?,
            ),
        };
        if let Some(m) = &req.metadata {
            let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > MAX_METADATA_BYTES {
                return Err(Rejection::new(
                    "metadata",
                    format!("{size} bytes"),
                    format!("at most {MAX_METADATA_BYTES} bytes serialised"),
                ));
            }
        }
        Ok(Self {
            job_id,
            generation,
            model: req.model,
            output: OutputSpec {
                format: out.format.unwrap_or(ImageFormat::Png),
                quality,
                key_prefix,
                presign_ttl: Duration::from_secs(ttl),
            },
            webhook: req.webhook,
            batch: req.batch,
            deadline,
            metadata: req.metadata,
        })
    }

    /// Whether the job's deadline has passed at `now`.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.deadline.is_some_and(|d| now > d)
    }

    /// The job as a message again, every default resolved (size, steps, scheduler, seed, output),
    /// so that publishing it renders the same images. [`Job::parse`] of it gives this job back,
    /// except that the seed now counts as given.
    pub fn to_request(&self) -> JobRequest {
        let g = &self.generation;
        JobRequest {
            job_id: self.job_id.to_string(),
            prompt: g.prompt.clone(),
            negative_prompt: g.negative_prompt.clone(),
            width: Some(g.width),
            height: Some(g.height),
            steps: Some(g.steps),
            guidance_scale: Some(g.guidance_scale),
            scheduler: Some(g.scheduler.as_str().to_string()),
            seed: Some(g.seed),
            num_images: Some(g.num_images),
            model: self.model.clone(),
            output: Some(OutputRequest {
                format: Some(self.output.format),
                quality: Some(self.output.quality),
                key_prefix: Some(self.output.key_prefix.clone()),
                presign_ttl_s: Some(self.output.presign_ttl.as_secs()),
            }),
            webhook: self.webhook.clone(),
            batch: self.batch.clone(),
            // Parsed from RFC 3339, so it formats as RFC 3339 again.
            deadline: self.deadline.and_then(|d| {
                d.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            }),
            metadata: self.metadata.clone(),
        }
    }
}

/// `segmind/SSD-1B` matches `segmind/SSD-1B`, `SSD-1B` and a local folder named `SSD-1B`.
fn model_matches(asked: &str, served: &str) -> bool {
    let last = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(s)
            .to_ascii_lowercase()
    };
    asked.eq_ignore_ascii_case(served) || last(asked) == last(served)
}

/// A body that could not become a `Job`, with whatever id it carried (for the failure event).
#[derive(Debug, Clone)]
pub struct BadBody {
    /// The body's `job_id` when it had a usable one.
    pub job_id: Option<JobId>,
    pub rejection: Rejection,
}

/// Raw message body → `Job`: size, JSON syntax, types (the failing field's path is reported),
/// unknown fields, then [`Job::parse`].
pub fn parse_job_body(
    body: &[u8],
    limits: &Limits,
    defaults: &ModelDefaults,
    model: &str,
) -> Result<Job, BadBody> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(BadBody {
            job_id: None,
            rejection: Rejection::new(
                "body",
                format!("{} bytes", body.len()),
                format!("messages are at most {MAX_MESSAGE_BYTES} bytes"),
            ),
        });
    }
    // Best effort: recover the id of a body that is JSON but not a valid job.
    let job_id = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("job_id")?.as_str().and_then(|s| JobId::parse(s).ok()));
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: JobRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde reports a missing field at the parent's path; name the field itself.
        let missing = msg
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|f| {
                if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            });
        // `?` is a position serde cannot name: a syntax error before the first member is the
        // body's, one inside a member is that member's. `[0]` is an array where the body's
        // object should be.
        let named = path.strip_suffix(".?").unwrap_or(&path);
        let field = match missing {
            Some(f) => f,
            None if matches!(named, "." | "" | "?") || named.starts_with('[') => "body".to_string(),
            None => named.to_string(),
        };
        BadBody {
            job_id: job_id.clone(),
            rejection: Rejection::new(field, "(see reason)", inner.to_string()),
        }
    })?;
    Job::parse(req, limits, defaults, model).map_err(|rejection| BadBody { job_id, rejection })
}

#[cfg(test)]
#[path = "message_fuzz.rs"]
pub(crate) mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Job, BadBody> {
        parse_job_body(
            body.as_bytes(),
            &Limits::default(),
            &ModelDefaults::default(),
            "segmind/SSD-1B",
        )
    }

    #[test]
    fn the_design_example_parses() {
        let body = r#"{
          "job_id": "0190f6c2-7d3e-7a41-9c55-3b1f0e2a9d10",
          "prompt": "a wolf, half ice and half fire, dark fantasy, cinematic",
          "negative_prompt": "blurry, low quality",
          "width": 1024, "height": 1024,
          "steps": 25, "guidance_scale": 7.0, "scheduler": "euler",
          "seed": 42, "num_images": 1,
          "model": "segmind/SSD-1B",
          "output": {"format": "png", "quality": 90, "key_prefix": "datasets/wolves/", "presign_ttl_s": 3600},
          "webhook": {"url": "https://example.com/hooks/t2i", "events": ["job.succeeded", "job.failed"]},
          "batch": {"id": "wolves-2026-11", "index": 17, "total": 1000},
          "deadline": "2026-11-26T12:00:00Z",
          "metadata": {"anything": "echoed back verbatim"}
        }"#;
        let job = parse(body).unwrap();
        assert_eq!(job.output.key_prefix, "datasets/wolves/");
        assert_eq!(job.generation.seed, 42);
        assert!(job.deadline.is_some());
    }

    #[test]
    fn only_job_id_and_prompt_are_required() {
        let job = parse(r#"{"job_id": "a", "prompt": "x"}"#).unwrap();
        assert_eq!(job.output.format, ImageFormat::Png);
        assert!(job.generation.seed_was_random);
    }

    #[test]
    fn a_wrongly_typed_field_is_named_by_its_path() {
        let e =
            parse(r#"{"job_id": "a", "prompt": "x", "output": {"quality": "high"}}"#).unwrap_err();
        assert_eq!(e.rejection.field, "output.quality");
        assert_eq!(e.job_id.unwrap().as_str(), "a");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = parse(r#"{"job_id": "a", "prompt": "x", "stpes": 3}"#).unwrap_err();
        assert!(e.rejection.reason.contains("stpes"), "{:?}", e.rejection);
    }

    #[test]
    fn malformed_bodies_and_bad_ids_are_rejected() {
        assert_eq!(parse("not json").unwrap_err().rejection.field, "body");
        // Found by the property run (`fuzz`): these named the field `?`.
        assert_eq!(parse("[").unwrap_err().rejection.field, "body");
        assert_eq!(parse("{1").unwrap_err().rejection.field, "body");
        assert_eq!(parse("[x").unwrap_err().rejection.field, "body");
        assert!(parse("not json").unwrap_err().job_id.is_none());
        assert_eq!(
            parse(r#"{"prompt": "x"}"#).unwrap_err().rejection.field,
            "job_id"
        );
        assert_eq!(
            parse(r#"{"job_id": "a b", "prompt": "x"}"#)
                .unwrap_err()
                .rejection
                .field,
            "job_id"
        );
        let big = format!(r#"{{"job_id": "a", "prompt": "{}"}}"#, "x".repeat(70_000));
        assert_eq!(parse(&big).unwrap_err().rejection.field, "body");
    }

    #[test]
    fn a_webhook_names_a_receiver_a_url_or_both_never_neither() {
        for ok in [
            r#"{"receiver": "acme"}"#,
            r#"{"receiver": "acme", "url": "https://hooks.acme.example/t2i/7"}"#,
            r#"{"url": "https://hooks.example/t2i"}"#,
        ] {
            let body = format!(r#"{{"job_id": "a", "prompt": "x", "webhook": {ok}}}"#);
            assert!(parse(&body).is_ok(), "{ok}");
        }
        for (bad, field) in [
            (r#"{}"#, "webhook"),
            (r#"{"events": ["job.failed"]}"#, "webhook"),
            (r#"{"receiver": "../etc"}"#, "webhook.receiver"),
            (r#"{"receiver": ""}"#, "webhook.receiver"),
            (
                r#"{"receiver": "a", "secret": "whsec_x"}"#,
                "webhook.secret",
            ),
        ] {
            let body = format!(r#"{{"job_id": "a", "prompt": "x", "webhook": {bad}}}"#);
            let e = parse(&body).unwrap_err().rejection;
            assert!(
                e.field == field || e.reason.contains("secret"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn ids_that_would_name_a_folder_outside_the_job_are_rejected() {
        // Found by the property run: `..` put the job's objects in the prefix's parent folder.
        for bad in [".", "..", "_index"] {
            let body = format!(r#"{{"job_id": "{bad}", "prompt": "x"}}"#);
            assert_eq!(parse(&body).unwrap_err().rejection.field, "job_id", "{bad}");
            let body = format!(r#"{{"job_id": "a", "prompt": "x", "batch": {{"id": "{bad}"}}}}"#);
            assert_eq!(
                parse(&body).unwrap_err().rejection.field,
                "batch.id",
                "{bad}"
            );
        }
        assert!(parse(r#"{"job_id": "...", "prompt": "x"}"#).is_ok());
    }

    #[test]
    fn key_prefixes_cannot_escape() {
        for bad in ["/abs/", "a/../b/", "spa ce/", "_index/", "_index/x/"] {
            let body =
                format!(r#"{{"job_id": "a", "prompt": "x", "output": {{"key_prefix": "{bad}"}}}}"#);
            assert_eq!(
                parse(&body).unwrap_err().rejection.field,
                "output.key_prefix",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_job_for_another_model_is_rejected() {
        let e =
            parse(r#"{"job_id": "a", "prompt": "x", "model": "stabilityai/sdxl"}"#).unwrap_err();
        assert_eq!(e.rejection.field, "model");
        assert!(parse(r#"{"job_id": "a", "prompt": "x", "model": "SSD-1B"}"#).is_ok());
    }

    #[test]
    fn deadlines_are_rfc3339_and_checked() {
        let job =
            parse(r#"{"job_id": "a", "prompt": "x", "deadline": "2000-01-01T00:00:00Z"}"#).unwrap();
        assert!(job.is_expired(OffsetDateTime::now_utc()));
        let e = parse(r#"{"job_id": "a", "prompt": "x", "deadline": "tomorrow"}"#).unwrap_err();
        assert_eq!(e.rejection.field, "deadline");
    }

    #[test]
    fn oversized_metadata_is_rejected() {
        let body = format!(
            r#"{{"job_id": "a", "prompt": "x", "metadata": {{"k": "{}"}}}}"#,
            "v".repeat(9000)
        );
        assert_eq!(parse(&body).unwrap_err().rejection.field, "metadata");
    }
}
