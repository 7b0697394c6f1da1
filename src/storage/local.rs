//! A local folder as the image store (the default, `./outputs`). Writes go to a temporary file and are
//! renamed into place, so readers never see half an image and redeliveries overwrite atomically.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ImageStore, LIST_PAGE, StorageError, StoredObject};

/// Collects the keys under `dir` that start with `prefix` (files only; half-written `.partial-*`
/// files are not objects yet). Only folders that can hold such keys are entered.
fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            let path = dir.display().to_string();
            return Err(StorageError::Io {
                op: "listing",
                path,
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(key) = path
            .strip_prefix(root)
            .ok()
            .and_then(|k| k.to_str())
            .map(|k| k.replace(std::path::MAIN_SEPARATOR, "/"))
        else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir {
            let folder = format!("{key}/");
            if folder.starts_with(prefix) || prefix.starts_with(&folder) {
                walk(root, &path, prefix, out)?;
            }
        } else if key.starts_with(prefix) && !key.contains(".partial-") {
            out.push(key);
        }
    }
    Ok(())
}

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self {
            root: root.as_ref().to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        // Keys are validated by Job::parse: relative, no `.` or `..` segments.
        self.root.join(key)
    }
}

impl ImageStore for LocalStore {
    async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        _content_type: &str,
        _metadata: &[(String, String)],
        _url_ttl: Option<Duration>,
    ) -> Result<StoredObject, StorageError> {
        let path = self.path(key);
        fn io(op: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> StorageError + use<> {
            let path = p.display().to_string();
            move |source| StorageError::Io { op, path, source }
        }
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io("creating", dir))?;
        }
        let tmp = path.with_extension(format!("partial-{}", std::process::id()));
        tokio::fs::write(&tmp, &body)
            .await
            .map_err(io("writing", &tmp))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io("renaming", &path))?;
        let abs = std::path::absolute(&path).unwrap_or(path);
        Ok(StoredObject {
            bucket: None,
            key: key.to_string(),
            url: Some(format!("file://{}", abs.display())),
            url_expires_at: None,
        })
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.path(key);
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StorageError::Io {
                op: "reading",
                path: path.display().to_string(),
                source,
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StorageError::Io {
                op: "removing",
                path: path.display().to_string(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<Vec<String>, StorageError> {
        let (root, prefix) = (self.root.clone(), prefix.to_string());
        let after = start_after.map(str::to_string);
        // A folder walk is blocking I/O; a local store is for one machine, so the whole walk per
        // page is acceptable (S3 pages server-side).
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            walk(&root, &root, &prefix, &mut keys)?;
            keys.sort_unstable();
            Ok(keys
                .into_iter()
                .filter(|k| after.as_ref().is_none_or(|a| k > a))
                .take(LIST_PAGE)
                .collect())
        })
        .await
        .map_err(|e| StorageError::Io {
            op: "listing",
            path: self.root.display().to_string(),
            source: std::io::Error::other(e),
        })?
    }

    async fn presign(
        &self,
        stored_key: &str,
        _ttl: Duration,
    ) -> Result<Option<(String, Option<time::OffsetDateTime>)>, StorageError> {
        let path = self.path(stored_key);
        let abs = std::path::absolute(&path).unwrap_or(path);
        Ok(Some((format!("file://{}", abs.display()), None)))
    }

    fn describe(&self) -> String {
        format!(
            "file://{}",
            std::path::absolute(&self.root)
                .unwrap_or(self.root.clone())
                .display()
        )
    }
}
