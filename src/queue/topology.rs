//! Every exchange and queue name, and their idempotent declaration (docs/architecture.md §2 "Topology"). All
//! names derive from one prefix (`t2i` by default) so that several deployments, or tests, share a
//! broker without interfering.
//!
//! ```text
//! {p}.jobs (direct) ──interactive──▶ {p}.jobs       (quorum, delivery limit, DLX {p}.dlx)
//!                   └────bulk──────▶ {p}.jobs.bulk  (quorum, delivery limit, DLX {p}.dlx)
//!                   ──{lane}.{slug}─▶ {p}.jobs.{lane}.{slug}   (a model's pool, declared by its workers)
//! {p}.jobs.retry.{lane}.{n}[.{slug}] (quorum, TTL 1s·4ⁿ) ──dead-letter──▶ {p}.jobs with the route's key
//! {p}.dlx (fanout) ──▶ {p}.jobs.dead (quorum)
//! {p}.events (topic: job.started|progress|succeeded|failed|expired|canceled)
//! {p}.control (fanout) ──▶ one exclusive queue per worker
//! {p}.webhooks (quorum) ◀── the relayed event types; {p}.webhooks.retry.{n} ──▶ {p}.webhooks;
//!   {p}.webhooks.dead
//! ```
//! Delayed retry uses TTL'd queues that dead-letter back to the job exchange, so it needs no broker
//! plugin and works from RabbitMQ 3.10 (quorum queues with message TTL) through 4.x.
//!
//! Routing by model: a job that names a model is published with the key `{lane}.{slug}`
//! ([`Route`], the slug of [`ModelSlug`]); only the workers serving that model declare and bind its
//! pool's queues, so the broker itself knows which models are served. A mandatory publish for a model
//! no pool declared comes back unroutable, and its producer fails the job at once
//! (`model_not_served`). Jobs that name no model keep the lane keys and the default pool's queues.
//! Pool queue names put the slug last (`{p}.jobs.{lane}.{slug}`, `{p}.jobs.retry.{lane}.{n}.{slug}`),
//! so no slug can produce a name of the default pool (`{p}.jobs.bulk`, `{p}.jobs.dead`).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::job::{ModelSlug, Rejection};

/// Which job queue a message came from. Interactive jobs are served before bulk ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    Interactive,
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Interactive, Lane::Bulk];

    /// A lane by its name (`interactive`, `bulk`), as flags, query strings and configs give it.
    pub fn parse(name: &str) -> Result<Self, UnknownLane> {
        Self::ALL
            .into_iter()
            .find(|l| l.routing_key() == name.trim())
            .ok_or_else(|| UnknownLane(name.to_string()))
    }

    /// The routing key on the job exchange.
    pub fn routing_key(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Bulk => "bulk",
        }
    }
}

/// Where a job is published and consumed: its lane, and the pool of the model it names (`None`: the
/// default pool, which takes the jobs that name no model).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub lane: Lane,
    pub pool: Option<ModelSlug>,
}

impl From<Lane> for Route {
    fn from(lane: Lane) -> Self {
        Self { lane, pool: None }
    }
}

impl Route {
    /// The route of a job on `lane` naming `model` (or none).
    pub fn of(lane: Lane, model: Option<&str>) -> Result<Self, Rejection> {
        let pool = model.map(ModelSlug::of).transpose()?;
        Ok(Self { lane, pool })
    }

    /// The routing key on the job exchange: the lane's, then `.{slug}` for a model's pool.
    pub fn routing_key(&self) -> String {
        match &self.pool {
            None => self.lane.routing_key().to_string(),
            Some(slug) => format!("{}.{slug}", self.lane.routing_key()),
        }
    }
}

/// A lane name that is neither `interactive` nor `bulk`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lane `{0}` (expected interactive or bulk)")]
pub struct UnknownLane(pub String);

#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub prefix: String,
    /// Quorum-queue `x-delivery-limit`: deliveries (crashes included) before the broker dead-letters.
    pub delivery_limit: u32,
    /// Delay before retry attempt n+1 (one retry queue per entry and lane).
    pub retry_delays: Vec<Duration>,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            prefix: "t2i".into(),
            delivery_limit: 5,
            retry_delays: [1, 4, 16, 64]
                .iter()
                .map(|&s| Duration::from_secs(s))
                .collect(),
        }
    }
}

use super::publisher::headers as table;

