//! Everything that touches RabbitMQ (lapin): connecting with jittered backoff, the topology
//! (`topology.rs`), and the confirmed publisher (`publisher.rs`). Workers, `enqueue` and tests share
//! it; nothing else in the crate imports lapin.

pub mod publisher;
pub mod topology;

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

pub use publisher::{Publisher, QueueError};
pub use topology::{Lane, Topology};

/// AMQP header carrying the attempt number of a retried job (1 for the first delivery).
pub const ATTEMPT_HEADER: &str = "x-t2i-attempt";

/// A server-named, exclusive, auto-deleted queue: a worker's control queue, a client's event or
/// reply queue. It lives as long as the channel's connection.
pub async fn declare_private_queue(ch: &lapin::Channel) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        "".into(),
        lapin::options::QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
}

/// Connects once, naming the connection so operators can see it in the management UI.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// Exponential backoff with full jitter: attempt n (0-based) waits uniformly in [0, min(cap, base·2ⁿ)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let max = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    max.mul_f64(rand::random::<f64>())
}

/// Connects, retrying with jittered backoff until it works or `give_up` resolves.
pub async fn connect_with_retry(
    url: &str,
    name: &str,
    give_up: &tokio_util::sync::CancellationToken,
) -> Option<Connection> {
    let mut attempt = 0;
    loop {
        match connect(url, name).await {
            Ok(c) => return Some(c),
            Err(e) => {
                let wait = backoff(attempt, Duration::from_millis(200), Duration::from_secs(10));
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
