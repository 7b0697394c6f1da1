//! `t2i webhooks`: relays job events to HTTP receivers, signed per the Standard Webhooks spec.
//!
//! ```text
//! t2i.events ──job.started|succeeded|failed|expired|canceled──▶ {p}.webhooks (quorum, durable)
//!   relay: POST to the job's webhook.url (if its events filter matches) and every --endpoint
//!   failure (5xx, 429, timeout, connection) ─▶ {p}.webhooks.retry.{n} (per-message TTL, jittered;
//!     dead-letters back to {p}.webhooks with the one target in a header) ─▶ ... ─▶ {p}.webhooks.dead
//!   410 Gone: stop for that target; other 4xx or an SSRF refusal: straight to {p}.webhooks.dead
//! ```
//! Each POST is a structured-mode CloudEvent (`content-type: application/cloudevents+json`, the
//! event as published, byte for byte). The workers publish and move on; a slow or dead receiver only
//! ever delays this queue. Signing
//! secrets come from the relay's configuration, never from messages. Every delivery of one event
//! carries the same `webhook-id` (the CloudEvent id), so receivers can deduplicate.

pub mod guard;
pub mod sign;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::cli::{UsageError, WebhooksArgs};
use crate::events::{CloudEvent, EventKind};
use crate::health::Health;
use crate::queue::{Connection, Delivery, Publisher, QueueError, Reconnect, Topology};
use guard::{Guard, WebhookClient};
use sign::Secret;

const TARGET_HEADER: &str = "x-t2i-webhook-target";
const ATTEMPT_HEADER: &str = "x-t2i-webhook-attempt";
const REASON_HEADER: &str = "x-t2i-webhook-error";
/// The media type of a structured-mode CloudEvent in JSON (CloudEvents HTTP binding §3.2).
const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Webhook POSTs by outcome (`t2i_webhook_deliveries_total`).
struct Counters(IntCounterVec);

