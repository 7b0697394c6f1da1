//! Shared harness for tests against the real RabbitMQ (127.0.0.1:5672 or `T2I_AMQP_URL`) and Garage
//! (started idempotently through `scripts/garage.sh`): a unique name prefix per test, a `t2i worker`
//! child process on the tiny SSD-1B fixture, an event collector, and S3 checks.
//!
//! Tests that stop or restart shared servers run one at a time (`serial()`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use t2i_worker::events::CloudEvent;
use t2i_worker::queue::{Connection, Lane, Publisher, Topology};

use crate::support::model_dir;

/// An async mutex: each test has its own runtime, and the guard is held across awaits.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Broker/storage tests hold this for their whole run.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

pub fn amqp_url() -> String {
    std::env::var("T2I_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts Garage if needed and puts its client settings into this process's environment.
pub fn garage_env() -> Vec<(String, String)> {
    static ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let out = Command::new(repo().join("scripts/garage.sh"))
            .arg("start")
            .output()
            .expect("running scripts/garage.sh start");
        assert!(
            out.status.success(),
            "Garage did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vars: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &vars {
            // SAFETY-free: tests set process env once, before any S3 client is built.
            unsafe { std::env::set_var(k, v) };
        }
        vars
    })
    .clone()
}

pub fn garage(cmd: &str) {
    let ok = Command::new(repo().join("scripts/garage.sh"))
        .arg(cmd)
        .stdout(Stdio::null())
        .status()
        .expect("scripts/garage.sh")
        .success();
    assert!(ok, "garage.sh {cmd} failed");
}

pub fn rabbitmqctl(args: &[&str]) {
    let ok = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("rabbitmqctl")
        .success();
    assert!(ok, "rabbitmqctl {args:?} failed");
}

/// Garage's endpoint as clients outside "the cluster" would name it: `localhost` for `127.0.0.1`,
/// a host name the store is never reached at by the worker.
pub fn public_garage_endpoint() -> String {
    garage_env();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL from garage.sh");
    let public = endpoint.replace("//127.0.0.1:", "//localhost:");
    assert_ne!(public, endpoint, "Garage is expected on 127.0.0.1");
    public
}

