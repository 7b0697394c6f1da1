//! Routing by model on the real broker: two worker pools with different tiny fixture models, jobs for
//! each (and for none) land on the right pool; a job for a model no pool serves fails at once at its
//! producer (`t2i enqueue`, `t2i gateway`) with `model_not_served`; a job for another model published
//! on the default pool's key is failed the same way by the worker that got it; an SD 1.5 pool serves its
//! jobs with its own defaults.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use t2i_worker::events::{CloudEvent, ErrorCode};
use t2i_worker::queue::{Delivered, Lane, Route};

use crate::broker::{WorkerProc, World, amqp_url, serial};
use crate::webhooks::{json as body_json, spawn_gateway};

/// Retries of a transient failure wait 1 + 2 + 4 + 8 s here (`World::new`): a failure that took
/// retries could not be announced this soon after its publish.
const FAST: Duration = Duration::from_secs(10);

fn job(id: &str, model: Option<&str>) -> Vec<u8> {
    let mut j = json!({"job_id": id, "prompt": format!("a lighthouse, job {id}"),
                       "width": 32, "height": 32, "steps": 1, "seed": 3});
    if let Some(m) = model {
        j["model"] = m.into();
    }
    j.to_string().into_bytes()
}

fn error_code(e: &CloudEvent) -> Option<ErrorCode> {
    e.data.error.as_ref().map(|x| x.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_take_their_models_jobs_and_an_unserved_model_fails_at_once() {
    let _g = serial().await;
    let mut world = World::new("pools").await;
    // The SSD-1B pool also takes jobs that name no model; the Vega pool only its own.
    let ssd = WorkerProc::spawn_model(&world, "w-ssd", "ssd-1b-tiny", &[]);
    let vega = WorkerProc::spawn_model(&world, "w-vega", "vega-tiny", &["--default-pool", "false"]);

    let mut expect: Vec<(String, &str)> = Vec::new();
    for i in 0..4 {
        let lane = if i % 2 == 0 {
            Lane::Interactive
        } else {
            Lane::Bulk
        };
        // By folder name, and by a repo id whose last segment is the model's folder name.
        for (model, worker) in [("ssd-1b-tiny", "w-ssd"), ("segmind/vega-tiny", "w-vega")] {
            let id = format!("{}-{i}", &worker[2..]);
            let route = Route::of(lane, Some(model)).unwrap();
            let body = job(&id, Some(model));
            let sent = world.publisher.job(&route, &id, &body, None).await;
            assert_eq!(sent.unwrap(), Delivered::Routed, "{id}");
            expect.push((id, worker));
        }
    }
    for id in ["plain-0", "plain-1"] {
        world.publish(Lane::Interactive, id, &job(id, None)).await;
        expect.push((id.to_string(), "w-ssd"));
    }
    // A producer that ignores routing: a Vega job on the default pool's key reaches the SSD-1B pool.
    world
        .publish(
            Lane::Interactive,
            "astray",
            &job("astray", Some("vega-tiny")),
        )
        .await;

    // No pool declared a queue for this model: the broker returns the publish.
    let nowhere = Route::of(Lane::Interactive, Some("acme/not-deployed")).unwrap();
    let body = job("direct", Some("acme/not-deployed"));
    let sent = world.publisher.job(&nowhere, "direct", &body, None).await;
    assert_eq!(sent.unwrap(), Delivered::Unroutable);

    // `t2i enqueue` fails such jobs itself, names the model and exits non-zero.
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_t2i"))
        .arg("enqueue")
        .args(["--amqp-url", &amqp_url(), "--amqp-prefix", &world.prefix])
        .args([
            "--storage",
            &world.storage(),
            "--quiet",
            "--retry-delays",
            "1,2,4,8",
        ])
        .args([
            "--min-side",
            "32",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "1",
        ])
        .args([
            "--prompt",
            "a lighthouse",
            "--model",
            "acme/not-deployed",
            "--batch-id",
            "nope",
        ])
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    // It exits once the failure is announced (confirmed): no queue, no retry in between.
    let enqueue_took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(enqueue_took < FAST, "{enqueue_took:?}");
    assert!(
        stderr.contains("\"acme/not-deployed\"") && stderr.contains("model_not_served"),
        "{stderr}"
    );

    // So does the gateway, answering 422.
    let dir = tempfile::tempdir().unwrap();
    let (_gateway, base) = spawn_gateway(
        &world,
        &["--min-side", "32"],
        &dir.path().join("gateway.log"),
    )
    .await;
    let http = reqwest::Client::new();
    let asked = Instant::now();
    let r = http
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(job("via-http", Some("acme/not-deployed")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(asked.elapsed() < FAST, "{:?}", asked.elapsed());
    let v = body_json(r).await;
    assert_eq!(v["error"]["code"], "model_not_served", "{v}");
    assert_eq!(v["error"]["field"], "model", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("acme/not-deployed"),
        "{v}"
    );

    let mut ids: HashSet<String> = expect.iter().map(|(id, _)| id.clone()).collect();
    ids.extend(["astray", "nope-0000000", "via-http"].map(String::from));
    let all = |seen: &[CloudEvent]| {
        let done: HashSet<&str> = seen
            .iter()
            .filter(|e| !e.kind.ends_with(".started") && !e.kind.ends_with(".progress"))
            .map(|e| e.subject.as_str())
            .collect();
        ids.iter().all(|i| done.contains(i.as_str()))
    };
    let ended = world.collect_until(Duration::from_secs(180), all).await;
    assert!(
        ended,
        "{}\nw-ssd:\n{}\nw-vega:\n{}",
        world.missing_report(&ids),
        ssd.log_tail(20),
        vega.log_tail(20)
    );
    let terminal = world.terminal();
    let one = |id: &str| {
        let events = &terminal[id];
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        events[0].clone()
    };
    for (id, worker) in &expect {
        let e = one(id);
        assert_eq!(e.kind, "t2i.job.succeeded", "{id}: {:?}", e.data.error);
        assert_eq!(&e.data.worker, worker, "{id}");
        let fixture = if *worker == "w-vega" {
            "vega-tiny"
        } else {
            "ssd-1b-tiny"
        };
        assert!(e.data.model.ends_with(fixture), "{id}: {}", e.data.model);
    }
    let astray = one("astray");
    assert_eq!(astray.kind, "t2i.job.failed");
    assert_eq!(error_code(&astray), Some(ErrorCode::ModelNotServed));
    assert_eq!(astray.data.worker, "w-ssd");
    assert!(astray.data.error.unwrap().message.contains("\"vega-tiny\""));

    for (id, producer) in [("nope-0000000", "t2i enqueue"), ("via-http", "t2i gateway")] {
        let e = one(id);
        assert_eq!(e.kind, "t2i.job.failed", "{id}");
        assert_eq!(error_code(&e), Some(ErrorCode::ModelNotServed), "{id}");
        assert_eq!(
            (e.data.worker.as_str(), e.data.attempt),
            (producer, 1),
            "{id}"
        );
        assert_eq!(e.data.model, "acme/not-deployed", "{id}");
        assert_eq!(
            e.source, astray.source,
            "{id}: the deployment's source, as the workers'"
        );
    }
    let r = http
        .get(format!("{base}/v1/jobs/via-http"))
        .send()
        .await
        .unwrap();
    let record = body_json(r).await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["error"]["code"], "model_not_served", "{record}");

    // Each pool's queues exist (declared by its workers) and are drained; the dead-letter queue
    // holds only the misrouted job.
    for slug in ["ssd-1b-tiny", "vega-tiny"] {
        for lane in Lane::ALL {
            let route = Route::of(lane, Some(slug)).unwrap();
            let queue = world.topology.route_queue(&route);
            assert_eq!(world.message_count(&queue).await, 0, "{queue}");
        }
    }
    assert_eq!(world.message_count(&world.topology.dead_queue()).await, 1);
    drop((ssd, vega));
    world.delete_pools(&["ssd-1b-tiny", "vega-tiny"]).await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_delayed_retry_comes_back_to_that_pools_queue() {
    let _g = serial().await;
    let world = World::new("pool-retry").await;
    let slug = t2i_worker::job::ModelSlug::of("segmind/Segmind-Vega").unwrap();
    world
        .conn
        .declare_pools(&world.topology, std::slice::from_ref(&slug))
        .await
        .unwrap();
    let route = Route::of(Lane::Bulk, Some("segmind-vega")).unwrap();
    // What `Publisher::retry` does with a pool's job: into the route's first retry queue (1 s here).
    let retry = world.topology.route_retry_queue(&route, 0);
    let body = job("again", Some("segmind/Segmind-Vega"));
    world
        .publisher
        .to_queue(&retry, &body, &[], None)
        .await
        .unwrap();
    let queue = world.topology.route_queue(&route);
    let deadline = Instant::now() + FAST;
    while world.message_count(&queue).await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(world.message_count(&queue).await, 1, "{queue}");
    let default = world.topology.queue(Lane::Bulk);
    assert_eq!(
        world.message_count(&default).await,
        0,
        "not the default pool's"
    );
    world.delete_pools(&["segmind-vega"]).await;
    world.cleanup().await;
}

/// An SD 1.5 pool beside the SDXL-family ones: a job naming it takes that model's defaults (size,
/// sampler, guidance), its progress counts PNDM's extra UNet evaluation, and every event says the
/// safety checker its folder ships was not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sd15_pool_renders_with_its_own_defaults_and_says_its_safety_checker_is_not_run() {
    let _g = serial().await;
    let mut world = World::new("sd15-pool").await;
    let sd = WorkerProc::spawn_model(&world, "w-sd15", "sd15-tiny", &["--default-pool", "false"]);
    let route = Route::of(Lane::Interactive, Some("sd15-tiny")).unwrap();
    let body = json!({"job_id": "sd-1", "prompt": "a lighthouse", "steps": 2, "seed": 5,
                      "model": "sd15-tiny"})
    .to_string();
    let sent = world
        .publisher
        .job(&route, "sd-1", body.as_bytes(), None)
        .await;
    assert_eq!(sent.unwrap(), Delivered::Routed);
    let done = |seen: &[CloudEvent]| seen.iter().any(|e| e.kind == "t2i.job.succeeded");
    let ended = world.collect_until(Duration::from_secs(120), done).await;
    assert!(ended, "{}", sd.log_tail(20));
    let events: Vec<&CloudEvent> = world.seen.iter().filter(|e| e.subject == "sd-1").collect();
    let succeeded = events
        .iter()
        .find(|e| e.kind == "t2i.job.succeeded")
        .unwrap();
    let params = succeeded.data.params.as_ref().unwrap();
    // sd15-tiny: unet sample_size 8 × 8 px, PNDMScheduler shipped, StableDiffusionPipeline's 7.5.
    assert_eq!(
        (
            &params["width"],
            &params["scheduler"],
            &params["guidance_scale"]
        ),
        (&json!(64), &json!("pndm"), &json!(7.5)),
        "{params}"
    );
    for e in &events {
        assert_eq!(
            e.data.safety_checker,
            Some(t2i_worker::events::SafetyChecker::NotRun),
            "{}",
            e.kind
        );
    }
    let last = events
        .iter()
        .filter_map(|e| e.data.progress.as_ref())
        .map(|p| (p.step, p.total))
        .max();
    assert_eq!(last, Some((3, 3)), "2 PNDM steps are 3 UNet evaluations");
    drop(sd);
    world.delete_pools(&["sd15-tiny"]).await;
    world.cleanup().await;
}
