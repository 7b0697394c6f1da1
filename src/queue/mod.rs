//! Everything that touches RabbitMQ (lapin), and nothing else in the crate does:
//!
//! * [`connection`]: a named [`Connection`] that hands out publishers, consumers and
//!   subscriptions, and the one [`Reconnect`] policy (jittered backoff) of every long-running
//!   subcommand;
//! * [`consumer`]: [`Consumer`]s and [`Delivery`]s whose ack, reject and requeue are bounded in time;
//! * [`publisher`]: the confirmed [`Publisher`] (events, replies, retries, jobs, control messages);
//! * [`topology`]: every exchange and queue name, the lanes, and their idempotent declaration.

pub mod connection;
pub mod consumer;
pub mod publisher;
pub mod topology;

pub use connection::{Connection, Reconnect, backoff};
pub use consumer::{Consumer, Delivery, QueueReader, ReplyTo, SETTLE_TIMEOUT};
pub use publisher::{Delivered, PendingConfirm, Publisher, QueueError};
pub use topology::{Lane, Route, Topology, UnknownLane};

/// AMQP header carrying the attempt number of a retried job (1 for the first delivery).
pub const ATTEMPT_HEADER: &str = "x-t2i-attempt";
