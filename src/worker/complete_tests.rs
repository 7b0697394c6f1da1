//! Every outcome of the completion handler and of intake, against in-memory fakes: what is stored,
//! what is announced (and to whom), and how the delivery is to be settled.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use image::RgbImage;
use time::OffsetDateTime;

use super::*;
use crate::job::{Limits, ModelDefaults, parse_job_body};
use crate::queue::Lane;
use crate::worker::fakes::{MemoryStore, RecordingSink};
use crate::worker::intake::{Contract, Intake, intake};
use crate::worker::models::Served;

const MODEL: &str = "segmind/SSD-1B";

fn served() -> Served {
    Served {
        spec: MODEL.into(),
        slug: crate::job::ModelSlug::of(MODEL).unwrap(),
        defaults: ModelDefaults::default(),
        safety_checker: None,
    }
}

fn completion(max_attempts: u32) -> Completion<MemoryStore, RecordingSink> {
    on_worker("w1", max_attempts)
}

fn on_worker(worker: &str, max_attempts: u32) -> Completion<MemoryStore, RecordingSink> {
    Completion {
        store: Arc::new(MemoryStore::default()),
        sink: RecordingSink::default(),
        worker_id: worker.into(),
        source: "/t2i-worker/t2i".into(),
        models: Arc::new(vec![served()]),
        dtype: "f32",
        max_attempts,
        metrics: Metrics::new(&prometheus::Registry::new()),
    }
}

fn job(body: &str) -> Job {
    parse_job_body(
        body.as_bytes(),
        &Limits::default(),
        &ModelDefaults::default(),
    )
    .expect("a valid job")
}

fn fox() -> Job {
    job(
        r#"{"job_id": "fox-1", "prompt": "a red fox", "width": 64, "height": 64, "steps": 1,
            "seed": 7, "num_images": 2, "output": {"key_prefix": "sets/foxes/"}}"#,
    )
}

fn meta(attempt: u32) -> JobMeta {
    JobMeta {
        route: Lane::Interactive.into(),
        attempt,
        arrived: Instant::now(),
        published: None,
        reply_to: Some(ReplyTo {
            queue: "amq.gen-reply".into(),
            correlation_id: Some("corr-1".into()),
        }),
    }
}

fn rendered(n: usize) -> Action {
    Action::Complete {
        images: (0..n).map(|_| RgbImage::new(8, 8)).collect(),
        truncated: false,
        timing: BatchTiming {
            started: Instant::now(),
            queued: Duration::from_millis(5),
            inference: Duration::from_millis(20),
        },
    }
}

fn error_code(c: &Completion<MemoryStore, RecordingSink>) -> ErrorCode {
    c.sink.last().data.error.expect("an error").code
}

#[tokio::test]
async fn a_rendered_job_stores_its_images_then_result_json_and_announces_success() {
    let c = completion(5);
    let outcome = c.act(&fox(), &meta(1), rendered(2)).await;
    assert_eq!(outcome, Outcome::Completed);
    let objects = c.store.objects.lock().unwrap().clone();
    let keys: Vec<&str> = objects.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "sets/foxes/fox-1/0.png",
            "sets/foxes/fox-1/1.png",
            "sets/foxes/fox-1/result.json"
        ]
    );
    let event = c.sink.last();
    assert_eq!(event.kind, "t2i.job.succeeded");
    let seeds: Vec<u64> = event.data.images.iter().map(|i| i.seed).collect();
    assert_eq!(seeds, [7, 8], "image i uses seed + i");
    let stored: EventData =
        serde_json::from_slice(&objects["sets/foxes/fox-1/result.json"]).unwrap();
    assert_eq!(
        stored, event.data,
        "result.json is the succeeded event's data"
    );
    let png = &objects["sets/foxes/fox-1/0.png"];
    assert_eq!(&png[1..4], b"PNG");
    let (_, reply) = c.sink.events.lock().unwrap()[0].clone();
    assert_eq!(reply.unwrap().correlation_id.as_deref(), Some("corr-1"));
}

#[tokio::test]
async fn two_workers_announcing_one_job_emit_one_cloudevent() {
    // A redelivery on another worker: same source and id (one event to CloudEvents consumers),
    // the worker named in the data.
    let (w1, w2) = (on_worker("w1", 5), on_worker("w2", 5));
    w1.act(&fox(), &meta(1), rendered(1)).await;
    w2.act(&fox(), &meta(2), rendered(1)).await;
    let (a, b) = (w1.sink.last(), w2.sink.last());
    assert_eq!((&a.source, &a.id), (&b.source, &b.id));
    assert_eq!(a.source, "/t2i-worker/t2i");
    assert_eq!(
        (a.data.worker.as_str(), b.data.worker.as_str()),
        ("w1", "w2")
    );
    assert_eq!(a.dataschema.as_deref(), Some(crate::events::DATA_SCHEMA));
}

