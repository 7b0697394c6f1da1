//! `t2i webhooks` through the real binary, with a real worker, RabbitMQ and
//! Garage. The webhook receiver is Python with the official `standardwebhooks` and `cloudevents`
//! packages (from scripts/requirements-test.txt; `PYTHON` names the interpreter, as scripts/test.sh
//! sets it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use serde_json::{Value, json};
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, amqp_url, serial};

pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The relay's `--url-key` for ad-hoc URLs (another key than any receiver's secret).
pub(crate) const URL_KEY: &str = "whsec_dXJsLWtleS1mb3ItYWQtaG9jLXJlY2VpdmVycw==";
/// The worker's `--event-source` in the webhook test.
const EVENT_SOURCE: &str = "https://t2i.example.com/it/hooks";

pub(crate) fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A child process killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn spawn_t2i(world: &World, args: &[String], log: &Path) -> Proc {
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

/// `t2i gateway` on a free port against `world`'s store, with `extra` flags, once it answers
/// `/readyz`: the process and its base URL. Its log goes to `log`.
pub(crate) async fn spawn_gateway(world: &World, extra: &[&str], log: &Path) -> (Proc, String) {
    let port = free_port();
    let mut args: Vec<String> = vec![
        "gateway".into(),
        "--addr".into(),
        format!("127.0.0.1:{port}"),
        "--storage".into(),
        world.storage(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let proc = spawn_t2i(world, &args, log);
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(30)).await;
    (proc, base)
}

pub(crate) async fn wait_http_ok(url: &str, timeout: Duration) {
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

pub(crate) async fn json(r: reqwest::Response) -> Value {
    let status = r.status();
    let body = r.bytes().await.unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "HTTP {status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })
}

pub(crate) fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Starts tests/support/webhook_receiver.py (verifying with [`SECRET`], failing each event's
/// first `fail_first` deliveries to /hook, checking `checks`' secrets too): the process and its
/// main and other ports.
pub(crate) fn start_receiver(
    log: &Path,
    fail_first: u32,
    checks: Option<&Path>,
) -> (Proc, u16, u16) {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/webhook_receiver.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .args([SECRET, log.to_str().unwrap(), &fail_first.to_string()]);
    if let Some(c) = checks {
        cmd.arg(c);
    }
    let mut receiver = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("python for the webhook receiver (set PYTHON)");
    let mut line = String::new();
    BufReader::new(receiver.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let receiver = Proc(receiver);
    let ports: Vec<u16> = line
        .strip_prefix("PORTS ")
        .unwrap_or_else(|| {
            panic!("receiver did not start: {line:?} (is standardwebhooks installed?)")
        })
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    (receiver, ports[0], ports[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_guarded() {
    let _g = serial().await;
    let world = World::new("hooks").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("received.jsonl");
    let (_receiver, main, other) = start_receiver(&log, 2, None);
    // /hook is a configured receiver with its own secret; every other URL is ad hoc (per-URL
    // secrets from the URL key), so the guard sees it.
    let receivers = dir.path().join("receivers.toml");
    std::fs::write(
        &receivers,
        format!(
            "[[receiver]]\nid = \"hook\"\nurl = \"http://127.0.0.1:{main}/hook\"\nsecrets = [\"{SECRET}\"]\n"
        ),
    )
    .unwrap();

    let relay_http = free_port();
    let _relay = spawn_t2i(
        &world,
        &[
            "webhooks".into(),
            "--receivers".into(),
            receivers.display().to_string(),
            "--url-key".into(),
            URL_KEY.into(),
            "--state".into(),
            dir.path().join("state").display().to_string(),
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
    // ... and so is the event that got the 410, which disabled that (ad-hoc) receiver.
    assert_eq!(reasons.len(), refused.len() + 1, "{reasons:#?}");
    let gone = format!("http://127.0.0.1:{main}/gone");
    assert!(
        reasons
            .iter()
            .any(|(t, why)| *t == gone && why.contains("410")),
        "{reasons:#?}"
    );
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

/// Publishes a `job.succeeded` event of a job whose `webhook` is `webhook`.
pub(crate) async fn publish_webhook_event(world: &World, job_id: &str, webhook: Value) {
    use t2i_worker::events::{CloudEvent, EventData, EventKind};
    let data: EventData = serde_json::from_value(json!({
        "job_id": job_id, "status": "succeeded", "attempt": 1, "worker": "guard-test",
        "model": "none", "params": {"webhook": webhook},
    }))
    .unwrap();
    let event = CloudEvent::new(
        EventKind::Succeeded,
        "guard-test",
        data,
        time::OffsetDateTime::now_utc(),
    );
    world
        .publisher
        .event(&event, EventKind::Succeeded)
        .await
        .expect("event published");
}

/// Every dead-lettered delivery of `world`'s relay: (target, reason).
pub(crate) async fn drain_webhook_dead_letters(world: &World) -> Vec<(String, String)> {
    let ch = world.conn.raw().create_channel().await.unwrap();
    let dead_q = world.topology.webhooks_dead_queue();
    let mut out = Vec::new();
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
        out.push((get("x-t2i-webhook-target"), get("x-t2i-webhook-error")));
    }
    out
}

pub(crate) async fn delete_webhook_queues(world: &World, retry_levels: usize) {
    let ch = world.conn.raw().create_channel().await.unwrap();
    let t = &world.topology;
    let mut queues = vec![t.webhooks_queue(), t.webhooks_dead_queue()];
    queues.extend((0..retry_levels).map(|l| t.webhooks_retry_queue(l)));
    for q in queues {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
}

/// `t2i webhooks` with extra environment variables, the proxy variables of the test's own
/// environment removed.
pub(crate) fn spawn_relay(
    world: &World,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_t2i"));
    cmd.arg("webhooks")
        .args(args)
        .args(["--amqp-url", &amqp_url(), "--amqp-prefix", &world.prefix])
        .args(["--retry-delays", "1,2,4,8"])
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("T2I_LOG", "info");
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    Proc(
        cmd.stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

pub(crate) const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];
