//! `t2i webhooks`: relays job events to HTTP receivers, signed per the Standard Webhooks spec.
//!
//! ```text
//! t2i.events ──job.started|succeeded|failed|expired|canceled──▶ {p}.webhooks (quorum, durable)
//!   relay: POST to the job's webhook.url (if its events filter matches) and every --endpoint
//!   failure (5xx, 429, timeout, connection) ─▶ {p}.webhooks.retry.{n} (per-message TTL, jittered;
//!     dead-letters back to {p}.webhooks with the one target in a header) ─▶ ... ─▶ {p}.webhooks.dead
//!   410 Gone: stop for that target; other 4xx or an SSRF refusal: straight to {p}.webhooks.dead
//! ```
//! The workers publish and move on; a slow or dead receiver only ever delays this queue. Signing
//! secrets come from the relay's configuration, never from messages. Every delivery of one event
//! carries the same `webhook-id` (the CloudEvent id), so receivers can deduplicate.

pub mod guard;
pub mod sign;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

use crate::cli::{BrokerArgs, UsageError};
use crate::events::CloudEvent;
use crate::queue::Topology;
use crate::queue::publisher::headers as table;
use crate::queue::topology::text;
use guard::{Guard, GuardedResolver};
use sign::Secret;

const TARGET_HEADER: &str = "x-t2i-webhook-target";
const ATTEMPT_HEADER: &str = "x-t2i-webhook-attempt";
const REASON_HEADER: &str = "x-t2i-webhook-error";

/// Event types relayed (progress events are transient hints and are not relayed).
pub const RELAYED: [&str; 5] = [
    "job.started",
    "job.succeeded",
    "job.failed",
    "job.expired",
    "job.canceled",
];
/// What a webhook receives when it names no filter.
const TERMINAL: [&str; 4] = ["job.succeeded", "job.failed", "job.expired", "job.canceled"];

#[derive(Debug, Args)]
pub struct WebhooksArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Signing secret, `whsec_<base64>` (Standard Webhooks).
    #[arg(long, env = "T2I_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,

    /// A receiver for every job's events, in addition to each job's own webhook (repeatable).
    #[arg(
        long = "endpoint",
        env = "T2I_WEBHOOK_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,

    /// Event types sent to the --endpoint receivers.
    #[arg(
        long,
        env = "T2I_WEBHOOK_ENDPOINT_EVENTS",
        value_delimiter = ',',
        default_value = "job.succeeded,job.failed,job.expired,job.canceled"
    )]
    pub endpoint_events: Vec<String>,

    /// Delays between attempts, in seconds (one retry queue each); the last attempt is followed by
    /// dead-lettering. Default: ~10.5 hours in all.
    #[arg(
        long = "webhook-retry-delays",
        env = "T2I_WEBHOOK_RETRY_DELAYS",
        value_delimiter = ',',
        default_value = "5,30,120,600,1800,3600,7200,14400,14400"
    )]
    pub webhook_retry_delays: Vec<f64>,

    /// Per-request timeout, in seconds.
    #[arg(long, env = "T2I_WEBHOOK_TIMEOUT_S", default_value_t = 10)]
    pub timeout_s: u64,

    /// Deliveries in flight at once.
    #[arg(long, env = "T2I_WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub concurrency: u16,

    /// Allow plain http:// receivers.
    #[arg(long, env = "T2I_WEBHOOK_ALLOW_HTTP")]
    pub allow_http: bool,

    /// Allow loopback, private and link-local addresses (trusted networks only).
    #[arg(long, env = "T2I_WEBHOOK_ALLOW_PRIVATE")]
    pub allow_private_networks: bool,

    /// `host:port` always allowed, whatever it resolves to (repeatable), e.g. an in-cluster receiver.
    #[arg(
        long = "allow-host",
        env = "T2I_WEBHOOK_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    pub allow_hosts: Vec<String>,

    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "T2I_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    refused: AtomicU64,
    gone: AtomicU64,
    ready: AtomicBool,
}

