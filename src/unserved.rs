//! A job for a model that no worker pool serves, at its producer (docs/architecture.md §2
//! "Topology"). Jobs naming a model are published, mandatory, with the routing key of that model's
//! pool ([`crate::queue::Route`]); only the workers serving the model declare its queues, so a
//! publish the broker returns as unroutable is a job no pool would ever take. Rather than let it
//! vanish, or wait for retries that cannot help, its producer (`t2i enqueue`, `t2i gateway`) ends it
//! the way a worker ends any job: `failure.json` in the store, then `job.failed` with error code
//! `model_not_served` naming the model, on the events exchange (and to its `reply_to`).

use crate::events::{CloudEvent, ErrorCode, ErrorInfo, EventData, EventKind};
use crate::job::Job;
use crate::queue::{Delivered, Publisher, QueueError, ReplyTo, Route};
use crate::records::{self, JobState, Record};
use crate::storage::ImageStore;

/// Why the job failed, for its event and for the producer's own report.
pub fn message(model: &str, route: &Route) -> String {
    format!(
        "no worker pool serves model {model:?}: no queue is bound for its routing key `{}`",
        route.routing_key()
    )
}

/// The `data` of the job's `job.failed`: the model is the one asked for, the worker the producer.
pub fn event_data(job: &Job, route: &Route, producer: &str) -> EventData {
    let model = job.model.clone().unwrap_or_default();
    let mut data = EventData::for_job(job, EventKind::Failed.status(), 1, producer, &model);
    data.error = Some(ErrorInfo {
        code: ErrorCode::ModelNotServed,
        message: message(&model, route),
        field: Some("model".into()),
        retryable: false,
    });
    data
}

/// Records and announces that `job` (published on `route`, returned unroutable) failed with
/// `model_not_served`. The record is best effort, as a worker's is: the event is the authority.
pub async fn fail<S: ImageStore>(
    publisher: &Publisher,
    store: &S,
    source: &str,
    producer: &str,
    job: &Job,
    route: &Route,
    reply: Option<&ReplyTo>,
) -> Result<EventData, QueueError> {
    let data = event_data(job, route, producer);
    let (prefix, id) = (&job.output.key_prefix, &job.job_id);
    let record = Record::new(JobState::Failed, data.clone());
    if let Err(e) = records::write_with_index(store, prefix, id, &record).await {
        tracing::warn!(job = %id, error = %e, "recording a job no pool serves");
    }
    let event = CloudEvent::new(
        EventKind::Failed,
        source,
        data.clone(),
        time::OffsetDateTime::now_utc(),
    );
    // Nobody bound to the events exchange is not an error (as for the workers' events).
    let _: Delivered = publisher.event(&event, EventKind::Failed).await?;
    if let Some(r) = reply {
        publisher
            .reply(&r.queue, r.correlation_id.as_deref(), &event)
            .await?;
    }
    tracing::info!(job = %id, model = %data.model, "failed: no pool serves its model");
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Limits, ModelDefaults, parse_job_body};
    use crate::queue::Lane;

    #[test]
    fn the_failure_names_the_model_its_key_and_the_producer() {
        let body = br#"{"job_id": "j-1", "prompt": "x", "model": "acme/Nope-XL"}"#;
        let job = parse_job_body(body, &Limits::default(), &ModelDefaults::default()).unwrap();
        let route = Route::of(Lane::Bulk, job.model.as_deref()).unwrap();
        let d = event_data(&job, &route, "t2i enqueue");
        let e = d.error.unwrap();
        assert_eq!(e.code, ErrorCode::ModelNotServed);
        assert_eq!(e.field.as_deref(), Some("model"));
        assert!(e.message.contains("\"acme/Nope-XL\""), "{}", e.message);
        assert!(e.message.contains("`bulk.nope-xl`"), "{}", e.message);
        assert_eq!(
            (d.model.as_str(), d.worker.as_str()),
            ("acme/Nope-XL", "t2i enqueue")
        );
        assert_eq!((d.status.as_str(), d.job_id.as_str()), ("failed", "j-1"));
    }
}
