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

pub(crate) fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A child process killed when dropped.
pub(crate) struct Proc(Child);

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
        // Recorded as queued before it was published: never a 404 on the way.
        assert_eq!(r.status(), 200);
        let v = json(r).await;
        if v["status"] == "succeeded" {
            break v;
        }
        assert!(
            ["queued", "running"].contains(&v["status"].as_str().unwrap()),
            "{v}"
        );
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
    // Requests by route template (never the raw id) and status, with latency.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "t2i_http_requests_total{method=\"POST\",route=\"/generate-image\",status=\"401\"} 2",
        "t2i_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"413\"} 1",
        "t2i_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"404\"}",
        "t2i_http_request_duration_seconds_count{method=\"POST\",route=\"/generate-image\"}",
        "t2i_ready 1",
        "t2i_build_info{version=",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(!metrics.contains("never-submitted"), "{metrics}");
    drop(worker);
    world.cleanup().await;
}

/// A TCP listener on loopback that answers each request with `answer(request line)` and records
/// the request lines (one request per connection).
struct Listener {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

type Answer = std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>;

impl Listener {
    /// Listens on 127.0.0.1 and, where the host has IPv6, on [::1] with the same port.
    async fn start(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        let answer: Answer = std::sync::Arc::new(answer);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = tokio::net::TcpListener::bind(("::1", port)).await.ok();
        for l in std::iter::once(v4).chain(v6) {
            let (seen, answer) = (seen.clone(), answer.clone());
            tokio::spawn(async move {
                while let Ok((conn, _)) = l.accept().await {
                    let (seen, answer) = (seen.clone(), answer.clone());
                    tokio::spawn(Self::serve(conn, seen, answer));
                }
            });
        }
        Self { port, seen }
    }

