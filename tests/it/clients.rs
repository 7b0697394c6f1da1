//! `t2i enqueue` through the real binary, against the real RabbitMQ, Garage and a real worker.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use t2i_worker::events::CloudEvent;

use crate::broker::{WorkerProc, World, amqp_url, bucket, s3, serial};

fn enqueue_cmd<S: AsRef<std::ffi::OsStr>>(world: &World, extra: &[S]) -> Command {
    // T2I_TEST_BIN: measure a release build (see the README's performance section).
    let bin = std::env::var("T2I_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_t2i").into());
    let mut cmd = Command::new(bin);
    cmd.arg("enqueue")
        .args(["--amqp-url", &amqp_url(), "--amqp-prefix", &world.prefix])
        .args(["--storage", &world.storage(), "--quiet"])
        .args(["--retry-delays", "1,2,4,8", "--min-side", "32"])
        .args(extra)
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// 500 prompts from a template over 25 × 20 values, tiny images.
fn template_args() -> Vec<String> {
    let animals: Vec<String> = (0..25).map(|i| format!("animal{i}")).collect();
    let styles: Vec<String> = (0..20).map(|i| format!("style{i}")).collect();
    [
        "--template",
        "a {animal} painted in {style}",
        "--var",
        &format!("animal={}", animals.join(",")),
        "--var",
        &format!("style={}", styles.join(",")),
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "--guidance-scale",
        "0",
        "--seed-strategy",
        "random",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn list_keys(prefix: &str) -> Vec<String> {
    let client = s3().await;
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let out = client
            .list_objects_v2()
            .bucket(bucket())
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from)),
        );
        match out.next_continuation_token() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    keys
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The issue's bulk scenario: a 500-item templated run is interrupted, then the same command is run
/// again with `--wait`: it skips what finished, completes the rest, and its manifest matches the
/// stored objects one to one (no duplicates, every image downloaded and verified).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_template_run_resumes_after_interruption_and_manifest_matches_storage() {
    let _g = serial().await;
    let mut world = World::new("bulk").await;
    let worker = WorkerProc::spawn(
        &world,
        "w1",
        &["--max-batch", "32", "--batch-window-ms", "20"],
    );
    let args = template_args();
    let dry = enqueue_cmd(&world, &args)
        .arg("--dry-run")
        .output()
        .unwrap();
    assert!(dry.status.success(), "{}", stderr(&dry));
    let planned: Vec<serde_json::Value> = String::from_utf8_lossy(&dry.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(planned.len(), 500);
    let batch_id = planned[0]["batch"]["id"].as_str().unwrap().to_string();
    let ids: HashSet<String> = planned
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 500);

    // First run: interrupted (SIGKILL) once some jobs are done and others are still queued.
    let mut first = enqueue_cmd(&world, &args)
        .arg("--wait")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let some_done = |seen: &[CloudEvent]| {
        seen.iter()
            .filter(|e| e.kind == "t2i.job.succeeded" && ids.contains(&e.subject))
            .count()
            >= 60
    };
    assert!(
        world
            .collect_until(Duration::from_secs(120), some_done)
            .await
    );
    first.kill().unwrap();
    let _ = first.wait();

    // The same command again, waiting, with a manifest, downloads and WebDataset shards.
    let dir = tempfile::tempdir().unwrap();
    let manifest_dir = dir.path().join("dataset");
    let wds_dir = dir.path().join("wds");
    let second = enqueue_cmd(&world, &args)
        .args([
            "--wait",
            "--wait-timeout-s",
            "300",
            "--download",
            "--shard-size",
            "128",
        ])
        .arg("--manifest")
        .arg(&manifest_dir)
        .arg("--webdataset")
        .arg(&wds_dir)
        .output()
        .unwrap();
    let err = stderr(&second);
    assert!(second.status.success(), "{err}");
    println!("bulk rerun: {}", err.trim());
    let already: usize = err
        .split("; ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'already done' count in: {err}"));
    assert!(
        (60..500).contains(&already),
        "the rerun should skip what finished: {err}"
    );
    // The first run had published every job: none is published twice, however many were queued.
    assert!(
        err.contains("published 0 job(s)"),
        "queued jobs must not be republished: {err}"
    );

    // The manifest: one line per job, each file present and matching its sha256.
    let text = std::fs::read_to_string(manifest_dir.join("metadata.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 500);
    let mut keys_in_manifest = HashSet::new();
    let mut seeds = HashSet::new();
    for r in &rows {
        assert!(ids.contains(r["job_id"].as_str().unwrap()));
        let file = manifest_dir.join(r["file_name"].as_str().unwrap());
        assert_eq!(sha256_file(&file), r["sha256"].as_str().unwrap());
        assert_eq!(r["width"], 32);
        assert_eq!(r["steps"], 1);
        assert!(r["prompt"].as_str().unwrap().starts_with("a animal"));
        assert_eq!(r["text"], r["prompt"], "the caption column diffusers reads");
        let key = r["key"].as_str().unwrap();
        assert_eq!(r["location"], format!("s3://{}/{key}", bucket()));
        assert!(r.get("url").is_none(), "no expiring URL in a data set: {r}");
        assert!(
            r["file_name"]
                .as_str()
                .unwrap()
                .starts_with("images/00000/")
        );
        assert!(keys_in_manifest.insert(r["key"].as_str().unwrap().to_string()));
        seeds.insert(r["seed"].as_u64().unwrap());
    }
    assert_eq!(seeds.len(), 500, "every image its own recorded seed");

    // Storage holds exactly those images (plus one result.json per job), nothing twice.
    let prefix = format!("{}/datasets/{batch_id}/", world.prefix);
    let stored = list_keys(&prefix).await;
    let images: HashSet<String> = stored
        .iter()
        .filter(|k| k.ends_with(".png"))
        .cloned()
        .collect();
    let results = stored.iter().filter(|k| k.ends_with("result.json")).count();
    let running = stored.iter().filter(|k| k.ends_with("status.json")).count();
    assert_eq!(images, keys_in_manifest);
    assert_eq!(results, 500);
    assert_eq!(running, 500, "one running record per job");
    assert!(stored.contains(&format!("{prefix}batch.json")));
    assert_eq!(stored.len(), 1501, "{:?}", &stored[..5]);

    // The batch as an object: its status from the store alone.
    let status = Command::new(env!("CARGO_BIN_EXE_t2i"))
        .args([
            "batch",
            "status",
            &batch_id,
            "--json",
            "--storage",
            &world.storage(),
        ])
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", stderr(&status));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["counts"]["done"], 500, "{v}");
    assert_eq!(v["counts"]["pending"], 0, "{v}");
    assert_eq!(v["counts"]["total"], 500, "{v}");
    assert_eq!(v["published"], 500, "{v}");

    // What training code reads: Hugging Face `datasets` ImageFolder and the `webdataset` package.
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let check = r#"
import sys, datasets, webdataset
ds = datasets.load_dataset("imagefolder", data_dir=sys.argv[1], split="train")
assert len(ds) == 500, len(ds)
assert ds[0]["image"].size == (32, 32), ds[0]["image"].size
assert ds[0]["text"].startswith("a animal"), ds[0]["text"]
shards = sorted(f"{sys.argv[2]}/shard-{n:05d}.tar" for n in range(4))
samples = list(webdataset.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("png", "json"))
assert len(samples) == 500, len(samples)
assert samples[0][0].size == (32, 32) and "seed" in samples[0][1]
print("python ok", len(ds), len(samples))
"#;
    let py = Command::new(&python)
        .args(["-c", check])
        .arg(&manifest_dir)
        .arg(&wds_dir)
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path().join("hf"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&py.stdout),
        stderr(&py)
    );

    // Something to look at: an X/Y plot over the template's variables, bounded by --max.
    let sheet_dir = dir.path().join("sheet");
    let sheet = Command::new(env!("CARGO_BIN_EXE_t2i"))
        .args([
            "batch",
            "contact-sheet",
            &batch_id,
            "--storage",
            &world.storage(),
        ])
        .args([
            "--max", "16", "--thumb", "32", "--x", "style", "--y", "animal",
        ])
        .arg("--out")
        .arg(&sheet_dir)
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(sheet.status.success(), "{}", stderr(&sheet));
    let png = image::open(sheet_dir.join("contact-sheet.png")).unwrap();
    // 4 x 4 cells of 32 px with 4 px gaps.
    assert_eq!((png.width(), png.height()), (148, 148));
    let html = std::fs::read_to_string(sheet_dir.join("index.html")).unwrap();
    for label in [
        "animal ↓ / style →",
        "<th>style3</th>",
        "<th>animal3</th>",
        "seed ",
    ] {
        assert!(html.contains(label), "{label} missing from index.html");
    }
    assert!(!html.contains("<th>style4</th>"), "bounded by --max");
    assert_eq!(
        std::fs::read_dir(sheet_dir.join("thumbs")).unwrap().count(),
        16
    );

    // WebDataset: 4 shards of up to 128 samples, two files each.
    let mut shard_entries: HashMap<String, usize> = HashMap::new();
    for n in 0..4 {
        let f = std::fs::File::open(wds_dir.join(format!("shard-{n:05}.tar"))).unwrap();
        for entry in tar::Archive::new(f).entries().unwrap() {
            let path = entry
                .unwrap()
                .path()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let ext = path.rsplit('.').next().unwrap().to_string();
            *shard_entries.entry(ext).or_default() += 1;
        }
    }
    assert_eq!(shard_entries["png"], 500);
    assert_eq!(shard_entries["json"], 500);
    assert!(!wds_dir.join("shard-00004.tar").exists());

    drop(worker);
    world.cleanup().await;
}

