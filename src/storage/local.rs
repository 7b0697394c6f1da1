//! A local folder as the image store (the default, `./outputs`). Writes go to a temporary file and are
//! renamed into place, so readers never see half an image and redeliveries overwrite atomically.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ImageStore, StorageError, StoredObject};

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
        // Keys are validated by Job::parse: relative, no `..` segments.
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
        _url_ttl: Duration,
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

    fn describe(&self) -> String {
        format!(
            "file://{}",
            std::path::absolute(&self.root)
                .unwrap_or(self.root.clone())
                .display()
        )
    }
}
