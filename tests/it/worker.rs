//! `t2i worker` end to end, through the real binary, against the real RabbitMQ and Garage, with the
//! tiny SSD-1B fixture (the real pipeline; no fake renderer).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use t2i_worker::events::CloudEvent;
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, garage, get_object, rabbitmqctl, s3, serial};

fn job(id: &str, w: u32, h: u32, steps: u32, scheduler: &str, seed: u64, n: u32) -> Vec<u8> {
    serde_json::json!({
        "job_id": id, "prompt": format!("a photo of a cat, job {id}"), "width": w, "height": h,
        "steps": steps, "scheduler": scheduler, "seed": seed, "num_images": n,
        "metadata": {"test": id}
    })
    .to_string()
    .into_bytes()
}

fn succeeded(e: &CloudEvent) -> bool {
    e.kind == "t2i.job.succeeded"
}

fn all_terminal(ids: &HashSet<String>) -> impl FnMut(&[CloudEvent]) -> bool + '_ {
    move |seen| {
        let done: HashSet<&str> = seen
            .iter()
            .filter(|e| !e.kind.ends_with(".started") && !e.kind.ends_with(".progress"))
            .map(|e| e.subject.as_str())
            .collect();
        ids.iter().all(|i| done.contains(i.as_str()))
    }
}

fn all_succeeded(ids: &HashSet<String>) -> impl FnMut(&[CloudEvent]) -> bool + '_ {
    move |seen| {
        let done: HashSet<&str> = seen
            .iter()
            .filter(|e| succeeded(e))
            .map(|e| e.subject.as_str())
            .collect();
        ids.iter().all(|i| done.contains(i.as_str()))
    }
}

