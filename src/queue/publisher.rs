//! Publishing with publisher confirms: job events on `{p}.events` (terminal ones persistent,
//! `mandatory` and awaited; progress transient and not awaited), replies to `reply_to`, delayed
//! retries into the TTL'd retry queues, and jobs (for `enqueue` and tests).

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};

use super::{ATTEMPT_HEADER, Delivery, ReplyTo, Route, Topology};
use crate::events::{CloudEvent, EventKind};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nack) {0}")]
    Nacked(String),
    #[error("no answer from the broker in time for {0}")]
    Unconfirmed(String),
}

/// Longest wait for a publisher confirm. Confirms normally take milliseconds; a broker that has
/// gone silent (a half-open connection, a restart mid-publish) must not hold a job forever: the
/// caller treats the publish as failed and its session reconnects.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest wait for a publish's frames to be handed to the connection (milliseconds normally).
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What happened to a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Stored by the broker and routed to at least one queue.
    Routed,
    /// Confirmed, but no queue was bound for it (returned as unroutable).
    Unroutable,
}

/// A publish whose frames are sent; the broker's confirm may still be on its way.
pub struct PendingConfirm {
    /// `None` for transient messages nobody waits for.
    confirm: Option<lapin::PublisherConfirm>,
    what: String,
}

impl PendingConfirm {
    /// Waits for the broker's confirm: stored and routed, stored but unroutable, or refused.
    pub async fn confirmed(self) -> Result<Delivered, QueueError> {
        let Some(confirm) = self.confirm else {
            return Ok(Delivered::Routed);
        };
        let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| QueueError::Unconfirmed(self.what.clone()))?;
        match confirmed? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Delivered::Routed),
            Confirmation::Ack(Some(_)) => Ok(Delivered::Unroutable),
            Confirmation::Nack(_) => Err(QueueError::Nacked(self.what)),
        }
    }
}

/// One message to publish.
struct Publish<'a> {
    exchange: &'a str,
    key: &'a str,
    mandatory: bool,
    body: &'a [u8],
    props: BasicProperties,
}

/// A publisher-confirm channel. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

