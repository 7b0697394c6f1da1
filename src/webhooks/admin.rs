//! The operator commands beside the relay: `t2i webhooks enable` (undo a 410's disable),
//! `t2i webhooks replay` (dead letters back to the relay) and `t2i webhooks url-secret` (the secret
//! to hand to an ad-hoc receiver). Each runs once and exits; none needs a running relay.
//!
//! Replay moves, it does not copy: each dead letter is published (confirmed) to `{p}.webhooks`
//! with its target headers and attempt 0, then acked, so it is retried for that one target with
//! the whole retry schedule. One it does not want is published to the dead queue's tail and
//! acked, never nacked: RabbitMQ 4 quorum queues count requeues against a delivery limit (20 by
//! default) and drop the message past it. Only the messages present when it starts are looked
//! at. A crash between publish and ack leaves a duplicate, which receivers deduplicate on
//! `webhook-id`. Run one replay at a time.

use anyhow::{Context, Result};
use reqwest::Url;

use super::receivers::is_receiver_id;
use super::sign::Secrets;
use super::state::StateStore;
use super::{ATTEMPT_HEADER, REASON_HEADER, RECEIVER_HEADER, TARGET_HEADER};
use crate::cli::{
    UsageError, WebhookStateArgs, WebhooksEnableArgs, WebhooksReplayArgs, WebhooksUrlSecretArgs,
};
use crate::queue::{Connection, Delivery};
use crate::storage::{S3Options, Store};

/// The store that holds receiver state (`--state`).
pub(super) async fn open_state(args: &WebhookStateArgs) -> Result<Store> {
    let s3 = S3Options {
        force_path_style: args.s3_force_path_style,
        public_endpoint: None,
    };
    Store::open(&args.state, &s3)
        .await
        .with_context(|| format!("opening the receiver state store {}", args.state))
}

/// A receiver id as is, or an ad-hoc receiver's URL as the relay writes it.
fn receiver_name(s: &str) -> Result<String, UsageError> {
    if let Ok(url) = Url::parse(s)
        && matches!(url.scheme(), "http" | "https")
    {
        return Ok(url.to_string());
    }
    if is_receiver_id(s) {
        return Ok(s.to_string());
    }
    Err(UsageError(format!(
        "{s:?} is neither a receiver id ([A-Za-z0-9._-]) nor an http(s) URL"
    )))
}

pub(super) async fn enable(args: WebhooksEnableArgs) -> Result<()> {
    let name = receiver_name(&args.receiver)?;
    // No cache: this process reads and writes once.
    let state = StateStore::new(open_state(&args.state).await?, std::time::Duration::ZERO);
    let before = state.read(&name).await?;
    state
        .set(&name, false, "enabled by `t2i webhooks enable`")
        .await?;
    match before.filter(|s| s.disabled) {
        Some(s) => println!(
            "enabled {name} (disabled since {}: {}); relays apply it within --state-refresh-s. \
             Its events since then are dead-lettered: `t2i webhooks replay --receiver {name}`",
            s.at, s.reason
        ),
        None => println!("{name} was not disabled"),
    }
    Ok(())
}

pub(super) fn url_secret(args: WebhooksUrlSecretArgs) -> Result<()> {
    let keys =
        Secrets::parse_list(&args.url_key).map_err(|e| UsageError(format!("--url-key: {e}")))?;
    if keys.is_empty() {
        return Err(UsageError("--url-key is empty".into()).into());
    }
    let url = Url::parse(&args.url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| UsageError(format!("{}: not an http(s) URL", args.url)))?;
    for key in keys {
        println!("{}", key.derive(&url).to_whsec());
    }
    Ok(())
}

/// What one replay run did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Replayed {
    moved: u64,
    kept: u64,
}

pub(super) async fn replay(args: WebhooksReplayArgs) -> Result<()> {
    let topology = crate::config::topology(&args.broker)?;
    let filter = args.receiver.as_deref().map(receiver_name).transpose()?;
    let conn = Connection::open(&args.broker.amqp_url, "t2i webhooks replay")
        .await
        .context("connecting to RabbitMQ")?;
    let result = move_dead_letters(&conn, &topology, filter.as_deref(), args.limit).await;
    conn.close("replayed").await;
    let r = result?;
    println!(
        "replayed {} dead-lettered deliveries to {}; {} others looked at and left in {}",
        r.moved,
        topology.webhooks_queue(),
        r.kept,
        topology.webhooks_dead_queue()
    );
    Ok(())
}

async fn move_dead_letters(
    conn: &Connection,
    topology: &crate::queue::Topology,
    filter: Option<&str>,
    limit: Option<u64>,
) -> Result<Replayed> {
    // Nothing is declared: both queues exist once a relay has run (a dead letter implies one did),
    // and declaring the topology here would have to repeat every T2I_RETRY_DELAYS the relay used.
    let (dead, live) = (topology.webhooks_dead_queue(), topology.webhooks_queue());
    let reader = conn.reader(&dead).await?;
    let publisher = conn.publisher(topology).await?;
    let mut out = Replayed::default();
    let mut todo: Option<u64> = None;
    while todo != Some(0) && limit.is_none_or(|l| out.moved < l) {
        let Some((d, left)) = reader.get().await? else {
            break;
        };
        // The first answer says how many there are; later arrivals are not looked at.
        let n = todo.get_or_insert(u64::from(left) + 1);
        *n -= 1;
        let wanted = is_for(&d, filter);
        let mut headers: Vec<(&str, String)> = [TARGET_HEADER, RECEIVER_HEADER, REASON_HEADER]
            .into_iter()
            .filter_map(|k| Some((k, d.header_text(k)?)))
            .collect();
        if wanted {
            headers.push((ATTEMPT_HEADER, "0".into()));
            publisher.to_queue(&live, d.body(), &headers, None).await?;
            out.moved += 1;
        } else {
            if let Some(a) = d
                .header_text(ATTEMPT_HEADER)
                .or_else(|| d.header_int(ATTEMPT_HEADER).map(|n| n.to_string()))
            {
                headers.push((ATTEMPT_HEADER, a));
            }
            publisher.to_queue(&dead, d.body(), &headers, None).await?;
            out.kept += 1;
        }
        d.ack().await?;
    }
    Ok(out)
}

/// Whether a dead letter is for `filter` (a receiver id or a URL; `None`: every one). One without
/// a target header is not a relay's copy and stays.
fn is_for(d: &Delivery, filter: Option<&str>) -> bool {
    let Some(target) = d.header_text(TARGET_HEADER) else {
        return false;
    };
    let Some(f) = filter else {
        return true;
    };
    let url = Url::parse(&target).map(|u| u.to_string()).unwrap_or(target);
    d.header_text(RECEIVER_HEADER).as_deref() == Some(f) || url == f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_are_named_by_id_or_normalised_url() {
        assert_eq!(receiver_name("acme").unwrap(), "acme");
        assert_eq!(
            receiver_name("HTTPS://Hooks.Example:443/x").unwrap(),
            "https://hooks.example/x"
        );
        assert!(receiver_name("../etc").is_err());
        assert!(receiver_name("ftp://x/").is_err());
    }
}
