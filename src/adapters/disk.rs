//! The on-disk cache of downloaded adapter files: one folder (`--lora-cache-dir`), one file per
//! source, named by a digest of the source, within a byte budget (`--lora-cache-max-mb`), least
//! recently used evicted first. A file a job holds ([`Pin`]) is never evicted: the job that fetched
//! it renders from it later. Recency survives restarts through the files' modification times,
//! which every use refreshes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::Digest;

use super::Hashes;

/// What is known of one cached file.
struct Entry {
    bytes: u64,
    /// Larger is more recent.
    used: u64,
    pins: usize,
    /// Once computed: cached files never change.
    hashes: Option<Hashes>,
}

struct Index {
    entries: HashMap<String, Entry>,
    clock: u64,
    budget: u64,
}

/// The cache folder and what it holds.
#[derive(Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
}

/// Keeps a cached file from eviction while held (a job that will render from it).
pub struct Pin {
    index: Arc<Mutex<Index>>,
    name: String,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pin({})", self.name)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(e) = lock(&self.index).entries.get_mut(&self.name) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DiskCache {
    /// Opens (creating) `dir` and indexes the files already there, most recently modified newest.
    /// Leftover partial downloads (`.part` files) are removed.
    pub(crate) fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            if name.ends_with(".part") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, name, meta.len()));
        }
        found.sort();
        let entries: HashMap<String, Entry> = found
            .into_iter()
            .enumerate()
            .map(|(i, (_, name, bytes))| {
                let entry = Entry {
                    bytes,
                    used: i as u64,
                    pins: 0,
                    hashes: None,
                };
                (name, entry)
            })
            .collect();
        let clock = entries.len() as u64;
        Ok(Self {
            dir: dir.to_path_buf(),
            index: Arc::new(Mutex::new(Index {
                entries,
                clock,
                budget,
            })),
        })
    }

    /// The file name a source key is cached under.
    pub(crate) fn name_for(key: &str) -> String {
        let digest = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        format!("{}.safetensors", &digest[..40])
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A fresh path for a download in progress (removed at the next open if left behind).
    pub(crate) fn part_path(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!("{name}.{:016x}.part", rand::random::<u64>()))
    }

    /// The cached file `name`, pinned and marked used now, with its hashes when known.
    pub(crate) fn get(&self, name: &str) -> Option<(Pin, Option<Hashes>)> {
        let mut index = lock(&self.index);
        index.clock += 1;
        let now = index.clock;
        let e = index.entries.get_mut(name)?;
        if !self.dir.join(name).is_file() {
            index.entries.remove(name);
            return None;
        }
        e.used = now;
        e.pins += 1;
        let hashes = e.hashes.clone();
        drop(index);
        touch(&self.dir.join(name));
        Some((self.pin(name), hashes))
    }

    fn pin(&self, name: &str) -> Pin {
        Pin {
            index: self.index.clone(),
            name: name.to_string(),
        }
    }

    /// Records the hashes of a cached file.
    pub(crate) fn set_hashes(&self, name: &str, hashes: Hashes) {
        if let Some(e) = lock(&self.index).entries.get_mut(name) {
            e.hashes = Some(hashes);
        }
    }

    /// Moves a finished download into the cache as `name`, pinned, after evicting least recently
    /// used files that no job holds until it fits the budget (a file larger than the whole budget
    /// still goes in, alone).
    pub(crate) fn insert(&self, part: &Path, name: &str) -> std::io::Result<Pin> {
        let bytes = std::fs::metadata(part)?.len();
        let mut index = lock(&self.index);
        let mut total: u64 = index.entries.values().map(|e| e.bytes).sum();
        while total + bytes > index.budget {
            let victim = index
                .entries
                .iter()
                .filter(|(n, e)| e.pins == 0 && n.as_str() != name)
                .min_by_key(|(_, e)| e.used)
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else { break };
            if let Some(e) = index.entries.remove(&victim) {
                total -= e.bytes;
            }
            let _ = std::fs::remove_file(self.dir.join(&victim));
            tracing::info!(file = %victim, "LoRA cache: evicted the least recently used file");
        }
        std::fs::rename(part, self.dir.join(name))?;
        index.clock += 1;
        let used = index.clock;
        let pins = index.entries.get(name).map_or(0, |e| e.pins) + 1;
        index.entries.insert(
            name.to_string(),
            Entry {
                bytes,
                used,
                pins,
                hashes: None,
            },
        );
        drop(index);
        Ok(self.pin(name))
    }

    /// Bytes held by cached files.
    pub(crate) fn bytes(&self) -> u64 {
        lock(&self.index).entries.values().map(|e| e.bytes).sum()
    }
}

/// Marks a file used now (its modification time), so recency survives a restart.
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(cache: &DiskCache, name: &str, bytes: usize) -> PathBuf {
        let p = cache.part_path(name);
        std::fs::write(&p, vec![0u8; bytes]).unwrap();
        p
    }

    #[test]
    fn the_least_recently_used_unpinned_file_is_evicted_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 10).unwrap();
        drop(cache.insert(&part(&cache, "a", 4), "a").unwrap());
        drop(cache.insert(&part(&cache, "b", 4), "b").unwrap());
        drop(cache.get("a").unwrap()); // a is now more recent than b
        let held_c = cache.insert(&part(&cache, "c", 4), "c").unwrap();
        assert!(cache.get("b").is_none(), "b was the least recently used");
        assert!(dir.path().join("a").exists() && !dir.path().join("b").exists());
        assert_eq!(cache.bytes(), 8);
        // a is unpinned, c is held: a new file evicts a, never c.
        let _d = cache.insert(&part(&cache, "d", 4), "d").unwrap();
        assert!(cache.get("a").is_none());
        assert!(dir.path().join("c").exists());
        // Everything held and over budget: the new file still goes in (alone over the budget).
        let _e = cache.insert(&part(&cache, "e", 4), "e").unwrap();
        assert_eq!(cache.bytes(), 12);
        drop(held_c);
    }

    #[test]
    fn a_reopened_cache_knows_its_files_and_drops_partial_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 100).unwrap();
        drop(cache.insert(&part(&cache, "a", 3), "a").unwrap());
        let left = part(&cache, "b", 5);
        let again = DiskCache::open(dir.path(), 100).unwrap();
        assert_eq!(again.bytes(), 3);
        assert!(again.get("a").is_some());
        assert!(!left.exists());
    }
}
