//! Where a job's LoRA adapter files come from: the [`Fetcher`] turns each `loras[i].uri` into a
//! local, checked safetensors file before the job waits for the device (the worker's intake, and
//! `t2i generate`), so the device thread only ever reads local files (`pipeline::lora`).
//!
//! | source | policy |
//! |---|---|
//! | `path/file.safetensors` | only under `--lora-dir`: the resolved path (symlinks followed) must stay inside it; without a folder, refused |
//! | `s3://bucket/key` | only under a `--lora-s3-allow` prefix; the worker's S3 client and credentials |
//! | `https://…` | the webhooks' SSRF guard (`webhooks::guard`: public addresses only, every redirect checked; `--lora-allow-http`, `--lora-allow-host`, `--lora-allow-private-networks` loosen it as the relay's flags do) |
//! | `hf://owner/repo[@rev][/file]` | the Hugging Face cache first (`HF_HOME`, as models), `HF_HUB_OFFLINE` honoured; else downloaded from `HF_ENDPOINT`, anonymously unless `--lora-hub-token` (the operator's token would open its private repos to every job) |
//!
//! Every file is checked ([`inspect`]: a whole safetensors file, at most `--lora-max-mb`) and hashed.
//! Downloads land in a disk cache bounded in bytes, least recently used evicted first, never a file
//! a job still holds ([`disk::Pin`]); a URI is downloaded once and then served from the cache.
//! Failures say whether a retry could help ([`FetchError::is_retryable`]): a refusal, a missing file,
//! a file that is not safetensors or is too big fail the job; a network or store hiccup retries it.

mod disk;
mod inspect;
mod remote;

use std::collections::HashMap;
use std::path::{Component as PathPart, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use disk::Pin;
pub use inspect::Hashes;

use crate::job::{Lora, LoraSource};
use crate::pipeline::lora::AdapterFile;
use crate::webhooks::guard::{Guard, WebhookClient};
use remote::Body;

/// How adapters may be fetched, from `--lora-*` flags.
#[derive(Debug, Clone)]
pub struct LoraSettings {
    /// The folder local adapter paths are resolved in; `None` refuses them.
    pub dir: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// Bytes of downloads kept on disk.
    pub cache_max_bytes: u64,
    /// Largest adapter file accepted.
    pub max_file_bytes: u64,
    /// `s3://bucket/prefix` entries S3 adapters must be under.
    pub s3_allow: Vec<S3Allow>,
    pub s3: crate::storage::S3Options,
    pub allow_http: bool,
    pub allow_private_networks: bool,
    pub allow_hosts: Vec<String>,
    /// Send the operator's Hugging Face token with hub downloads (`--lora-hub-token`): jobs may
    /// then name any private repo it can read. Off, hub adapters are downloaded anonymously.
    pub hub_token: bool,
    /// Longest download, start to end.
    pub timeout: Duration,
}

/// One `--lora-s3-allow` entry: objects of `bucket` whose keys start with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Allow {
    bucket: String,
    prefix: String,
}

impl S3Allow {
    /// `s3://bucket[/prefix]`; an empty prefix allows the whole bucket.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| format!("--lora-s3-allow {s}: expected s3://bucket[/prefix]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("--lora-s3-allow {s}: no bucket"));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    fn allows(&self, bucket: &str, key: &str) -> bool {
        self.bucket == bucket && key.starts_with(&self.prefix)
    }
}

/// Why an adapter could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The policy refuses the source (outside the LoRA folder or the S3 allow-list, an address the
    /// SSRF guard refuses, denied by the store or the hub).
    #[error("refused: {0}")]
    Refused(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// Not a safetensors file, or too big.
    #[error("{0}")]
    Invalid(String),
    /// A network or store failure that may pass.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl FetchError {
    /// Whether fetching again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// A fetched, checked adapter file. Holding it keeps a downloaded file in the disk cache.
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub hashes: Hashes,
    _pin: Option<Pin>,
}

impl Fetched {
    /// The file as a render takes it, with `lora`'s scale.
    pub fn adapter(&self, lora: &Lora) -> AdapterFile {
        AdapterFile {
            path: self.path.clone(),
            sha256: self.hashes.sha256.clone(),
            scale: lora.scale,
            uri: lora.uri.clone(),
        }
    }
}