/// What one POST came to.
#[derive(Debug, PartialEq)]
enum Attempt {
    Delivered,
    /// 410: the receiver asked to stop.
    Gone,
    /// Worth trying again, not before `after` when the receiver said so.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Never going to work (other 4xx, refused by the SSRF guard).
    Permanent(String),
}

struct Relay {
    topology: Topology,
    secret: Secret,
    guard: Arc<Guard>,
    client: reqwest::Client,
    endpoints: Vec<reqwest::Url>,
    endpoint_events: Vec<String>,
    delays: Vec<Duration>,
    counters: Arc<Counters>,
}

impl Relay {
    fn queue(&self) -> String {
        format!("{}.webhooks", self.topology.prefix)
    }

    fn retry_queue(&self, level: usize) -> String {
        format!("{}.webhooks.retry.{level}", self.topology.prefix)
    }

    fn dead_queue(&self) -> String {
        format!("{}.webhooks.dead", self.topology.prefix)
    }

    async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        self.topology.declare(ch).await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), text("quorum"));
        ch.queue_declare(self.queue().as_str().into(), durable, quorum.clone())
            .await?;
        for key in RELAYED {
            ch.queue_bind(
                self.queue().as_str().into(),
                self.topology.events_exchange().as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        for level in 0..self.delays.len() {
            let mut args = quorum.clone();
            args.insert("x-dead-letter-exchange".into(), text(""));
            args.insert("x-dead-letter-routing-key".into(), text(&self.queue()));
            ch.queue_declare(self.retry_queue(level).as_str().into(), durable, args)
                .await?;
        }
        ch.queue_declare(self.dead_queue().as_str().into(), durable, quorum)
            .await?;
        Ok(())
    }

    /// Receivers of `event` (the job's webhook when its filter matches, then the static endpoints).
    fn targets(&self, event: &CloudEvent) -> Vec<String> {
        let kind = event.kind.strip_prefix("t2i.").unwrap_or(&event.kind);
        let mut out = Vec::new();
        if let Some(hook) = event
            .data
            .params
            .as_ref()
            .and_then(|p| p.get("webhook"))
            .filter(|w| !w.is_null())
        {
            let wants = match hook.get("events").and_then(|e| e.as_array()) {
                Some(list) => list.iter().any(|e| e.as_str() == Some(kind)),
                None => TERMINAL.contains(&kind),
            };
            if let (true, Some(url)) = (wants, hook.get("url").and_then(|u| u.as_str())) {
                out.push(url.to_string());
            }
        }
        if self.endpoint_events.iter().any(|e| e == kind) {
            out.extend(self.endpoints.iter().map(|u| u.to_string()));
        }
        out.dedup();
        out
    }

    async fn post(&self, target: &str, event_id: &str, body: &[u8]) -> Attempt {
        let url = match reqwest::Url::parse(target) {
            Ok(u) => u,
            Err(e) => return Attempt::Permanent(format!("bad URL {target}: {e}")),
        };
        if let Err(why) = self.guard.check_url(&url) {
            return Attempt::Permanent(why);
        }
        let ts = time::OffsetDateTime::now_utc().unix_timestamp();
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header(
                "user-agent",
                concat!("t2i-webhooks/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", event_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", self.secret.sign(event_id, ts, body))
            .body(body.to_vec())
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let chain = error_chain(&e);
                if chain.contains("refused ") {
                    return Attempt::Permanent(chain);
                }
                return Attempt::Retry {
                    reason: chain,
                    after: None,
                };
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Attempt::Delivered;
        }
        if status.as_u16() == 410 {
            return Attempt::Gone;
        }
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Attempt::Retry {
                reason: format!("HTTP {status}"),
                after,
            }
        } else if status.is_redirection() {
            Attempt::Permanent(format!("HTTP {status}: too many redirects"))
        } else {
            Attempt::Permanent(format!("HTTP {status}"))
        }
    }

    /// The retry level after attempt `attempt` (1-based), late enough for `after`.
    fn next_level(&self, attempt: u32, after: Option<Duration>) -> Option<usize> {
        let mut level = attempt as usize - 1;
        if level >= self.delays.len() {
            return None;
        }
        if let Some(after) = after {
            while level + 1 < self.delays.len() && self.delays[level] < after {
                level += 1;
            }
        }
        Some(level)
    }

    async fn handle(&self, ch: &Channel, d: &lapin::message::Delivery) -> lapin::Result<()> {
        let Ok(event) = serde_json::from_slice::<CloudEvent>(&d.data) else {
            tracing::warn!("dropping a message that is not a CloudEvent");
            return Ok(());
        };
        let headers = d.properties.headers().clone().unwrap_or_default();
        let header = |k: &str| headers.inner().get(k).cloned();
        let (targets, attempt) = match header(TARGET_HEADER) {
            Some(AMQPValue::LongString(t)) => {
                let attempt = match header(ATTEMPT_HEADER) {
                    Some(AMQPValue::LongLongInt(n)) => n.max(1) as u32,
                    Some(AMQPValue::LongInt(n)) => n.max(1) as u32,
                    _ => 1,
                };
                (vec![t.to_string()], attempt + 1)
            }
            _ => (self.targets(&event), 1),
        };
        for target in targets {
            let outcome = self.post(&target, &event.id, &d.data).await;
            tracing::info!(event = %event.id, job = %event.subject, %target, attempt, ?outcome, "webhook");
            match outcome {
                Attempt::Delivered => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Attempt::Gone => {
                    self.counters.gone.fetch_add(1, Ordering::Relaxed);
                }
                Attempt::Retry { reason, after } => match self.next_level(attempt, after) {
                    Some(level) => {
                        self.counters.retried.fetch_add(1, Ordering::Relaxed);
                        // Full jitter in the top quarter of the level's delay, so receivers that
                        // come back are not hit by every retry at once.
                        let base = self.delays[level].as_millis() as f64;
                        let ms = (base * (0.75 + 0.25 * rand::random::<f64>())).max(1.0) as u64;
                        let props = BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into())
                            .with_expiration(ms.to_string().as_str().into())
                            .with_headers(table(&[
                                (TARGET_HEADER, text(&target)),
                                (ATTEMPT_HEADER, AMQPValue::LongLongInt(attempt as i64)),
                                (REASON_HEADER, text(&reason)),
                            ]));
                        publish(ch, &self.retry_queue(level), &d.data, props).await?;
                    }
                    None => self.dead_letter(ch, d, &target, attempt, &reason).await?,
                },
                Attempt::Permanent(reason) => {
                    if reason.contains("refused ") {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    self.dead_letter(ch, d, &target, attempt, &reason).await?
                }
            }
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        ch: &Channel,
        d: &lapin::message::Delivery,
        target: &str,
        attempt: u32,
        reason: &str,
    ) -> lapin::Result<()> {
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%target, attempt, reason, "webhook dead-lettered");
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(table(&[
                (TARGET_HEADER, text(target)),
                (ATTEMPT_HEADER, AMQPValue::LongLongInt(attempt as i64)),
                (REASON_HEADER, text(reason)),
            ]));
        publish(ch, &self.dead_queue(), &d.data, props).await
    }
}