/// An AMQP long-string argument or header value.
pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl Topology {
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// The default pool's queue of a lane.
    pub fn queue(&self, lane: Lane) -> String {
        match lane {
            Lane::Interactive => format!("{}.jobs", self.prefix),
            Lane::Bulk => format!("{}.jobs.bulk", self.prefix),
        }
    }

    /// The queue of a route: the default pool's, or `{p}.jobs.{lane}.{slug}` for a model's pool.
    pub fn route_queue(&self, route: &Route) -> String {
        match &route.pool {
            None => self.queue(route.lane),
            Some(slug) => format!("{}.jobs.{}.{slug}", self.prefix, route.lane.routing_key()),
        }
    }

    /// A route's retry queue of level `level`: `{p}.jobs.retry.{lane}.{level}[.{slug}]`.
    pub fn route_retry_queue(&self, route: &Route, level: usize) -> String {
        let base = self.retry_queue(route.lane, level);
        match &route.pool {
            None => base,
            Some(slug) => format!("{base}.{slug}"),
        }
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.jobs.dead", self.prefix)
    }

    pub fn retry_queue(&self, lane: Lane, level: usize) -> String {
        format!("{}.jobs.retry.{}.{level}", self.prefix, lane.routing_key())
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The webhook relay's work queue (bound to the relayed event types).
    pub fn webhooks_queue(&self) -> String {
        format!("{}.webhooks", self.prefix)
    }

    /// The relay's delayed-retry queue of level `level` (per-message TTLs, back to the work queue).
    pub fn webhooks_retry_queue(&self, level: usize) -> String {
        format!("{}.webhooks.retry.{level}", self.prefix)
    }

    /// Deliveries the relay gave up on.
    pub fn webhooks_dead_queue(&self) -> String {
        format!("{}.webhooks.dead", self.prefix)
    }

    /// The retry queue for a job that failed attempt `attempt` (1-based).
    pub fn retry_level(&self, attempt: u32) -> usize {
        (attempt.saturating_sub(1) as usize).min(self.retry_delays.len().saturating_sub(1))
    }

    /// Arguments of every job queue, the default pool's and the models' (also written into `infra/`
    /// definitions).
    pub fn job_queue_arguments(&self) -> FieldTable {
        table(&[
            ("x-queue-type", text("quorum")),
            (
                "x-delivery-limit",
                AMQPValue::LongInt(self.delivery_limit as i32),
            ),
            ("x-dead-letter-exchange", text(&self.dead_letter_exchange())),
        ])
    }

    /// Declares everything; safe to run from every worker and client at every connect.
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let none = FieldTable::default;
        ch.exchange_declare(
            self.jobs_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            none(),
        )
        .await?;
        ch.exchange_declare(
            self.dead_letter_exchange().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            none(),
        )
        .await?;
        ch.exchange_declare(
            self.events_exchange().as_str().into(),
            ExchangeKind::Topic,
            durable,
            none(),
        )
        .await?;
        ch.exchange_declare(
            self.control_exchange().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            none(),
        )
        .await?;
        let durable_q = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for lane in Lane::ALL {
            self.declare_route(ch, &Route::from(lane)).await?;
        }
        let dead = self.dead_queue();
        ch.queue_declare(
            dead.as_str().into(),
            durable_q,
            table(&[("x-queue-type", text("quorum"))]),
        )
        .await?;
        ch.queue_bind(
            dead.as_str().into(),
            self.dead_letter_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            none(),
        )
        .await?;
        Ok(())
    }
}

impl Topology {
    /// Declares the pool of the model `slug` (both lanes, their retry queues) on top of
    /// [`Topology::declare`]: what a worker serving that model does at every connect. From then on
    /// the broker routes the model's jobs, also while the pool has scaled to zero.
    pub async fn declare_pool(&self, ch: &Channel, slug: &ModelSlug) -> lapin::Result<()> {
        for lane in Lane::ALL {
            let route = Route {
                lane,
                pool: Some(slug.clone()),
            };
            self.declare_route(ch, &route).await?;
        }
        Ok(())
    }

