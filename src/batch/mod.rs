//! Batches as objects of the store: `t2i batch status|watch|manifest|contact-sheet <batch-id>` work on a batch
//! that exists, from the store (and, for `watch`, the events), publishing nothing.
//!
//! A batch is its key prefix (`datasets/<batch id>/` unless `--key-prefix` chose another): its
//! jobs' folders with their records ([`crate::records`]) and images, and `batch.json`, written by
//! `t2i enqueue` ([`BatchRecord`]: how many jobs, how many were published). Its state is one
//! paginated listing of that prefix ([`scan`]): a job with `result.json` is done, with
//! `failure.json` ended without images (failed, canceled or expired), with only `status.json`
//! running; the rest of `total` is pending (queued, or never published when `published` is
//! short of `total`).

pub mod manifest;
pub mod sheet;
pub mod watch;

use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::cli::{BatchCommand, BatchStatusArgs, BatchTarget};
use crate::events::rfc3339;
use crate::records::Listed;
use crate::storage::{ImageStore, StorageError, Store, list_all};

/// `batch.json` at a batch's key prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub batch_id: String,
    pub key_prefix: String,
    /// Jobs in the batch.
    pub total: u64,
    /// Jobs confirmed by the broker, in plan order: every job before this index was published.
    pub published: u64,
    pub lane: String,
    pub created_at: String,
    pub updated_at: String,
}

impl BatchRecord {
    pub const NAME: &'static str = "batch.json";

    pub fn new(batch_id: &str, key_prefix: &str, total: u64, lane: &str) -> Self {
        let now = rfc3339(OffsetDateTime::now_utc());
        Self {
            batch_id: batch_id.into(),
            key_prefix: key_prefix.into(),
            total,
            published: 0,
            lane: lane.into(),
            created_at: now.clone(),
            updated_at: now,
        }
    }

    pub async fn read<S: ImageStore>(
        store: &S,
        key_prefix: &str,
    ) -> Result<Option<Self>, StorageError> {
        let key = format!("{key_prefix}{}", Self::NAME);
        Ok(store
            .get(&key)
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub async fn write<S: ImageStore>(&mut self, store: &S) -> Result<(), StorageError> {
        self.updated_at = rfc3339(OffsetDateTime::now_utc());
        let key = format!("{}{}", self.key_prefix, Self::NAME);
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        store
            .put(&key, body, "application/json", &[], None)
            .await
            .map(drop)
    }
}

/// What a listing says about one job: the most telling of its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Running,
    /// `failure.json`: failed, canceled or expired.
    Ended,
    Done,
}

impl Seen {
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

/// Lists `key_prefix` once, page by page, and calls `each` once per job that has a record, with
/// what its records say. A job's keys are contiguous in a listing (they share `{job}/`), so one
/// job is held at a time: memory is one page whatever the batch's size. Returns the object count.
pub async fn scan<S: ImageStore>(
    store: &S,
    key_prefix: &str,
    mut each: impl FnMut(&str, Seen),
) -> Result<u64, StorageError> {
    fn flush(c: Option<(String, Listed)>, each: &mut impl FnMut(&str, Seen)) {
        let Some((job, best)) = c else { return };
        let seen = match best {
            Listed::Result => Seen::Done,
            Listed::Failure => Seen::Ended,
            Listed::Status => Seen::Running,
            Listed::Other => return,
        };
        each(&job, seen);
    }
    let mut current: Option<(String, Listed)> = None;
    let objects = list_all(store, key_prefix, |page| {
        for key in page {
            let Some((job, what)) = Listed::of(key, key_prefix) else {
                continue;
            };
            match &mut current {
                Some((j, best)) if j == job => *best = (*best).max(what),
                _ => flush(current.replace((job.to_string(), what)), &mut each),
            }
        }
    })
    .await?;
    flush(current.take(), &mut each);
    Ok(objects)
}

/// A batch's counts by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub done: u64,
    /// Ended without images: failed, canceled or expired.
    pub failed: u64,
    pub running: u64,
    /// `total` less the others; `None` without a `batch.json` to say the total.
    pub pending: Option<u64>,
    pub total: Option<u64>,
}

impl Counts {
    pub fn add(&mut self, seen: Seen) {
        match seen {
            Seen::Done => self.done += 1,
            Seen::Ended => self.failed += 1,
            Seen::Running => self.running += 1,
        }
    }