/// Fetches adapters under one [`LoraSettings`]. Shared by every job of a process.
pub struct Fetcher {
    settings: LoraSettings,
    /// `dir`, canonical (symlinks resolved): what a local adapter's resolved path must start with.
    root: Option<PathBuf>,
    disk: disk::DiskCache,
    guard: Arc<Guard>,
    http: WebhookClient,
    hub: reqwest::Client,
    s3: tokio::sync::OnceCell<aws_sdk_s3::Client>,
    /// One download per source at a time: a second job for it waits, then finds it cached.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Hashes of local files by (path, length, modification time): rehashed only when changed.
    local_hashes: Mutex<HashMap<PathBuf, (u64, SystemTime, Hashes)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fetcher {
    pub fn new(settings: LoraSettings) -> Result<Self, String> {
        let root = match &settings.dir {
            Some(d) => Some(
                std::fs::canonicalize(d).map_err(|e| format!("--lora-dir {}: {e}", d.display()))?,
            ),
            None => None,
        };
        let disk = disk::DiskCache::open(&settings.cache_dir, settings.cache_max_bytes)
            .map_err(|e| format!("--lora-cache-dir {}: {e}", settings.cache_dir.display()))?;
        let guard = Arc::new(
            Guard::new(
                settings.allow_http,
                settings.allow_private_networks,
                &settings.allow_hosts,
            )
            .map_err(|e| e.replace("--allow-host", "--lora-allow-host"))?,
        );
        let http = WebhookClient::new(guard.clone(), settings.timeout, None)
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let hub = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Self {
            settings,
            root,
            disk,
            guard,
            http,
            hub,
            s3: tokio::sync::OnceCell::new(),
            inflight: Mutex::default(),
            local_hashes: Mutex::default(),
        })
    }

    /// Fetches every adapter of `loras` in order and records each file's hashes in it; on failure,
    /// the index of the adapter that failed.
    pub async fn fetch_all(&self, loras: &mut [Lora]) -> Result<Vec<Fetched>, (usize, FetchError)> {
        let mut out = Vec::with_capacity(loras.len());
        for (i, lora) in loras.iter_mut().enumerate() {
            let fetched = self.fetch(lora).await.map_err(|e| (i, e))?;
            lora.sha256 = Some(fetched.hashes.sha256.clone());
            lora.short_hash = Some(fetched.hashes.short_hash.clone());
            out.push(fetched);
        }
        Ok(out)
    }

    /// Fetches one adapter's file.
    pub async fn fetch(&self, lora: &Lora) -> Result<Fetched, FetchError> {
        match &lora.source {
            LoraSource::Local(rel) => self.local(rel).await,
            LoraSource::S3 { bucket, key } => self.s3(bucket, key).await,
            LoraSource::Url(url) => self.url(url).await,
            LoraSource::Hub {
                repo,
                revision,
                file,
            } => {
                self.hub(repo, revision.as_deref().unwrap_or("main"), file)
                    .await
            }
        }
    }

