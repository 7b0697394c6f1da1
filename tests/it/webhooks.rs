//! `t2i webhooks` and `t2i gateway` through the real binaries, with a real worker, RabbitMQ and
//! Garage. The webhook receiver is Python with the official `standardwebhooks` and `cloudevents`
//! packages (from scripts/requirements-test.txt; `PYTHON` names the interpreter, as scripts/test.sh
//! sets it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, amqp_url, serial};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The worker's `--event-source` in the webhook test.
const EVENT_SOURCE: &str = "https://t2i.example.com/it/hooks";

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_t2i(world: &World, args: &[String], log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_t2i"))
            .args(args)
            .args(["--amqp-url", &amqp_url(), "--amqp-prefix", &world.prefix])
            .args(["--retry-delays", "1,2,4,8"])
            .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("T2I_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

async fn wait_http_ok(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(url).await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{url} never answered 200");
}

async fn json(r: reqwest::Response) -> Value {
    let status = r.status();
    let body = r.bytes().await.unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "HTTP {status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })
}

fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_guarded() {
    let _g = serial().await;
    let world = World::new("hooks").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("received.jsonl");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/webhook_receiver.py");
    let mut receiver = Command::new(python())
        .arg(&script)
        .args([SECRET, log.to_str().unwrap(), "2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python for the webhook receiver (set PYTHON)");
    let mut line = String::new();
    BufReader::new(receiver.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _receiver = Proc(receiver);
    let ports: Vec<u16> = line
        .strip_prefix("PORTS ")
        .unwrap_or_else(|| {
            panic!("receiver did not start: {line:?} (is standardwebhooks installed?)")
        })
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let (main, other) = (ports[0], ports[1]);

    let relay_http = free_port();
    let _relay = spawn_t2i(
        &world,
        &[
            "webhooks".into(),
            "--secret".into(),
            SECRET.into(),
            "--allow-http".into(),
            "--allow-host".into(),
            format!("127.0.0.1:{main}"),
            "--webhook-retry-delays".into(),
            "1,1,1".into(),
            "--http-addr".into(),
            format!("127.0.0.1:{relay_http}"),
        ],
        &dir.path().join("relay.log"),
    );
    wait_http_ok(
        &format!("http://127.0.0.1:{relay_http}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    let worker = WorkerProc::spawn(
        &world,
        "w1",
        &["--max-batch", "8", "--event-source", EVENT_SOURCE],
    );

    let hook = format!("http://127.0.0.1:{main}/hook");
    let mut jobs: Vec<(String, Value)> = (0..5)
        .map(|i| (format!("ok{i}"), json!({"url": hook})))
        .collect();
    jobs.push((
        "started".into(),
        json!({"url": hook, "events": ["job.started", "job.succeeded"]}),
    ));
    let refused = [
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://127.0.0.1:{other}/direct"),
        format!("http://127.0.0.1:{main}/redirect"),
        format!("http://localhost:{other}/resolved"),
        "https://10.0.0.1/private".to_string(),
    ];
    for (i, url) in refused.iter().enumerate() {
        jobs.push((format!("ssrf{i}"), json!({ "url": url })));
    }
    jobs.push((
        "gone".into(),
        json!({"url": format!("http://127.0.0.1:{main}/gone")}),
    ));
    for (id, webhook) in &jobs {
        let body = json!({"job_id": id, "prompt": "a cat", "width": 32, "height": 32, "steps": 1,
            "guidance_scale": 0.0, "webhook": webhook});
        world
            .publish(Lane::Interactive, id, body.to_string().as_bytes())
            .await;
    }

    // 7 events to /hook (5 terminal + started and succeeded of one job), each failing twice first.
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = |entries: &[Value]| {
        entries
            .iter()
            .filter(|e| e["path"] == "/hook" && e["status"] == 200)
            .count()
            >= 7
    };
    while !done(&read_log(&log)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Leave time for anything that should not happen (a retry after 410, a redirect followed).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let entries = read_log(&log);
    let hook_hits: Vec<&Value> = entries.iter().filter(|e| e["path"] == "/hook").collect();
    assert_eq!(hook_hits.len(), 21, "{entries:#?}");
    for e in &hook_hits {
        assert_eq!(e["verified"], true, "signature rejected: {e}");
    }
    // Every POST is a structured-mode CloudEvent that the CloudEvents SDK parses, from the
    // deployment's source, valid against the event schema, its data against the schema that its
    // `dataschema` names (resolved in a registry holding schemas/event.schema.json).
    let posts: Vec<&Value> = entries.iter().filter(|e| e["server"] == "main").collect();
    assert!(posts.len() > hook_hits.len(), "{entries:#?}");
    for e in &posts {
        assert_eq!(e["content_type"], "application/cloudevents+json", "{e}");
        assert_eq!(e["cloudevent"], true, "CloudEvents SDK: {e}");
        assert_eq!(e["data_valid"], true, "{e}");
        assert_eq!(e["source"], EVENT_SOURCE, "{e}");
    }
    let ids: std::collections::HashSet<&str> = hook_hits
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        7,
        "one webhook-id per event, kept across retries"
    );
    for id in &ids {
        let statuses: Vec<i64> = hook_hits
            .iter()
            .filter(|e| e["id"] == *id)
            .map(|e| e["status"].as_i64().unwrap())
            .collect();
        assert_eq!(statuses, [500, 500, 200], "{id}");
    }
    let started: Vec<&str> = hook_hits
        .iter()
        .filter(|e| e["subject"] == "started" && e["status"] == 200)
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(started.len(), 2);
    assert!(started.contains(&"t2i.job.started"));
    // SSRF: nothing reached the other port, the redirect was not followed, and 410 stopped retries.
    assert!(
        entries.iter().all(|e| e["server"] != "other"),
        "{entries:#?}"
    );
    assert_eq!(entries.iter().filter(|e| e["path"] == "/gone").count(), 1);
    assert_eq!(
        entries.iter().filter(|e| e["path"] == "/redirect").count(),
        1
    );

    // The refused deliveries are dead-lettered with the reason.
    let ch = world.conn.raw().create_channel().await.unwrap();
    let dead_q = format!("{}.webhooks.dead", world.prefix);
    let mut reasons = Vec::new();
    while let Some(m) = ch
        .basic_get(dead_q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let get = |k: &str| match headers.inner().get(k) {
            Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
            _ => String::new(),
        };
        reasons.push((get("x-t2i-webhook-target"), get("x-t2i-webhook-error")));
    }
    assert_eq!(reasons.len(), refused.len(), "{reasons:#?}");
    for url in &refused {
        let (_, why) = reasons
            .iter()
            .find(|(t, _)| t == url)
            .unwrap_or_else(|| panic!("{url} not dead-lettered: {reasons:#?}"));
        assert!(why.contains("refused"), "{url}: {why}");
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{relay_http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "outcome=\"delivered\"} 7",
        "outcome=\"refused\"} 5",
        "outcome=\"gone\"} 1",
        "outcome=\"retried\"} 14",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let _ = ch
        .queue_delete(dead_q.as_str().into(), Default::default())
        .await;
    drop(worker);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_generates_queues_and_reports_errors() {
    let _g = serial().await;
    let world = World::new("gateway").await;
    let public = crate::broker::public_garage_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _gateway = spawn_t2i(
        &world,
        &[
            "gateway".into(),
            "--addr".into(),
            format!("127.0.0.1:{port}"),
            "--storage".into(),
            world.storage(),
            "--auth-token".into(),
            "s3cret".into(),
            "--min-side".into(),
            "32".into(),
            "--s3-public-endpoint".into(),
            public.clone(),
        ],
        &dir.path().join("gateway.log"),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(30)).await;
    // As in docker/compose.yaml: the worker presigns for the name clients use, not its own.
    let worker = WorkerProc::spawn(&world, "w1", &["--s3-public-endpoint", &public]);
    let http = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>, token: Option<&str>| {
        let mut r = http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    // The Flask-demo shape: text in, a working image URL out.
    let r = post(
        "/generate-image",
        json!({"text": "a cat", "width": 32, "height": 32, "steps": 1})
            .to_string()
            .into_bytes(),
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = json(r).await;
    assert_eq!(v["status"], "succeeded");
    let url = v["image_url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{public}/")),
        "presigned for the public endpoint: {url}"
    );
    let png = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(
        hex::encode(Sha256::digest(&png)),
        v["images"][0]["sha256"].as_str().unwrap()
    );

    // POST /v1/jobs → 202, then GET /v1/jobs/{id} once stored.
    let r = post(
        "/v1/jobs",
        json!({"prompt": "a dog", "width": 32, "height": 32, "steps": 1})
            .to_string()
            .into_bytes(),
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let id = json(r).await["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let r = http
            .get(format!("{base}/v1/jobs/{id}"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break json(r).await;
        }
        assert_eq!(r.status(), 404);
        assert!(Instant::now() < deadline, "job {id} never finished");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["job_id"], id.as_str());

    // Structured 4xx.
    // (path, body, bearer token, expected status, expected error code)
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a str>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/generate-image",
            br#"{"text": "x"}"#.to_vec(),
            None,
            401,
            "unauthorized",
        ),
        (
            "/generate-image",
            br#"{"text": "x"}"#.to_vec(),
            Some("wrong"),
            401,
            "unauthorized",
        ),
        (
            "/generate-image",
            br#"{"text": "x", "width": 1001}"#.to_vec(),
            Some("s3cret"),
            422,
            "invalid_input",
        ),
        (
            "/generate-image",
            br#"{"prompt_typo": "x"}"#.to_vec(),
            Some("s3cret"),
            422,
            "invalid_input",
        ),
        (
            "/v1/jobs",
            br#"{"prompt": "x", "stpes": 3}"#.to_vec(),
            Some("s3cret"),
            422,
            "invalid_input",
        ),
        (
            "/v1/jobs",
            b"not json".to_vec(),
            Some("s3cret"),
            400,
            "invalid_json",
        ),
        (
            "/v1/jobs",
            vec![b' '; 70 * 1024],
            Some("s3cret"),
            413,
            "too_large",
        ),
    ];
    for (path, body, token, status, code) in cases {
        let r = post(path, body, token).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {code}");
        let v: Value = json(r).await;
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    let r = post(
        "/generate-image",
        br#"{"text": "x", "width": 1001}"#.to_vec(),
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(json(r).await["error"]["field"], "width");
    let r = http
        .get(format!("{base}/v1/jobs/never-submitted"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let spec = json(reqwest::get(format!("{base}/openapi.json")).await.unwrap()).await;
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["paths"]["/generate-image"]["post"].is_object());
    drop(worker);
    world.cleanup().await;
}
