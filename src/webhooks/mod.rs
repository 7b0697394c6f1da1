//! `t2i webhooks`: relays job events to HTTP receivers, signed per the Standard Webhooks spec.
//!
//! ```text
//! t2i.events ──job.started|succeeded|failed|expired|canceled──▶ {p}.webhooks (quorum, durable)
//!   relay: POST to the job's webhook (receiver id or URL, if the filters take the event), every
//!          all_jobs receiver and every --endpoint, each signed with its own receiver's secrets
//!   failure (5xx, 429, timeout, connection) ─▶ {p}.webhooks.retry.{n} (per-message TTL, jittered;
//!     dead-letters back to {p}.webhooks with the one target in headers) ─▶ ... ─▶ {p}.webhooks.dead
//!   410 Gone: the receiver is disabled in the state store (shared, durable) and the event
//!     dead-lettered; later events for it are dead-lettered unsent until `t2i webhooks enable`
//!   other 4xx, an SSRF refusal, no receiver to sign with: straight to {p}.webhooks.dead
//! `t2i webhooks replay` moves dead letters back to {p}.webhooks, each for its one target.
//! ```
//! Each POST is a structured-mode CloudEvent (`content-type: application/cloudevents+json`, the
//! event as published, byte for byte). The workers publish and move on; a slow or dead receiver only
//! ever delays this queue. Who receives what, and with which secrets, is `receivers`; secrets come
//! from the relay's configuration, never from messages. Every delivery of one event carries the
//! same `webhook-id` (the CloudEvent id), so receivers can deduplicate.
//!
//! Why disabled receivers' events are dead-lettered rather than skipped: nothing is lost while a
//! receiver is away, the dead queue's depth is the alert, and `enable` + `replay` catch it up.

mod admin;
pub mod guard;
pub mod receivers;
pub mod sign;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::cli::{UsageError, WebhooksAction, WebhooksArgs};
use crate::events::{CloudEvent, EventKind};
use crate::health::Health;
use crate::queue::{Connection, Delivery, Publisher, QueueError, Reconnect, Topology};
use guard::{Guard, WebhookClient};
use receivers::{Receivers, Target};
use sign::Secrets;
use state::StateStore;

/// The URL a retry or dead-letter copy is for.
const TARGET_HEADER: &str = "x-t2i-webhook-target";
/// The configured receiver it is for (absent for ad-hoc URLs).
const RECEIVER_HEADER: &str = "x-t2i-webhook-receiver";
/// The attempt that failed; a replayed copy carries 0, so it gets the whole retry schedule again.
const ATTEMPT_HEADER: &str = "x-t2i-webhook-attempt";
const REASON_HEADER: &str = "x-t2i-webhook-error";
/// The media type of a structured-mode CloudEvent in JSON (CloudEvents HTTP binding §3.2).
const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Webhook POSTs by outcome (`t2i_webhook_deliveries_total`).
struct Counters(IntCounterVec);

impl Counters {
    /// `refused`: the SSRF guard; `gone`: a 410 (the receiver is disabled); `disabled`: not sent,
    /// its receiver is disabled; `unrouted`: no receiver to sign with. All but `delivered` and
    /// `retried` also count as `dead_lettered`.
    const OUTCOMES: [&'static str; 7] = [
        "delivered",
        "retried",
        "dead_lettered",
        "refused",
        "gone",
        "disabled",
        "unrouted",
    ];

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
    /// Never going to work (a 4xx other than those worth retrying).
    Permanent(String),
    /// The SSRF guard refused the URL, an address it resolves to or a redirect: never sent.
    Refused(String),
}

struct Relay {
    topology: Topology,
    health: Arc<Health>,
    receivers: Receivers,
    state: StateStore,
    guard: Arc<Guard>,
    client: WebhookClient,
    endpoints: Vec<reqwest::Url>,
    endpoint_events: Vec<EventKind>,
    delays: Vec<Duration>,
    counters: Counters,
}

