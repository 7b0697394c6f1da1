//! The data set a batch becomes, built from the store alone (`t2i batch manifest`, and `t2i enqueue
//! --wait` once every job has ended):
//!
//! * `metadata.jsonl` in the Hugging Face ImageFolder convention: one line per image, `file_name`
//!   first (the downloaded file with `--download`, else the object key), `text` (the prompt: the
//!   caption column diffusers' training scripts read), the generation parameters, and durable
//!   locations (`bucket`, `key`, `location` = `s3://bucket/key`), never expiring URLs.
//! * `--download`: the images under `images/00000/`, `images/00001/`, ... at most
//!   [`FILES_PER_FOLDER`] each (the Hugging Face Hub refuses folders of more than 10,000 files).
//! * WebDataset shards `shard-00000.tar`, ... with `<job>_<i>.<ext>` + `<job>_<i>.json` per sample,
//!   each written as it fills and renamed into place when complete.
//!
//! One page of the listing at a time, and at most `--download-concurrency` jobs' images in memory:
//! memory does not grow with the batch. Downloaded bytes are hashed again; where they differ from
//! the recorded sha256 (a job rendered twice at once), the manifest follows the stored bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use futures_util::stream::{self, StreamExt};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::cli::{BatchManifestArgs, DatasetArgs};
use crate::events::{EventData, ImageRecord};
use crate::records::Listed;
use crate::storage::{ImageStore, Pages, Store};

/// Files per `images/` sub-folder: the Hugging Face Hub's limit per folder.
pub const FILES_PER_FOLDER: u64 = 10_000;

/// What a manifest run wrote.
#[derive(Debug, Default)]
pub struct Summary {
    pub jobs: u64,
    pub images: u64,
    pub shards: u64,
    /// Images whose stored bytes differ from their recorded sha256.
    pub differ: u64,
}

pub async fn run(args: BatchManifestArgs) -> Result<()> {
    if !args.dataset.wanted() {
        return Err(
            crate::cli::UsageError("give --manifest or --webdataset (or both)".into()).into(),
        );
    }
    let (store, prefix) = super::open(&args.target).await?;
    build(&store, &prefix, &args.dataset).await?;
    Ok(())
}

/// A WebDataset shard being filled: a tar written straight to `<name>.partial`.
struct Shards {
    dir: PathBuf,
    per: usize,
    in_current: usize,
    next: u64,
    current: Option<(tar::Builder<BufWriter<File>>, PathBuf)>,
}

impl Shards {
    fn new(dir: &Path, per: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            per: per.max(1),
            in_current: 0,
            next: 0,
            current: None,
        })
    }

    fn add(&mut self, name: &str, ext: &str, image: &[u8], json: &[u8]) -> Result<()> {
        if self.current.is_none() {
            let path = self.dir.join(format!("shard-{:05}.tar", self.next));
            let partial = path.with_extension("tar.partial");
            let f = File::create(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            self.current = Some((tar::Builder::new(BufWriter::new(f)), path));
            self.next += 1;
        }
        let (tar, _) = self.current.as_mut().expect("opened above");
        append(tar, &format!("{name}.{ext}"), image)?;
        append(tar, &format!("{name}.json"), json)?;
        self.in_current += 1;
        if self.in_current >= self.per {
            self.close()?;
        }
        Ok(())
    }

    /// Finishes the shard being filled and renames it into place.
    fn close(&mut self) -> Result<()> {
        if let Some((tar, path)) = self.current.take() {
            let mut w = tar.into_inner()?;
            w.flush()?;
            w.get_ref().sync_all()?;
            std::fs::rename(path.with_extension("tar.partial"), &path)?;
        }
        self.in_current = 0;
        Ok(())
    }
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, data: &[u8]) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, name, data)?;
    Ok(())
}

/// A job's stored result and, when the data set needs them, its images' bytes.
struct Fetched {
    data: EventData,
    bytes: Vec<Vec<u8>>,
}

async fn fetch(store: &Store, result_key: &str, with_bytes: bool) -> Result<Option<Fetched>> {
    let Some(body) = store.get(result_key).await? else {
        return Ok(None); // deleted since the listing
    };
    let data: EventData = serde_json::from_slice(&body)
        .with_context(|| format!("{result_key} is not a result record"))?;
    let mut bytes = Vec::new();
    if with_bytes {
        for img in &data.images {
            let key = store.relative_key(&img.key);
            let b = store
                .get(key)
                .await
                .with_context(|| format!("downloading {key}"))?
                .with_context(|| format!("{key} is not in the store"))?;
            bytes.push(b);
        }
    }
    Ok(Some(Fetched { data, bytes }))
}