    async fn serve(
        mut conn: tokio::net::TcpStream,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        answer: Answer,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(i + 4);
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end.unwrap_or(buf.len())]).to_string();
        let line = head.lines().next().unwrap_or("(nothing sent)").to_string();
        seen.lock().unwrap().push(line.clone());
        let Some(head_end) = head_end else { return };
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = conn.write_all(answer(&line).as_bytes()).await;
        let _ = conn.shutdown().await;
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn http_answer(status: &str, headers: &[(&str, &str)]) -> String {
    let mut s = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s + "\r\n"
}

/// Names other than `localhost` that this host resolves to 127.0.0.1 only (from /etc/hosts), so a
/// name that resolves to loopback is tested as a name, not caught by the `localhost` rule.
fn loopback_names() -> Vec<String> {
    use std::net::ToSocketAddrs;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut names: Vec<String> = hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip: std::net::IpAddr = words.next()?.parse().ok()?;
            ip.is_loopback()
                .then(|| words.map(str::to_lowercase).collect::<Vec<_>>())
        })
        .flatten()
        .filter(|n| n != "localhost" && !n.ends_with(".localhost"))
        .filter(|n| {
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .filter(|n| {
            (n.as_str(), 0).to_socket_addrs().is_ok_and(|addrs| {
                let addrs: Vec<_> = addrs.collect();
                !addrs.is_empty()
                    && addrs.iter().all(|a| a.ip().is_loopback())
                    && addrs
                        .iter()
                        .any(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST)
            })
        })
        .collect();
    names.dedup();
    names.truncate(2);
    names
}

/// Publishes a `job.succeeded` event whose job names `url` as its webhook (no worker needed: the
/// relay reads nothing else).
async fn publish_hook_event(world: &World, job_id: &str, url: &str) {
    use t2i_worker::events::{CloudEvent, EventData, EventKind};
    let data: EventData = serde_json::from_value(json!({
        "job_id": job_id, "status": "succeeded", "attempt": 1, "worker": "guard-test",
        "model": "none", "params": {"webhook": {"url": url}},
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
async fn drain_webhook_dead_letters(world: &World) -> Vec<(String, String)> {
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

async fn delete_webhook_queues(world: &World, retry_levels: usize) {
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
fn spawn_relay(world: &World, args: &[String], env: &[(&str, String)], log: &Path) -> Proc {
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

const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// An allowed receiver on loopback: `/ok` answers 200, `/redirect/{i}` redirects (307) to
/// `redirects[i]`, anything else 404.
async fn redirecting_receiver(redirects: Vec<String>) -> Listener {
    Listener::start(move |line| {
        let path = line.split_whitespace().nth(1).unwrap_or("");
        if path == "/ok" {
            return http_answer("200 OK", &[]);
        }
        match path
            .strip_prefix("/redirect/")
            .and_then(|i| redirects.get(i.parse::<usize>().ok()?))
        {
            Some(to) => http_answer("307 Temporary Redirect", &[("location", to)]),
            None => http_answer("404 Not Found", &[]),
        }
    })
    .await
}

/// Starts the relay with `extra` flags and `env`, retrying once after 1 s, and waits until ready.
async fn start_guard_relay(
    world: &World,
    allowed: &[String],
    extra: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> Proc {
    let relay_http = free_port();
    let mut args: Vec<String> = vec![
        "--secret".into(),
        SECRET.into(),
        "--allow-http".into(),
        "--webhook-retry-delays".into(),
        "1".into(),
        "--timeout-s".into(),
        "3".into(),
        "--http-addr".into(),
        format!("127.0.0.1:{relay_http}"),
    ];
    for a in allowed {
        args.extend(["--allow-host".into(), a.clone()]);
    }
    args.extend(extra.iter().cloned());
    let relay = spawn_relay(world, &args, env, log);
    wait_http_ok(
        &format!("http://127.0.0.1:{relay_http}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    relay
}

/// Publishes one event per URL, then waits until `dead` deliveries are dead-lettered (and 2 s
/// more, for anything that should not happen) and returns them.
async fn relay_all(world: &World, urls: &[&String], dead: usize) -> Vec<(String, String)> {
    for (i, url) in urls.iter().enumerate() {
        publish_hook_event(world, &format!("guard{i}"), url).await;
    }
    let dead_q = world.topology.webhooks_dead_queue();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && (world.message_count(&dead_q).await as usize) < dead {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drain_webhook_dead_letters(world).await
}

/// The proxy variables of a relay's environment, all naming `proxy`.
fn proxy_env(proxy: &str) -> Vec<(&'static str, String)> {
    PROXY_VARS[..6]
        .iter()
        .map(|v| (*v, proxy.to_string()))
        .collect()
}

/// The SSRF guard against every forbidden form, through the real relay: a listener on loopback
/// (127.0.0.1 and ::1, one port) must see no connection at all, whether the URL names it directly
/// (decimal, octal, hex and short IPv4, IPv4-mapped and -compatible IPv6, 0.0.0.0, `localhost` in
/// several spellings, another name that resolves to loopback, an allowed host on another port) or
/// an allowed receiver redirects to it, and while `HTTP(S)_PROXY`/`ALL_PROXY` in the relay's
/// environment name that listener as the proxy. Each refused URL is dead-lettered as refused, and
/// an allowed receiver still gets its deliveries, directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_guard_reaches_no_loopback_listener() {
    let _g = serial().await;
    let world = World::new("guard").await;
    let dir = tempfile::tempdir().unwrap();
    let trap = Listener::start(|_| http_answer("200 OK", &[])).await;
    let t = trap.port;
    let names = loopback_names();
    if names.is_empty() {
        eprintln!("no loopback name besides localhost in /etc/hosts: only localhost is tested");
    }

    // Where the allowed receiver redirects /redirect/{i} to; the last one is allowed.
    let mut redirects = vec![
        format!("http://127.0.0.1:{t}/stolen"),
        format!("http://localhost:{t}/stolen"),
        format!("http://2130706433:{t}/stolen"),
        format!("http://[::ffff:127.0.0.1]:{t}/stolen"),
        format!("http://[::1]:{t}/stolen"),
    ];
    redirects.extend(names.iter().map(|n| format!("http://{n}:{t}/stolen")));
    let refused_redirects = redirects.len();
    let receiver = {
        // The receiver's port is only known once it listens: /redirect/{last} reads it here.
        let port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
        let p = port.clone();
        let mut redirects = redirects.clone();
        redirects.push(String::new());
        let last = redirects.len() - 1;
        let r = Listener::start(move |line| {
            let path = line.split_whitespace().nth(1).unwrap_or("");
            match path
                .strip_prefix("/redirect/")
                .and_then(|i| i.parse::<usize>().ok())
            {
                Some(i) if i == last => http_answer(
                    "307 Temporary Redirect",
                    &[(
                        "location",
                        &format!("http://127.0.0.1:{}/ok", p.get().unwrap()),
                    )],
                ),
                Some(i) if i < last => {
                    http_answer("307 Temporary Redirect", &[("location", &redirects[i])])
                }
                _ if path == "/ok" => http_answer("200 OK", &[]),
                _ => http_answer("404 Not Found", &[]),
            }
        })
        .await;
        port.set(r.port).unwrap();
        r
    };
    let r = receiver.port;

    let mut allowed = vec![format!("127.0.0.1:{r}"), format!("localhost:{r}")];
    allowed.extend(names.iter().map(|n| format!("{n}:{r}")));
    let _relay = start_guard_relay(
        &world,
        &allowed,
        &[],
        &proxy_env(&format!("http://127.0.0.1:{t}")),
        &dir.path().join("relay.log"),
    )
    .await;

    let mut forbidden = vec![
        format!("http://127.0.0.1:{t}/plain"),
        format!("http://2130706433:{t}/decimal"),
        format!("http://0177.0.0.1:{t}/octal"),
        format!("http://0x7f.0.0.1:{t}/hex"),
        format!("http://127.1:{t}/short"),
        format!("http://0.0.0.0:{t}/unspecified"),
        format!("http://0:{t}/zero"),
        format!("http://[::1]:{t}/v6-loopback"),
        format!("http://[::ffff:127.0.0.1]:{t}/v4-mapped"),
        format!("http://[::127.0.0.1]:{t}/v4-compatible"),
        format!("http://localhost:{t}/localhost"),
        format!("http://LocalHost.:{t}/localhost-dot"),
        format!("http://hooks.localhost:{t}/sub-localhost"),
    ];
    forbidden.extend(names.iter().map(|n| format!("http://{n}:{t}/name")));
    forbidden.extend((0..refused_redirects).map(|i| format!("http://127.0.0.1:{r}/redirect/{i}")));
    // The allowed host by name, redirecting to itself on the listener's port.
    forbidden.push(format!("http://localhost:{r}/redirect/1"));
    for (i, n) in names.iter().enumerate() {
        forbidden.push(format!("http://{n}:{r}/redirect/{}", 5 + i));
    }
    let delivered = [
        format!("http://127.0.0.1:{r}/ok"),
        format!("http://localhost:{r}/redirect/{refused_redirects}"),
    ];
    // Public, so allowed, but unresolvable here: it fails (and is dead-lettered after one retry)
    // without reaching anything, unless the relay hands it to HTTPS_PROXY.
    let unresolvable = "https://receiver.example/hook".to_string();

    let urls: Vec<&String> = forbidden
        .iter()
        .chain(&delivered)
        .chain(std::iter::once(&unresolvable))
        .collect();
    let dead = relay_all(&world, &urls, forbidden.len() + 1).await;
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
    assert!(
        trap.seen().is_empty(),
        "the loopback listener was reached: {:#?}\nrelay log:\n{log}",
        trap.seen()
    );
    for url in &forbidden {
        let (_, why) = dead
            .iter()
            .find(|(t, _)| t == url)
            .unwrap_or_else(|| panic!("{url} not dead-lettered: {dead:#?}\nrelay log:\n{log}"));
        assert!(why.contains("refused"), "{url}: {why}");
    }
    let (_, why) = dead
        .iter()
        .find(|(t, _)| *t == unresolvable)
        .unwrap_or_else(|| panic!("{unresolvable} not dead-lettered: {dead:#?}"));
    assert!(!why.contains("refused"), "{why}");
    assert_eq!(dead.len(), forbidden.len() + 1, "{dead:#?}");
    // The allowed receiver: /ok twice (directly and through the allowed redirect), each redirect
    // asked for once, nothing else.
    let seen = receiver.seen();
    let oks = seen.iter().filter(|l| l.starts_with("POST /ok ")).count();
    assert_eq!(oks, 2, "{seen:#?}\nrelay log:\n{log}");
    let redirects_asked = urls.iter().filter(|u| u.contains("/redirect/")).count();
    assert_eq!(seen.len(), 2 + redirects_asked, "{seen:#?}");
    assert!(
        seen.iter()
            .all(|l| l.starts_with("POST /ok ") || l.starts_with("POST /redirect/")),
        "{seen:#?}"
    );
    assert!(log.contains("ignores proxy variables"), "{log}");
    delete_webhook_queues(&world, 1).await;
    world.cleanup().await;
}

/// `--egress-proxy`: every delivery but those to allowed receivers goes to the proxy (CONNECT for
/// https, absolute-form requests for http, redirects included), named here by `localhost`; the
/// guard still refuses forbidden literal addresses, localhost names and redirects before anything
/// is sent; `HTTPS_PROXY` (a loopback trap) is not used. What the relay does not guard in this
/// mode, and the proxy must: a name that resolves to an internal address at the proxy (here a
/// loopback name from /etc/hosts, handed to the proxy as it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_egress_proxy_carries_all_but_allowed_receivers() {
    let _g = serial().await;
    let world = World::new("egress").await;
    let dir = tempfile::tempdir().unwrap();
    let trap = Listener::start(|_| http_answer("200 OK", &[])).await;
    let t = trap.port;
    // A proxy that denies everything, as an egress proxy does for destinations it refuses.
    let proxy = Listener::start(|_| http_answer("403 Forbidden", &[])).await;
    let receiver = redirecting_receiver(vec![
        format!("http://127.0.0.1:{t}/stolen"),
        "http://receiver.example/redirected".into(),
    ])
    .await;
    let r = receiver.port;
    let names = loopback_names();
    let _relay = start_guard_relay(
        &world,
        &[format!("127.0.0.1:{r}")],
        &[
            "--egress-proxy".into(),
            format!("http://localhost:{}", proxy.port),
        ],
        &proxy_env(&format!("http://127.0.0.1:{t}")),
        &dir.path().join("relay.log"),
    )
    .await;

    let forbidden = [
        format!("http://127.0.0.1:{t}/plain"),
        format!("http://2130706433:{t}/decimal"),
        format!("http://[::ffff:127.0.0.1]:{t}/v4-mapped"),
        format!("http://localhost:{t}/localhost"),
        format!("http://127.0.0.1:{r}/redirect/0"),
    ];
    let connect = "https://receiver.example/hook".to_string();
    let redirected = format!("http://127.0.0.1:{r}/redirect/1");
    let handed: Vec<String> = names
        .iter()
        .map(|n| format!("http://{n}:{t}/name"))
        .collect();
    let ok = format!("http://127.0.0.1:{r}/ok");
    let urls: Vec<&String> = forbidden
        .iter()
        .chain([&connect, &redirected, &ok])
        .chain(&handed)
        .collect();
    // The https one fails twice at the proxy (CONNECT refused, retried once); the others answer
    // 403 through it (permanent).
    let expected_dead = forbidden.len() + 2 + handed.len();
    let dead = relay_all(&world, &urls, expected_dead).await;
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
    assert!(
        trap.seen().is_empty(),
        "the loopback listener was reached: {:#?}\nrelay log:\n{log}",
        trap.seen()
    );
    for url in &forbidden {
        let (_, why) = dead
            .iter()
            .find(|(t, _)| t == url)
            .unwrap_or_else(|| panic!("{url} not dead-lettered: {dead:#?}\nrelay log:\n{log}"));
        assert!(why.contains("refused"), "{url}: {why}");
    }
    assert_eq!(dead.len(), expected_dead, "{dead:#?}\nrelay log:\n{log}");
    let mut proxied = proxy.seen();
    proxied.sort();
    let mut expected = vec![
        "CONNECT receiver.example:443 HTTP/1.1".to_string(),
        "CONNECT receiver.example:443 HTTP/1.1".to_string(),
        "POST http://receiver.example/redirected HTTP/1.1".to_string(),
    ];
    expected.extend(
        names
            .iter()
            .map(|n| format!("POST http://{n}:{t}/name HTTP/1.1")),
    );
    expected.sort();
    assert_eq!(proxied, expected, "relay log:\n{log}");
    let mut direct = receiver.seen();
    direct.sort();
    assert_eq!(
        direct,
        [
            "POST /ok HTTP/1.1",
            "POST /redirect/0 HTTP/1.1",
            "POST /redirect/1 HTTP/1.1"
        ]
    );
    assert!(!log.contains("ignores proxy variables"), "{log}");
    delete_webhook_queues(&world, 1).await;
    world.cleanup().await;
}
