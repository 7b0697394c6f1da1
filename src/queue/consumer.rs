//! Consuming: a [`Consumer`] yields [`Delivery`]s, whose ack, reject and requeue are each bounded in
//! time. After a connection reset lapin may never resolve a pending settle (seen in the broker
//! restart tests: a worker hung in its teardown), so every one of them gets [`SETTLE_TIMEOUT`]; a
//! settle that fails or times out means the channel is gone, and the broker redelivers by itself.
//!
//! A delivery also answers the questions the worker and the clients ask of a message (its body,
//! attempt number, publication time, `reply_to`) without them seeing AMQP types.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use time::OffsetDateTime;

use super::{ATTEMPT_HEADER, QueueError};

/// Longest wait for an ack, nack or consumer cancel to be written.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a job's terminal event is also sent (AMQP `reply_to` + `correlation_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub queue: String,
    pub correlation_id: Option<String>,
}

/// The deliveries of one queue, on a channel of their own.
pub struct Consumer {
    channel: lapin::Channel,
    tag: String,
    inner: lapin::Consumer,
    no_ack: bool,
}

impl Consumer {
    pub(super) fn new(channel: lapin::Channel, tag: String, inner: lapin::Consumer) -> Self {
        Self {
            channel,
            tag,
            inner,
            no_ack: false,
        }
    }

    /// A consumer whose deliveries the broker counts as settled when sent.
    pub(super) fn new_no_ack(channel: lapin::Channel, tag: String, inner: lapin::Consumer) -> Self {
        Self {
            no_ack: true,
            ..Self::new(channel, tag, inner)
        }
    }

    /// The next delivery; `None` when the consumer was closed (the channel or connection died).
    pub async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let d = self.inner.next().await?;
        Some(
            d.map(|inner| Delivery {
                inner,
                no_ack: self.no_ack,
            })
            .map_err(QueueError::from),
        )
    }

    /// Stops the broker from sending more (what is unacknowledged stays ours to settle).
    pub async fn cancel(&self) {
        let _ = tokio::time::timeout(
            SETTLE_TIMEOUT,
            self.channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await;
    }
}

/// Takes messages from a queue one at a time (`basic.get`), for operator tools that move a queue's
/// messages elsewhere (`t2i webhooks replay`): no prefetch, nothing delivered that was not asked for.
pub struct QueueReader {
    channel: lapin::Channel,
    queue: String,
}

impl QueueReader {
    pub(super) fn new(channel: lapin::Channel, queue: String) -> Self {
        Self { channel, queue }
    }

    /// The next message (to be acked once it has been dealt with), with the number of messages
    /// left behind it; `None` when the queue is empty.
    pub async fn get(&self) -> Result<Option<(Delivery, u32)>, QueueError> {
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?;
        Ok(got.map(|m| {
            let left = m.message_count;
            (
                Delivery {
                    inner: m.delivery,
                    no_ack: false,
                },
                left,
            )
        }))
    }
}

/// One message, settled at most once.
pub struct Delivery {
    inner: lapin::message::Delivery,
    no_ack: bool,
}

impl Delivery {
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str())
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.inner
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str())
    }

    pub fn reply_to(&self) -> Option<ReplyTo> {
        self.inner.properties.reply_to().as_ref().map(|q| ReplyTo {
            queue: q.to_string(),
            correlation_id: self.correlation_id().map(str::to_string),
        })
    }

    /// When it was published (AMQP timestamp, 1 s resolution).
    pub fn published_at(&self) -> Option<OffsetDateTime> {
        self.inner
            .properties
            .timestamp()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t as i64).ok())
    }

    /// The attempt number a retried job carries (1 for the first delivery).
    pub fn attempt(&self) -> u32 {
        match self.header(ATTEMPT_HEADER) {
            Some(AMQPValue::LongUInt(n)) => n,
            Some(AMQPValue::LongInt(n)) => n.max(1) as u32,
            Some(AMQPValue::LongLongInt(n)) => n.max(1) as u32,
            Some(AMQPValue::ShortUInt(n)) => n as u32,
            _ => 1,
        }
    }

    /// A text header, if present and textual.
    pub fn header_text(&self, key: &str) -> Option<String> {
        match self.header(key)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    /// An integer header, if present and integral.
    pub fn header_int(&self, key: &str) -> Option<i64> {
        match self.header(key)? {
            AMQPValue::LongLongInt(n) => Some(n),
            AMQPValue::LongInt(n) => Some(n as i64),
            AMQPValue::LongUInt(n) => Some(n as i64),
            AMQPValue::ShortInt(n) => Some(n as i64),
            AMQPValue::ShortUInt(n) => Some(n as i64),
            _ => None,
        }
    }

    fn header(&self, key: &str) -> Option<AMQPValue> {
        self.inner
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(key).cloned())
    }

    pub(super) fn properties(&self) -> &lapin::BasicProperties {
        &self.inner.properties
    }

    /// Done with: the broker forgets it.
    pub async fn ack(&self) -> Result<(), QueueError> {
        if self.no_ack {
            return Ok(());
        }
        settle(self.inner.ack(BasicAckOptions::default()), "ack").await
    }

    /// Never going to work: the broker dead-letters it (no requeue).
    pub async fn reject(&self) -> Result<(), QueueError> {
        self.nack(false, "reject").await
    }

    /// Not now: back to the head of its queue for any consumer.
    pub async fn requeue(&self) -> Result<(), QueueError> {
        self.nack(true, "requeue").await
    }

    async fn nack(&self, requeue: bool, what: &'static str) -> Result<(), QueueError> {
        if self.no_ack {
            return Ok(());
        }
        let nack = self.inner.nack(BasicNackOptions {
            requeue,
            ..Default::default()
        });
        settle(nack, what).await
    }
}

async fn settle(
    r: impl std::future::Future<Output = lapin::Result<bool>>,
    what: &'static str,
) -> Result<(), QueueError> {
    match tokio::time::timeout(SETTLE_TIMEOUT, r).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(QueueError::Unconfirmed(what.to_string())),
    }
}
