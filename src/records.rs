//! What the store keeps about each job beside its images, so that its state can be read back from
//! the store alone (the gateway's `GET /v1/jobs/{id}`, `t2i batch`), without the broker:
//!
//! | object (under the job's `output.key_prefix`) | written by                  | state                  |
//! |----------------------------------------------|-----------------------------|------------------------|
//! | `{job}/status.json`                          | gateway at submit; worker at start | queued, running |
//! | `{job}/failure.json`                         | worker, before announcing   | failed, canceled, expired |
//! | `{job}/result.json`                          | worker, after every image   | succeeded              |
//! | `_index/{job}.json` (store root)             | gateway; worker at start    | the job's key prefix   |
//!
//! Each holds the data of the job's latest event ([`EventData`], as in the events) and
//! `updated_at`. A reader takes the first that exists of result → failure → status: a terminal
//! record is never overwritten by a later, slower `running` write, because they are different
//! objects. A listing alone tells a batch's counts ([`Listed`]): no object needs to be read.
//! A batch's own record, `batch.json` at its key prefix, is `crate::batch`'s.
//!
//! Stored records hold durable locations only (bucket and key); presigned URLs expire, so they are
//! made when a record is read ([`presign_images`]). The index exists because a job is found by id
//! while its objects live under a prefix its producer chose: one small object per prefixed job,
//! written once.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::events::{EventData, rfc3339};
use crate::job::JobId;
use crate::storage::{ImageStore, ObjectKey, StorageError};

/// A job's state as its records tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    Expired,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }

    /// The object this state is recorded in.
    fn key(self, key_prefix: &str, job: &JobId) -> String {
        match self {
            Self::Queued | Self::Running => ObjectKey::status(key_prefix, job),
            Self::Succeeded => ObjectKey::result(key_prefix, job),
            Self::Failed | Self::Canceled | Self::Expired => ObjectKey::failure(key_prefix, job),
        }
    }

    /// An event's `status` (`started` reads as running).
    pub fn parse(status: &str) -> Option<Self> {
        Some(match status {
            "queued" => Self::Queued,
            "started" | "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            "expired" => Self::Expired,
            _ => return None,
        })
    }
}

/// One stored record: the latest event's data, with `status` set to the state, and its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub data: EventData,
    /// RFC 3339; absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

impl Record {
    /// The record of `state` for `data`, stamped now, with durable image locations only.
    pub fn new(state: JobState, mut data: EventData) -> Self {
        data.status = state.as_str().into();
        for img in &mut data.images {
            img.url = None;
            img.url_expires_at = None;
        }
        Self {
            data,
            updated_at: Some(rfc3339(OffsetDateTime::now_utc())),
        }
    }

