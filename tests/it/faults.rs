//! `t2i worker` through failures, against the real RabbitMQ and Garage: a worker killed mid-batch,
//! a broker restart, a storage outage. Nothing is lost and nothing is done twice in the store.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use t2i_worker::events::CloudEvent;
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, garage, rabbitmqctl, s3, serial};
use crate::worker::{all_succeeded, all_terminal, job, succeeded, verify_stored};

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