impl Publisher {
    pub(super) async fn open(channel: Channel, topology: &Topology) -> Result<Self, QueueError> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            topology: topology.clone(),
        })
    }

    /// The underlying channel, for tests that publish malformed messages on purpose.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    async fn confirmed(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        body: &[u8],
        props: BasicProperties,
        what: &str,
    ) -> Result<Delivered, QueueError> {
        let publish = Publish {
            exchange,
            key,
            mandatory,
            body,
            props,
        };
        self.send(publish, what.to_string(), true)
            .await?
            .confirmed()
            .await
    }

    /// Hands one publish's frames to the connection (within [`SEND_TIMEOUT`]); the confirm is left
    /// to the caller, or dropped when `confirm` is false (transient messages).
    async fn send(
        &self,
        p: Publish<'_>,
        what: String,
        confirm: bool,
    ) -> Result<PendingConfirm, QueueError> {
        let publish = self.channel.basic_publish(
            p.exchange.into(),
            p.key.into(),
            BasicPublishOptions {
                mandatory: p.mandatory,
                ..Default::default()
            },
            p.body,
            p.props,
        );
        match tokio::time::timeout(SEND_TIMEOUT, publish).await {
            Ok(sent) => Ok(PendingConfirm {
                confirm: confirm.then_some(sent?),
                what,
            }),
            Err(_) => Err(QueueError::Unconfirmed(what)),
        }
    }

    /// Publishes a job event. Terminal events are persistent, mandatory and confirmed before this
    /// returns; progress events are transient and not awaited (they are throttled hints).
    pub async fn event(
        &self,
        event: &CloudEvent,
        kind: EventKind,
    ) -> Result<Delivered, QueueError> {
        self.send_event(event, kind).await?.confirmed().await
    }

    /// Sends a job event's frames and returns without waiting for the broker's confirm: events sent
    /// one after another on this channel arrive in that order, and the caller awaits
    /// [`PendingConfirm::confirmed`] when (and if) it needs to know. Progress events are transient
    /// and never confirmed.
    pub async fn send_event(
        &self,
        event: &CloudEvent,
        kind: EventKind,
    ) -> Result<PendingConfirm, QueueError> {
        let body = event.to_json();
        let props = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_message_id(event.id.as_str().into())
            .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp() as u64)
            .with_type(event.kind.as_str().into());
        let exchange = self.topology.events_exchange();
        let progress = kind == EventKind::Progress;
        let publish = Publish {
            exchange: &exchange,
            key: kind.routing_key(),
            mandatory: kind.is_terminal(),
            body: &body,
            props: props.with_delivery_mode(if progress { 1 } else { 2 }),
        };
        let what = format!("event {} for {}", kind.routing_key(), event.subject);
        self.send(publish, what, !progress).await
    }

    /// The terminal event to the job's `reply_to` queue (default exchange), with its correlation id.
    pub async fn reply(
        &self,
        reply_to: &str,
        correlation_id: Option<&str>,
        event: &CloudEvent,
    ) -> Result<Delivered, QueueError> {
        let mut props = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_message_id(event.id.as_str().into());
        if let Some(c) = correlation_id {
            props = props.with_correlation_id(c.into());
        }
        self.confirmed("", reply_to, false, &event.to_json(), props, "reply")
            .await
    }

    /// Re-publishes a job into the retry queue for the attempt that failed, carrying the next
    /// attempt number and the original's identity (message id, reply_to, correlation id, content
    /// type, timestamp, headers); the queue's TTL dead-letters it back to the route's job queue.
    pub async fn retry(&self, route: &Route, delivery: &Delivery) -> Result<(), QueueError> {
        let original = delivery.properties();
        let failed_attempt = delivery.attempt();
        let level = self.topology.retry_level(failed_attempt);
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(
            ATTEMPT_HEADER.into(),
            AMQPValue::LongUInt(failed_attempt + 1),
        );
        let mut props = persistent().with_headers(headers);
        for (set, value) in [
            (original.message_id(), 0),
            (original.reply_to(), 1),
            (original.correlation_id(), 2),
            (original.content_type(), 3),
        ] {
            if let Some(v) = set {
                let v: ShortString = v.clone();
                props = match value {
                    0 => props.with_message_id(v),
                    1 => props.with_reply_to(v),
                    2 => props.with_correlation_id(v),
                    _ => props.with_content_type(v),
                };
            }
        }
        if let Some(ts) = original.timestamp() {
            props = props.with_timestamp(*ts);
        }
        let queue = self.topology.route_retry_queue(route, level);
        self.confirmed("", &queue, true, delivery.body(), props, "retry")
            .await?;
        Ok(())
    }

    /// A control message (cancellations) to every running worker, through the fanout exchange.
    /// `Unroutable` means no worker was listening.
    pub async fn control(&self, body: &[u8]) -> Result<Delivered, QueueError> {
        let props = persistent().with_content_type("application/json".into());
        self.confirmed(
            &self.topology.control_exchange(),
            "",
            true,
            body,
            props,
            "control message",
        )
        .await
    }

    /// Publishes a job (persistent, mandatory, `message_id` = job id) on a route (its lane, and the
    /// pool of the model it names) and waits for the broker's confirm. `Unroutable`: no queue is
    /// bound for the route, which for a model's route means that no pool serves the model.
    pub async fn job(
        &self,
        route: &Route,
        job_id: &str,
        body: &[u8],
        reply: Option<&ReplyTo>,
    ) -> Result<Delivered, QueueError> {
        self.send_job(route, job_id, body, reply)
            .await?
            .confirmed()
            .await
    }

    /// Sends a job's frames and returns without waiting for the confirm: `enqueue` keeps a window
    /// of these outstanding (backpressure) instead of one round trip per job.
    pub async fn send_job(
        &self,
        route: &Route,
        job_id: &str,
        body: &[u8],
        reply: Option<&ReplyTo>,
    ) -> Result<PendingConfirm, QueueError> {
        let mut props = persistent()
            .with_content_type("application/json".into())
            .with_message_id(job_id.into())
            .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp() as u64);
        if let Some(r) = reply {
            props = props.with_reply_to(r.queue.as_str().into());
            if let Some(c) = &r.correlation_id {
                props = props.with_correlation_id(c.as_str().into());
            }
        }
        let (exchange, key) = (self.topology.jobs_exchange(), route.routing_key());
        let publish = Publish {
            exchange: &exchange,
            key: &key,
            mandatory: true,
            body,
            props,
        };
        self.send(publish, format!("job {job_id}"), true).await
    }

    /// Publishes straight into a queue (default exchange), persistent and confirmed: the webhook
    /// relay's retry and dead-letter copies. `headers` are text values; `expiration` is the
    /// per-message TTL of a delayed copy.
    pub async fn to_queue(
        &self,
        queue: &str,
        body: &[u8],
        headers: &[(&str, String)],
        expiration: Option<std::time::Duration>,
    ) -> Result<(), QueueError> {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), super::topology::text(v));
        }
        let mut props = persistent()
            .with_content_type("application/json".into())
            .with_headers(table);
        if let Some(ttl) = expiration {
            props = props.with_expiration(ttl.as_millis().max(1).to_string().as_str().into());
        }
        self.confirmed("", queue, false, body, props, "queue copy")
            .await?;
        Ok(())
    }
}

/// A field table from entries (queue arguments).
pub(super) fn headers(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}