impl Counters {
    const OUTCOMES: [&'static str; 5] =
        ["delivered", "retried", "dead_lettered", "refused", "gone"];

    fn new(health: &Health) -> Self {
        let c = IntCounterVec::new(
            prometheus::Opts::new("webhook_deliveries_total", "Webhook POSTs by outcome."),
            &["outcome"],
        )
        .expect("a static, valid metric");
        health
            .registry()
            .register(Box::new(c.clone()))
            .expect("registered once");
        // Every outcome appears from the start, at 0, so rates are defined before the first event.
        for o in Self::OUTCOMES {
            c.with_label_values(&[o]);
        }
        Self(c)
    }

    fn inc(&self, outcome: &str) {
        self.0.with_label_values(&[outcome]).inc();
    }
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
    health: Arc<Health>,
    secret: Secret,
    guard: Arc<Guard>,
    client: WebhookClient,
    endpoints: Vec<reqwest::Url>,
    endpoint_events: Vec<EventKind>,
    delays: Vec<Duration>,
    counters: Counters,
}

impl Relay {
    /// Receivers of `event` (the job's webhook when its filter matches, then the static endpoints).
    fn targets(&self, event: &CloudEvent) -> Vec<String> {
        let Some(kind) = EventKind::parse(&event.kind) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(hook) = event
            .data
            .params
            .as_ref()
            .and_then(|p| p.get("webhook"))
            .filter(|w| !w.is_null())
        {
            let wants = match hook.get("events").and_then(|e| e.as_array()) {
                Some(list) => list.iter().any(|e| e.as_str() == Some(kind.routing_key())),
                None => EventKind::TERMINAL.contains(&kind),
            };
            if let (true, Some(url)) = (wants, hook.get("url").and_then(|u| u.as_str())) {
                out.push(url.to_string());
            }
        }
        if self.endpoint_events.contains(&kind) {
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
            // Structured mode of the CloudEvents HTTP binding: the body is the whole event.
            .header("content-type", CLOUDEVENTS_JSON)
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

    async fn handle(&self, publisher: &Publisher, d: &Delivery) -> Result<(), QueueError> {
        let Ok(event) = serde_json::from_slice::<CloudEvent>(d.body()) else {
            tracing::warn!("dropping a message that is not a CloudEvent");
            return Ok(());
        };
        let (targets, attempt) = match d.header_text(TARGET_HEADER) {
            Some(t) => {
                // Integers from older relays, text from this one.
                let before = d
                    .header_int(ATTEMPT_HEADER)
                    .or_else(|| d.header_text(ATTEMPT_HEADER)?.parse().ok())
                    .unwrap_or(1)
                    .max(1) as u32;
                (vec![t], before + 1)
            }
            None => (self.targets(&event), 1),
        };
        for target in targets {
            let outcome = self.post(&target, &event.id, d.body()).await;
            tracing::info!(event = %event.id, job = %event.subject, %target, attempt, ?outcome, "webhook");
            match outcome {
                Attempt::Delivered => self.counters.inc("delivered"),
                Attempt::Gone => self.counters.inc("gone"),
                Attempt::Retry { reason, after } => match self.next_level(attempt, after) {
                    Some(level) => {
                        self.counters.inc("retried");
                        // Full jitter in the top quarter of the level's delay, so receivers that
                        // come back are not hit by every retry at once.
                        let base = self.delays[level].as_secs_f64();
                        let wait =
                            Duration::from_secs_f64(base * (0.75 + 0.25 * rand::random::<f64>()));
                        let headers = copy_headers(&target, attempt, &reason);
                        let queue = self.topology.webhooks_retry_queue(level);
                        publisher
                            .to_queue(&queue, d.body(), &headers, Some(wait))
                            .await?;
                    }
                    None => {
                        self.dead_letter(publisher, d, &target, attempt, &reason)
                            .await?
                    }
                },
                Attempt::Permanent(reason) => {
                    if reason.contains("refused ") {
                        self.counters.inc("refused");
                    }
                    self.dead_letter(publisher, d, &target, attempt, &reason)
                        .await?
                }
            }
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        publisher: &Publisher,
        d: &Delivery,
        target: &str,
        attempt: u32,
        reason: &str,
    ) -> Result<(), QueueError> {
        self.counters.inc("dead_lettered");
        tracing::warn!(%target, attempt, reason, "webhook dead-lettered");
        let headers = copy_headers(target, attempt, reason);
        let queue = self.topology.webhooks_dead_queue();
        publisher.to_queue(&queue, d.body(), &headers, None).await
    }
}

/// The headers of a retry or dead-letter copy: the one target it is for, the attempt it failed
/// and why.
fn copy_headers(target: &str, attempt: u32, reason: &str) -> [(&'static str, String); 3] {
    [
        (TARGET_HEADER, target.to_string()),
        (ATTEMPT_HEADER, attempt.to_string()),
        (REASON_HEADER, reason.to_string()),
    ]
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

pub async fn run(args: WebhooksArgs, shutdown: CancellationToken) -> Result<()> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    let secret = Secret::parse(&args.secret).map_err(usage)?;
    let guard = Arc::new(
        Guard::new(
            args.allow_http,
            args.allow_private_networks,
            &args.allow_hosts,
        )
        .map_err(usage)?,
    );
    let mut endpoints = Vec::new();
    for e in args.endpoints.iter().filter(|e| !e.is_empty()) {
        let url = reqwest::Url::parse(e).map_err(|err| usage(format!("--endpoint {e}: {err}")))?;
        guard
            .check_url(&url)
            .map_err(|why| usage(format!("--endpoint: {why}")))?;
        endpoints.push(url);
    }
    let mut endpoint_events = Vec::new();
    for name in &args.endpoint_events {
        match EventKind::parse(name).filter(|k| EventKind::RELAYED.contains(k)) {
            Some(kind) if kind.routing_key() == name => endpoint_events.push(kind),
            _ => {
                let relayed: Vec<&str> =
                    EventKind::RELAYED.iter().map(|k| k.routing_key()).collect();
                return Err(usage(format!(
                    "--endpoint-events: `{name}` is not one of {}",
                    relayed.join(", ")
                )));
            }
        }
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
    let egress_proxy = guard::egress_proxy(args.egress_proxy.as_deref()).map_err(usage)?;
    let client = WebhookClient::new(
        guard.clone(),
        Duration::from_secs(args.timeout_s.max(1)),
        egress_proxy,
    )?;
    let health = Health::new();
    let relay = Arc::new(Relay {
        topology: crate::config::topology(&args.broker)?,
        counters: Counters::new(&health),
        health,
        secret,
        guard,
        client,
        endpoints,
        endpoint_events,
        delays: args
            .webhook_retry_delays
            .iter()
            .map(|&s| Duration::from_secs_f64(s))
            .collect(),
    });
    if let Some(addr) = args.http_addr {
        crate::health::serve(addr, relay.health.clone(), shutdown.clone())
            .await
            .with_context(|| format!("binding {addr}"))?;
    }
    let reconnect = Reconnect::new(&args.broker.amqp_url, "t2i webhooks");
    while let Some(conn) = reconnect.connect(&shutdown).await {
        let ended = session(&relay, &conn, args.concurrency, &shutdown).await;
        relay.health.set_ready(false);
        conn.close("bye").await;
        match ended {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!(error = %e, "broker session ended; reconnecting"),
        }
        if !reconnect.pause(&shutdown).await {
            break;
        }
    }
    Ok(())
}

/// One broker session: consume, deliver, ack. Ends on shutdown (Ok) or a broker error.
async fn session(
    relay: &Arc<Relay>,
    conn: &Connection,
    concurrency: u16,
    shutdown: &CancellationToken,
) -> Result<()> {
    conn.declare_webhooks(&relay.topology, relay.delays.len())
        .await?;
    let publisher = conn.publisher(&relay.topology).await?;
    let queue = relay.topology.webhooks_queue();
    let mut consumer = conn.consume(&queue, "t2i-webhooks", concurrency).await?;
    relay.health.set_ready(true);
    tracing::info!(%queue, "relaying webhooks");
    let tracker = tokio_util::task::TaskTracker::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => {
                    let (relay, publisher) = (relay.clone(), publisher.clone());
                    tracker.spawn(async move {
                        match relay.handle(&publisher, &d).await {
                            Ok(()) => { let _ = d.ack().await; }
                            Err(e) => {
                                tracing::warn!(error = %e, "could not schedule a retry; requeueing");
                                let _ = d.requeue().await;
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
    result
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
