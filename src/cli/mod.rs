//! Command-line flags (clap derive). Every flag that configures a deployment has a `T2I_*`
//! environment variable; the `///` comment on each field is its `--help` text. Nothing here validates
//! beyond syntax: `config`, `job::Generation::parse` and the subcommands do that. The subcommands
//! import their flags from here, never the other way round.

mod batch;
mod commands;

pub use batch::{
    BatchCommand, BatchManifestArgs, BatchSheetArgs, BatchStatusArgs, BatchTarget, BatchWatchArgs,
    DatasetArgs, WatchArgs,
};
pub use commands::{
    BenchArgs, CancelArgs, EnqueueArgs, GatewayArgs, GenerateArgs, HealthcheckArgs, SchemasArgs,
    WebhookStateArgs, WebhooksAction, WebhooksArgs, WebhooksEnableArgs, WebhooksReplayArgs,
    WebhooksUrlSecretArgs, WorkerArgs,
};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "t2i",
    version,
    about = "Text-to-image with SDXL-family models (SSD-1B, SDXL, Vega) and SD 1.x/2.x in candle"
)]
pub struct Cli {
    /// Log verbosity filter (tracing EnvFilter syntax), e.g. `warn`, `t2i_worker=debug`. Without
    /// it, `RUST_LOG`, else `info` (startup, connections, rejections and retries are info).
    #[arg(long, env = "T2I_LOG", global = true)]
    pub log: Option<String>,

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
    Bench(BenchArgs),
    /// Consume jobs from RabbitMQ, render, store in S3 or a folder, publish events.
    Worker(WorkerArgs),
    /// Write the JSON Schemas of the message contract (generated from the Rust types).
    Schemas(SchemasArgs),
    /// Publish one job or a bulk set (JSONL, CSV, prompt list, template); optionally wait and write a
    /// dataset manifest.
    Enqueue(EnqueueArgs),
    /// Relay job events to HTTP receivers, signed per the Standard Webhooks spec, with retries.
    Webhooks(WebhooksArgs),
    /// HTTP front door: POST /v1/jobs, GET /v1/jobs/{id}, POST /generate-image (waits for the result).
    Gateway(GatewayArgs),
    /// Cancel jobs or whole batches: waiting jobs are dropped, running ones stop between steps.
    Cancel(CancelArgs),
    /// Inspect a batch from the store, publishing nothing: status, watch, manifest.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Exit 0 when a URL answers 200 (container HEALTHCHECK without curl in the image).
    Healthcheck(HealthcheckArgs),
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

    /// The project's own CUDA kernels to use instead of candle's, comma-separated: groupnorm, geglu,
    /// bias, residual, conv (needs the `cudnn` feature), attn (needs `flash-attn`); `all` for every
    /// one this binary has. Experimental and off by default (docs/gpu.md); CUDA devices only.
    #[arg(long, env = "T2I_CUDA_KERNELS", default_value = "none")]
    pub cuda_kernels: String,
}

/// A mistake in what the user asked for (bad flag values, missing model files): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

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

/// Where the workers store images and `result.json`: the worker writes there, `enqueue` and the
/// gateway read results from it.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Where images go: `s3://bucket/prefix`, `file:///path` or a folder.
    #[arg(long, env = "T2I_STORAGE", default_value = "./outputs")]
    pub storage: String,

    /// S3 path-style addressing [default: on when AWS_ENDPOINT_URL is set].
    #[arg(long, env = "T2I_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: Option<bool>,

    /// The S3 endpoint that presigned image URLs name, when clients reach the store at another
    /// address than AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000 on the host for http://s3:9000 in
    /// Compose). Presigning only: every S3 request still goes to AWS_ENDPOINT_URL [default: the same
    /// endpoint].
    #[arg(long, env = "T2I_S3_PUBLIC_ENDPOINT")]
    pub s3_public_endpoint: Option<String>,
}

impl StorageArgs {
    pub fn s3_options(&self) -> crate::storage::S3Options {
        crate::storage::S3Options {
            force_path_style: self.s3_force_path_style,
            public_endpoint: self.s3_public_endpoint.clone().filter(|e| !e.is_empty()),
        }
    }
}

/// Where jobs' LoRA adapters may come from and how much of them is kept (`t2i worker`, `t2i
/// generate`); see `crate::adapters` for the policy.
#[derive(Debug, Clone, Args)]
pub struct LoraArgs {
    /// Folder that local LoRA paths (`loras[].uri` without a scheme) are resolved in; nothing outside
    /// it is ever read (`..`, absolute paths and symlinks leading out are refused). Without it,
    /// local paths are refused.
    #[arg(long, env = "T2I_LORA_DIR")]
    pub lora_dir: Option<std::path::PathBuf>,