/// Every image of a succeeded event exists in Garage with the event's sha256, size, content type,
/// metadata and embedded parameters; result.json exists.
async fn verify_stored(client: &aws_sdk_s3::Client, e: &CloudEvent) {
    use sha2::Digest;
    let params = e.data.params.as_ref().expect("params");
    assert!(!e.data.images.is_empty());
    for img in &e.data.images {
        let (body, ct, meta) = get_object(client, &img.key)
            .await
            .unwrap_or_else(|| panic!("{} missing from Garage", img.key));
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&body)),
            img.sha256,
            "{}",
            img.key
        );
        assert_eq!(body.len() as u64, img.bytes);
        assert_eq!(ct.as_deref(), Some("image/png"));
        assert_eq!(
            meta.get("job-id").map(String::as_str),
            Some(e.subject.as_str())
        );
        assert_eq!(meta.get("seed"), Some(&img.seed.to_string()));
        let decoded = image::load_from_memory(&body).expect("a valid image");
        assert_eq!((decoded.width(), decoded.height()), (img.width, img.height));
        assert_eq!(img.width as u64, params["width"].as_u64().unwrap());
        assert_eq!(img.height as u64, params["height"].as_u64().unwrap());
        assert_eq!(
            img.seed,
            params["seed"].as_u64().unwrap() + img.index as u64
        );
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains(&format!("Seed: {}", img.seed)),
            "parameters chunk in {}",
            img.key
        );
        assert!(
            img.url
                .as_deref()
                .is_some_and(|u| u.contains("X-Amz-Signature")),
            "presigned URL"
        );
    }
    let result_key = e.data.images[0].key.rsplit_once('/').unwrap().0.to_string() + "/result.json";
    assert!(
        get_object(client, &result_key).await.is_some(),
        "{result_key}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mixed_jobs_all_succeed_exactly_once_with_correct_objects_and_events() {
    let _g = serial().await;
    let mut world = World::new("fifty").await;
    let worker = WorkerProc::spawn(&world, "w1", &["--max-batch", "8"]);
    let sizes = [(64, 64), (72, 40), (48, 64), (32, 32)];
    let schedulers = [
        "euler",
        "euler_ancestral",
        "ddim",
        "dpmpp_2m",
        "dpmpp_2m_karras",
    ];
    let mut ids = HashSet::new();
    let start = Instant::now();
    for i in 0..50u32 {
        let (w, h) = sizes[i as usize % sizes.len()];
        let id = format!("job-{i}");
        let body = job(
            &id,
            w,
            h,
            2,
            schedulers[i as usize % 5],
            1000 + i as u64,
            1 + i % 2,
        );
        let lane = if i % 3 == 0 {
            Lane::Bulk
        } else {
            Lane::Interactive
        };
        world.publish(lane, &id, &body).await;
        ids.insert(id);
    }
    assert!(
        world
            .collect_until(Duration::from_secs(240), all_terminal(&ids))
            .await,
        "not all jobs finished"
    );
    let elapsed = start.elapsed();
    println!(
        "50 jobs in {:.2}s ({:.1} jobs/s)",
        elapsed.as_secs_f64(),
        50.0 / elapsed.as_secs_f64()
    );
    let client = s3().await;
    let terminal = world.terminal();
    for id in &ids {
        let events = &terminal[id];
        assert_eq!(
            events.len(),
            1,
            "{id}: exactly one terminal event, got {events:?}"
        );
        let e = &events[0];
        assert!(succeeded(e), "{id}: {:?}", e.data.error);
        assert_eq!(
            world.count_terminal_deliveries(id),
            1,
            "{id} announced twice"
        );
        assert_eq!(e.data.metadata, Some(serde_json::json!({"test": id})));
        assert_eq!(e.data.worker, "w1");
        verify_stored(&client, e).await;
    }
    let (status, metrics) = worker.http_get("/metrics").unwrap();
    assert_eq!(status, 200);
    // Each terminal outcome once per job; per-job histograms once per job; the process-wide ones.
    for line in [
        "t2i_jobs_total{outcome=\"succeeded\"} 50",
        "t2i_jobs_total{outcome=\"failed\"} 0",
        "t2i_job_retries_total 0",
        "t2i_job_encode_seconds_count 50",
        "t2i_job_upload_seconds_count 50",
        "t2i_ready 1",
        "t2i_jobs_rendering 0",
        "t2i_build_info{version=",
        "# TYPE t2i_batch_inference_seconds histogram",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(!metrics.contains("phase_seconds"), "{metrics}");
    drop(worker);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_out_of_range_messages_fail_clearly_and_are_dead_lettered() {
    let _g = serial().await;
    let mut world = World::new("bad").await;
    let worker = WorkerProc::spawn(&world, "w1", &[]);
    let long_prompt = "x".repeat(10_000);
    let one_mib = "y".repeat(1 << 20);
    let big_meta = "z".repeat(9000);
    let bad: Vec<(String, &str)> = vec![
        ("not json".into(), "body"),
        ("".into(), "body"),
        (r#"{"job_id": "b3", "prompt": 5}"#.into(), "prompt"),
        (r#"{"job_id": "b4", "prompt": "x", "stpes": 3}"#.into(), "stpes"),
        (r#"{"job_id": "b5", "prompt": "x", "guidance_scale": NaN}"#.into(), "guidance_scale"),
        (r#"{"job_id": "b6", "prompt": "x", "width": 1001}"#.into(), "width"),
        (format!(r#"{{"job_id": "b7", "prompt": "{long_prompt}"}}"#), "prompt"),
        (format!(r#"{{"job_id": "b8", "prompt": "{one_mib}"}}"#), "body"),
        (r#"{"prompt": "x"}"#.into(), "job_id"),
        (r#"{"job_id": "b10", "prompt": "x", "steps": 0}"#.into(), "steps"),
        (r#"{"job_id": "b11", "prompt": "x", "steps": 151}"#.into(), "steps"),
        (r#"{"job_id": "b12", "prompt": "x", "guidance_scale": -1}"#.into(), "guidance_scale"),
        (r#"{"job_id": "b13", "prompt": "x", "guidance_scale": 31}"#.into(), "guidance_scale"),
        (r#"{"job_id": "b14", "prompt": "x", "num_images": 0}"#.into(), "num_images"),
        (r#"{"job_id": "b15", "prompt": "x", "num_images": 9}"#.into(), "num_images"),
        (r#"{"job_id": "b16", "prompt": "x", "scheduler": "heun"}"#.into(), "scheduler"),
        (r#"{"job_id": "b17", "prompt": "x", "width": 4096}"#.into(), "width"),
        (r#"{"job_id": "b 18", "prompt": "x"}"#.into(), "job_id"),
        (format!(r#"{{"job_id": "{}", "prompt": "x"}}"#, "i".repeat(200)), "job_id"),
        (r#"{"job_id": "b20", "prompt": "x", "output": {"format": "gif"}}"#.into(), "output.format"),
        (r#"{"job_id": "b21", "prompt": "x", "output": {"quality": 0}}"#.into(), "output.quality"),
        (r#"{"job_id": "b22", "prompt": "x", "output": {"key_prefix": "../x/"}}"#.into(), "output.key_prefix"),
        (r#"{"job_id": "b23", "prompt": "x", "output": {"presign_ttl_s": 0}}"#.into(), "output.presign_ttl_s"),
        (r#"{"job_id": "b24", "prompt": "x", "deadline": "yesterday"}"#.into(), "deadline"),
        (r#"{"job_id": "b25", "prompt": "x", "webhook": {"url": "ftp://x"}}"#.into(), "webhook.url"),
        (r#"{"job_id": "b26", "prompt": "x", "webhook": {"url": "https://x", "events": ["job.nope"]}}"#.into(), "webhook.events"),
        (format!(r#"{{"job_id": "b27", "prompt": "x", "metadata": {{"k": "{big_meta}"}}}}"#), "metadata"),
        ("[]".into(), "body"),
        (r#"{"job_id": "b29"}"#.into(), "prompt"),
        (r#"{"job_id": "b30", "prompt": "x", "batch": {"id": "bad id"}}"#.into(), "batch.id"),
    ];
    assert_eq!(bad.len(), 30);
    let mut good = HashSet::new();
    for (i, (body, _)) in bad.iter().enumerate() {
        world
            .publish_raw(body.as_bytes(), Some(&format!("msg-{i}")))
            .await;
        if i % 3 == 0 {
            let id = format!("good-{i}");
            world
                .publish(
                    Lane::Interactive,
                    &id,
                    &job(&id, 32, 32, 1, "euler", i as u64, 1),
                )
                .await;
            good.insert(id);
        }
    }
    let done = |seen: &[CloudEvent]| {
        let failed = seen.iter().filter(|e| e.kind == "t2i.job.failed").count();
        let ok = seen.iter().filter(|e| succeeded(e)).count();
        failed >= 30 && ok >= good.len()
    };
    assert!(
        world.collect_until(Duration::from_secs(120), done).await,
        "missing events: {:?}",
        world.seen.len()
    );
    let failed: Vec<&CloudEvent> = world
        .seen
        .iter()
        .filter(|e| e.kind == "t2i.job.failed")
        .collect();
    assert_eq!(failed.len(), 30);
    let mut fields: HashMap<String, String> = HashMap::new();
    for e in &failed {
        let err = e.data.error.as_ref().expect("error");
        assert_eq!(serde_json::to_value(err.code).unwrap(), "invalid_input");
        assert!(!err.retryable);
        assert!(!err.message.is_empty());
        fields.insert(e.subject.clone(), err.field.clone().unwrap_or_default());
    }
    // Jobs with a usable id are reported under it, others under the AMQP message id.
    assert_eq!(fields["b6"], "width");
    assert_eq!(fields["b22"], "output.key_prefix");
    assert_eq!(fields["msg-0"], "body");
    assert_eq!(fields["msg-8"], "job_id");
    for (i, (_, field)) in bad.iter().enumerate() {
        let key = fields
            .iter()
            .find(|(k, _)| **k == format!("b{}", i + 1) || **k == format!("msg-{i}"))
            .map(|(_, f)| f.clone());
        assert_eq!(
            key.as_deref(),
            Some(*field),
            "message {i}: {:?}",
            bad[i].0.chars().take(80).collect::<String>()
        );
    }
    for id in &good {
        assert!(
            world.seen.iter().any(|e| succeeded(e) && &e.subject == id),
            "{id}"
        );
    }
    // The dead-letter queue holds exactly the 30 rejects.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dead = 0;
    while Instant::now() < deadline {
        dead = world.message_count(&world.topology.dead_queue()).await;
        if dead >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(dead, 30);
    drop(worker);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_and_its_successor_overwrites_identically() {
    let _g = serial().await;
    let mut world = World::new("kill").await;
    let mut ids = HashSet::new();
    for i in 0..24u32 {
        let id = format!("k{i}");
        world
            .publish(
                Lane::Interactive,
                &id,
                &job(&id, 64, 64, 12, "euler", i as u64, 1),
            )
            .await;
        ids.insert(id);
    }
    let mut w1 = WorkerProc::spawn(
        &world,
        "w1",
        &["--max-batch", "4", "--batch-window-ms", "0"],
    );
    let some_done = |seen: &[CloudEvent]| seen.iter().filter(|e| succeeded(e)).count() >= 4;
    assert!(
        world
            .collect_until(Duration::from_secs(120), some_done)
            .await
    );
    w1.kill9();
    let _w2 = WorkerProc::spawn(&world, "w2", &["--max-batch", "4"]);
    assert!(
        world
            .collect_until(Duration::from_secs(240), all_succeeded(&ids))
            .await,
        "jobs lost"
    );
    // Both workers announce as one deployment: one CloudEvents source, the worker in the data, so
    // a job announced by each is one event (source + id) to CloudEvents consumers.
    let source = format!("/t2i-worker/{}", world.prefix);
    let workers: HashSet<&str> = world.seen.iter().map(|e| e.data.worker.as_str()).collect();
    assert_eq!(workers, HashSet::from(["w1", "w2"]));
    for e in &world.seen {
        assert_eq!(e.source, source, "{} of {}", e.kind, e.subject);
        assert_eq!(
            e.dataschema.as_deref(),
            Some(t2i_worker::events::DATA_SCHEMA)
        );
    }
    let client = s3().await;
    for id in &ids {
        let events: Vec<&CloudEvent> = world
            .seen
            .iter()
            .filter(|e| succeeded(e) && &e.subject == id)
            .collect();
        let first = &events[0];
        for e in &events {
            // A redelivered job re-emits the same event id and the same image bytes.
            assert_eq!(e.id, first.id);
            let a: Vec<&str> = e.data.images.iter().map(|i| i.sha256.as_str()).collect();
            let b: Vec<&str> = first
                .data
                .images
                .iter()
                .map(|i| i.sha256.as_str())
                .collect();
            assert_eq!(a, b, "{id}: different content for the same key");
        }
        verify_stored(&client, events.last().unwrap()).await;
    }
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_a_broker_restart_and_finishes() {
    let _g = serial().await;
    let mut world = World::new("restart").await;
    let mut ids = HashSet::new();
    for i in 0..20u32 {
        let id = format!("r{i}");
        world
            .publish(
                Lane::Interactive,
                &id,
                &job(&id, 64, 64, 8, "euler", i as u64, 1),
            )
            .await;
        ids.insert(id);
    }
    let w = WorkerProc::spawn(&world, "w1", &["--max-batch", "2"]);
    let some_done = |seen: &[CloudEvent]| seen.iter().filter(|e| succeeded(e)).count() >= 3;
    assert!(
        world
            .collect_until(Duration::from_secs(120), some_done)
            .await
    );
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    world.reconnect().await;
    let finished = world
        .collect_until(Duration::from_secs(240), all_succeeded(&ids))
        .await;
    assert!(
        finished,
        "not all jobs finished after the restart; {}\nworker log tail:\n{}",
        world.missing_report(&ids),
        w.log_tail(60)
    );
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_outage_of_twenty_seconds_is_retried_until_every_job_finishes() {
    let _g = serial().await;
    // Five attempts 2+4+8+16 s apart outlast a 20 s outage (the defaults, 1/4/16/64 s, do too).
    let mut world = World::with_retry_delays("s3down", &[2, 4, 8, 16]).await;
    let w = WorkerProc::spawn(&world, "w1", &["--max-batch", "2"]);
    let mut ids = HashSet::new();
    let publish = |i: u32| {
        let id = format!("s{i}");
        (id.clone(), job(&id, 64, 64, 6, "euler", i as u64, 1))
    };
    for i in 0..4u32 {
        let (id, body) = publish(i);
        world.publish(Lane::Interactive, &id, &body).await;
        ids.insert(id);
    }
    let first = |seen: &[CloudEvent]| seen.iter().any(succeeded);
    assert!(world.collect_until(Duration::from_secs(120), first).await);
    garage("stop");
    // Jobs arriving during the outage cannot even check for an earlier result: they must retry.
    for i in 4..12u32 {
        let (id, body) = publish(i);
        world.publish(Lane::Interactive, &id, &body).await;
        ids.insert(id);
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    garage("start");
    let ok = world
        .collect_until(Duration::from_secs(180), all_terminal(&ids))
        .await;
    assert!(ok, "not all jobs finished after the outage");
    let terminal = world.terminal();
    for id in &ids {
        assert!(
            terminal[id].iter().all(succeeded),
            "{id}: {:?}",
            terminal[id][0].data.error
        );
    }
    let retried = terminal
        .values()
        .flatten()
        .filter(|e| e.data.attempt > 1)
        .count();
    assert!(retried > 0, "the outage should have caused retries");
    let value = |metrics: &str, name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    // A success is counted once its publish is confirmed, which can come a moment after the
    // event reached our consumer: wait for the count to settle, then require it exact.
    let succeeded = "t2i_jobs_total{outcome=\"succeeded\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, m) = w.http_get("/metrics").unwrap();
        if value(&m, succeeded) >= ids.len() as f64 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let value = |name: &str| value(&metrics, name);
    // Retries are counted apart from outcomes, and every job still ends as one success.
    assert!(value("t2i_job_retries_total") >= 1.0, "{metrics}");
    assert!(!metrics.contains("outcome=\"retried\""), "{metrics}");
    assert_eq!(value(succeeded), ids.len() as f64, "{metrics}");
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_queue_and_each_result_appears_once_then_stop_cleanly() {
    let _g = serial().await;
    let mut world = World::new("pair").await;
    let mut w1 = WorkerProc::spawn(
        &world,
        "w1",
        &["--max-batch", "2", "--batch-window-ms", "0"],
    );
    let mut w2 = WorkerProc::spawn(
        &world,
        "w2",
        &["--max-batch", "2", "--batch-window-ms", "0"],
    );
    let mut ids = HashSet::new();
    for i in 0..30u32 {
        let id = format!("p{i}");
        world
            .publish(Lane::Bulk, &id, &job(&id, 64, 64, 6, "ddim", i as u64, 1))
            .await;
        ids.insert(id);
    }
    assert!(
        world
            .collect_until(Duration::from_secs(240), all_succeeded(&ids))
            .await
    );
    let terminal = world.terminal();
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        assert_eq!(terminal[id].len(), 1, "{id}");
        assert_eq!(
            world.count_terminal_deliveries(id),
            1,
            "{id} produced twice"
        );
        *by_worker
            .entry(terminal[id][0].data.worker.clone())
            .or_default() += 1;
    }
    assert_eq!(
        by_worker.len(),
        2,
        "both workers should have taken jobs: {by_worker:?}"
    );
    assert_eq!(w1.terminate(), Some(0), "SIGTERM exits 0");
    assert_eq!(w2.terminate(), Some(0), "SIGTERM exits 0");
    world.cleanup().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_uploads_and_presigned_urls_work_against_garage() {
    use t2i_worker::storage::{ImageStore, S3Options, S3Store};
    let _g = serial().await;
    crate::broker::garage_env();
    let prefix = format!(
        "t2it-multipart-{}/",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let opts = S3Options {
        force_path_style: Some(true),
        public_endpoint: None,
    };
    let store = S3Store::from_env(&crate::broker::bucket(), &prefix, &opts)
        .await
        .unwrap()
        .with_multipart(5 * 1024 * 1024, 5 * 1024 * 1024);
    let body: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let meta = vec![("job-id".to_string(), "big".to_string())];
    let stored = store
        .put(
            "big.bin",
            body.clone(),
            "application/octet-stream",
            &meta,
            Some(Duration::from_secs(300)),
        )
        .await
        .unwrap();
    assert_eq!(
        store.get("big.bin").await.unwrap().as_deref(),
        Some(&body[..])
    );
    assert_eq!(store.get("absent.bin").await.unwrap(), None);
    // The presigned URL serves the object to a client without credentials.
    let url = stored.url.unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..head_end]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(resp.len() - head_end - 4, body.len());
    let client = s3().await;
    let (_, ct, meta) = get_object(&client, &format!("{prefix}big.bin"))
        .await
        .unwrap();
    assert_eq!(ct.as_deref(), Some("application/octet-stream"));
    assert_eq!(meta.get("job-id").map(String::as_str), Some("big"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_presigned_for_a_public_endpoint_name_it_and_open_without_credentials() {
    use t2i_worker::storage::{ImageStore, S3Options, Store};
    let _g = serial().await;
    let public = crate::broker::public_garage_endpoint();
    let public_url = reqwest::Url::parse(&public).unwrap();
    let prefix = format!(
        "t2it-public-{}/",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let storage = format!("s3://{}/{prefix}", crate::broker::bucket());
    let open = |endpoint: &str| {
        let opts = S3Options {
            force_path_style: None,
            public_endpoint: Some(endpoint.to_string()),
        };
        let storage = storage.clone();
        async move { Store::open(&storage, &opts).await.unwrap() }
    };
    let body = b"\x89PNG\r\n\x1a\n not really a png".to_vec();
    let store = open(&public).await;
    let stored = store
        .put(
            "a.png",
            body.clone(),
            "image/png",
            &[],
            Some(Duration::from_secs(300)),
        )
        .await
        .unwrap();
    let url = reqwest::Url::parse(stored.url.as_deref().unwrap()).unwrap();
    assert_eq!(
        (url.host_str(), url.port()),
        (Some("localhost"), public_url.port()),
        "{url}"
    );
    assert!(
        url.path()
            .starts_with(&format!("/{}/{prefix}", crate::broker::bucket())),
        "path-style for the public endpoint: {url}"
    );
    // A client without credentials opens it at the public name.
    let r = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    // The signature covers the host: it was signed for the public name, not rewritten afterwards.
    let mut moved = url.clone();
    moved.set_host(Some("127.0.0.1")).unwrap();
    assert_eq!(reqwest::get(moved).await.unwrap().status(), 403);
    // Presigning does no I/O and every request goes to AWS_ENDPOINT_URL: a public endpoint where
    // nothing listens changes only the URLs.
    let elsewhere = open("http://127.0.0.1:9").await;
    let stored = elsewhere
        .put(
            "b.png",
            body.clone(),
            "image/png",
            &[],
            Some(Duration::from_secs(300)),
        )
        .await
        .unwrap();
    assert!(
        stored
            .url
            .as_deref()
            .unwrap()
            .starts_with("http://127.0.0.1:9/"),
        "{stored:?}"
    );
    assert_eq!(
        elsewhere.get("a.png").await.unwrap().as_deref(),
        Some(&body[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_folder_works_as_the_store() {
    let _g = serial().await;
    let mut world = World::new("local").await;
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", dir.path().display());
    let worker = WorkerProc::spawn(&world, "w1", &["--storage", &storage]);
    world
        .publish(
            Lane::Interactive,
            "l1",
            &job("l1", 32, 32, 1, "euler", 9, 2),
        )
        .await;
    let ids: HashSet<String> = ["l1".to_string()].into();
    assert!(
        world
            .collect_until(Duration::from_secs(60), all_succeeded(&ids))
            .await
    );
    for i in 0..2 {
        let img = image::open(dir.path().join(format!("l1/{i}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    assert!(dir.path().join("l1/result.json").exists());
    let e = &world.terminal()["l1"][0];
    assert!(
        e.data.images[0]
            .url
            .as_deref()
            .unwrap()
            .starts_with("file://")
    );
    drop(worker);
    world.cleanup().await;
}

/// Plumbing throughput: many tiny jobs (32×32, 1 step, no guidance) through RabbitMQ → worker →
/// Garage → events. Asserts that every job succeeds exactly once; prints jobs/s (docs/performance.md §1 target:
/// ≥ 200 jobs/s on a 2-core machine). For the figure in the README:
/// `cargo build --release && T2I_TEST_BIN=$CARGO_TARGET_DIR/release/t2i cargo test --test it plumbing -- --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plumbing_throughput_many_tiny_jobs_all_succeed_once() {
    let _g = serial().await;
    let n: u32 = std::env::var("T2I_PLUMBING_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut world = World::new("plumbing").await;
    let worker = WorkerProc::spawn(
        &world,
        "w1",
        &["--max-batch", "32", "--batch-window-ms", "10"],
    );
    let mut ids = HashSet::new();
    let start = Instant::now();
    for i in 0..n {
        let id = format!("t{i}");
        let body = serde_json::json!({"job_id": id, "prompt": "a cat", "width": 32, "height": 32,
            "steps": 1, "guidance_scale": 0.0, "seed": i});
        world
            .publish(Lane::Bulk, &id, body.to_string().as_bytes())
            .await;
        ids.insert(id);
    }
    let published = start.elapsed();
    assert!(
        world
            .collect_until(Duration::from_secs(600), all_terminal(&ids))
            .await,
        "jobs missing"
    );
    let elapsed = start.elapsed();
    let terminal = world.terminal();
    for id in &ids {
        assert!(succeeded(&terminal[id][0]), "{id}");
        assert_eq!(world.count_terminal_deliveries(id), 1, "{id}");
    }
    let (_, metrics) = worker.http_get("/metrics").unwrap();
    // A sample's value by its full name with labels, e.g. `t2i_job_encode_seconds_sum`.
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    };
    let phase = |name: &str| metric(&format!("t2i_{name}_seconds_sum"));
    let batches = metric("t2i_batch_images_count");
    println!(
        "plumbing: {n} jobs in {:.2}s = {:.0} jobs/s (published in {:.2}s); {batches} batches of {:.1} on average; time summed over jobs: inference {:.1}s (per batch), encode {:.1}s, upload {:.1}s",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        published.as_secs_f64(),
        metric("t2i_batch_images_sum") / batches.max(1.0),
        phase("batch_inference"),
        phase("job_encode"),
        phase("job_upload"),
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