    pub fn state(&self) -> Option<JobState> {
        JobState::parse(&self.data.status)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys always serialises.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// Writes `record` where its state belongs under `key_prefix`.
pub async fn write<S: ImageStore>(
    store: &S,
    key_prefix: &str,
    job: &JobId,
    record: &Record,
) -> Result<(), StorageError> {
    let state = record.state().unwrap_or(JobState::Failed);
    let key = state.key(key_prefix, job);
    store
        .put(&key, record.to_json(), "application/json", &[], None)
        .await
        .map(drop)
}

#[derive(Serialize, Deserialize)]
struct IndexEntry {
    job_id: String,
    key_prefix: String,
}

/// Records where `job`'s objects live, for lookups by id; nothing to record for an empty prefix.
pub async fn write_index<S: ImageStore>(
    store: &S,
    job: &JobId,
    key_prefix: &str,
) -> Result<(), StorageError> {
    if key_prefix.is_empty() {
        return Ok(());
    }
    let entry = IndexEntry {
        job_id: job.to_string(),
        key_prefix: key_prefix.to_string(),
    };
    let body = serde_json::to_vec(&entry).unwrap_or_default();
    store
        .put(&ObjectKey::index(job), body, "application/json", &[], None)
        .await
        .map(drop)
}

/// Writes where `job`'s objects live (for a prefixed job), then `record`: what every writer of a
/// record does, so a lookup by id finds it.
pub async fn write_with_index<S: ImageStore>(
    store: &S,
    key_prefix: &str,
    job: &JobId,
    record: &Record,
) -> Result<(), StorageError> {
    write_index(store, job, key_prefix).await?;
    write(store, key_prefix, job, record).await
}

/// The key prefix of `job`: the one given, else the index's, else none (the store root).
pub async fn key_prefix_of<S: ImageStore>(
    store: &S,
    job: &JobId,
    given: Option<&str>,
) -> Result<String, StorageError> {
    if let Some(p) = given {
        return Ok(p.to_string());
    }
    Ok(store
        .get(&ObjectKey::index(job))
        .await?
        .and_then(|b| serde_json::from_slice::<IndexEntry>(&b).ok())
        .map(|e| e.key_prefix)
        .unwrap_or_default())
}

/// The latest record of `job` under `key_prefix`: result, else failure, else status. `None` when
/// there is none (never queued through the gateway, not started yet, or unknown). An unreadable
/// object is skipped as if absent.
pub async fn read<S: ImageStore>(
    store: &S,
    key_prefix: &str,
    job: &JobId,
) -> Result<Option<Record>, StorageError> {
    for state in [JobState::Succeeded, JobState::Failed, JobState::Running] {
        if let Some(bytes) = store.get(&state.key(key_prefix, job)).await?
            && let Ok(mut r) = serde_json::from_slice::<Record>(&bytes)
        {
            if r.state().is_none() {
                r.data.status = state.as_str().into();
            }
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// Fresh presigned URLs for every image of `data`, valid for `ttl`.
pub async fn presign_images<S: ImageStore>(
    store: &S,
    data: &mut EventData,
    ttl: Duration,
) -> Result<(), StorageError> {
    for img in &mut data.images {
        let signed = store.presign(&img.key, ttl).await?;
        (img.url, img.url_expires_at) = match signed {
            Some((url, expires)) => (Some(url), expires.map(rfc3339)),
            None => (None, None),
        };
    }
    Ok(())
}

/// What one object of a job's folder is, as a listing shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Listed {
    /// An image, or anything else that is not a record.
    Other,
    Status,
    Failure,
    Result,
}

impl Listed {
    /// Splits `key` (relative to the store) of a listing of `key_prefix` into the job it belongs
    /// to (`{key_prefix}{job}/{name}`) and what it is; `None` for keys outside any job's folder.
    /// The order (`Result` > `Failure` > `Status`) is the order readers trust them in.
    pub fn of<'a>(key: &'a str, key_prefix: &str) -> Option<(&'a str, Self)> {
        let (job, name) = key.strip_prefix(key_prefix)?.split_once('/')?;
        let what = match name {
            "result.json" => Self::Result,
            "failure.json" => Self::Failure,
            "status.json" => Self::Status,
            _ => Self::Other,
        };
        Some((job, what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::ImageRecord;
    use crate::worker::fakes::MemoryStore;

    fn data(status: &str) -> EventData {
        EventData {
            job_id: "j-1".into(),
            status: status.into(),
            attempt: 1,
            worker: "w".into(),
            model: "m".into(),
            params: None,
            images: vec![ImageRecord {
                index: 0,
                seed: 7,
                bucket: Some("b".into()),
                key: "p/j-1/0.png".into(),
                url: Some("https://expiring".into()),
                url_expires_at: Some("2026-01-01T00:00:00Z".into()),
                content_type: "image/png".into(),
                width: 64,
                height: 64,
                bytes: 10,
                sha256: "00".into(),
            }],
            timings_ms: None,
            error: None,
            progress: None,
            prompt_truncated: false,
            batch: None,
            metadata: None,
            safety_checker: None,
        }
    }

    #[test]
    fn records_keep_durable_locations_only() {
        let r = Record::new(JobState::Succeeded, data("succeeded"));
        assert_eq!(r.data.images[0].url, None);
        assert_eq!(r.data.images[0].url_expires_at, None);
        assert_eq!(r.data.images[0].key, "p/j-1/0.png");
        let back: Record = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(back, r);
        // A record reads as the event data it extends (result.json's older readers).
        let plain: EventData = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(plain.status, "succeeded");
    }

    #[tokio::test]
    async fn a_terminal_record_wins_over_a_later_running_write() {
        let store = MemoryStore::default();
        let id = JobId::parse("j-1").unwrap();
        let failed = Record::new(JobState::Canceled, data("canceled"));
        write(&store, "p/", &id, &failed).await.unwrap();
        // A slow `running` write landing after the terminal one.
        let running = Record::new(JobState::Running, data("started"));
        write(&store, "p/", &id, &running).await.unwrap();
        let got = read(&store, "p/", &id).await.unwrap().unwrap();
        assert_eq!(got.state(), Some(JobState::Canceled));
        // Success wins over an earlier failure record (a job replayed after failing).
        let ok = Record::new(JobState::Succeeded, data("succeeded"));
        write(&store, "p/", &id, &ok).await.unwrap();
        let got = read(&store, "p/", &id).await.unwrap().unwrap();
        assert_eq!(got.state(), Some(JobState::Succeeded));
        assert_eq!(read(&store, "q/", &id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_index_finds_a_prefixed_job_by_id() {
        let store = MemoryStore::default();
        let id = JobId::parse("j-1").unwrap();
        assert_eq!(key_prefix_of(&store, &id, None).await.unwrap(), "");
        write_index(&store, &id, "datasets/b/").await.unwrap();
        assert_eq!(
            key_prefix_of(&store, &id, None).await.unwrap(),
            "datasets/b/"
        );
        assert_eq!(key_prefix_of(&store, &id, Some("x/")).await.unwrap(), "x/");
        // No index object for jobs at the root.
        let root = JobId::parse("j-2").unwrap();
        write_index(&store, &root, "").await.unwrap();
        assert!(
            !store
                .objects
                .lock()
                .unwrap()
                .contains_key("_index/j-2.json")
        );
    }

    #[tokio::test]
    async fn reading_presigns_afresh() {
        let store = MemoryStore::default();
        let mut d = Record::new(JobState::Succeeded, data("succeeded")).data;
        presign_images(&store, &mut d, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(d.images[0].url.as_deref(), Some("memory://p/j-1/0.png"));
        assert!(d.images[0].url_expires_at.is_some());
    }

    #[test]
    fn listed_keys_classify_by_name() {
        let of = |k| Listed::of(k, "d/b/");
        assert_eq!(of("d/b/b-1/result.json"), Some(("b-1", Listed::Result)));
        assert_eq!(of("d/b/b-1/failure.json"), Some(("b-1", Listed::Failure)));
        assert_eq!(of("d/b/b-1/status.json"), Some(("b-1", Listed::Status)));
        assert_eq!(of("d/b/b-1/0.png"), Some(("b-1", Listed::Other)));
        assert_eq!(of("d/b/batch.json"), None);
        assert_eq!(of("e/b-1/result.json"), None);
    }
}