/// Invalid rows are all reported with file, line and reason, and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rows_are_reported_before_anything_is_published() {
    let _g = serial().await;
    let world = World::new("rows").await;
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("jobs.jsonl");
    std::fs::write(
        &jsonl,
        [
            r#"{"prompt": "fine"}"#,
            r#"{"prompt": "bad width", "width": 1001}"#,
            r#"not json"#,
            r#"{"prompt": "typo", "stpes": 4}"#,
            r#"{"prompt": "fine too", "steps": 4}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = enqueue_cmd::<&str>(&world, &[])
        .arg("--input")
        .arg(&jsonl)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    for (line, what) in [(2, "width"), (3, "not JSON"), (4, "stpes")] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("jobs.jsonl:{line}:")) && l.contains(what)),
            "line {line} ({what}) not reported: {err}"
        );
    }
    assert!(
        err.contains("3 invalid item(s); nothing was published"),
        "{err}"
    );
    assert_eq!(
        world
            .message_count(&world.topology.queue(t2i_worker::queue::Lane::Bulk))
            .await,
        0
    );

    // CSV: a misspelt column is named with its position.
    let csv = dir.path().join("jobs.csv");
    std::fs::write(&csv, "prompt,widht\na cat,512\n").unwrap();
    let out = enqueue_cmd::<&str>(&world, &[])
        .arg("--input")
        .arg(&csv)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("jobs.csv:1 column 2: unknown column `widht`"),
        "{}",
        stderr(&out)
    );
    world.cleanup().await;
}