impl Relay {
    async fn post(&self, target: &str, secrets: &Secrets, event_id: &str, body: &[u8]) -> Attempt {
        let url = match reqwest::Url::parse(target) {
            Ok(u) => u,
            Err(e) => return Attempt::Permanent(format!("bad URL {target}: {e}")),
        };
        if let Err(why) = self.guard.check_url(&url) {
            return Attempt::Refused(why);
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
            .header("webhook-signature", secrets.sign(event_id, ts, body))
            .body(body.to_vec())
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return send_failure(&e),
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
            Some(url) => {
                // Integers from older relays, text from this one; 0 from `replay`.
                let before = d
                    .header_int(ATTEMPT_HEADER)
                    .or_else(|| d.header_text(ATTEMPT_HEADER)?.parse().ok())
                    .unwrap_or(1)
                    .clamp(0, i64::from(u32::MAX - 1)) as u32;
                let receiver = d.header_text(RECEIVER_HEADER).filter(|r| !r.is_empty());
                (vec![Target { url, receiver }], before + 1)
            }
            None => (
                self.receivers
                    .targets(&event, &self.endpoints, &self.endpoint_events),
                1,
            ),
        };
        for target in &targets {
            self.deliver(publisher, d, &event, target, attempt).await?;
        }
        Ok(())
    }

    /// One attempt at one target: sign, POST, and settle what it came to (retry copy, dead
    /// letter, or a disabled receiver).
    async fn deliver(
        &self,
        publisher: &Publisher,
        d: &Delivery,
        event: &CloudEvent,
        target: &Target,
        attempt: u32,
    ) -> Result<(), QueueError> {
        let signer = match self.receivers.signer(target) {
            Ok(s) => s,
            Err(why) => {
                self.counters.inc("unrouted");
                return self.dead_letter(publisher, d, target, attempt, &why).await;
            }
        };
        // Copies name the receiver that signed, so `replay --receiver` finds a job URL it owns.
        let named;
        let target = if signer.configured && target.receiver.is_none() {
            named = Target {
                url: target.url.clone(),
                receiver: Some(signer.name.clone()),
            };
            &named
        } else {
            target
        };
        if let Some(off) = self.state.disabled(&signer.name).await {
            self.counters.inc("disabled");
            let why = format!(
                "receiver {} disabled since {} ({}): `t2i webhooks enable`, then `t2i webhooks replay`",
                signer.name, off.at, off.reason
            );
            return self.dead_letter(publisher, d, target, attempt, &why).await;
        }
        let outcome = self
            .post(&target.url, &signer.secrets, &event.id, d.body())
            .await;
        tracing::info!(event = %event.id, job = %event.subject, target = %target.url,
            receiver = %signer.name, attempt, ?outcome, "webhook");
        match outcome {
            Attempt::Delivered => {
                self.counters.inc("delivered");
                Ok(())
            }
            Attempt::Gone => {
                let reason = format!("HTTP 410 Gone from {} (event {})", target.url, event.id);
                match self.state.set(&signer.name, true, &reason).await {
                    Ok(()) => {
                        self.counters.inc("gone");
                        tracing::warn!(receiver = %signer.name, "410 Gone: receiver disabled until `t2i webhooks enable`");
                        self.dead_letter(
                            publisher,
                            d,
                            target,
                            attempt,
                            "HTTP 410 Gone: receiver disabled",
                        )
                        .await
                    }
                    // Not recorded: try again later (the receiver will say 410 again).
                    Err(e) => {
                        let reason = format!("HTTP 410 Gone, not recorded: {e}");
                        self.retry(publisher, d, target, attempt, &reason, None)
                            .await
                    }
                }
            }
            Attempt::Retry { reason, after } => {
                self.retry(publisher, d, target, attempt, &reason, after)
                    .await
            }
            Attempt::Permanent(reason) => {
                self.dead_letter(publisher, d, target, attempt, &reason)
                    .await
            }
            Attempt::Refused(reason) => {
                self.counters.inc("refused");
                self.dead_letter(publisher, d, target, attempt, &reason)
                    .await
            }
        }
    }

