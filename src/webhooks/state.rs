//! Which receivers a `410 Gone` has disabled, kept where every relay replica and the operator's
//! `t2i webhooks enable` see it: one small JSON object per disabled receiver in an object store
//! (`--state`, `s3://bucket/prefix` or a folder), through the same [`Store`] the workers write
//! images with.
//!
//! Why a store object, not RabbitMQ or a local file: the state must outlive relay restarts and be
//! shared by replicas; the broker holds messages, not records that are read on every delivery,
//! and a local file is not shared. The store is already deployed (the workers need it), S3
//! `PUT` is atomic per object, and a folder works for a single relay or a shared volume.
//!
//! Reads are cached for `refresh` per receiver, so a relay does at most one `GET` per receiver
//! per interval; the price is that another replica, or an `enable`, takes up to `refresh` to be
//! seen. A failed read counts as enabled (logged): the receiver answers 410 again if it still
//! means it. Deliveries already in flight when the 410 arrives may still reach the receiver.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::storage::{ImageStore, StorageError, Store};

/// The state object of one receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiverState {
    /// The receiver id or ad-hoc URL, as `t2i webhooks enable` takes it.
    pub receiver: String,
    pub disabled: bool,
    /// RFC 3339, when it was last disabled or enabled.
    pub at: String,
    /// Why: `HTTP 410 Gone` with the event that got it, or who enabled it.
    pub reason: String,
}

/// The object key of `name`'s state: receiver ids are path-safe (`receivers::is_receiver_id`), an
/// ad-hoc URL is named by its SHA-256 (any length, any characters).
pub fn key(name: &str) -> String {
    if super::receivers::is_receiver_id(name) {
        format!("receivers/{name}.json")
    } else {
        format!("urls/{}.json", hex::encode(Sha256::digest(name.as_bytes())))
    }
}

/// The durable disabled state, with a per-receiver read cache.
pub struct StateStore {
    store: Store,
    refresh: Duration,
    cache: Mutex<HashMap<String, (Instant, Option<ReceiverState>)>>,
}

impl StateStore {
    pub fn new(store: Store, refresh: Duration) -> Self {
        Self {
            store,
            refresh,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The state of `name` when it is disabled, `None` when it is enabled (or never was disabled).
    pub async fn disabled(&self, name: &str) -> Option<ReceiverState> {
        if let Some((at, state)) = self.lock().get(name)
            && at.elapsed() < self.refresh
        {
            return state.clone();
        }
        let state = match self.read(name).await {
            Ok(s) => s.filter(|s| s.disabled),
            Err(e) => {
                tracing::warn!(receiver = name, error = %e, "reading receiver state; treating it as enabled");
                None
            }
        };
        self.lock()
            .insert(name.to_string(), (Instant::now(), state.clone()));
        state
    }

    /// Records `name` as disabled (`true`) or enabled, durably, and caches it.
    pub async fn set(&self, name: &str, disabled: bool, reason: &str) -> Result<(), StorageError> {
        let state = ReceiverState {
            receiver: name.to_string(),
            disabled,
            at: now_rfc3339(),
            reason: reason.to_string(),
        };
        let body = serde_json::to_vec_pretty(&state).expect("plain strings serialise");
        self.store
            .put(&key(name), body, "application/json", &[], None)
            .await?;
        let cached = disabled.then_some(state);
        self.lock()
            .insert(name.to_string(), (Instant::now(), cached));
        Ok(())
    }

    /// The stored state of `name`, uncached.
    pub async fn read(&self, name: &str) -> Result<Option<ReceiverState>, StorageError> {
        let Some(bytes) = self.store.get(&key(name)).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&bytes).ok())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<ReceiverState>)>> {
        // A panic while holding this lock leaves a map that is still consistent: keep using it.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_ids_are_keys_and_urls_are_hashed() {
        assert_eq!(key("acme"), "receivers/acme.json");
        let k = key("https://a.example/../hook?x=1");
        assert!(k.starts_with("urls/") && k.ends_with(".json"), "{k}");
        assert_eq!(k.len(), "urls/".len() + 64 + ".json".len());
    }

    #[tokio::test]
    async fn disabling_is_durable_and_enabling_undoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            StateStore::new(
                Store::Local(crate::storage::LocalStore::new(dir.path())),
                Duration::ZERO,
            )
        };
        let a = open();
        assert_eq!(a.disabled("acme").await, None);
        a.set("acme", true, "HTTP 410 Gone").await.unwrap();
        // Another replica (or the same relay after a restart) sees it.
        let b = open();
        assert_eq!(b.disabled("acme").await.unwrap().reason, "HTTP 410 Gone");
        b.set("acme", false, "enabled by operator").await.unwrap();
        assert_eq!(a.disabled("acme").await, None);
        assert!(!a.read("acme").await.unwrap().unwrap().disabled);
    }

    #[tokio::test]
    async fn reads_are_cached_for_the_refresh_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = |refresh| {
            StateStore::new(
                Store::Local(crate::storage::LocalStore::new(dir.path())),
                refresh,
            )
        };
        let cached = store(Duration::from_secs(3600));
        assert_eq!(cached.disabled("acme").await, None);
        store(Duration::ZERO)
            .set("acme", true, "410")
            .await
            .unwrap();
        assert_eq!(cached.disabled("acme").await, None, "within the interval");
        assert!(store(Duration::ZERO).disabled("acme").await.is_some());
    }
}