    pub fn with_total(mut self, total: Option<u64>) -> Self {
        self.total = total;
        self.pending = total.map(|t| t.saturating_sub(self.done + self.failed + self.running));
        self
    }
}

/// A batch's key prefix: the one given, else `datasets/<batch id>/` (`t2i enqueue`'s default).
pub fn key_prefix(target: &BatchTarget) -> Result<String> {
    let p = match &target.key_prefix {
        Some(p) if !p.is_empty() && !p.ends_with('/') => format!("{p}/"),
        Some(p) => p.clone(),
        None => format!("datasets/{}/", target.batch_id),
    };
    crate::job::message::check_key_prefix(&p)
        .map_err(|r| crate::cli::UsageError(format!("--key-prefix: {}", r.reason)))?;
    Ok(p)
}

pub async fn open(target: &BatchTarget) -> Result<(Store, String)> {
    let storage = &target.storage.storage;
    let store = Store::open(storage, &target.storage.s3_options())
        .await
        .with_context(|| format!("opening the store {storage}"))?;
    Ok((store, key_prefix(target)?))
}

pub async fn run(cmd: BatchCommand) -> Result<()> {
    match cmd {
        BatchCommand::Status(a) => status(a).await,
        BatchCommand::Watch(a) => watch::run(a).await,
        BatchCommand::Manifest(a) => manifest::run(a).await,
        BatchCommand::ContactSheet(a) => sheet::run(a).await,
    }
}

async fn status(args: BatchStatusArgs) -> Result<()> {
    let (store, prefix) = open(&args.target).await?;
    let started = Instant::now();
    let record = BatchRecord::read(&store, &prefix).await?;
    let mut counts = Counts::default();
    let objects = scan(&store, &prefix, |_, seen| counts.add(seen)).await?;
    let counts = counts.with_total(record.as_ref().map(|r| r.total));
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let v = serde_json::json!({"batch_id": args.target.batch_id, "key_prefix": prefix,
            "counts": counts, "published": record.as_ref().map(|r| r.published),
            "objects_listed": objects, "seconds": secs});
        println!("{v}");
        return Ok(());
    }
    let total = counts.total.map_or("?".into(), |t| t.to_string());
    let pending = counts.pending.map_or("?".into(), |p| p.to_string());
    println!(
        "batch {} ({}{prefix}): {total} job(s): {} done, {} failed, {} running, {pending} pending",
        args.target.batch_id,
        store_name(&store),
        counts.done,
        counts.failed,
        counts.running,
    );
    match &record {
        None => println!("  no {} here: the total is unknown", BatchRecord::NAME),
        Some(r) if r.published < r.total => println!(
            "  only {} of {} job(s) were confirmed published: rerun the same `t2i enqueue` to publish the rest",
            r.published, r.total
        ),
        Some(_) => {}
    }
    eprintln!("listed {objects} object(s) in {secs:.2}s");
    Ok(())
}

fn store_name(store: &Store) -> String {
    let d = store.describe();
    if d.ends_with('/') { d } else { format!("{d}/") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::fakes::MemoryStore;

    #[tokio::test]
    async fn a_scan_reports_each_job_once_by_its_most_telling_record() {
        let store = MemoryStore::default();
        let put = |k: &str| {
            store.objects.lock().unwrap().insert(k.into(), vec![]);
        };
        put("d/b/batch.json");
        for (job, names) in [
            ("b-1", &["0.png", "result.json", "status.json"][..]),
            ("b-1-x", &["failure.json", "status.json"][..]),
            ("b-2", &["status.json"][..]),
            ("b-3", &["0.png"][..]),
        ] {
            for n in names {
                put(&format!("d/b/{job}/{n}"));
            }
        }
        // Beyond one page, so paging is exercised.
        for i in 0..1500 {
            put(&format!("d/b/c-{i:04}/result.json"));
        }
        put("d/other/z/result.json");
        let mut seen = Vec::new();
        let objects = scan(&store, "d/b/", |j, s| seen.push((j.to_string(), s)))
            .await
            .unwrap();
        assert_eq!(objects, 1 + 3 + 2 + 1 + 1 + 1500);
        // Listing order: `b-1-x/` sorts before `b-1/` ('-' < '/'); each job still comes once.
        assert_eq!(
            &seen[..3],
            &[
                ("b-1-x".to_string(), Seen::Ended),
                ("b-1".to_string(), Seen::Done),
                ("b-2".to_string(), Seen::Running),
            ]
        );
        assert_eq!(seen.len(), 3 + 1500, "b-3 has no record yet");
        let mut c = Counts::default();
        seen.iter().for_each(|(_, s)| c.add(*s));
        let c = c.with_total(Some(1510));
        assert_eq!(
            (c.done, c.failed, c.running, c.pending),
            (1501, 1, 1, Some(7))
        );
    }
}