#[tokio::test]
async fn storage_trouble_before_the_last_attempt_asks_for_a_retry_and_announces_nothing() {
    let c = completion(5);
    c.store.fail_puts.store(true, Ordering::Relaxed);
    let outcome = c.act(&fox(), &meta(1), rendered(2)).await;
    assert_eq!(outcome, Outcome::Retry);
    assert!(c.sink.kinds().is_empty());
}

#[tokio::test]
async fn storage_trouble_at_the_last_attempt_fails_the_job_for_good() {
    let c = completion(3);
    c.store.fail_puts.store(true, Ordering::Relaxed);
    let outcome = c.act(&fox(), &meta(3), rendered(2)).await;
    assert_eq!(outcome, Outcome::Rejected);
    assert_eq!(c.sink.kinds(), ["t2i.job.failed"]);
    let error = c.sink.last().data.error.unwrap();
    assert_eq!(error.code, ErrorCode::UploadFailed);
    assert!(
        error.retryable && error.message.contains("attempt 3"),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_event_that_cannot_be_announced_leaves_the_delivery_unsettled() {
    let c = completion(5);
    c.sink.fail.store(true, Ordering::Relaxed);
    let outcome = c.act(&fox(), &meta(1), rendered(2)).await;
    assert_eq!(outcome, Outcome::Abandoned);
    // The images stay: the redelivery overwrites them and re-announces.
    assert!(
        c.store
            .objects
            .lock()
            .unwrap()
            .contains_key("sets/foxes/fox-1/result.json")
    );
    for action in [
        Action::End(EventKind::Canceled),
        Action::Fail(ErrorCode::Oom, "out of memory".into()),
    ] {
        assert_eq!(c.act(&fox(), &meta(1), action).await, Outcome::Abandoned);
    }
}

#[tokio::test]
async fn expired_and_canceled_jobs_are_announced_and_acked() {
    for (kind, code, ty) in [
        (EventKind::Expired, ErrorCode::Expired, "t2i.job.expired"),
        (EventKind::Canceled, ErrorCode::Canceled, "t2i.job.canceled"),
    ] {
        let c = completion(5);
        assert_eq!(
            c.act(&fox(), &meta(1), Action::End(kind)).await,
            Outcome::Completed
        );
        assert_eq!(c.sink.kinds(), [ty]);
        assert_eq!(error_code(&c), code);
        // Recorded for readers of the store (`GET /v1/jobs/{id}`, `t2i batch`), before the event.
        let objects = c.store.objects.lock().unwrap();
        let keys: Vec<&String> = objects.keys().collect();
        assert_eq!(keys, ["_index/fox-1.json", "sets/foxes/fox-1/failure.json"]);
        let record: EventData = serde_json::from_slice(&objects[keys[1]]).unwrap();
        assert_eq!(record.status, kind.status());
        assert_eq!(record.error.unwrap().code, code);
    }
}

#[tokio::test]
async fn device_failures_are_announced_and_dead_lettered() {
    for (code, retryable) in [(ErrorCode::Oom, true), (ErrorCode::Internal, false)] {
        let c = completion(5);
        let outcome = c
            .act(&fox(), &meta(2), Action::Fail(code, "boom".into()))
            .await;
        assert_eq!(outcome, Outcome::Rejected);
        let event = c.sink.last();
        assert_eq!(event.kind, "t2i.job.failed");
        assert_eq!(event.data.attempt, 2);
        let error = event.data.error.unwrap();
        assert_eq!((error.code, error.retryable), (code, retryable));
    }
}

#[tokio::test]
async fn a_stored_result_is_reannounced_as_it_was_with_fresh_urls() {
    let c = completion(5);
    let first = completion(5);
    first.act(&fox(), &meta(1), rendered(2)).await;
    // What intake reads back: result.json, which holds keys and no URLs.
    let stored: EventData = serde_json::from_slice(
        &first.store.objects.lock().unwrap()["sets/foxes/fox-1/result.json"],
    )
    .unwrap();
    assert!(stored.images.iter().all(|i| i.url.is_none()));
    let outcome = c
        .act(
            &fox(),
            &meta(2),
            Action::Reannounce(Box::new(stored.clone())),
        )
        .await;
    assert_eq!(outcome, Outcome::Completed);
    let again = c.sink.last();
    assert_eq!(
        again.id,
        first.sink.last().id,
        "the same event id: receivers deduplicate"
    );
    let mut urls_removed = again.data.clone();
    for (img, want) in urls_removed.images.iter_mut().zip(&stored.images) {
        assert_eq!(
            img.url,
            Some(format!("memory://{}", want.key)),
            "presigned now"
        );
        assert!(img.url_expires_at.is_some());
        (img.url, img.url_expires_at) = (None, None);
    }
    assert_eq!(urls_removed, stored);
}

#[tokio::test]
async fn an_invalid_body_is_rejected_under_its_message_id_or_a_body_hash() {
    let c = completion(5);
    let r = crate::job::Rejection::new("width", 65, "must be a multiple of 8");
    let outcome = c
        .reject_body(b"{}", Some("msg-9"), None, None, r.clone())
        .await;
    assert_eq!(outcome, Outcome::Rejected);
    let event = c.sink.last();
    assert_eq!(event.subject, "msg-9");
    let error = event.data.error.unwrap();
    assert_eq!(
        (error.code, error.field.as_deref()),
        (ErrorCode::InvalidInput, Some("width"))
    );
    c.reject_body(b"not json", Some("bad id!"), None, None, r)
        .await;
    assert!(c.sink.last().subject.starts_with("body-sha256-"));
}

async fn decide(store: &MemoryStore, body: &str, canceled: bool) -> Intake {
    let served = [served()];
    let contract = Contract {
        limits: &Limits::default(),
        served: &served,
    };
    let now = OffsetDateTime::now_utc();
    intake(body.as_bytes(), &contract, store, |_| canceled, now).await
}

const FOX: &str = r#"{"job_id": "fox-1", "prompt": "a red fox", "width": 64, "height": 64}"#;

#[tokio::test]
async fn intake_decides_each_delivery_once() {
    let store = MemoryStore::default();
    assert!(matches!(
        decide(&store, FOX, false).await,
        Intake::Render(_, 0)
    ));
    assert!(matches!(
        decide(&store, FOX, true).await,
        Intake::Settled(_, Action::End(EventKind::Canceled))
    ));
    let late = r#"{"job_id": "fox-2", "prompt": "x", "deadline": "2020-01-01T00:00:00Z"}"#;
    assert!(matches!(
        decide(&store, late, false).await,
        Intake::Settled(_, Action::End(EventKind::Expired))
    ));
    match decide(
        &store,
        r#"{"job_id": "fox-3", "prompt": "x", "width": 65}"#,
        false,
    )
    .await
    {
        Intake::Invalid(bad) => assert_eq!(bad.rejection.field, "width"),
        _ => panic!("a width of 65 is invalid"),
    }
}

#[tokio::test]
async fn a_job_for_another_model_fails_as_not_served_naming_it_without_retry() {
    let store = MemoryStore::default();
    let vega = r#"{"job_id": "v-1", "prompt": "x", "model": "segmind/Segmind-Vega"}"#;
    let Intake::Settled(job, action) = decide(&store, vega, false).await else {
        panic!("a job for another model is settled at intake");
    };
    assert!(matches!(action, Action::Fail(ErrorCode::ModelNotServed, _)));
    let c = completion(5);
    assert_eq!(c.act(&job, &meta(1), action).await, Outcome::Rejected);
    let e = c.sink.last();
    assert_eq!(e.kind, "t2i.job.failed");
    let error = e.data.error.expect("an error");
    assert_eq!(error.code, ErrorCode::ModelNotServed);
    assert!(
        error.message.contains("segmind/Segmind-Vega"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("`<lane>.segmind-vega`"),
        "{}",
        error.message
    );
    assert!(!error.retryable);
    // Its own model, by repo id, short name or folder name, is served.
    for same in ["segmind/SSD-1B", "SSD-1B", "/models/ssd-1b"] {
        let body = format!(r#"{{"job_id": "s-1", "prompt": "x", "model": "{same}"}}"#);
        assert!(
            matches!(decide(&store, &body, false).await, Intake::Render(_, 0)),
            "{same}"
        );
    }
}

/// A worker serving two models parses each job with its own model's defaults, and announces it
/// with that model.
#[tokio::test]
async fn a_second_served_model_takes_its_jobs_with_its_own_defaults() {
    let store = MemoryStore::default();
    let sd = Served {
        spec: "/models/sd15".into(),
        slug: crate::job::ModelSlug::of("sd15").unwrap(),
        defaults: ModelDefaults {
            size: 512,
            guidance_scale: 7.5,
            ..ModelDefaults::default()
        },
        safety_checker: Some(crate::events::SafetyChecker::NotRun),
    };
    let served = [served(), sd];
    let contract = Contract {
        limits: &Limits::default(),
        served: &served,
    };
    let now = OffsetDateTime::now_utc();
    let decide = |body: &'static str| intake(body.as_bytes(), &contract, &store, |_| false, now);
    let Intake::Render(job, 1) =
        decide(r#"{"job_id": "s-1", "prompt": "x", "model": "sd15"}"#).await
    else {
        panic!("a job for the second model renders with it");
    };
    assert_eq!(
        (job.generation.width, job.generation.guidance_scale),
        (512, 7.5)
    );
    let Intake::Render(plain, 0) = decide(r#"{"job_id": "p-1", "prompt": "x"}"#).await else {
        panic!("a job naming no model renders with the first");
    };
    assert_eq!(plain.generation.width, 1024);
    let c = Completion {
        models: Arc::new(served.to_vec()),
        ..completion(5)
    };
    let data = c.data(&job, 1, EventKind::Started);
    assert_eq!(data.model, "/models/sd15");
    assert_eq!(
        data.safety_checker,
        Some(crate::events::SafetyChecker::NotRun)
    );
    assert_eq!(c.data(&plain, 1, EventKind::Started).model, MODEL);
}

#[tokio::test]
async fn intake_reannounces_a_stored_result_and_retries_when_the_store_is_down() {
    let c = completion(5);
    c.act(&job(FOX), &meta(1), rendered(1)).await;
    let store = Arc::try_unwrap(c.store).ok().expect("one owner");
    assert!(matches!(
        decide(&store, FOX, false).await,
        Intake::Settled(_, Action::Reannounce(_))
    ));
    store.fail_gets.store(true, Ordering::Relaxed);
    assert!(matches!(
        decide(&store, FOX, false).await,
        Intake::Settled(_, Action::RetryOrFail(_))
    ));
}

/// `t2i_jobs_total` counts each terminal outcome once, when it is announced; a retry is
/// `t2i_job_retries_total` only; an announcement that fails counts nothing (the redelivery will).
#[tokio::test]
async fn every_terminal_path_counts_once_and_retries_apart() {
    let counts = |c: &Completion<MemoryStore, RecordingSink>| {
        let m = &c.metrics;
        let all: Vec<u64> = super::super::metrics::OUTCOMES
            .iter()
            .map(|o| m.outcome_count(o))
            .collect();
        (all, m.retries.get())
    };
    let cases: Vec<(Action, u32, &str)> = vec![
        (rendered(2), 1, "succeeded"),
        (Action::End(EventKind::Expired), 1, "expired"),
        (Action::End(EventKind::Canceled), 1, "canceled"),
        (Action::Fail(ErrorCode::Oom, "oom".into()), 1, "failed"),
        (Action::RetryOrFail("s3 down".into()), 3, "failed"),
    ];
    for (action, attempt, outcome) in cases {
        let c = completion(3);
        c.act(&fox(), &meta(attempt), action).await;
        let (all, retries) = counts(&c);
        assert_eq!(all.iter().sum::<u64>(), 1, "{outcome}: {all:?}");
        assert_eq!(c.metrics.outcome_count(outcome), 1, "{outcome}");
        assert_eq!(retries, 0, "{outcome}");
    }
    let c = completion(3);
    assert_eq!(
        c.act(&fox(), &meta(1), Action::RetryOrFail("s3 down".into()))
            .await,
        Outcome::Retry
    );
    assert_eq!(counts(&c), (vec![0; 6], 1), "a retry is not an outcome");
    let r = crate::job::Rejection::new("width", 65, "must be a multiple of 8");
    c.reject_body(b"{}", None, None, None, r).await;
    assert_eq!(c.metrics.outcome_count("rejected"), 1);
    let c = completion(3);
    c.sink.fail.store(true, Ordering::Relaxed);
    assert_eq!(
        c.act(&fox(), &meta(1), rendered(1)).await,
        Outcome::Abandoned
    );
    assert_eq!(counts(&c), (vec![0; 6], 0), "unannounced: not counted");
}
