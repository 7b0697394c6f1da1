//! Single files of hub repos, for LoRA adapters (`crate::adapters`): found in the same hub cache the
//! model loader uses, or the URL and token to download one with. The downloader is the caller's: it
//! bounds the size and keeps the file in its own cache.

use std::path::{Path, PathBuf};

use super::{hub_cache_dir, is_commit_hash, repo_folder};

/// A file of a hub repo already in the hub cache (`snapshots/<commit>/<file>` for the revision's
/// commit), as huggingface_hub or a model load left it.
pub(crate) fn cached_hub_file(repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    cached_hub_file_in(&hub_cache_dir(), repo, revision, file)
}

fn cached_hub_file_in(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let path = folder.join("snapshots").join(commit).join(file);
    path.is_file().then_some(path)
}

/// The URL a hub file is downloaded from (`HF_ENDPOINT`, default `https://huggingface.co`), as
/// hf-hub builds it (`{endpoint}/{repo}/resolve/{revision}/{file}`), and the token to send
/// (`HF_TOKEN`, else the one `huggingface-cli login` cached).
pub(crate) fn hub_download(repo: &str, revision: &str, file: &str) -> (String, Option<String>) {
    let endpoint = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into());
    let url = format!(
        "{}/{repo}/resolve/{}/{file}",
        endpoint.trim_end_matches('/'),
        revision.replace('/', "%2F")
    );
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| hf_hub::Cache::from_env().token());
    (url, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_files_are_found_in_the_cache_by_branch_or_commit() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let folder = cache.path().join("models--owner--styles");
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), commit).unwrap();
        let snapshot = folder.join("snapshots").join(commit).join("ink");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("a.safetensors"), b"x").unwrap();
        let want = Some(snapshot.join("a.safetensors"));
        let find = |rev| cached_hub_file_in(cache.path(), "owner/styles", rev, "ink/a.safetensors");
        assert_eq!(find("main"), want);
        assert_eq!(find(commit), want);
        assert_eq!(find("v2"), None);
        assert_eq!(
            cached_hub_file_in(cache.path(), "owner/styles", "main", "b.safetensors"),
            None
        );
    }
}
