//! Command-line flags (clap derive). Every flag that configures a deployment has a `T2I_*`
//! environment variable; the `///` comment on each field is its `--help` text. Nothing here validates
//! beyond syntax: `job::Generation::parse` and the subcommands do that.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "t2i",
    version,
    about = "Text-to-image with SDXL-family models (SSD-1B, SDXL, Vega) in candle"
)]
pub struct Cli {
    /// Log verbosity filter (tracing EnvFilter syntax), e.g. `info`, `t2i_worker=debug`.
    #[arg(long, env = "T2I_LOG", default_value = "warn", global = true)]
    pub log: String,

    /// Log format: `text` or `json` (one object per line).
    #[arg(long, env = "T2I_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: String,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images locally from prompts (no broker).
    Generate(GenerateArgs),
    /// Measure load, per-step and end-to-end speed and memory for a model, device and dtype.
    Bench(crate::bench::BenchArgs),
    /// Consume jobs from RabbitMQ, render, store in S3 or a folder, publish events.
    Worker(WorkerArgs),
    /// Write the JSON Schemas of the message contract (generated from the Rust types).
    Schemas(SchemasArgs),
    /// Publish one job or a bulk set (JSONL, CSV, prompt list, template); optionally wait and write a
    /// dataset manifest.
    Enqueue(crate::enqueue::EnqueueArgs),
    /// Relay job events to HTTP receivers, signed per the Standard Webhooks spec, with retries.
    Webhooks(crate::webhooks::WebhooksArgs),
    /// HTTP front door: POST /v1/jobs, GET /v1/jobs/{id}, POST /generate-image (waits for the result).
    Gateway(crate::gateway::GatewayArgs),
    /// Cancel jobs or whole batches: waiting jobs are dropped, running ones stop between steps.
    Cancel(CancelArgs),
    /// Exit 0 when a URL answers 200 (container HEALTHCHECK without curl in the image).
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Job ids to cancel.
    pub job_ids: Vec<String>,

    /// Batch id to cancel (every job whose `batch.id` it is); repeatable.
    #[arg(long = "batch")]
    pub batches: Vec<String>,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// http:// URL to probe.
    #[arg(
        env = "T2I_HEALTHCHECK_URL",
        default_value = "http://127.0.0.1:9090/healthz"
    )]
    pub url: String,

    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout_s: u64,
}

/// Where the model comes from and how it runs.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face repo id (resolved through the hub cache; HF_HOME, HF_HUB_OFFLINE apply) or a local
    /// diffusers folder.
    #[arg(long, env = "T2I_MODEL", default_value = "segmind/SSD-1B")]
    pub model: String,

    /// Hub revision to pin: branch, tag or commit hash.
    #[arg(long, env = "T2I_MODEL_REVISION")]
    pub revision: Option<String>,

    /// Weight files: `auto` (the .fp16 files for f16/bf16, full precision otherwise), `default`, `fp16`.
    #[arg(long, env = "T2I_MODEL_VARIANT", default_value = "auto")]
    pub variant: String,

    /// Device: cpu, cuda, cuda:N, metal.
    #[arg(long, env = "T2I_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Compute dtype: f32, f16, bf16, or auto (f32 on CPU, bf16 on CUDA, f16 on Metal). The VAE never
    /// runs in f16.
    #[arg(long, env = "T2I_DTYPE", default_value = "auto")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A prompt; repeat for several.
    #[arg(long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,

    /// A file with one prompt per line (`-` for stdin); blank lines and lines starting with `#` are
    /// skipped.
    #[arg(long, value_name = "PATH")]
    pub prompts_file: Option<PathBuf>,

    /// Negative prompt for every image. Without one, SDXL-family models use zero embeddings.
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,

    /// Width in pixels, a multiple of 8 [default: the model's, 1024 for SSD-1B].
    #[arg(long)]
    pub width: Option<u32>,

    /// Height in pixels, a multiple of 8 [default: the model's].
    #[arg(long)]
    pub height: Option<u32>,

    /// Denoising steps, 1..=150 [default: 25].
    #[arg(long)]
    pub steps: Option<u32>,

    /// Classifier-free guidance scale, 0..=30; ≤ 1 disables guidance [default: 5].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance_scale: Option<f64>,

    /// Sampler: euler, euler_ancestral, ddim, dpmpp_2m, dpmpp_2m_karras [default: the model's, euler
    /// for SSD-1B].
    #[arg(long)]
    pub scheduler: Option<String>,

    /// Seed of the first image of each prompt; image i uses seed + i [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Images per prompt, 1..=8.
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,

    /// Initial latents (safetensors with a tensor `latents` of shape [n, 4, h/8, w/8], unscaled, like
    /// diffusers' `latents=`), one row per image in output order.
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,

    /// Output file (one image) or folder.
    #[arg(long, short, default_value = "outputs")]
    pub output: PathBuf,

    /// Image format: png, jpeg, webp [default: from --output's extension, else png].
    #[arg(long)]
    pub format: Option<String>,

    /// JPEG quality, 1..=100.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,

    /// Images rendered together on the device. Results do not depend on it (each image has its own
    /// seeded noise); larger batches are faster on GPUs and use more memory.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// A mistake in what the user asked for (bad flag values, missing model files): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Debug, Args)]