    /// A path under the LoRA folder, whatever it resolves to: `..`, absolute paths and symlinks
    /// that lead outside are refused.
    async fn local(&self, rel: &str) -> Result<Fetched, FetchError> {
        let Some(root) = &self.root else {
            return Err(FetchError::Refused(format!(
                "{rel}: local LoRA paths need a LoRA folder (--lora-dir) on the worker"
            )));
        };
        if !Path::new(rel)
            .components()
            .all(|c| matches!(c, PathPart::Normal(_)))
        {
            return Err(FetchError::Refused(format!(
                "{rel}: not a plain relative path"
            )));
        }
        let resolved = std::fs::canonicalize(root.join(rel)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                FetchError::NotFound(format!("{rel} in the LoRA folder"))
            }
            _ => FetchError::Refused(format!("{rel}: {e}")),
        })?;
        if !resolved.starts_with(root) {
            return Err(FetchError::Refused(format!(
                "{rel}: resolves outside the LoRA folder (a symlink?)"
            )));
        }
        let meta =
            std::fs::metadata(&resolved).map_err(|e| FetchError::Refused(format!("{rel}: {e}")))?;
        if !meta.is_file() {
            return Err(FetchError::Invalid(format!("{rel}: not a file")));
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let known = lock(&self.local_hashes)
            .get(&resolved)
            .filter(|(len, when, _)| *len == meta.len() && *when == modified)
            .map(|(_, _, h)| h.clone());
        let hashes = match known {
            Some(h) => h,
            None => {
                let h = self.inspect(&resolved, rel).await?;
                lock(&self.local_hashes)
                    .insert(resolved.clone(), (meta.len(), modified, h.clone()));
                h
            }
        };
        Ok(Fetched {
            path: resolved,
            hashes,
            _pin: None,
        })
    }

    async fn s3(&self, bucket: &str, key: &str) -> Result<Fetched, FetchError> {
        let what = format!("s3://{bucket}/{key}");
        if !self.settings.s3_allow.iter().any(|a| a.allows(bucket, key)) {
            return Err(FetchError::Refused(format!(
                "{what} is not under an allowed prefix (--lora-s3-allow)"
            )));
        }
        let max = self.settings.max_file_bytes;
        self.download(&format!("s3:{bucket}/{key}"), &what, || async {
            let client = self
                .s3
                .get_or_init(|| async { crate::storage::sdk_client(&self.settings.s3).await.1 })
                .await;
            let resp = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| remote::s3_error(&e, &what))?;
            let len = resp.content_length().and_then(|n| u64::try_from(n).ok());
            remote::check_length(len, max, &what)?;
            Ok(Body::S3(resp.body))
        })
        .await
    }

    async fn url(&self, url: &str) -> Result<Fetched, FetchError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| FetchError::Invalid(format!("{url}: not a valid URL: {e}")))?;
        self.guard
            .check_url(&parsed)
            .map_err(|why| FetchError::Refused(format!("{url}: {why}")))?;
        let max = self.settings.max_file_bytes;
        self.download(&format!("url:{url}"), url, || async {
            let resp = self
                .http
                .get(parsed)
                .send()
                .await
                .map_err(|e| remote::send_error(&e, url))?;
            if !resp.status().is_success() {
                return Err(remote::status_error(resp.status(), url));
            }
            remote::check_length(resp.content_length(), max, url)?;
            Ok(Body::Http(resp))
        })
        .await
    }

    async fn hub(&self, repo: &str, revision: &str, file: &str) -> Result<Fetched, FetchError> {
        let what = format!("hf://{repo}@{revision}/{file}");
        if let Some(path) = crate::pipeline::weights::cached_hub_file(repo, revision, file) {
            let hashes = self.inspect(&path, &what).await?;
            return Ok(Fetched {
                path,
                hashes,
                _pin: None,
            });
        }
        if crate::pipeline::weights::hub_offline() {
            return Err(FetchError::NotFound(format!(
                "{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            )));
        }
        let (url, token) = crate::pipeline::weights::hub_download(repo, revision, file);
        let token = token.filter(|_| self.settings.hub_token);
        let max = self.settings.max_file_bytes;
        self.download(&format!("hf:{repo}@{revision}/{file}"), &what, || async {
            let mut request = self.hub.get(&url);
            if let Some(t) = &token {
                request = request.bearer_auth(t);
            }
            let resp = request
                .send()
                .await
                .map_err(|e| remote::send_error(&e, &what))?;
            if !resp.status().is_success() {
                return Err(remote::status_error(resp.status(), &what));
            }
            remote::check_length(resp.content_length(), max, &what)?;
            Ok(Body::Http(resp))
        })
        .await
    }

    /// The cached copy of `key`, or a download of it (`start` makes the request) into the cache.
    async fn download<F, Fut>(&self, key: &str, what: &str, start: F) -> Result<Fetched, FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Body, FetchError>>,
    {
        let gate = lock(&self.inflight)
            .entry(key.to_string())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        let name = disk::DiskCache::name_for(key);
        let path = self.disk.path(&name);
        if let Some((pin, hashes)) = self.disk.get(&name) {
            let hashes = match hashes {
                Some(h) => h,
                None => {
                    let h = self.inspect(&path, what).await?;
                    self.disk.set_hashes(&name, h.clone());
                    h
                }
            };
            return Ok(Fetched {
                path,
                hashes,
                _pin: Some(pin),
            });
        }
        let body = start().await?;
        let part = self.disk.part_path(&name);
        remote::save(body, &part, self.settings.max_file_bytes, what).await?;
        let hashes = match self.inspect(&part, what).await {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        };
        let pin = self
            .disk
            .insert(&part, &name)
            .map_err(|e| FetchError::Unavailable(format!("{what}: caching: {e}")))?;
        self.disk.set_hashes(&name, hashes.clone());
        tracing::info!(
            source = what,
            bytes = self.disk.bytes(),
            "LoRA downloaded into the cache"
        );
        Ok(Fetched {
            path,
            hashes,
            _pin: Some(pin),
        })
    }

    /// [`inspect::inspect`] off the async threads.
    async fn inspect(&self, path: &Path, what: &str) -> Result<Hashes, FetchError> {
        let (path, max) = (path.to_path_buf(), self.settings.max_file_bytes);
        tokio::task::spawn_blocking(move || inspect::inspect(&path, max))
            .await
            .map_err(|e| FetchError::Unavailable(format!("{what}: {e}")))?
            .map_err(|why| FetchError::Invalid(format!("{what}: {why}")))
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
