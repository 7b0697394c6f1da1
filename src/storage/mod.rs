//! Where images and `result.json` go: an S3-compatible bucket (`s3://bucket/prefix`) or a local folder
//! (`file:///path`, or a plain path; the default is `./outputs`), behind the [`ImageStore`] trait.
//!
//! Keys are deterministic (`{prefix}{key_prefix}{job_id}/{index}.{ext}` and `…/result.json`,
//! [`ObjectKey`]), so a redelivered job overwrites its own objects instead of duplicating them. This
//! module does not know about queues or events.

mod local;
mod s3;

use std::future::Future;
use std::time::Duration;

use time::OffsetDateTime;

pub use local::LocalStore;
pub use s3::{S3Store, sdk_client};

use crate::job::JobId;

/// Deterministic object keys for a job (docs/architecture.md §2 "Stored images").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey;

impl ObjectKey {
    pub fn image(key_prefix: &str, job: &JobId, index: u32, ext: &str) -> String {
        format!("{key_prefix}{job}/{index}.{ext}")
    }

    pub fn result(key_prefix: &str, job: &JobId) -> String {
        format!("{key_prefix}{job}/result.json")
    }

    /// A job that ended without images: failed, canceled or expired (`crate::records`).
    pub fn failure(key_prefix: &str, job: &JobId) -> String {
        format!("{key_prefix}{job}/failure.json")
    }

    /// A job's latest non-terminal state: queued or running (`crate::records`).
    pub fn status(key_prefix: &str, job: &JobId) -> String {
        format!("{key_prefix}{job}/status.json")
    }

    /// Where a job with a key prefix is found from its id alone (`GET /v1/jobs/{id}`).
    pub fn index(job: &JobId) -> String {
        format!("{INDEX_PREFIX}{job}.json")
    }
}

/// The reserved top-level folder of the id → key prefix index; no job's `output.key_prefix` may
/// start with it (`Job::parse`).
pub const INDEX_PREFIX: &str = "_index/";

/// At most this many keys per [`ImageStore::list`] page: S3 ListObjectsV2's own maximum.
pub const LIST_PAGE: usize = 1000;

/// What a successful put returns.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    pub bucket: Option<String>,
    /// The full key, store prefix included.
    pub key: String,
    pub url: Option<String>,
    pub url_expires_at: Option<OffsetDateTime>,
}

/// S3 settings beside the AWS chain's (`AWS_ENDPOINT_URL`, region, credentials).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Path-style addressing [default: on when `AWS_ENDPOINT_URL` is set; always on for presigning
    /// against `public_endpoint`].
    pub force_path_style: Option<bool>,
    /// The endpoint presigned URLs name, when clients reach the store at another address than this
    /// process does (`http://127.0.0.1:9000` on the host for `http://s3:9000` in Compose). Used for
    /// presigning only, which does no I/O: every request still goes to the store's own endpoint.
    pub public_endpoint: Option<String>,
}

impl S3Options {
    /// Checks `public_endpoint`: an `http` or `https` URL with a host, and no query or fragment.
    pub fn check(&self) -> Result<(), StorageError> {
        let Some(e) = &self.public_endpoint else {
            return Ok(());
        };
        let bad = |why: &str| Err(StorageError::BadEndpoint(e.clone(), why.into()));
        match reqwest::Url::parse(e) {
            Err(err) => bad(&err.to_string()),
            Ok(u) if !matches!(u.scheme(), "http" | "https") => bad("expected http:// or https://"),
            Ok(u) if u.host_str().is_none_or(str::is_empty) => bad("no host"),
            Ok(u) if u.query().is_some() || u.fragment().is_some() => {
                bad("must not have a query or fragment")
            }
            Ok(_) => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage URL `{0}`: expected s3://bucket[/prefix], file:///path or a folder")]
    BadUrl(String),
    #[error("S3 public endpoint `{0}`: {1}")]
    BadEndpoint(String, String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("S3 {op} s3://{bucket}/{key}: {message}")]
    S3 {
        op: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
}

impl StorageError {
    /// Transient (network, 5xx, throttling): worth a delayed retry. Bad URLs are not.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::BadUrl(_) | Self::BadEndpoint(..))
    }
}

/// An object store for generated images.
pub trait ImageStore: Send + Sync + 'static {
    /// Writes `body` at `key` (under the store's own prefix) and returns where it is, with a
    /// presigned GET URL valid for `url_ttl` where the store supports them (`None`: no URL wanted,
    /// as for the records, so nothing is signed).
    fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(String, String)],
        url_ttl: Option<Duration>,
    ) -> impl Future<Output = Result<StoredObject, StorageError>> + Send;

    /// Reads `key`, `None` when it does not exist.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StorageError>> + Send;

    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// One page of the keys under `prefix` (relative to the store's prefix, as `put` takes them),
    /// in lexicographic order, strictly after `start_after`: at most [`LIST_PAGE`] of them, fewer
    /// only on the last page. Paging by the last key seen (ListObjectsV2 `StartAfter`) keeps a
    /// listing resumable without tokens.
    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> impl Future<Output = Result<Vec<String>, StorageError>> + Send;

    /// A GET URL for `stored_key` (the full key a `put` returned in [`StoredObject::key`]) valid
    /// for `ttl`, with its expiry when it has one; `None` where the store has no URLs.
    fn presign(
        &self,
        stored_key: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<(String, Option<OffsetDateTime>)>, StorageError>> + Send;

    /// `s3://bucket/prefix` or `file:///path`, for logs.
    fn describe(&self) -> String;
}