pub struct SchemasArgs {
    /// Output folder.
    #[arg(long, default_value = "schemas")]
    pub out: PathBuf,
}

/// Broker settings shared by the worker and the clients.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "T2I_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name (`t2i` → `t2i.jobs`, `t2i.events`, ...).
    #[arg(long, env = "T2I_AMQP_PREFIX", default_value = "t2i")]
    pub amqp_prefix: String,

    /// Deliveries of one job before it is dead-lettered (quorum `x-delivery-limit`; also the number of
    /// attempts for transient failures).
    #[arg(long, env = "T2I_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Delays before retry attempts 2, 3, ... in seconds (one retry queue each; the last repeats).
    #[arg(
        long,
        env = "T2I_RETRY_DELAYS",
        default_value = "1,4,16,64",
        value_delimiter = ','
    )]
    pub retry_delays: Vec<f64>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Where images go: `s3://bucket/prefix`, `file:///path` or a folder.
    #[arg(long, env = "T2I_STORAGE", default_value = "./outputs")]
    pub storage: String,

    /// S3 path-style addressing [default: on when AWS_ENDPOINT_URL is set].
    #[arg(long, env = "T2I_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: Option<bool>,

    /// Most images rendered in one device batch.
    #[arg(long, env = "T2I_MAX_BATCH", default_value_t = 4)]
    pub max_batch: u32,

    /// How long a partial batch waits for compatible jobs, in milliseconds.
    #[arg(long, env = "T2I_BATCH_WINDOW_MS", default_value_t = 50)]
    pub batch_window_ms: u64,

    /// Job queues to consume: `interactive`, `bulk` or both (interactive first). A bulk-only pool can
    /// scale to zero while interactive workers stay up.
    #[arg(
        long,
        env = "T2I_LANES",
        default_value = "interactive,bulk",
        value_delimiter = ','
    )]
    pub lanes: Vec<String>,

    /// Unacknowledged deliveries per queue [default: 2 × max batch, so the next batch is ready while
    /// the previous one uploads].
    #[arg(long, env = "T2I_PREFETCH")]
    pub prefetch: Option<u16>,

    /// This worker's name in events and connection names [default: hostname-pid].
    #[arg(long, env = "T2I_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Address for /healthz, /readyz and /metrics (e.g. 0.0.0.0:9090); off when unset.
    #[arg(long, env = "T2I_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,

    /// A batch running longer than this fails its jobs with `timeout`, in seconds.
    #[arg(long, env = "T2I_JOB_TIMEOUT_S", default_value_t = 600)]
    pub job_timeout_s: u64,

    /// After SIGTERM/SIGINT, how long in-flight work may take to finish, in seconds.
    #[arg(long, env = "T2I_GRACE_PERIOD_S", default_value_t = 60)]
    pub grace_period_s: u64,

    /// Minimum interval between two job.progress events of a job, in milliseconds.
    #[arg(long, env = "T2I_PROGRESS_INTERVAL_MS", default_value_t = 1000)]
    pub progress_interval_ms: u64,

    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Bounds on image sizes, shared by the worker and the clients that check jobs before publishing
/// (same variables, so one deployment configuration applies to all).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Smallest accepted width/height.
    #[arg(long, env = "T2I_MIN_SIDE", default_value_t = 64)]
    pub min_side: u32,

    /// Largest accepted width/height.
    #[arg(long, env = "T2I_MAX_SIDE", default_value_t = 2048)]
    pub max_side: u32,

    /// Largest accepted width × height.
    #[arg(long, env = "T2I_MAX_PIXELS", default_value_t = 2048 * 2048)]
    pub max_pixels: u64,
}

impl LimitArgs {
    pub fn limits(&self) -> crate::job::Limits {
        crate::job::Limits {
            min_side: self.min_side,
            max_side: self.max_side,
            max_pixels: self.max_pixels,
            ..crate::job::Limits::default()
        }
    }
}