    /// A delayed copy for the next attempt, or the dead letters after the last one.
    async fn retry(
        &self,
        publisher: &Publisher,
        d: &Delivery,
        target: &Target,
        attempt: u32,
        reason: &str,
        after: Option<Duration>,
    ) -> Result<(), QueueError> {
        let Some(level) = self.next_level(attempt, after) else {
            return self
                .dead_letter(publisher, d, target, attempt, reason)
                .await;
        };
        self.counters.inc("retried");
        // Full jitter in the top quarter of the level's delay, so receivers that come back are
        // not hit by every retry at once.
        let base = self.delays[level].as_secs_f64();
        let wait = Duration::from_secs_f64(base * (0.75 + 0.25 * rand::random::<f64>()));
        let headers = copy_headers(target, attempt, reason);
        let queue = self.topology.webhooks_retry_queue(level);
        publisher
            .to_queue(&queue, d.body(), &headers, Some(wait))
            .await
    }

    async fn dead_letter(
        &self,
        publisher: &Publisher,
        d: &Delivery,
        target: &Target,
        attempt: u32,
        reason: &str,
    ) -> Result<(), QueueError> {
        self.counters.inc("dead_lettered");
        tracing::warn!(target = %target.url, receiver = ?target.receiver, attempt, reason, "webhook dead-lettered");
        let headers = copy_headers(target, attempt, reason);
        let queue = self.topology.webhooks_dead_queue();
        publisher.to_queue(&queue, d.body(), &headers, None).await
    }
}