/// One manifest line for an image of a job.
fn line(store: &Store, data: &EventData, img: &ImageRecord) -> Map<String, Value> {
    let params = data.params.clone().unwrap_or(Value::Null);
    let param = |k: &str| params.get(k).cloned().unwrap_or(Value::Null);
    let mut r = Map::new();
    r.insert("file_name".into(), Value::from(img.key.as_str()));
    r.insert("text".into(), param("prompt"));
    r.insert("job_id".into(), Value::from(data.job_id.as_str()));
    r.insert("index".into(), Value::from(img.index));
    for k in ["prompt", "negative_prompt"] {
        r.insert(k.into(), param(k));
    }
    r.insert("seed".into(), Value::from(img.seed));
    r.insert("width".into(), Value::from(img.width));
    r.insert("height".into(), Value::from(img.height));
    for k in ["steps", "scheduler", "guidance_scale"] {
        r.insert(k.into(), param(k));
    }
    r.insert("model".into(), Value::from(data.model.as_str()));
    r.insert("sha256".into(), Value::from(img.sha256.as_str()));
    r.insert("key".into(), Value::from(img.key.as_str()));
    r.insert(
        "bucket".into(),
        img.bucket.clone().map_or(Value::Null, Value::from),
    );
    let location = match &img.bucket {
        Some(b) => format!("s3://{b}/{}", img.key),
        None => format!("{}/{}", store.describe().trim_end_matches('/'), img.key),
    };
    r.insert("location".into(), Value::from(location));
    if let Some(m) = &data.metadata {
        r.insert("metadata".into(), m.clone());
    }
    r
}

/// Builds the data set `opts` asks for from every done job under `key_prefix`.
pub async fn build(store: &Store, key_prefix: &str, opts: &DatasetArgs) -> Result<Summary> {
    let with_bytes = opts.download || opts.webdataset.is_some();
    let mut metadata = match &opts.manifest {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join("metadata.jsonl.partial");
            let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            Some((BufWriter::new(f), dir.clone()))
        }
        None => None,
    };
    let mut shards = match &opts.webdataset {
        Some(dir) => Some(Shards::new(dir, opts.shard_size)?),
        None => None,
    };
    let mut sum = Summary::default();
    let mut pages = Pages::new(store, key_prefix);
    while let Some(page) = pages.next().await? {
        let results: Vec<&String> = page
            .iter()
            .filter(|k| matches!(Listed::of(k, key_prefix), Some((_, Listed::Result))))
            .collect();
        let mut fetched = stream::iter(results)
            .map(|k| fetch(store, k, with_bytes))
            .buffered(opts.download_concurrency.max(1));
        while let Some(job) = fetched.next().await {
            let Some(job) = job? else { continue };
            sum.jobs += 1;
            for (i, img) in job.data.images.iter().enumerate() {
                let mut r = line(store, &job.data, img);
                let ext = img.key.rsplit('.').next().unwrap_or("png");
                // WebDataset splits a sample's key at the first '.', so none in the name.
                let name = format!("{}_{}", job.data.job_id.replace('.', "_"), img.index);
                if let Some(b) = job.bytes.get(i) {
                    let got = hex::encode(Sha256::digest(b));
                    if got != img.sha256 {
                        sum.differ += 1;
                        r.insert("recorded_sha256".into(), Value::from(img.sha256.as_str()));
                        r.insert("sha256".into(), Value::from(got));
                    }
                }
                if let (Some((_, dir)), true, Some(b)) =
                    (&metadata, opts.download, job.bytes.get(i))
                {
                    let folder = format!("images/{:05}", sum.images / FILES_PER_FOLDER);
                    let rel = format!("{folder}/{name}.{ext}");
                    if sum.images % FILES_PER_FOLDER == 0 {
                        std::fs::create_dir_all(dir.join(&folder))?;
                    }
                    std::fs::write(dir.join(&rel), b).with_context(|| format!("writing {rel}"))?;
                    r.insert("file_name".into(), Value::from(rel));
                }
                let json = Value::Object(r).to_string();
                if let (Some(s), Some(b)) = (shards.as_mut(), job.bytes.get(i)) {
                    s.add(&name, ext, b, json.as_bytes())?;
                }
                if let Some((w, _)) = metadata.as_mut() {
                    w.write_all(json.as_bytes())?;
                    w.write_all(b"\n")?;
                }
                sum.images += 1;
            }
        }
    }
    if let Some(s) = shards.as_mut() {
        s.close()?;
        sum.shards = s.next;
    }
    if let Some((mut w, dir)) = metadata {
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(
            dir.join("metadata.jsonl.partial"),
            dir.join("metadata.jsonl"),
        )?;
        eprintln!(
            "manifest: {} image(s) of {} job(s) in {}",
            sum.images,
            sum.jobs,
            dir.join("metadata.jsonl").display()
        );
    }
    if let Some(dir) = &opts.webdataset {
        eprintln!(
            "webdataset: {} sample(s) in {} shard(s) under {}",
            sum.images,
            sum.shards,
            dir.display()
        );
    }
    if sum.differ > 0 {
        eprintln!(
            "warning: {} stored image(s) differ from their recorded sha256 (rendered twice); \
             the manifest describes the stored bytes",
            sum.differ
        );
    }
    Ok(sum)
}