    /// Folder for downloaded LoRA files (S3, https, hub) [default: $XDG_CACHE_HOME/t2i/loras, else
    /// ~/.cache/t2i/loras].
    #[arg(long, env = "T2I_LORA_CACHE_DIR")]
    pub lora_cache_dir: Option<std::path::PathBuf>,

    /// Most megabytes of downloaded LoRA files kept on disk; the least recently used go first.
    #[arg(long, env = "T2I_LORA_CACHE_MAX_MB", default_value_t = 10240)]
    pub lora_cache_max_mb: u64,

    /// Largest LoRA file accepted, in megabytes (a download stops there).
    #[arg(long, env = "T2I_LORA_MAX_MB", default_value_t = 1024)]
    pub lora_max_mb: u64,

    /// Most megabytes of merged LoRA model variants kept in (device) memory; the least recently
    /// used go first, the last one used always stays.
    #[arg(long, env = "T2I_LORA_MEMORY_MAX_MB", default_value_t = 4096)]
    pub lora_memory_max_mb: u64,

    /// `s3://bucket[/prefix]` under which `s3://` LoRAs may be read (repeatable or comma-separated);
    /// without one, S3 LoRAs are refused.
    #[arg(long, env = "T2I_LORA_S3_ALLOW", value_delimiter = ',')]
    pub lora_s3_allow: Vec<String>,

    /// Accept http:// LoRA URLs (https only by default).
    #[arg(long, env = "T2I_LORA_ALLOW_HTTP")]
    pub lora_allow_http: bool,

    /// `host:port` whose LoRA URLs are fetched whatever its address (e.g. an in-cluster file server);
    /// repeatable or comma-separated.
    #[arg(long, env = "T2I_LORA_ALLOW_HOSTS", value_delimiter = ',')]
    pub lora_allow_host: Vec<String>,

    /// Fetch LoRA URLs from any address, private networks included (trusted networks only).
    #[arg(long, env = "T2I_LORA_ALLOW_PRIVATE_NETWORKS")]
    pub lora_allow_private_networks: bool,

    /// Send the Hugging Face token (`HF_TOKEN`, else the cached login) with hub LoRA downloads, so
    /// that jobs may use the private repos it can read. Off, hub LoRAs download anonymously: the
    /// token that fetches the model is not lent to every job.
    #[arg(long, env = "T2I_LORA_HUB_TOKEN")]
    pub lora_hub_token: bool,

    /// Longest LoRA download, in seconds.
    #[arg(long, env = "T2I_LORA_FETCH_TIMEOUT_S", default_value_t = 600)]
    pub lora_fetch_timeout_s: u64,
}

/// The shape of an image, for the subcommands that make or describe jobs (`generate`, `enqueue`,
/// `bench`). Absent values take the model's defaults, exactly as a job's absent fields do.
#[derive(Debug, Clone, Args)]
pub struct GenerationArgs {
    /// Negative prompt for every image. Without one, SDXL-family models use zero embeddings and SD
    /// 1.x/2.x the encoding of "".
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,

    /// Width in pixels, a multiple of 8 [default: the model's, 1024 for SSD-1B].
    #[arg(long)]
    pub width: Option<u32>,

    /// Height in pixels, a multiple of 8 [default: the model's].
    #[arg(long)]
    pub height: Option<u32>,

    /// Denoising steps, 1..=150 [default: 25; `t2i bench`: 4].
    #[arg(long)]
    pub steps: Option<u32>,

    /// Classifier-free guidance scale, 0..=30; ≤ 1 disables guidance [default: the pipeline's, 5 for
    /// SDXL-family models, 7.5 for SD 1.x/2.x].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance_scale: Option<f64>,

    /// Sampler: euler, euler_ancestral, ddim, dpmpp_2m, dpmpp_2m_karras, pndm [default: the model's,
    /// euler for SSD-1B, pndm for SD 1.5].
    #[arg(long)]
    pub scheduler: Option<String>,

    /// Prompts over CLIP's 77 tokens: chunk (every 75 tokens encoded as a chunk of their own and
    /// concatenated) or truncate (cut at 77 tokens, as diffusers does) [default: chunk].
    #[arg(long)]
    pub long_prompt: Option<String>,

    /// Prompt weighting syntax: a1111 (`(word:1.2)`, `(word)`, `[word]`, `BREAK`) or none (the
    /// text as is) [default: a1111; none with --long-prompt truncate].
    #[arg(long)]
    pub prompt_weighting: Option<String>,
}

impl GenerationArgs {
    /// A request for `prompt` with these values (seed and image count are the caller's).
    pub fn request(&self, prompt: &str) -> crate::job::GenerationRequest {
        crate::job::GenerationRequest {
            prompt: prompt.to_string(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler.clone(),
            seed: None,
            num_images: None,
            long_prompt: self.long_prompt.clone(),
            loras: None,
            prompt_weighting: self.prompt_weighting.clone(),
        }
    }
}
