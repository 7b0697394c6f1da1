//! `t2i bench`: load time, text-encode time, seconds per UNet step, VAE decode time, seconds per image,
//! images/s, achieved UNet TFLOP/s (from `pipeline::cost`) and peak memory, for one model, device and
//! dtype, at one or more batch sizes.
//!
//! Timings come from `Pipeline::render`'s phase timings (synchronised with the device). Peak host
//! memory is the process's high-water RSS (`VmHWM`); device memory, on CUDA, is the device's used
//! memory sampled after every step. Absolute times on a shared CPU machine are noisy: compare ratios
//! measured in the same run (`scripts/bench/compare.py` runs diffusers beside us).

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::{ModelArgs, UsageError};
use crate::config::ModelConfig;
use crate::pipeline::{ImageSpec, Pipeline, RenderBatch, SchedulerKind, cost};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Image width [default: the model's].
    #[arg(long)]
    pub width: Option<usize>,

    /// Image height [default: the model's].
    #[arg(long)]
    pub height: Option<usize>,

    /// Denoising steps per image.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,

    /// Batch sizes to measure, comma-separated (e.g. 1,4,8).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,

    /// Sampler.
    #[arg(long, default_value = "euler")]
    pub scheduler: String,

    /// Guidance scale (> 1: classifier-free guidance, a doubled UNet batch).
    #[arg(long, default_value_t = 5.0)]
    pub guidance_scale: f64,

    /// Untimed renders per batch size before measuring (kernel loading, allocator warm-up).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,

    /// Timed renders per batch size (the mean is reported).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,

    /// Print one JSON object per batch size instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One batch size's figures.
#[derive(Debug, serde::Serialize)]
struct Row {
    implementation: &'static str,
    model: String,
    device: String,
    dtype: &'static str,
    width: usize,
    height: usize,
    steps: usize,
    batch: usize,
    cfg: bool,
    load_s: f64,
    text_encode_s: f64,
    step_s: f64,
    vae_decode_s: f64,
    total_s: f64,
    s_per_image: f64,
    images_per_s: f64,
    unet_tflops: f64,
    peak_rss_gib: f64,
    device_mem_gib: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let model = ModelConfig::from_args(&args.model)?;
    let scheduler = SchedulerKind::parse(&args.scheduler)
        .ok_or_else(|| UsageError(format!("unknown --scheduler `{}`", args.scheduler)))?;
    if args.batch_sizes.contains(&0) || args.steps == 0 || args.runs == 0 {
        return Err(
            UsageError("--batch-sizes, --steps and --runs must be at least 1".into()).into(),
        );
    }
    let loaded = model.load().map_err(|e| {
        if e.is_usage() {
            anyhow::Error::new(UsageError(e.to_string()))
        } else {
            anyhow::Error::new(e)
        }
    })?;
    let p = &loaded.pipeline;
    let load_s = (loaded.resolve_time + loaded.load_time).as_secs_f64();
    let f = p.vae_scale_factor();
    let width = args.width.unwrap_or(p.default_size());
    let height = args.height.unwrap_or(p.default_size());
    if !width.is_multiple_of(f) || !height.is_multiple_of(f) {
        return Err(UsageError(format!("--width/--height must be multiples of {f}")).into());
    }
    let cfg = args.guidance_scale > 1.0;
    let flops_per_sample = cost::unet_flops(p.unet().config(), height / f, width / f, 77);
    if !args.json {
        println!(
            "model {} on {} ({}), {width}x{height}, {} steps {scheduler}, CFG {}, load {load_s:.2}s",
            model.spec,
            model.device_name,
            model.dtype_name(),
            args.steps,
            if cfg { "on" } else { "off" }
        );
        println!(
            "{:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
            "batch",
            "encode_s",
            "step_s",
            "vae_s",
            "total_s",
            "s/image",
            "images/s",
            "UNet TF/s",
            "RSS GiB",
            "dev GiB"
        );
    }
    for &batch_size in &args.batch_sizes {
        let batch = RenderBatch {
            images: (0..batch_size)
                .map(|i| ImageSpec {
                    prompt: "a photo of an astronaut riding a horse on the moon".into(),
                    negative_prompt: None,
                    seed: i as u64,
                })
                .collect(),
            width,
            height,
            steps: args.steps,
            guidance_scale: args.guidance_scale,
            scheduler,
            latents: None,
        };
        let mut device_peak: Option<u64> = None;
        for _ in 0..args.warmup {
            p.render(&batch, &mut |_| ControlFlow::Continue(()))
                .context("warm-up render")?;
        }
        let (mut encode, mut step, mut vae, mut total) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..args.runs {
            let start = Instant::now();
            let r = p
                .render(&batch, &mut |_| {
                    if let Some(used) = device_memory_used(p) {
                        device_peak = Some(device_peak.map_or(used, |m| m.max(used)));
                    }
                    ControlFlow::Continue(())
                })
                .context("timed render")?;
            total += start.elapsed().as_secs_f64();
            encode += r.timings.text_encode.as_secs_f64();
            step += r.timings.denoise.as_secs_f64() / args.steps as f64;
            vae += r.timings.vae_decode.as_secs_f64();
        }
        let n = args.runs as f64;
        let (encode, step, vae, total) = (encode / n, step / n, vae / n, total / n);
        let rows_per_step = batch_size as f64 * if cfg { 2.0 } else { 1.0 };
        let row = Row {
            implementation: "t2i",
            model: model.spec.clone(),
            device: model.device_name.clone(),
            dtype: model.dtype_name(),
            width,
            height,
            steps: args.steps,
            batch: batch_size,
            cfg,
            load_s,
            text_encode_s: encode,
            step_s: step,
            vae_decode_s: vae,
            total_s: total,
            s_per_image: total / batch_size as f64,
            images_per_s: batch_size as f64 / total,
            unet_tflops: flops_per_sample * rows_per_step / step / 1e12,
            peak_rss_gib: peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64,
            device_mem_gib: device_peak.map(|b| b as f64 / (1u64 << 30) as f64),
        };
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "{:>5} {:>10.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.2} {:>9.2} {:>9}",
                row.batch,
                row.text_encode_s,
                row.step_s,
                row.vae_decode_s,
                row.total_s,
                row.s_per_image,
                row.images_per_s,
                row.unet_tflops,
                row.peak_rss_gib,
                row.device_mem_gib
                    .map_or("-".to_string(), |g| format!("{g:.2}")),
            );
        }
    }
    Ok(())
}

/// High-water resident set size of this process (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Used memory of the CUDA device (the whole device, as `nvidia-smi` shows it).
#[cfg(feature = "cuda")]
fn device_memory_used(p: &Pipeline) -> Option<u64> {
    let dev = p.device().as_cuda_device().ok()?;
    let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as u64)
}

#[cfg(not(feature = "cuda"))]
fn device_memory_used(_: &Pipeline) -> Option<u64> {
    None
}
