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

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images locally from prompts (no broker).
    Generate(GenerateArgs),
    /// Measure load, per-step and end-to-end speed and memory for a model, device and dtype.
    Bench(crate::bench::BenchArgs),
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
