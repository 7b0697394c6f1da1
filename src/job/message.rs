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
use super::ModelSlug;
use super::{Generation, GenerationRequest, Limits, ModelDefaults, Rejection, default_weighting};
use crate::events::EventKind;

/// Largest job body a producer writes: an HTTP request body, a JSONL line.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest message body a worker accepts: a producer's [`MAX_BODY_BYTES`] plus room for what the
/// gateway adds on the way (an assigned `job_id` member, at most 140 bytes for a 128-character id;
/// `text` renamed `prompt`), so that a body the gateway took is never refused for its size later.
pub const MAX_MESSAGE_BYTES: usize = MAX_BODY_BYTES + 256;
/// Largest `metadata` object, serialised.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// Longest `model`: room for a folder path whose last segment is the slug (at most
/// [`super::model::MAX_SLUG_LEN`] characters); a hub repo id has at most 96.
pub const MAX_MODEL_BYTES: usize = 512;
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
    /// At most 4000 characters. Longer than CLIP's 77 tokens it is encoded in 75-token chunks
    /// (`long_prompt`), at most 10 of them; whatever is cut is reported (`prompt_truncated`).
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
    /// Prompts over CLIP's 77 tokens: `chunk` encodes every 75 tokens as a chunk of their own and
    /// concatenates them (the negative prompt padded to as many chunks), `truncate` cuts at 77 tokens
    /// as diffusers does [default: chunk].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["chunk", "truncate"]))]
    pub long_prompt: Option<String>,
    /// LoRA adapters merged into the model for this job (UNet and text encoders), at most 8, each
    /// listed once; diffusers/PEFT and kohya safetensors files. Jobs are batched together only
    /// with the same adapters and scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub loras: Option<Vec<super::LoraRequest>>,
    /// `a1111` reads the A1111 weighting syntax in both prompts: `(words)` ×1.1, `[words]` ÷1.1,
    /// `(words:1.3)`, nesting multiplies (every weight within 0..=10), `\(` `\)` `\[` `\]` `\\` are
    /// the characters, `BREAK` starts a new 75-token chunk. `none` encodes the text literally
    /// [default: a1111, or none with `long_prompt: truncate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["a1111", "none"]))]
    pub prompt_weighting: Option<String>,
    /// The model the job is for: a hub repo id (`segmind/SSD-1B`), its short name (`SSD-1B`) or a
    /// model folder's name. It routes the job to the pool serving that model (`{lane}.{slug}`, the
    /// slug being the last segment, lowercased); with no pool serving it, the job fails at once with
    /// `model_not_served`. Without it, the default pool renders the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
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

/// `output.key_prefix`: relative, no `.` or `..` segments, outside the store's reserved id index, in
/// a character set safe as both an S3 key and a path. A `.` segment is refused too: a filesystem
/// store resolves `./_index/` to the reserved index, and `a/./b/` names another job's folder there
/// than in S3.
pub fn check_key_prefix(key_prefix: &str) -> Result<(), Rejection> {
    let ok = key_prefix.len() <= 512
        && !key_prefix.starts_with('/')
        && !key_prefix.split('/').any(|seg| seg == "." || seg == "..")
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
        "at most 512 characters of [A-Za-z0-9._/=+-], not starting with '/' or '_index/', no '.' or '..' segments",
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
    /// Checks every field of `req`. Whether its `model` is served is not a property of the job but
    /// of the fleet: the broker decides that when it routes the job ([`super::ModelSlug`]), and a
    /// worker checks it again before rendering.
    pub fn parse(
        req: JobRequest,
        limits: &Limits,
        defaults: &ModelDefaults,
    ) -> Result<Self, Rejection> {
        let job_id = JobId::parse(&req.job_id)?;
        if let Some(m) = &req.model {
            if m.len() > MAX_MODEL_BYTES {
                return Err(Rejection::new(
                    "model",
                    format!("{} bytes", m.len()),
                    format!("at most {MAX_MODEL_BYTES} bytes"),
                ));
            }
            ModelSlug::of(m)?;
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
                long_prompt: req.long_prompt,
                loras: req.loras,
                prompt_weighting: req.prompt_weighting,
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
            long_prompt: Some(g.long_prompt.as_str().to_string()),
            loras: (!g.loras.is_empty())
                .then(|| g.loras.iter().map(super::Lora::to_request).collect()),
            // Written only where it is not the default, so that a worker from before the field
            // still takes the job (it refuses unknown fields).
            prompt_weighting: (g.prompt_weighting != default_weighting(g.long_prompt))
                .then(|| g.prompt_weighting.as_str().to_string()),
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
    Job::parse(req, limits, defaults).map_err(|rejection| BadBody { job_id, rejection })
}

#[cfg(test)]
#[path = "message_fuzz.rs"]
pub(crate) mod fuzz;

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