/// Publishes to a queue through the default exchange, confirmed.
async fn publish(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> lapin::Result<()> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await?
    .await?;
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(v.trim(), &fmt)
        .ok()?
        .assume_utc();
    let secs = (at - time::OffsetDateTime::now_utc()).whole_seconds();
    Some(Duration::from_secs(secs.max(0) as u64))
}

pub fn run(args: WebhooksArgs) -> Result<()> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    let secret = Secret::parse(&args.secret).map_err(usage)?;
    let guard = Arc::new(Guard {
        allow_http: args.allow_http,
        allow_private: args.allow_private_networks,
        allow_hosts: args.allow_hosts.clone(),
    });
    let mut endpoints = Vec::new();
    for e in args.endpoints.iter().filter(|e| !e.is_empty()) {
        let url = reqwest::Url::parse(e).map_err(|err| usage(format!("--endpoint {e}: {err}")))?;
        guard
            .check_url(&url)
            .map_err(|why| usage(format!("--endpoint: {why}")))?;
        endpoints.push(url);
    }
    if let Some(bad) = args
        .endpoint_events
        .iter()
        .find(|e| !RELAYED.contains(&e.as_str()))
    {
        return Err(usage(format!(
            "--endpoint-events: `{bad}` is not one of {}",
            RELAYED.join(", ")
        )));
    }
    if args
        .webhook_retry_delays
        .iter()
        .any(|d| !d.is_finite() || *d < 0.0)
    {
        return Err(usage(
            "--webhook-retry-delays must be non-negative seconds".into(),
        ));
    }
    let redirect_guard = guard.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s.max(1)))
        .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                return attempt.error("too many redirects");
            }
            match redirect_guard.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(why),
            }
        }))
        .build()?;
    let relay = Arc::new(Relay {
        topology: crate::config::topology(&args.broker)?,
        secret,
        guard,
        client,
        endpoints,
        endpoint_events: args.endpoint_events.clone(),
        delays: args
            .webhook_retry_delays
            .iter()
            .map(|&s| Duration::from_secs_f64(s))
            .collect(),
        counters: Arc::new(Counters::default()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = crate::shutdown::on_signals();
        if let Some(addr) = args.http_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tokio::spawn(serve_http(listener, relay.counters.clone()));
        }
        let mut attempt = 0u32;
        loop {
            match session(&relay, &args.broker.amqp_url, args.concurrency, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    relay.counters.ready.store(false, Ordering::Relaxed);
                    let wait = crate::queue::backoff(
                        attempt,
                        Duration::from_millis(500),
                        Duration::from_secs(30),
                    );
                    tracing::warn!(error = %e, ?wait, "broker session ended; reconnecting");
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    })
}

/// One broker session: consume, deliver, ack. Ends on shutdown (Ok) or a broker error.
async fn session(
    relay: &Arc<Relay>,
    url: &str,
    concurrency: u16,
    shutdown: &CancellationToken,
) -> Result<()> {
    let conn = crate::queue::connect(url, "t2i webhooks").await?;
    let ch = conn.create_channel().await?;
    relay.declare(&ch).await?;
    let publish_ch = conn.create_channel().await?;
    publish_ch.confirm_select(Default::default()).await?;
    ch.basic_qos(concurrency.max(1), BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            relay.queue().as_str().into(),
            "t2i-webhooks".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    relay.counters.ready.store(true, Ordering::Relaxed);
    tracing::info!(queue = %relay.queue(), "relaying webhooks");
    let tracker = tokio_util::task::TaskTracker::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => {
                    let (relay, publish_ch) = (relay.clone(), publish_ch.clone());
                    tracker.spawn(async move {
                        match relay.handle(&publish_ch, &d).await {
                            Ok(()) => { let _ = d.ack(BasicAckOptions::default()).await; }
                            Err(e) => {
                                tracing::warn!(error = %e, "could not schedule a retry; requeueing");
                                let _ = d.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                            }
                        }
                    });
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("consumer closed")),
            },
        }
    };
    tracker.close();
    tracker.wait().await;
    let _ = conn.close(0, "bye".into()).await;
    result
}

async fn serve_http(listener: tokio::net::TcpListener, counters: Arc<Counters>) {
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(c): State<Arc<Counters>>| async move {
                if c.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(c): State<Arc<Counters>>| async move {
                let mut out = String::from(
                    "# HELP t2i_webhook_deliveries_total Webhook POSTs by outcome.\n\
                     # TYPE t2i_webhook_deliveries_total counter\n",
                );
                for (name, v) in [
                    ("delivered", &c.delivered),
                    ("retried", &c.retried),
                    ("dead_lettered", &c.dead_lettered),
                    ("refused", &c.refused),
                    ("gone", &c.gone),
                ] {
                    out.push_str(&format!(
                        "t2i_webhook_deliveries_total{{outcome=\"{name}\"}} {}\n",
                        v.load(Ordering::Relaxed)
                    ));
                }
                out
            }),
        )
        .with_state(counters);
    let _ = axum::serve(listener, app).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_dates() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
