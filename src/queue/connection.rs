//! One broker connection and the one reconnect policy every long-running subcommand uses.
//!
//! [`Connection`] hands out what the rest of the crate needs from RabbitMQ — a confirming
//! [`Publisher`], [`Consumer`]s of the job lanes, the control fanout, event subscriptions and a reply
//! queue — so no other module opens a channel. [`Reconnect`] is the policy: connect with jittered
//! exponential backoff until it works or shutdown, and pause briefly after a session ends before
//! connecting again. It does not decide what a session does; callers loop
//! `reconnect.connect() → session → reconnect.pause()`.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use super::{Consumer, Publisher, QueueError, QueueReader, Route, Topology};
use crate::events::EventKind;
use crate::job::ModelSlug;

/// Longest wait for a connection to close: a broker that is gone must not hold a shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A named AMQP connection (operators see the name in the management UI).
pub struct Connection {
    inner: lapin::Connection,
}

impl Connection {
    /// Connects once.
    pub async fn open(url: &str, name: &str) -> Result<Self, QueueError> {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        Ok(Self {
            inner: lapin::Connection::connect(url, props).await?,
        })
    }

    /// The underlying lapin connection, for tests that inspect the broker directly.
    pub fn raw(&self) -> &lapin::Connection {
        &self.inner
    }

    pub fn is_connected(&self) -> bool {
        self.inner.status().connected()
    }

