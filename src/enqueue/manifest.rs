//! The dataset a `t2i enqueue --wait` run leaves behind:
//!
//! * `metadata.jsonl` in the Hugging Face ImageFolder convention: one line per image, `file_name`
//!   first (the local path with `--download`, else the object key), then the generation parameters
//!   and the image's sha256, key, bucket and URL.
//! * WebDataset shards: `shard-00000.tar`, ... with `<job>_<i>.<ext>` + `<job>_<i>.json` per sample.
//!
//! Downloaded bytes are hashed again; where they differ from the sha256 the event reported (a job
//! rendered twice concurrently), the manifest follows the stored bytes and says so.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use futures_util::stream::StreamExt;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::Outcome;
use super::expand::PlannedJob;
use crate::cli::EnqueueArgs;
use crate::events::ImageRecord;
use crate::storage::{ImageStore, Store};

/// One image of the dataset.
struct Sample {
    name: String,
    ext: String,
    record: Map<String, Value>,
    /// Key relative to the store (as the worker wrote it).
    store_key: String,
    sha256: String,
}

fn samples(jobs: &[PlannedJob], outcomes: &HashMap<String, Outcome>) -> Vec<Sample> {
    let mut out = Vec::new();
    for j in jobs {
        let Some(o) = outcomes.get(&j.job_id) else {
            continue;
        };
        if o.data.status != "succeeded" {
            continue;
        }
        let params = o.data.params.clone().unwrap_or(Value::Null);
        let param = |k: &str| {
            params
                .get(k)
                .or_else(|| params.get("generation").and_then(|g| g.get(k)))
                .cloned()
                .or_else(|| j.body.get(k).cloned())
                .unwrap_or(Value::Null)
        };
        let prefix = j.body["output"]["key_prefix"].as_str().unwrap_or("");
        for img in &o.data.images {
            let ImageRecord {
                index,
                seed,
                bucket,
                key,
                url,
                width,
                height,
                sha256,
                ..
            } = img;
            let ext = key.rsplit('.').next().unwrap_or("png").to_string();
            let name = format!("{}_{index}", j.job_id);
            let mut r = Map::new();
            r.insert("file_name".into(), Value::from(key.as_str()));
            r.insert("job_id".into(), Value::from(j.job_id.as_str()));
            r.insert("index".into(), Value::from(*index));
            for k in ["prompt", "negative_prompt"] {
                r.insert(k.into(), param(k));
            }
            r.insert("seed".into(), Value::from(*seed));
            r.insert("width".into(), Value::from(*width));
            r.insert("height".into(), Value::from(*height));
            for k in ["steps", "scheduler", "guidance_scale"] {
                r.insert(k.into(), param(k));
            }
            r.insert("sha256".into(), Value::from(sha256.as_str()));
            r.insert("key".into(), Value::from(key.as_str()));
            r.insert(
                "bucket".into(),
                bucket.clone().map_or(Value::Null, Value::from),
            );
            r.insert("url".into(), url.clone().map_or(Value::Null, Value::from));
            if let Some(m) = &o.data.metadata {
                r.insert("metadata".into(), m.clone());
            }
            out.push(Sample {
                store_key: format!("{prefix}{}/{index}.{ext}", j.job_id),
                name,
                ext,
                record: r,
                sha256: sha256.clone(),
            });
        }
    }
    out
}

async fn fetch(store: &Store, s: &Sample) -> Result<Vec<u8>> {
    let bytes = store
        .get(&s.store_key)
        .await
        .with_context(|| format!("downloading {}", s.store_key))?
        .with_context(|| format!("{} is not in the store", s.store_key))?;
    Ok(bytes)
}

pub async fn write(
    args: &EnqueueArgs,
    jobs: &[PlannedJob],
    outcomes: &HashMap<String, Outcome>,
) -> Result<()> {
    let mut samples = samples(jobs, outcomes);
    let needs_bytes = args.download || args.webdataset.is_some();
    let store = Store::open(&args.storage.storage, &args.storage.s3_options()).await?;
    let mut bytes: Vec<Option<Vec<u8>>> = vec![None; samples.len()];
    if needs_bytes {
        let fetched: Vec<(usize, Result<Vec<u8>>)> =
            futures_util::stream::iter(samples.iter().enumerate().map(|(i, s)| {
                let store = &store;
                async move { (i, fetch(store, s).await) }
            }))
            .buffer_unordered(16)
            .collect()
            .await;
        let mut differ = 0;
        for (i, b) in fetched {
            let b = b?;
            // A job rendered twice at once (a resumed run republishes what was still queued) can be
            // stored by one render and announced by the other; batching may change low bits. The
            // manifest describes what is stored, and keeps the event's hash beside it.
            let got = hex::encode(Sha256::digest(&b));
            if got != samples[i].sha256 {
                differ += 1;
                let s = &mut samples[i];
                s.record
                    .insert("event_sha256".into(), Value::from(s.sha256.as_str()));
                s.record.insert("sha256".into(), Value::from(got.as_str()));
                s.sha256 = got;
            }
            bytes[i] = Some(b);
        }
        if differ > 0 {
            eprintln!(
                "warning: {differ} stored image(s) differ from their event's sha256 (rendered twice); \
                 the manifest describes the stored bytes"
            );
        }
    }
    if let Some(dir) = &args.manifest {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if args.download {
            std::fs::create_dir_all(dir.join("images"))?;
        }
        let mut lines = String::new();
        for (s, b) in samples.iter_mut().zip(&bytes) {
            if let (true, Some(b)) = (args.download, b) {
                let rel = format!("images/{}.{}", s.name, s.ext);
                std::fs::write(dir.join(&rel), b)?;
                s.record.insert("file_name".into(), Value::from(rel));
            }
            lines.push_str(&Value::Object(s.record.clone()).to_string());
            lines.push('\n');
        }
        write_atomic(&dir.join("metadata.jsonl"), lines.as_bytes())?;
        eprintln!(
            "manifest: {} image(s) in {}",
            samples.len(),
            dir.join("metadata.jsonl").display()
        );
    }
    if let Some(dir) = &args.webdataset {
        std::fs::create_dir_all(dir)?;
        let per = args.shard_size.max(1);
        let pairs: Vec<(&Sample, &Vec<u8>)> = samples
            .iter()
            .zip(&bytes)
            .filter_map(|(s, b)| b.as_ref().map(|b| (s, b)))
            .collect();
        for (n, chunk) in pairs.chunks(per).enumerate() {
            let path = dir.join(format!("shard-{n:05}.tar"));
            let mut tar = tar::Builder::new(Vec::new());
            for (s, b) in chunk {
                append(&mut tar, &format!("{}.{}", s.name, s.ext), b)?;
                let json = Value::Object(s.record.clone()).to_string();
                append(&mut tar, &format!("{}.json", s.name), json.as_bytes())?;
            }
            write_atomic(&path, &tar.into_inner()?)?;
        }
        eprintln!(
            "webdataset: {} sample(s) in {} shard(s) under {}",
            pairs.len(),
            pairs.len().div_ceil(per),
            dir.display()
        );
    }
    Ok(())
}

fn append(tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, name, data)?;
    Ok(())
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
