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

use crate::cli::{BenchArgs, UsageError};
use crate::config::ModelConfig;
use crate::job::{Generation, Limits, ModelDefaults};
use crate::pipeline::ops::profile::{self, Op, Phase, Profile};
use crate::pipeline::{ImageSpec, RenderBatch, cost};

/// The prompt every benchmark image renders (its length, not its words, sets the text encoders' cost).
const PROMPT: &str = "a photo of an astronaut riding a horse on the moon";

/// `t2i bench`'s default step count: enough steps for a stable s/step, few enough for a CPU.
const DEFAULT_STEPS: u32 = 4;

/// One op category (or "other": the phase's time outside the ops) in one phase.
#[derive(Debug, serde::Serialize)]
struct ProfileRow {
    phase: &'static str,
    op: &'static str,
    /// Milliseconds per UNet step (denoise) or per render (text encode, VAE decode).
    ms: f64,
    calls: f64,
    /// Share of the phase's wall time.
    percent: f64,
}

/// Profile totals over `runs` renders of `steps` steps → rows per step / per render, with each
/// phase's unaccounted time as "other". `phase_s` are the measured phase times in the same units.
fn profile_rows(p: &Profile, runs: usize, steps: usize, phase_s: [f64; 3]) -> Vec<ProfileRow> {
    let mut rows = Vec::new();
    for (phase, wall_s) in Phase::ALL.into_iter().zip(phase_s) {
        let per = match phase {
            Phase::Denoise => (runs * steps) as f64,
            _ => runs as f64,
        };
        let wall_ms = wall_s * 1e3;
        let share = |ms: f64| {
            if wall_ms > 0.0 {
                100.0 * ms / wall_ms
            } else {
                0.0
            }
        };
        for op in Op::ALL {
            let t = p.get(phase, op);
            let ms = t.time.as_secs_f64() * 1e3 / per;
            rows.push(ProfileRow {
                phase: phase.name(),
                op: op.name(),
                ms,
                calls: t.calls as f64 / per,
                percent: share(ms),
            });
        }
        let other = (wall_ms - p.phase_total(phase).as_secs_f64() * 1e3 / per).max(0.0);
        rows.push(ProfileRow {
            phase: phase.name(),
            op: "other",
            ms: other,
            calls: 0.0,
            percent: share(other),
        });
    }
    rows
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
    /// Per component: tensors, bytes, time in reads, in building tensors, and in all.
    load: Vec<crate::pipeline::ComponentLoad>,
    text_encode_s: f64,
    step_s: f64,
    vae_decode_s: f64,
    total_s: f64,
    s_per_image: f64,
    images_per_s: f64,
    unet_tflops: f64,
    /// With `--profile`: time per op and phase (per UNet step for the denoise phase, per render
    /// otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Vec<ProfileRow>>,
    peak_rss_gib: f64,
    device_mem_gib: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let model = ModelConfig::from_args(&args.model)?;
    if args.check_ops {
        if !model.device.is_cuda() {
            return Err(
                UsageError("--check-ops checks CUDA kernels: give --device cuda".into()).into(),
            );
        }
        let passed = crate::pipeline::ops::check::run(&model.device, model.dtype, args.json)
            .context("op check")?;
        anyhow::ensure!(passed, "op check: a kernel failed (see the FAIL lines)");
        return Ok(());
    }
    if args.profile {
        profile::set_enabled(true);
    }
    if args.batch_sizes.contains(&0) || args.runs == 0 {
        return Err(UsageError("--batch-sizes and --runs must be at least 1".into()).into());
    }
    // Any multiple of 8 the model can take: benchmarks go below the worker's 64-pixel minimum
    // on the tiny fixtures.
    let limits = Limits {
        min_side: 8,
        max_side: 8192,
        max_pixels: 8192 * 8192,
        ..Limits::default()
    };
    let mut request = args.generation.request(PROMPT);
    request.steps = request.steps.or(Some(DEFAULT_STEPS));
    // Fail on bad values before the model loads; sizes are checked again against its defaults.
    Generation::parse(request.clone(), &limits, &ModelDefaults::default())
        .map_err(|e| UsageError(e.to_string()))?;
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
    let defaults = p.model_defaults();
    let g =
        Generation::parse(request, &limits, &defaults).map_err(|e| UsageError(e.to_string()))?;
    let (width, height, steps) = (g.width as usize, g.height as usize, g.steps as usize);
    let scheduler = g.scheduler;
    let cfg = g.guidance_scale > 1.0;
    let flops_per_sample = cost::unet_flops(p.unet().config(), height / f, width / f, 77);
    if !args.json {
        println!(
            "model {} on {} ({}), {width}x{height}, {} steps {scheduler}, CFG {}, load {load_s:.2}s",
            model.spec,
            model.device_name,
            model.dtype_name(),
            steps,
            if cfg { "on" } else { "off" }
        );
        for c in p.load_report() {
            println!(
                "  load {:<15} {:>8.2}s: read {:.2}s, tensors {:.2}s, {} tensors, {:.2} GiB",
                c.component,
                c.total.as_secs_f64(),
                c.read.as_secs_f64(),
                c.convert.as_secs_f64(),
                c.tensors,
                c.bytes as f64 / (1u64 << 30) as f64
            );
        }
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
        let images = (0..batch_size)
            .map(|i| ImageSpec {
                prompt: g.prompt.clone(),
                negative_prompt: g.negative_prompt.clone(),
                seed: i as u64,
            })
            .collect();
        let batch = RenderBatch::new(&g, images);
        let mut device_peak: Option<u64> = None;
        for _ in 0..args.warmup {
            p.render(&batch, &mut |_| ControlFlow::Continue(()))
                .context("warm-up render")?;
        }
        // What the warm-up renders counted is not part of the profile.
        let _ = profile::take();
        let (mut encode, mut step, mut vae, mut total) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..args.runs {
            let start = Instant::now();
            let r = p
                .render(&batch, &mut |_| {
                    if let Some(used) = crate::device::memory_used(p.device()) {
                        device_peak = Some(device_peak.map_or(used, |m| m.max(used)));
                    }
                    ControlFlow::Continue(())
                })
                .context("timed render")?;
            total += start.elapsed().as_secs_f64();
            encode += r.timings.text_encode.as_secs_f64();
            step += r.timings.denoise.as_secs_f64() / r.timings.steps as f64;
            vae += r.timings.vae_decode.as_secs_f64();
        }
        let n = args.runs as f64;
        let (encode, step, vae, total) = (encode / n, step / n, vae / n, total / n);
        let rows_per_step = batch_size as f64 * if cfg { 2.0 } else { 1.0 };
        let ops = profile::is_enabled().then(|| {
            let evaluations = scheduler.unet_evaluations(steps);
            profile_rows(
                &profile::take(),
                args.runs,
                evaluations,
                [encode, step, vae],
            )
        });
        let row = Row {
            implementation: "t2i",
            model: model.spec.clone(),
            device: model.device_name.clone(),
            dtype: model.dtype_name(),
            width,
            height,
            steps,
            batch: batch_size,
            cfg,
            load_s,
            load: p.load_report().to_vec(),
            text_encode_s: encode,
            step_s: step,
            vae_decode_s: vae,
            total_s: total,
            s_per_image: total / batch_size as f64,
            images_per_s: batch_size as f64 / total,
            unet_tflops: flops_per_sample * rows_per_step / step / 1e12,
            profile: ops,
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
            if let Some(rows) = &row.profile {
                print_profile(rows);
            }
        }
    }
    Ok(())
}

/// The profile under its batch size's row: one line per op with time in any phase.
fn print_profile(rows: &[ProfileRow]) {
    println!(
        "      {:<12} {:<11} {:>10} {:>8} {:>7}",
        "phase", "op", "ms", "calls", "%"
    );
    for r in rows.iter().filter(|r| r.ms > 0.0 || r.calls > 0.0) {
        let unit = if r.phase == Phase::Denoise.name() {
            "/step"
        } else {
            ""
        };
        println!(
            "      {:<12} {:<11} {:>10.2} {:>8.1} {:>6.1}%",
            format!("{}{unit}", r.phase),
            r.op,
            r.ms,
            r.calls,
            r.percent
        );
    }
}

/// High-water resident set size of this process (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
