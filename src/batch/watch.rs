//! `t2i batch watch` (and `t2i enqueue --wait`): follow a batch until every job has ended.
//!
//! Subscribe to the terminal events first, then count what the store already holds ([`scan`]),
//! then count events as they come, each job once. A lost broker connection is not the end: after a
//! reconnect the store is listed again, which counts whatever ended while no one was listening. So
//! the count is right whatever the broker did, and the events only make it prompt.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use super::{BatchRecord, Counts, Seen, scan};
use crate::cli::{BatchWatchArgs, UsageError, WatchArgs};
use crate::events::{CloudEvent, EventKind};
use crate::queue::{Reconnect, Topology};
use crate::storage::Store;

/// Failures kept for the report (the rest are counted).
const FAILURES_SHOWN: usize = 20;

/// The batch being followed.
pub struct Target<'a> {
    pub store: &'a Store,
    pub key_prefix: &'a str,
    pub batch_id: &'a str,
    pub total: u64,
}

/// How a followed batch ended.
#[derive(Debug, Default)]
pub struct Finished {
    pub counts: Counts,
    /// Up to [`FAILURES_SHOWN`] failed jobs with what their event said.
    pub failures: Vec<(String, String)>,
}

/// The jobs that have ended, each once, and the progress bar that shows them.
struct Tally {
    ended: HashMap<Box<str>, bool>,
    failed: u64,
    failures: Vec<(String, String)>,
    bar: indicatif::ProgressBar,
}

impl Tally {
    fn new(total: u64, quiet: bool) -> Self {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total)
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {pos}/{len} ended, {msg} {per_sec} ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        Self {
            ended: HashMap::new(),
            failed: 0,
            failures: Vec::new(),
            bar,
        }
    }

    /// Counts `job` once; later news of it (a redelivery announced twice) changes nothing.
    fn end(&mut self, job: &str, ok: bool, why: impl FnOnce() -> String) {
        if self.ended.contains_key(job) {
            return;
        }
        self.ended.insert(job.into(), ok);
        if !ok {
            self.failed += 1;
            if self.failures.len() < FAILURES_SHOWN {
                self.failures.push((job.to_string(), why()));
            }
        }
        self.bar.set_position(self.ended.len() as u64);
        self.bar.set_message(format!("{} failed", self.failed));
    }
}

/// Follows `t` until all of its `total` jobs have ended (or the timeout passes: an error).
pub async fn follow(
    t: &Target<'_>,
    amqp_url: &str,
    topology: &Topology,
    opts: &WatchArgs,
) -> Result<Finished> {
    let deadline =
        (opts.timeout_s > 0).then(|| Instant::now() + Duration::from_secs(opts.timeout_s));
    let mut tally = Tally::new(t.total, opts.quiet);
    let never = CancellationToken::new();
    let reconnect = Reconnect::new(amqp_url, "t2i batch watch");
    let timed_out = |tally: &Tally| {
        tally.bar.abandon();
        anyhow::anyhow!(
            "timed out: {} of {} job(s) ended",
            tally.ended.len(),
            t.total
        )
    };
    loop {
        let conn = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), reconnect.connect(&never))
                .await
                .map_err(|_| timed_out(&tally))?,
            None => reconnect.connect(&never).await,
        }
        .context("connecting to RabbitMQ")?;
        let subscribed = async {
            conn.declare(topology).await?;
            conn.subscribe_events(topology, &EventKind::TERMINAL).await
        };
        let mut events = match subscribed.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "subscribing to the events; reconnecting");
                conn.close("retrying").await;
                reconnect.pause(&never).await;
                continue;
            }
        };
        // Whatever ended before this subscription (or while disconnected) is in the store.
        scan(t.store, t.key_prefix, |job, seen| {
            if seen.is_terminal() {
                let why = || format!("recorded in {job}/failure.json");
                tally.end(job, seen == Seen::Done, why);
            }
        })
        .await
        .with_context(|| format!("listing {}", t.key_prefix))?;
        while (tally.ended.len() as u64) < t.total {
            let next = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), events.next())
                    .await
                    .map_err(|_| timed_out(&tally))?,
                None => events.next().await,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                _ => break,
            };
            let Ok(event) = serde_json::from_slice::<CloudEvent>(delivery.body()) else {
                continue;
            };
            let ours = event
                .data
                .batch
                .as_ref()
                .and_then(|b| b.get("id"))
                .and_then(|id| id.as_str())
                == Some(t.batch_id);
            if !ours {
                continue;
            }
            let ok = event.data.status == "succeeded";
            let why = || {
                event.data.error.as_ref().map_or_else(
                    || event.data.status.clone(),
                    |e| format!("{:?}: {}", e.code, e.message),
                )
            };
            tally.end(&event.subject, ok, why);
        }
        if tally.ended.len() as u64 >= t.total {
            conn.close("done").await;
            break;
        }
        tracing::warn!("lost the event stream; reconnecting (the store is listed again after)");
        conn.close("reconnecting").await;
        reconnect.pause(&never).await;
    }
    tally.bar.finish();
    let done = tally.ended.values().filter(|ok| **ok).count() as u64;
    let counts = Counts {
        done,
        failed: tally.failed,
        ..Counts::default()
    }
    .with_total(Some(t.total));
    Ok(Finished {
        counts,
        failures: tally.failures,
    })
}

/// Prints the failures kept, and says whether all succeeded.
pub fn report(f: &Finished) -> Result<()> {
    for (job, why) in &f.failures {
        eprintln!("failed: {job} ({why})");
    }
    if f.counts.failed > 0 {
        anyhow::bail!(
            "{} of {} job(s) did not succeed",
            f.counts.failed,
            f.counts.total.unwrap_or(0)
        );
    }
    Ok(())
}

pub async fn run(args: BatchWatchArgs) -> Result<()> {
    let (store, prefix) = super::open(&args.target).await?;
    let record = BatchRecord::read(&store, &prefix).await?;
    let Some(total) = args.total.or(record.map(|r| r.total)) else {
        return Err(UsageError(format!(
            "no {} under {prefix}: give --total (or --key-prefix, if the batch is elsewhere)",
            BatchRecord::NAME
        ))
        .into());
    };
    let topology = crate::config::topology(&args.broker)?;
    let target = Target {
        store: &store,
        key_prefix: &prefix,
        batch_id: &args.target.batch_id,
        total,
    };
    let started = Instant::now();
    let finished = follow(&target, &args.broker.amqp_url, &topology, &args.watch).await?;
    eprintln!(
        "batch {}: {} job(s) ended ({} done, {} failed), watched for {:.1}s",
        args.target.batch_id,
        total,
        finished.counts.done,
        finished.counts.failed,
        started.elapsed().as_secs_f64()
    );
    report(&finished)
}
