//! `t2i worker` end to end, through the real binary, against the real RabbitMQ and Garage, with the
//! tiny SSD-1B fixture (the real pipeline; no fake renderer): many jobs, bad messages, two workers,
//! plumbing throughput. The helpers here are shared by `faults`, `lifecycle` and `storage`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use t2i_worker::events::CloudEvent;
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, get_object, s3, serial};

pub(crate) fn job(
    id: &str,
    w: u32,
    h: u32,
    steps: u32,
    scheduler: &str,
    seed: u64,
    n: u32,
) -> Vec<u8> {
    serde_json::json!({
        "job_id": id, "prompt": format!("a photo of a cat, job {id}"), "width": w, "height": h,
        "steps": steps, "scheduler": scheduler, "seed": seed, "num_images": n,
        "metadata": {"test": id}
    })
    .to_string()
    .into_bytes()
}

pub(crate) fn succeeded(e: &CloudEvent) -> bool {
    e.kind == "t2i.job.succeeded"
}

pub(crate) fn all_terminal(ids: &HashSet<String>) -> impl FnMut(&[CloudEvent]) -> bool + '_ {
    move |seen| {
        let done: HashSet<&str> = seen
            .iter()
            .filter(|e| !e.kind.ends_with(".started") && !e.kind.ends_with(".progress"))
            .map(|e| e.subject.as_str())
            .collect();
        ids.iter().all(|i| done.contains(i.as_str()))
    }
}

pub(crate) fn all_succeeded(ids: &HashSet<String>) -> impl FnMut(&[CloudEvent]) -> bool + '_ {
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
pub(crate) async fn verify_stored(client: &aws_sdk_s3::Client, e: &CloudEvent) {
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
