//! Flags of `t2i batch` and of the dataset a batch becomes (shared with `t2i enqueue --wait`).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{BrokerArgs, StorageArgs};

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Counts by state (done, failed, running, pending) from one listing of the batch's objects.
    Status(BatchStatusArgs),
    /// Follow the batch's events with a progress bar until every job has ended (survives broker
    /// restarts: the count is taken again from the store after each reconnect).
    Watch(BatchWatchArgs),
    /// Build the data set (ImageFolder `metadata.jsonl`, downloads, WebDataset shards) from the store.
    Manifest(BatchManifestArgs),
    /// A grid image of thumbnails and an HTML index with captions; an X/Y plot over template variables.
    ContactSheet(BatchSheetArgs),
}

/// Which batch, and where it is.
#[derive(Debug, Args)]
pub struct BatchTarget {
    /// The batch id (`t2i enqueue` prints it).
    pub batch_id: String,

    /// Its key prefix, when `t2i enqueue --key-prefix` chose one [default: datasets/<batch id>/].
    #[arg(long)]
    pub key_prefix: Option<String>,

    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Args)]
pub struct BatchStatusArgs {
    #[command(flatten)]
    pub target: BatchTarget,

    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Give up after this many seconds (0: never).
    #[arg(long = "wait-timeout-s", default_value_t = 0)]
    pub timeout_s: u64,

    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct BatchWatchArgs {
    #[command(flatten)]
    pub target: BatchTarget,

    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Jobs in the batch, where it has no batch.json (not made by `t2i enqueue`).
    #[arg(long)]
    pub total: Option<u64>,

    #[command(flatten)]
    pub watch: WatchArgs,
}

#[derive(Debug, Args)]
pub struct BatchManifestArgs {
    #[command(flatten)]
    pub target: BatchTarget,

    #[command(flatten)]
    pub dataset: DatasetArgs,
}

#[derive(Debug, Args)]
pub struct BatchSheetArgs {
    #[command(flatten)]
    pub target: BatchTarget,

    /// Folder for `contact-sheet.png`, `index.html` and `thumbs/`.
    #[arg(long)]
    pub out: PathBuf,

    /// Thumbnails at most (1..=1024).
    #[arg(long, default_value_t = 64)]
    pub max: usize,

    /// Stored results read at most to fill the grid.
    #[arg(long, default_value_t = 2048)]
    pub scan: usize,

    /// Thumbnail side in pixels.
    #[arg(long, default_value_t = 160)]
    pub thumb: u32,

    /// Template variable across the columns [default: the first by name].
    #[arg(long)]
    pub x: Option<String>,

    /// Template variable down the rows [default: the second by name].
    #[arg(long)]
    pub y: Option<String>,
}

/// The data set a batch becomes.
#[derive(Debug, Clone, Args)]
pub struct DatasetArgs {
    /// Write `metadata.jsonl` (Hugging Face ImageFolder) into this folder.
    #[arg(long)]
    pub manifest: Option<PathBuf>,

    /// With --manifest: download the images next to it (`images/00000/`, ... at most 10,000 files
    /// per folder), verifying their sha256.
    #[arg(long)]
    pub download: bool,

    /// Write WebDataset shards (`shard-00000.tar`, ...) into this folder, each as it fills.
    #[arg(long)]
    pub webdataset: Option<PathBuf>,

    /// Samples per WebDataset shard.
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,

    /// Downloads in flight at once (memory is bounded by this, not by the batch's size).
    #[arg(long, default_value_t = 16)]
    pub download_concurrency: usize,
}

impl DatasetArgs {
    pub fn wanted(&self) -> bool {
        self.manifest.is_some() || self.webdataset.is_some()
    }
}