/// Publishing rate with confirms (no worker: the jobs stay queued). Prints jobs/s; every job must
/// be in the queue afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_publishes_a_large_set_with_confirms() {
    let _g = serial().await;
    let n: usize = std::env::var("T2I_ENQUEUE_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let world = World::new("rate").await;
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    let text: String = (0..n).map(|i| format!("prompt number {i}\n")).collect();
    std::fs::write(&prompts, text).unwrap();
    let start = Instant::now();
    let out = enqueue_cmd(&world, &["--no-skip", "--steps", "4"])
        .arg("--input")
        .arg(&prompts)
        .output()
        .unwrap();
    let wall = start.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    println!(
        "enqueue: {n} jobs, process wall {:.2}s; {}",
        wall.as_secs_f64(),
        stderr(&out).trim()
    );
    let queued = world
        .message_count(&world.topology.queue(t2i_worker::queue::Lane::Bulk))
        .await;
    assert_eq!(queued as usize, n);
    world.cleanup().await;
}

/// `t2i batch watch` on a batch published without `--wait`: it follows the events, loses them when
/// the broker restarts mid-batch, reconnects, lists the store again and ends with every job counted
/// once. Nothing is published by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_watch_survives_a_broker_restart_and_counts_every_job_once() {
    let _g = serial().await;
    let mut world = World::new("watch").await;
    let out = enqueue_cmd(
        &world,
        &[
            "--template",
            "a {animal}",
            "--var",
            "animal=cat,dog,fox,owl,elk,yak,emu,ant,bee,cod,eel,gnu",
            "--images-per-prompt",
            "2",
            "--batch-id",
            "watchme",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "8",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("watch.log");
    let mut watch = Command::new(env!("CARGO_BIN_EXE_t2i"))
        .args([
            "batch",
            "watch",
            "watchme",
            "--quiet",
            "--wait-timeout-s",
            "240",
        ])
        .args(["--storage", &world.storage()])
        .args(["--amqp-url", &amqp_url(), "--amqp-prefix", &world.prefix])
        .args(["--retry-delays", "1,2,4,8"])
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("T2I_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let worker = WorkerProc::spawn(&world, "w1", &["--max-batch", "2"]);
    let some_done = |seen: &[CloudEvent]| {
        seen.iter()
            .filter(|e| e.kind == "t2i.job.succeeded")
            .count()
            >= 3
    };
    assert!(
        world
            .collect_until(Duration::from_secs(120), some_done)
            .await
    );
    crate::broker::rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    crate::broker::rabbitmqctl(&["start_app"]);
    crate::broker::rabbitmqctl(&["await_startup"]);
    world.reconnect().await;
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "watch never ended: {}",
            worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(
        text.contains("lost the event stream"),
        "the restart must have cut the watch off: {text}"
    );
    assert!(
        text.contains("batch watchme: 24 job(s) ended (24 done, 0 failed)"),
        "{text}"
    );
    drop(worker);
    world.cleanup().await;
}