pub fn bucket() -> String {
    std::env::var("T2I_TEST_BUCKET").unwrap_or_else(|_| "t2i".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One test's world: its own exchange/queue prefix and S3 prefix.
pub struct World {
    pub prefix: String,
    pub topology: Topology,
    pub env: Vec<(String, String)>,
    /// The test's own connection; `conn.raw()` for what tests do to the broker directly.
    pub conn: Connection,
    pub publisher: Publisher,
    events_queue: String,
    events: lapin::Consumer,
    pub seen: Vec<CloudEvent>,
}

impl World {
    pub async fn new(name: &str) -> Self {
        Self::with_retry_delays(name, &[1, 2, 4, 8]).await
    }

    /// A world whose retry queues wait `delays` seconds (the worker is started with the same).
    pub async fn with_retry_delays(name: &str, delays: &[u64]) -> Self {
        let env = garage_env();
        let prefix = format!(
            "t2it-{name}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let topology = Topology {
            prefix: prefix.clone(),
            delivery_limit: 5,
            retry_delays: delays.iter().map(|&s| Duration::from_secs(s)).collect(),
        };
        let conn = Connection::open(&amqp_url(), "t2i-tests")
            .await
            .expect("RabbitMQ is up");
        let publisher = conn.publisher(&topology).await.unwrap();
        conn.declare(&topology).await.unwrap();
        let events_queue = format!("{prefix}.test-events");
        let (events, _) = Self::bind_events(conn.raw(), &topology, &events_queue).await;
        Self {
            prefix,
            topology,
            env,
            conn,
            publisher,
            events_queue,
            events,
            seen: Vec::new(),
        }
    }

    /// A durable queue of every event (survives a broker restart).
    async fn bind_events(
        conn: &lapin::Connection,
        t: &Topology,
        queue: &str,
    ) -> (lapin::Consumer, lapin::Channel) {
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            queue.into(),
            t.events_exchange().as_str().into(),
            "job.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (consumer, ch)
    }

    /// Reconnects the test's own connection (after a broker restart).
    pub async fn reconnect(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let conn = loop {
            match Connection::open(&amqp_url(), "t2i-tests").await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => panic!("RabbitMQ did not come back: {e}"),
            }
        };
        self.publisher = conn.publisher(&self.topology).await.unwrap();
        let (events, _) = Self::bind_events(conn.raw(), &self.topology, &self.events_queue).await;
        self.events = events;
        self.conn = conn;
    }

    pub fn storage(&self) -> String {
        format!("s3://{}/{}/", bucket(), self.prefix)
    }

    pub async fn publish(&self, lane: Lane, job_id: &str, body: &[u8]) {
        self.publisher
            .job(&lane.into(), job_id, body, None)
            .await
            .expect("publish");
    }

    /// Publishes a raw body with an optional message id (malformed-message tests).
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        let mut props = lapin::BasicProperties::default().with_delivery_mode(2);
        if let Some(m) = message_id {
            props = props.with_message_id(m.into());
        }
        self.publisher
            .channel()
            .basic_publish(
                self.topology.jobs_exchange().as_str().into(),
                "interactive".into(),
                Default::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Collects events until `done` says so or `timeout` passes.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[CloudEvent]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, self.events.next()).await {
                Ok(Some(Ok(d))) => {
                    let _ = d.ack(BasicAckOptions::default()).await;
                    if let Ok(e) = serde_json::from_slice::<CloudEvent>(&d.data) {
                        self.seen.push(e);
                    }
                }
                Ok(Some(Err(_))) | Ok(None) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(_) => return false,
            }
        }
        true
    }

    /// Terminal events by job id (deduplicated by event id).
    pub fn terminal(&self) -> BTreeMap<String, Vec<CloudEvent>> {
        let mut by_job: BTreeMap<String, Vec<CloudEvent>> = BTreeMap::new();
        let mut ids = std::collections::HashSet::new();
        for e in &self.seen {
            let terminal = !e.kind.ends_with(".started") && !e.kind.ends_with(".progress");
            if terminal && ids.insert(e.id.clone()) {
                by_job.entry(e.subject.clone()).or_default().push(e.clone());
            }
        }
        by_job
    }

    /// For failure messages: which of `ids` have no `job.succeeded` yet, and every event seen for them.
    pub fn missing_report(&self, ids: &std::collections::HashSet<String>) -> String {
        let mut missing: Vec<&String> = ids
            .iter()
            .filter(|id| {
                !self
                    .seen
                    .iter()
                    .any(|e| &e.subject == *id && e.kind == "t2i.job.succeeded")
            })
            .collect();
        missing.sort();
        let mut out = format!(
            "{} of {} jobs without job.succeeded:",
            missing.len(),
            ids.len()
        );
        for id in missing {
            let kinds: Vec<&str> = self
                .seen
                .iter()
                .filter(|e| &e.subject == id)
                .map(|e| e.kind.as_str())
                .collect();
            out.push_str(&format!("\n  {id}: {kinds:?}"));
        }
        out
    }

    pub fn count_terminal_deliveries(&self, job: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| {
                e.subject == job && !e.kind.ends_with(".started") && !e.kind.ends_with(".progress")
            })
            .count()
    }

    pub async fn message_count(&self, queue: &str) -> u32 {
        let ch = self.conn.raw().create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        q.message_count()
    }

    /// Deletes the queues of the model pools `slugs` (workers declared them for this test).
    pub async fn delete_pools(&self, slugs: &[&str]) {
        let ch = self.conn.raw().create_channel().await.unwrap();
        for slug in slugs {
            let slug = t2i_worker::job::ModelSlug::of(slug).unwrap();
            for lane in Lane::ALL {
                let route = t2i_worker::queue::Route {
                    lane,
                    pool: Some(slug.clone()),
                };
                let mut queues = vec![self.topology.route_queue(&route)];
                for level in 0..self.topology.retry_delays.len() {
                    queues.push(self.topology.route_retry_queue(&route, level));
                }
                for q in queues {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
        }
    }

    /// Deletes this test's queues (exchanges are cheap and left), the model pools' queues that its
    /// workers declared included: quorum queues left behind pile up on the test broker.
    pub async fn cleanup(self) {
        self.delete_pools(&FIXTURE_MODELS).await;
        let ch = self.conn.raw().create_channel().await.unwrap();
        let mut queues = vec![self.events_queue.clone(), self.topology.dead_queue()];
        for lane in Lane::ALL {
            queues.push(self.topology.queue(lane));
            for level in 0..self.topology.retry_delays.len() {
                queues.push(self.topology.retry_queue(lane, level));
            }
        }
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        self.conn.close("done").await;
    }
}

/// The fixture models a test worker may serve (`tests/fixtures/models/`), whose pools `cleanup`
/// deletes.
const FIXTURE_MODELS: [&str; 5] = [
    "ssd-1b-tiny",
    "sdxl-tiny",
    "vega-tiny",
    "sd15-tiny",
    "sd21-v-tiny",
];

/// A `t2i worker` process serving `world` with the tiny SSD-1B fixture.
pub struct WorkerProc {
    pub child: Child,
    pub http_port: u16,
    pub id: String,
    /// Where the worker's stderr (its logs) goes.
    pub log: std::path::PathBuf,
}

impl WorkerProc {
    pub fn spawn(world: &World, id: &str, extra: &[&str]) -> Self {
        Self::spawn_model(world, id, "ssd-1b-tiny", extra)
    }

    /// A worker serving the tiny fixture model `model` (`tests/fixtures/models/<model>`).
    pub fn spawn_model(world: &World, id: &str, model: &str, extra: &[&str]) -> Self {
        let http_port = free_port();
        let model = model_dir(model);
        let log = std::env::temp_dir().join(format!("{}-{id}.log", world.prefix));
        let delays: Vec<String> = world
            .topology
            .retry_delays
            .iter()
            .map(|d| d.as_secs().to_string())
            .collect();
        let delays = delays.join(",");
        // T2I_TEST_BIN lets measurements use a release build (see the plumbing throughput test).
        let bin =
            std::env::var("T2I_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_t2i").to_string());
        let mut cmd = Command::new(bin);
        cmd.args([
            "worker",
            "--model",
            model.to_str().unwrap(),
            "--amqp-url",
            &amqp_url(),
            "--amqp-prefix",
            &world.prefix,
            "--retry-delays",
            &delays,
            "--min-side",
            "32",
            "--worker-id",
            id,
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
            "--log",
            "info",
        ])
        .args(if extra.contains(&"--storage") {
            vec![]
        } else {
            vec!["--storage".to_string(), world.storage()]
        })
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &world.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning t2i worker");
        let w = Self {
            child,
            http_port,
            id: id.to_string(),
            log,
        };
        w.wait_ready(Duration::from_secs(60));
        w
    }

    /// The last `lines` lines of the worker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((200, _)) = self.http_get("/readyz") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("worker {} not ready within {timeout:?}", self.id);
    }

    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
        None
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An S3 client for checks, from the Garage environment.
pub async fn s3() -> aws_sdk_s3::Client {
    garage_env();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    )
}

pub async fn get_object(
    client: &aws_sdk_s3::Client,
    key: &str,
) -> Option<(Vec<u8>, Option<String>, HashMap<String, String>)> {
    let out = client
        .get_object()
        .bucket(bucket())
        .key(key)
        .send()
        .await
        .ok()?;
    let ct = out.content_type().map(str::to_string);
    let meta = out.metadata().cloned().unwrap_or_default();
    let body = out.body.collect().await.ok()?.into_bytes().to_vec();
    Some((body, ct, meta))
}