    /// Closes the connection without waiting long for a broker that is gone. Everything unsettled
    /// on it goes back to its queue.
    pub async fn close(&self, why: &str) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.inner.close(200, why.into())).await;
    }

    async fn channel(&self) -> Result<lapin::Channel, QueueError> {
        Ok(self.inner.create_channel().await?)
    }

    /// A publisher-confirm channel for `topology`'s exchanges.
    pub async fn publisher(&self, topology: &Topology) -> Result<Publisher, QueueError> {
        Publisher::open(self.channel().await?, topology).await
    }

    /// Declares the whole topology (idempotent; every worker and client does it at connect).
    pub async fn declare(&self, topology: &Topology) -> Result<(), QueueError> {
        let ch = self.channel().await?;
        topology.declare(&ch).await?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Declares only the control exchange: `t2i cancel` works whatever the workers' other
    /// settings (delivery limit, retry delays) are.
    pub async fn declare_control(&self, topology: &Topology) -> Result<(), QueueError> {
        let ch = self.channel().await?;
        ch.exchange_declare(
            topology.control_exchange().as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    /// Declares the webhook relay's queues (and the topology they bind to).
    pub async fn declare_webhooks(
        &self,
        topology: &Topology,
        retry_levels: usize,
    ) -> Result<(), QueueError> {
        let ch = self.channel().await?;
        topology.declare(&ch).await?;
        topology.declare_webhooks(&ch, retry_levels).await?;
        Ok(())
    }

    /// Consumes a durable queue with manual acks and at most `prefetch` unacknowledged deliveries.
    pub async fn consume(
        &self,
        queue: &str,
        tag: &str,
        prefetch: u16,
    ) -> Result<Consumer, QueueError> {
        let ch = self.channel().await?;
        ch.basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await?;
        let inner = ch
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Consumer::new(ch, tag.to_string(), inner))
    }

    /// Reads `queue` one message at a time, on a channel of its own.
    pub async fn reader(&self, queue: &str) -> Result<QueueReader, QueueError> {
        Ok(QueueReader::new(self.channel().await?, queue.to_string()))
    }

    /// Consumes one job route (a lane of the default pool or of a model's); the consumer tag names
    /// the worker and the route's key.
    pub async fn consume_route(
        &self,
        topology: &Topology,
        route: &Route,
        worker_id: &str,
        prefetch: u16,
    ) -> Result<Consumer, QueueError> {
        let tag = format!("{worker_id}-{}", route.routing_key());
        self.consume(&topology.route_queue(route), &tag, prefetch)
            .await
    }

    /// Declares the topology and the pools of the models `pools` (a worker's declaration).
    pub async fn declare_pools(
        &self,
        topology: &Topology,
        pools: &[ModelSlug],
    ) -> Result<(), QueueError> {
        let ch = self.channel().await?;
        topology.declare(&ch).await?;
        for slug in pools {
            topology.declare_pool(&ch, slug).await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// A private queue bound to the control fanout: every worker gets every control message.
    /// Deliveries need no ack (a lost control message is resent by the operator).
    pub async fn subscribe_control(&self, topology: &Topology) -> Result<Consumer, QueueError> {
        let exchange = topology.control_exchange();
        let (_, consumer) = self.private_consumer(&exchange, &[""]).await?;
        Ok(consumer)
    }

    /// A private queue bound to `kinds` on the events exchange, for clients that follow jobs.
    /// Subscribe before publishing, so no event can be missed.
    pub async fn subscribe_events(
        &self,
        topology: &Topology,
        kinds: &[EventKind],
    ) -> Result<Consumer, QueueError> {
        let exchange = topology.events_exchange();
        let keys: Vec<&str> = kinds.iter().map(|k| k.routing_key()).collect();
        let (_, consumer) = self.private_consumer(&exchange, &keys).await?;
        Ok(consumer)
    }

    /// A private queue for `reply_to` answers (the default exchange routes to it by name): its
    /// name, and its consumer.
    pub async fn reply_queue(&self) -> Result<(String, Consumer), QueueError> {
        self.private_consumer("", &[]).await
    }

    /// A private queue on a channel of its own, bound to `exchange` with each of `keys`, consumed
    /// without acks: its server-given name and its consumer.
    async fn private_consumer(
        &self,
        exchange: &str,
        keys: &[&str],
    ) -> Result<(String, Consumer), QueueError> {
        let ch = self.channel().await?;
        let q = declare_private_queue(&ch).await?;
        for key in keys {
            ch.queue_bind(
                q.name().clone(),
                exchange.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let inner = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok((
            q.name().to_string(),
            Consumer::new_no_ack(ch, String::new(), inner),
        ))
    }
}

/// A server-named, exclusive, auto-deleted queue: a worker's control queue, a client's event or
/// reply queue. It lives as long as the channel's connection.
async fn declare_private_queue(ch: &lapin::Channel) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Exponential backoff with full jitter: attempt n (0-based) waits uniformly in [0, min(cap, base·2ⁿ)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let max = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    max.mul_f64(rand::random::<f64>())
}

/// The reconnect policy of the worker, the gateway and the webhook relay.
pub struct Reconnect {
    url: String,
    name: String,
}

impl Reconnect {
    /// First connect attempts back off from this...
    const BASE: Duration = Duration::from_millis(200);
    /// ...up to this between two attempts.
    const CAP: Duration = Duration::from_secs(10);
    /// After a session ends: a pause of up to this (jittered), so a fleet does not reconnect in
    /// lockstep after a broker restart.
    const AFTER_SESSION: Duration = Duration::from_secs(2);

    pub fn new(url: &str, name: &str) -> Self {
        Self {
            url: url.to_string(),
            name: name.to_string(),
        }
    }

    /// Connects, retrying with jittered backoff until it works or `give_up` fires (`None`).
    pub async fn connect(&self, give_up: &CancellationToken) -> Option<Connection> {
        let mut attempt = 0;
        loop {
            match Connection::open(&self.url, &self.name).await {
                Ok(c) => return Some(c),
                Err(e) => {
                    let wait = backoff(attempt, Self::BASE, Self::CAP);
                    tracing::warn!(error = %e, attempt, ?wait, "AMQP connect failed; retrying");
                    attempt += 1;
                    tokio::select! {
                        _ = give_up.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// The pause after a session ended; false when `give_up` fired meanwhile.
    pub async fn pause(&self, give_up: &CancellationToken) -> bool {
        let wait = backoff(1, Self::BASE, Self::AFTER_SESSION);
        tokio::select! {
            _ = give_up.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_the_exponential_and_the_cap() {
        for attempt in 0..40 {
            let d = backoff(attempt, Duration::from_millis(100), Duration::from_secs(5));
            assert!(
                d <= Duration::from_millis(100)
                    .saturating_mul(1 << attempt.min(16))
                    .min(Duration::from_secs(5))
            );
        }
    }
}
