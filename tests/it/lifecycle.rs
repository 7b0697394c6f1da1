//! A job's life beyond rendering, through the real worker and broker: deadlines, `reply_to`,
//! re-announcing a stored result, and cancellation (`t2i cancel` stops a running batch within a
//! step).

use std::collections::HashSet;
use std::time::Duration;

use t2i_worker::events::CloudEvent;
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, serial};
use crate::worker::{all_terminal, job, succeeded};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_reply_to_reannouncement_and_cancellation_follow_the_contract() {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let _g = serial().await;
    let mut world = World::new("contract").await;
    let worker = WorkerProc::spawn(
        &world,
        "w1",
        &["--max-batch", "1", "--batch-window-ms", "0"],
    );

    // 1. A job whose deadline has passed is expired, not rendered.
    let expired = serde_json::json!({"job_id": "late", "prompt": "x", "width": 32, "height": 32,
        "deadline": "2001-01-01T00:00:00Z"});
    world
        .publish(Lane::Interactive, "late", expired.to_string().as_bytes())
        .await;

    // 2. reply_to + correlation_id get the terminal event.
    let ch = world.conn.raw().create_channel().await.unwrap();
    let reply_q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut replies = ch
        .basic_consume(
            reply_q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let reply_to = t2i_worker::queue::ReplyTo {
        queue: reply_q.name().to_string(),
        correlation_id: Some("corr-1".into()),
    };
    world
        .publisher
        .job(
            &Lane::Interactive.into(),
            "asked",
            &job("asked", 32, 32, 1, "euler", 5, 1),
            Some(&reply_to),
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::StreamExt::next(&mut replies),
    )
    .await
    .expect("a reply")
    .unwrap()
    .unwrap();
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("corr-1")
    );
    let reply_event: CloudEvent = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(reply_event.kind, "t2i.job.succeeded");
    assert_eq!(reply_event.subject, "asked");

    // 3. The same job again: result.json exists, so it is re-announced with the same event id.
    world
        .publish(
            Lane::Interactive,
            "asked",
            &job("asked", 32, 32, 1, "euler", 5, 1),
        )
        .await;
    let twice = |seen: &[CloudEvent]| {
        seen.iter()
            .filter(|e| succeeded(e) && e.subject == "asked")
            .count()
            >= 2
    };
    assert!(world.collect_until(Duration::from_secs(60), twice).await);
    let asked: Vec<&CloudEvent> = world
        .seen
        .iter()
        .filter(|e| succeeded(e) && e.subject == "asked")
        .collect();
    assert_eq!(
        asked[0].id, asked[1].id,
        "re-announcement keeps the event id"
    );
    // The same images, with URLs presigned for the reannouncement (the stored record has none).
    let durable = |e: &CloudEvent| {
        let mut images = e.data.images.clone();
        for i in &mut images {
            assert!(i.url.is_some(), "a reannouncement carries working URLs");
            (i.url, i.url_expires_at) = (None, None);
        }
        images
    };
    assert_eq!(durable(asked[0]), durable(asked[1]));

    // 4. A canceled batch: jobs waiting behind a long one are dropped with job.canceled. "long"
    // must still be rendering when the cancel arrives: it is sized to take seconds (a fixed 300 ms
    // wait stopped being enough once the CPU kernels got faster), and the cancel is sent only once
    // it has started.
    world
        .publish(
            Lane::Interactive,
            "long",
            &job("long", 128, 128, 100, "euler", 1, 1),
        )
        .await;
    for i in 0..3 {
        let id = format!("c{i}");
        let body = serde_json::json!({"job_id": id, "prompt": "x", "width": 32, "height": 32, "steps": 1,
            "batch": {"id": "doomed", "index": i, "total": 3}});
        world
            .publish(Lane::Interactive, &id, body.to_string().as_bytes())
            .await;
    }
    let long_started = |seen: &[CloudEvent]| {
        seen.iter()
            .any(|e| e.kind == "t2i.job.started" && e.subject == "long")
    };
    assert!(
        world
            .collect_until(Duration::from_secs(60), long_started)
            .await
    );
    world
        .publisher
        .channel()
        .basic_publish(
            world.topology.control_exchange().as_str().into(),
            "".into(),
            Default::default(),
            br#"{"cancel_batches": ["doomed"]}"#,
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    let ids: HashSet<String> = ["late", "long", "c0", "c1", "c2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(
        world
            .collect_until(Duration::from_secs(120), all_terminal(&ids))
            .await
    );
    let terminal = world.terminal();
    assert_eq!(terminal["late"][0].kind, "t2i.job.expired");
    assert!(succeeded(&terminal["long"][0]));
    for i in 0..3 {
        assert_eq!(
            terminal[&format!("c{i}")][0].kind,
            "t2i.job.canceled",
            "c{i}"
        );
    }
    let (_, metrics) = worker.http_get("/metrics").unwrap();
    assert!(
        metrics.contains("t2i_jobs_total{outcome=\"reannounced\"} 1"),
        "{metrics}"
    );
    drop(worker);
    world.cleanup().await;
}

/// `t2i cancel --batch` through the real binary: the running batch stops between denoising steps
/// (at most one step after the worker could see the message) and waiting jobs of the batch are
/// dropped; a job outside the batch still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2i_cancel_stops_a_running_batch_within_a_step() {
    let _g = serial().await;
    let mut world = World::new("cancel").await;
    let worker = WorkerProc::spawn(
        &world,
        "w1",
        &[
            "--max-batch",
            "1",
            "--batch-window-ms",
            "0",
            "--progress-interval-ms",
            "0",
        ],
    );
    let steps = 150; // the contract's maximum
    for (id, batch) in [
        ("run", Some("stopme")),
        ("wait", Some("stopme")),
        ("other", None),
    ] {
        // The running job is large enough (512², CFG) that one step takes far longer than an event
        // takes to arrive, so counting the steps reported after the cancel measures the worker.
        let (side, n) = if id == "run" { (512, steps) } else { (64, 2) };
        let mut body = serde_json::json!({"job_id": id, "prompt": "x", "width": side, "height": side,
            "steps": n});
        if let Some(b) = batch {
            let index = usize::from(id != "run");
            body["batch"] = serde_json::json!({"id": b, "index": index, "total": 2});
        }
        world
            .publish(Lane::Interactive, id, body.to_string().as_bytes())
            .await;
        if id == "run" {
            // The long job is on the device before the others arrive.
            let started = |seen: &[CloudEvent]| {
                seen.iter()
                    .any(|e| e.subject == "run" && e.kind == "t2i.job.progress")
            };
            assert!(world.collect_until(Duration::from_secs(60), started).await);
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_t2i"))
        .args([
            "cancel",
            "--amqp-url",
            &crate::broker::amqp_url(),
            "--amqp-prefix",
            &world.prefix,
            "--batch",
            "stopme",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen_before = world.seen.len();
    let ids: HashSet<String> = ["run", "wait", "other"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(
        world
            .collect_until(Duration::from_secs(60), all_terminal(&ids))
            .await
    );
    let terminal = world.terminal();
    assert_eq!(terminal["run"][0].kind, "t2i.job.canceled");
    assert_eq!(terminal["wait"][0].kind, "t2i.job.canceled");
    assert!(succeeded(&terminal["other"][0]));
    let steps_of_run = |events: &[CloudEvent]| -> Vec<usize> {
        events
            .iter()
            .filter(|e| e.subject == "run" && e.kind == "t2i.job.progress")
            .filter_map(|e| e.data.progress.as_ref().map(|p| p.step))
            .collect()
    };
    let before = steps_of_run(&world.seen[..seen_before]);
    let after = steps_of_run(&world.seen[seen_before..]);
    let last = *before.iter().chain(&after).max().unwrap();
    assert!(last < steps, "the job ran to the end");
    // Steps reported after the cancel was confirmed by the broker: the one running when the worker
    // read the message, plus progress events already in flight (published per step, unconfirmed).
    assert!(
        after.len() <= 3,
        "{} steps after the cancel was confirmed: {after:?}",
        after.len()
    );
    drop(worker);
    world.cleanup().await;
}
