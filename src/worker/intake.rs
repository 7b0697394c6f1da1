//! The start of a job's path: what can be decided about a delivery before it waits for the device.
//!
//! [`intake`] parses the body with the contract's own `parse_job_body`, then looks for an earlier
//! result, the deadline and the cancellations, and returns one [`Intake`] value: invalid, settled
//! now (with the [`Action`] for the completion handler), or waiting for a batch. It publishes
//! nothing and settles nothing; the session acts on the value. [`Cancellations`] is the worker's
//! memory of the control messages, also consulted while a batch renders. [`fetch_adapters`] brings a
//! job's LoRA files to local disk before it joins a batch, so the device never waits for a download.

use std::collections::HashSet;

use time::OffsetDateTime;

use super::complete::Action;
use super::models::{Served, model_of};
use crate::adapters::{Fetched, Fetcher};
use crate::control::ControlMessage;
use crate::events::{ErrorCode, EventData, EventKind};
use crate::job::{BadBody, Job, Limits, Lora, ModelSlug, Rejection, parse_job_body};
use crate::storage::{ImageStore, ObjectKey};

/// Jobs and batches canceled through the control exchange (kept for the life of the process).
#[derive(Default)]
pub struct Cancellations {
    jobs: HashSet<String>,
    batches: HashSet<String>,
}

impl Cancellations {
    pub fn covers(&self, job: &Job) -> bool {
        self.jobs.contains(job.job_id.as_str())
            || job
                .batch
                .as_ref()
                .is_some_and(|b| self.batches.contains(&b.id))
    }

    /// Remembers a control message's cancellations; a malformed one is logged and ignored.
    pub fn apply(&mut self, body: &[u8]) {
        match ControlMessage::parse(body) {
            Ok(c) => {
                self.jobs.extend(c.cancel_jobs);
                self.batches.extend(c.cancel_batches);
            }
            Err(e) => tracing::warn!(error = %e, "ignoring malformed control message"),
        }
    }
}

/// What a delivery's intake decided.
pub enum Intake {
    /// Not a valid job: rejected with the field, value and bound.
    Invalid(BadBody),
    /// Nothing to render: the action settles it now.
    Settled(Box<Job>, Action),
    /// Waits for a device batch, to be rendered with served model `.1`.
    Render(Box<Job>, usize),
}

/// What the contract needs to parse a job as this worker would render it.
pub struct Contract<'a> {
    pub limits: &'a Limits,
    /// The models this worker serves, the default pool's first: a job is parsed with its model's
    /// defaults, and a job naming another model was misrouted here (published on the default
    /// pool's keys, or into a queue its pool does not own) and fails with `model_not_served`.
    pub served: &'a [Served],
}

/// The `model` member of a job body, when it is a JSON object with a string there (anything else
/// is for `parse_job_body` to refuse).
fn named_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        #[serde(default)]
        model: Option<serde_json::Value>,
    }
    let named: Named = serde_json::from_slice(body).ok()?;
    named.model?.as_str().map(str::to_string)
}

/// Decides what becomes of a delivery before it waits for the device, in this order: invalid →
/// rejected; for another model → failed (`model_not_served`); already done (`result.json`
/// stored) → re-announced; the store unreachable → retried later; deadline passed → expired;
/// canceled → canceled; otherwise it waits for a batch of its model.
pub async fn intake<S: ImageStore>(
    body: &[u8],
    contract: &Contract<'_>,
    store: &S,
    cancelled: impl FnOnce(&Job) -> bool,
    now: OffsetDateTime,
) -> Intake {
    // The job is parsed with its own model's defaults (its native size, sampler, guidance), so
    // the model it names is read first.
    let model = model_of(contract.served, named_model(body).as_deref());
    let defaults = &contract.served[model.unwrap_or(0)].defaults;
    let job = match parse_job_body(body, contract.limits, defaults) {
        Ok(j) => Box::new(j),
        Err(bad) => return Intake::Invalid(bad),
    };
    let Some(model) = model else {
        let asked = job.model.as_deref().unwrap_or_default();
        let served: Vec<&str> = contract.served.iter().map(|s| s.spec.as_str()).collect();
        let served = served.join(", ");
        let message = match ModelSlug::of(asked) {
            Ok(slug) => format!(
                "model {asked:?} is not served by this worker (it serves {served}); jobs for it \
                 are published with the routing key `<lane>.{slug}`, which only its pool binds"
            ),
            Err(_) => format!("model {asked:?} is not served by this worker ({served})"),
        };
        return Intake::Settled(job, Action::Fail(ErrorCode::ModelNotServed, message));
    };
    let result_key = ObjectKey::result(&job.output.key_prefix, &job.job_id);
    match store.get(&result_key).await {
        Ok(Some(bytes)) => {
            // An unreadable result.json is rendered over rather than trusted.
            if let Ok(stored) = serde_json::from_slice::<EventData>(&bytes) {
                return Intake::Settled(job, Action::Reannounce(Box::new(stored)));
            }
        }
        Ok(None) => {}
        Err(e) => {
            let why = format!("checking for an earlier result: {e}");
            return Intake::Settled(job, Action::RetryOrFail(why));
        }
    }
    if job.is_expired(now) {
        return Intake::Settled(job, Action::End(EventKind::Expired));
    }
    if cancelled(&job) {
        return Intake::Settled(job, Action::End(EventKind::Canceled));
    }
    Intake::Render(job, model)
}

/// Fetches `job`'s LoRA adapters and records their hashes in it (events report them; the batch key
/// compares them). A source that is refused, missing, not safetensors or too big fails the job
/// (`invalid_input`, naming `loras[i].uri`); a network or store failure retries it later.
pub async fn fetch_adapters(fetcher: &Fetcher, job: &mut Job) -> Result<Vec<Fetched>, Action> {
    if job.generation.loras.is_empty() {
        return Ok(Vec::new());
    }
    let fetched = fetcher.fetch_all(&mut job.generation.loras).await;
    fetched.map_err(|(i, e)| {
        let uri = &job.generation.loras[i].uri;
        if e.is_retryable() {
            Action::RetryOrFail(format!("fetching LoRA {uri}: {e}"))
        } else {
            Action::Invalid(Rejection::new(
                Lora::field(i, "uri"),
                format!("{uri:?}"),
                e.to_string(),
            ))
        }
    })
}
