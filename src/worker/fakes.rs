//! In-memory stand-ins for the image store and the event sink, so the worker's decisions are
//! unit-tested without a broker or a bucket (the real ones are tested in `tests/it/worker.rs`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::complete::EventSink;
use crate::events::CloudEvent;
use crate::queue::{QueueError, ReplyTo};
use crate::storage::{ImageStore, StorageError, StoredObject};

/// Objects by key; `fail_puts`/`fail_gets` make every call fail as an unreachable store would.
#[derive(Default)]
pub struct MemoryStore {
    pub objects: Mutex<BTreeMap<String, Vec<u8>>>,
    pub fail_puts: AtomicBool,
    pub fail_gets: AtomicBool,
}

fn unreachable_store(op: &'static str, key: &str) -> StorageError {
    StorageError::S3 {
        op,
        bucket: "memory".into(),
        key: key.into(),
        message: "connection refused".into(),
    }
}

impl ImageStore for MemoryStore {
    async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        _content_type: &str,
        _metadata: &[(String, String)],
        _url_ttl: Option<Duration>,
    ) -> Result<StoredObject, StorageError> {
        if self.fail_puts.load(Ordering::Relaxed) {
            return Err(unreachable_store("PUT", key));
        }
        self.objects.lock().unwrap().insert(key.into(), body);
        Ok(StoredObject {
            bucket: None,
            key: key.into(),
            url: None,
            url_expires_at: None,
        })
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        if self.fail_gets.load(Ordering::Relaxed) {
            return Err(unreachable_store("GET", key));
        }
        Ok(self.objects.lock().unwrap().get(key).cloned())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        if self.fail_puts.load(Ordering::Relaxed) {
            return Err(unreachable_store("DELETE", key));
        }
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<Vec<String>, StorageError> {
        if self.fail_gets.load(Ordering::Relaxed) {
            return Err(unreachable_store("LIST", prefix));
        }
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .keys()
            .filter(|k| k.starts_with(prefix) && start_after.is_none_or(|a| k.as_str() > a))
            .take(crate::storage::LIST_PAGE)
            .cloned()
            .collect())
    }

    async fn presign(
        &self,
        stored_key: &str,
        ttl: Duration,
    ) -> Result<Option<(String, Option<time::OffsetDateTime>)>, StorageError> {
        let expires = time::OffsetDateTime::UNIX_EPOCH + ttl;
        Ok(Some((format!("memory://{stored_key}"), Some(expires))))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Every announced event with its reply target; `fail` refuses every publish.
#[derive(Default)]
pub struct RecordingSink {
    pub events: Mutex<Vec<(CloudEvent, Option<ReplyTo>)>>,
    pub fail: AtomicBool,
}

impl RecordingSink {
    /// The CloudEvents types announced so far, in order.
    pub fn kinds(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.kind.clone())
            .collect()
    }

    pub fn last(&self) -> CloudEvent {
        let events = self.events.lock().unwrap();
        events.last().expect("an event was announced").0.clone()
    }
}

impl EventSink for RecordingSink {
    async fn announce(
        &self,
        event: &CloudEvent,
        reply: Option<&ReplyTo>,
    ) -> Result<(), QueueError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(QueueError::Unconfirmed(format!(
                "event for {}",
                event.subject
            )));
        }
        self.events
            .lock()
            .unwrap()
            .push((event.clone(), reply.cloned()));
        Ok(())
    }
}