/// The configured store, chosen from `T2I_STORAGE`.
pub enum Store {
    Local(LocalStore),
    S3(Box<S3Store>),
}

impl Store {
    /// `s3://bucket[/prefix]`, `file:///path` or a plain folder path; `s3` applies to buckets only.
    pub async fn open(url: &str, s3: &S3Options) -> Result<Self, StorageError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StorageError::BadUrl(url.into()));
            }
            let mut prefix = prefix.to_string();
            if !prefix.is_empty() && !prefix.ends_with('/') {
                prefix.push('/');
            }
            return Ok(Self::S3(Box::new(
                S3Store::from_env(bucket, &prefix, s3).await?,
            )));
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.is_empty() || url.contains("://") && !url.starts_with("file://") {
            return Err(StorageError::BadUrl(url.into()));
        }
        Ok(Self::Local(LocalStore::new(path)))
    }
}

impl Store {
    /// A key as `put` recorded it ([`StoredObject::key`], the store's prefix included) → the key
    /// `get` and `list` take.
    pub fn relative_key<'a>(&self, stored_key: &'a str) -> &'a str {
        match self {
            Self::Local(_) => stored_key,
            Self::S3(s) => stored_key.strip_prefix(s.prefix()).unwrap_or(stored_key),
        }
    }
}

impl ImageStore for Store {
    async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(String, String)],
        url_ttl: Option<Duration>,
    ) -> Result<StoredObject, StorageError> {
        match self {
            Self::Local(s) => s.put(key, body, content_type, metadata, url_ttl).await,
            Self::S3(s) => s.put(key, body, content_type, metadata, url_ttl).await,
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        match self {
            Self::Local(s) => s.get(key).await,
            Self::S3(s) => s.get(key).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self {
            Self::Local(s) => s.delete(key).await,
            Self::S3(s) => s.delete(key).await,
        }
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<Vec<String>, StorageError> {
        match self {
            Self::Local(s) => s.list(prefix, start_after).await,
            Self::S3(s) => s.list(prefix, start_after).await,
        }
    }

    async fn presign(
        &self,
        stored_key: &str,
        ttl: Duration,
    ) -> Result<Option<(String, Option<OffsetDateTime>)>, StorageError> {
        match self {
            Self::Local(s) => s.presign(stored_key, ttl).await,
            Self::S3(s) => s.presign(stored_key, ttl).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Local(s) => s.describe(),
            Self::S3(s) => s.describe(),
        }
    }
}

/// A listing of `prefix` read one page at a time ([`ImageStore::list`] by `StartAfter`): the one
/// place that knows when a listing has ended (a page shorter than [`LIST_PAGE`]).
pub struct Pages<'a, S> {
    store: &'a S,
    prefix: &'a str,
    after: Option<String>,
    done: bool,
}

impl<'a, S: ImageStore> Pages<'a, S> {
    pub fn new(store: &'a S, prefix: &'a str) -> Self {
        Self {
            store,
            prefix,
            after: None,
            done: false,
        }
    }

    /// The next page, `None` once the listing has ended.
    pub async fn next(&mut self) -> Result<Option<Vec<String>>, StorageError> {
        if self.done {
            return Ok(None);
        }
        let page = self.store.list(self.prefix, self.after.as_deref()).await?;
        match page.last() {
            Some(last) if page.len() >= LIST_PAGE => self.after = Some(last.clone()),
            _ => self.done = true,
        }
        Ok(Some(page))
    }
}

/// Every key under `prefix`, page by page: `each` sees one page at a time, so memory stays at one
/// page whatever the listing's length. Returns how many keys there were.
pub async fn list_all<S: ImageStore>(
    store: &S,
    prefix: &str,
    mut each: impl FnMut(&[String]),
) -> Result<u64, StorageError> {
    let mut pages = Pages::new(store, prefix);
    let mut n = 0u64;
    while let Some(page) = pages.next().await? {
        n += page.len() as u64;
        each(&page);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic() {
        let id = JobId::parse("job-1").unwrap();
        assert_eq!(
            ObjectKey::image("datasets/wolves/", &id, 0, "png"),
            "datasets/wolves/job-1/0.png"
        );
        assert_eq!(ObjectKey::result("", &id), "job-1/result.json");
    }

    #[test]
    fn public_endpoints_are_http_urls_with_a_host() {
        let opts = |e: &str| S3Options {
            public_endpoint: Some(e.into()),
            ..S3Options::default()
        };
        for ok in [
            "http://127.0.0.1:9000",
            "https://images.example.com",
            "https://example.com/s3/",
        ] {
            assert!(opts(ok).check().is_ok(), "{ok}");
        }
        for bad in [
            "127.0.0.1:9000",
            "s3:9000",
            "ftp://x",
            "http://x/?a=1",
            "http://",
        ] {
            let err = opts(bad).check().unwrap_err();
            assert!(!err.is_retryable(), "{bad}");
        }
        assert!(S3Options::default().check().is_ok());
    }
}