    /// A route's queue, bound with its key, and its retry queues, which dead-letter back with it.
    async fn declare_route(&self, ch: &Channel, route: &Route) -> lapin::Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let (queue, key) = (self.route_queue(route), route.routing_key());
        ch.queue_declare(queue.as_str().into(), durable, self.job_queue_arguments())
            .await?;
        ch.queue_bind(
            queue.as_str().into(),
            self.jobs_exchange().as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for (level, delay) in self.retry_delays.iter().enumerate() {
            let args = table(&[
                ("x-queue-type", text("quorum")),
                (
                    "x-message-ttl",
                    AMQPValue::LongInt(delay.as_millis() as i32),
                ),
                ("x-dead-letter-exchange", text(&self.jobs_exchange())),
                ("x-dead-letter-routing-key", text(&key)),
            ]);
            let retry = self.route_retry_queue(route, level);
            ch.queue_declare(retry.as_str().into(), durable, args)
                .await?;
        }
        Ok(())
    }

    /// Declares the webhook relay's queues: the work queue bound to every relayed event type,
    /// `retry_levels` delayed-retry queues that dead-letter back to it, and the dead queue.
    pub(super) async fn declare_webhooks(
        &self,
        ch: &Channel,
        retry_levels: usize,
    ) -> lapin::Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let quorum = || table(&[("x-queue-type", text("quorum"))]);
        let queue = self.webhooks_queue();
        ch.queue_declare(queue.as_str().into(), durable, quorum())
            .await?;
        for kind in crate::events::EventKind::RELAYED {
            ch.queue_bind(
                queue.as_str().into(),
                self.events_exchange().as_str().into(),
                kind.routing_key().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        for level in 0..retry_levels {
            let args = table(&[
                ("x-queue-type", text("quorum")),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&queue)),
            ]);
            ch.queue_declare(
                self.webhooks_retry_queue(level).as_str().into(),
                durable,
                args,
            )
            .await?;
        }
        ch.queue_declare(
            self.webhooks_dead_queue().as_str().into(),
            durable,
            quorum(),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let t = Topology::default();
        assert_eq!(t.queue(Lane::Interactive), "t2i.jobs");
        assert_eq!(t.queue(Lane::Bulk), "t2i.jobs.bulk");
        assert_eq!(t.dead_queue(), "t2i.jobs.dead");
        assert_eq!(t.retry_queue(Lane::Bulk, 2), "t2i.jobs.retry.bulk.2");
        assert_eq!(t.events_exchange(), "t2i.events");
    }

    #[test]
    fn a_models_pool_has_its_own_keys_and_queues_that_no_slug_can_clash_with() {
        let t = Topology::default();
        let vega = Route::of(Lane::Bulk, Some("segmind/Segmind-Vega")).unwrap();
        assert_eq!(vega.routing_key(), "bulk.segmind-vega");
        assert_eq!(t.route_queue(&vega), "t2i.jobs.bulk.segmind-vega");
        assert_eq!(
            t.route_retry_queue(&vega, 1),
            "t2i.jobs.retry.bulk.1.segmind-vega"
        );
        let plain = Route::of(Lane::Interactive, None).unwrap();
        assert_eq!(plain.routing_key(), "interactive");
        assert_eq!(t.route_queue(&plain), "t2i.jobs");
        assert_eq!(
            t.route_retry_queue(&plain, 0),
            "t2i.jobs.retry.interactive.0"
        );
        // Models named like the default pool's queues still get queues of their own.
        for name in ["bulk", "dead", "retry", "jobs"] {
            for lane in Lane::ALL {
                let r = Route::of(lane, Some(name)).unwrap();
                let q = t.route_queue(&r);
                assert!(
                    ![
                        t.queue(Lane::Interactive),
                        t.queue(Lane::Bulk),
                        t.dead_queue()
                    ]
                    .contains(&q),
                    "{q}"
                );
                assert_ne!(r.routing_key(), lane.routing_key());
            }
        }
        assert!(Route::of(Lane::Bulk, Some("")).is_err());
    }

    #[test]
    fn lanes_parse_by_their_routing_keys_only() {
        assert_eq!(Lane::parse("bulk"), Ok(Lane::Bulk));
        assert_eq!(Lane::parse(" interactive"), Ok(Lane::Interactive));
        assert_eq!(Lane::parse("Bulk"), Err(UnknownLane("Bulk".into())));
        assert!(Lane::parse("").is_err());
    }

    #[test]
    fn retry_levels_back_off_and_saturate() {
        let t = Topology::default();
        let levels: Vec<usize> = (1..=6).map(|a| t.retry_level(a)).collect();
        assert_eq!(levels, vec![0, 1, 2, 3, 3, 3]);
    }
}