/// The headers of a retry or dead-letter copy: the one target it is for, the attempt it failed
/// and why.
fn copy_headers(target: &Target, attempt: u32, reason: &str) -> Vec<(&'static str, String)> {
    let mut h = vec![
        (TARGET_HEADER, target.url.clone()),
        (ATTEMPT_HEADER, attempt.to_string()),
        (REASON_HEADER, reason.to_string()),
    ];
    if let Some(r) = &target.receiver {
        h.push((RECEIVER_HEADER, r.clone()));
    }
    h
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

impl Relay {
    /// Flags → a relay: every receiver, URL, event name and delay checked before connecting.
    async fn from_args(args: &WebhooksArgs) -> Result<Self> {
        let usage = |m: String| anyhow::Error::from(UsageError(m));
        if args.secret.is_some() {
            return Err(usage(
                "T2I_WEBHOOK_SECRET / --secret is gone: one secret for every receiver let any \
                 receiver forge events for the others. Configure --receivers (each with its own \
                 secrets) and/or --url-key (per-URL secrets; see the README)"
                    .into(),
            ));
        }
        let guard = Arc::new(
            Guard::new(
                args.allow_http,
                args.allow_private_networks,
                &args.allow_hosts,
            )
            .map_err(usage)?,
        );
        let url_keys = match &args.url_key {
            Some(k) => Secrets::parse_list(k).map_err(|e| usage(format!("--url-key: {e}")))?,
            None => Vec::new(),
        };
        let receivers = match &args.receivers {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Receivers::parse(&text, |var| std::env::var(var).ok())
                    .map_err(|e| usage(format!("--receivers {}: {e}", path.display())))?
            }
            None => Receivers::default(),
        };
        for r in receivers.iter() {
            guard
                .check_url(&r.url)
                .map_err(|why| usage(format!("receiver {}: {why}", r.id)))?;
        }
        let mut endpoints = Vec::new();
        for e in args.endpoints.iter().filter(|e| !e.is_empty()) {
            let url =
                reqwest::Url::parse(e).map_err(|err| usage(format!("--endpoint {e}: {err}")))?;
            guard
                .check_url(&url)
                .map_err(|why| usage(format!("--endpoint: {why}")))?;
            endpoints.push(url);
        }
        if !endpoints.is_empty() && url_keys.is_empty() {
            return Err(usage(
                "--endpoint URLs are signed with their per-URL secret: set --url-key (or make \
                 them all_jobs receivers with their own secrets)"
                    .into(),
            ));
        }
        let endpoint_events = args
            .endpoint_events
            .iter()
            .map(|n| receivers::parse_relayed(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| usage(format!("--endpoint-events: {e}")))?;
        if args
            .webhook_retry_delays
            .iter()
            .any(|d| !d.is_finite() || *d < 0.0)
        {
            return Err(usage(
                "--webhook-retry-delays must be non-negative seconds".into(),
            ));
        }
        if !args.state_refresh_s.is_finite() || args.state_refresh_s < 0.0 {
            return Err(usage(
                "--state-refresh-s must be non-negative seconds".into(),
            ));
        }
        let state = StateStore::new(
            admin::open_state(&args.state).await?,
            Duration::from_secs_f64(args.state_refresh_s),
        );
        tracing::info!(receivers = receivers.iter().count(), ad_hoc_urls = !url_keys.is_empty(),
            state = %state.describe(), "webhook receivers");
        let egress_proxy = guard::egress_proxy(args.egress_proxy.as_deref()).map_err(usage)?;
        let client = WebhookClient::new(
            guard.clone(),
            Duration::from_secs(args.timeout_s.max(1)),
            egress_proxy,
        )?;
        let health = Health::new();
        Ok(Self {
            topology: crate::config::topology(&args.broker)?,
            counters: Counters::new(&health),
            health,
            receivers: receivers.with_url_keys(url_keys),
            state,
            guard,
            client,
            endpoints,
            endpoint_events,
            delays: args
                .webhook_retry_delays
                .iter()
                .map(|&s| Duration::from_secs_f64(s))
                .collect(),
        })
    }
}

pub async fn run(mut args: WebhooksArgs, shutdown: CancellationToken) -> Result<()> {
    match args.action.take() {
        Some(WebhooksAction::Enable(a)) => return admin::enable(a).await,
        Some(WebhooksAction::Replay(a)) => return admin::replay(a).await,
        Some(WebhooksAction::UrlSecret(a)) => return admin::url_secret(a),
        None => {}
    }
    let relay = Arc::new(Relay::from_args(&args).await?);
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

/// What a POST that got no answer comes to: refused by the guard (an address a name resolves to, a
/// redirect) for good, anything else (connection refused by a receiver that is down, a timeout, a
/// reset) worth another attempt. The guard's refusals are told by their type
/// ([`guard::is_refusal`]), never by their text: "Connection refused" is a receiver that is down.
fn send_failure(e: &reqwest::Error) -> Attempt {
    let chain = error_chain(e);
    if guard::is_refusal(e) {
        Attempt::Refused(chain)
    } else {
        Attempt::Retry {
            reason: chain,
            after: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a receiver that was down ("Connection refused") was dead-lettered at its first
    /// attempt, because refusals were told by the word "refused " in the error text.
    #[tokio::test]
    async fn a_receiver_that_is_down_is_retried_and_a_refused_address_is_not() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let allowed = format!("localhost:{closed}");
        let g = std::sync::Arc::new(Guard::new(true, false, &[allowed]).unwrap());
        let client = WebhookClient::new(g, Duration::from_secs(5), None).unwrap();
        let post = |u: String| client.post(reqwest::Url::parse(&u).unwrap()).send();

        let down = post(format!("http://localhost:{closed}/hook"))
            .await
            .unwrap_err();
        assert!(error_chain(&down).contains("refused"), "{down:?}");
        assert!(
            matches!(send_failure(&down), Attempt::Retry { .. }),
            "{:?}",
            send_failure(&down)
        );

        // Another port of the same name resolves on the strict client, which refuses loopback.
        let refused = post("http://localhost:9/hook".to_string())
            .await
            .unwrap_err();
        assert!(
            matches!(send_failure(&refused), Attempt::Refused(_)),
            "{:?}",
            send_failure(&refused)
        );
    }

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
