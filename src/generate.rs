//! `t2i generate`: prompts in, image files out, no broker.
//!
//! flags → `GenerationRequest` per prompt → `Generation::parse` (checked before the model loads, so a
//! typo fails in milliseconds) → `--lora` adapters fetched (`adapters::Fetcher`, the worker's policy
//! and `--lora-*` flags) → `Pipeline::render` in batches of `--batch-size` → `image::encode`
//! with the parameters embedded → files. Prints one line per written file on stdout and per-phase
//! timings on stderr. Does not talk to RabbitMQ; S3 only for `s3://` adapters.

use std::io::BufRead;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::cli::{GenerateArgs, UsageError};
use crate::config::ModelConfig;
use crate::image::{ImageFormat, ImageMetadata, ParametersText, encode, parameters_text};
use crate::job::{Generation, GenerationRequest, Limits, LoraRequest, ModelDefaults};
use crate::pipeline::{ImageSpec, RenderBatch};

/// One image to produce, in output order.
struct Planned {
    generation: usize,
    index: u32,
    spec: ImageSpec,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let total_start = Instant::now();
    let prompts = collect_prompts(&args)?;
    let limits = Limits::default();
    // One seed for every prompt (same-seed prompt comparisons, as SD UIs do); drawn once if absent.
    let seed = args.seed.unwrap_or_else(rand::random);
    let loras: Vec<LoraRequest> = args.loras.iter().map(|a| lora_request(a)).collect();
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .map(|p| GenerationRequest {
            seed: Some(seed),
            num_images: Some(args.num_images),
            loras: (!loras.is_empty()).then(|| loras.clone()),
            ..args.generation.request(p)
        })
        .collect();
    // Fail fast on bad values, before spending seconds to minutes loading the model.
    for r in &requests {
        Generation::parse(r.clone(), &limits, &ModelDefaults::default())
            .map_err(|e| UsageError(e.to_string()))?;
    }
    if args.batch_size == 0 {
        return Err(UsageError("--batch-size must be at least 1".into()).into());
    }
    let format = output_format(&args)?;
    let model = ModelConfig::from_args(&args.model)?;
    // Adapters are fetched before the model loads: a bad one fails in seconds, not minutes.
    let checked = Generation::parse(requests[0].clone(), &limits, &ModelDefaults::default())
        .map_err(|e| UsageError(e.to_string()))?;
    let (fetched_loras, held_files) = fetch_loras(&args, checked.loras)?;
    let total_images = prompts.len() * args.num_images as usize;
    let single_file = is_single_file(&args.output, total_images)?;
    let latents = args
        .latents
        .as_deref()
        .map(|p| read_latents(p, total_images))
        .transpose()?;

    let loaded = model.load().map_err(|e| {
        if e.is_usage() {
            anyhow::Error::new(UsageError(format!("{e}")))
        } else {
            anyhow::Error::new(e).context(format!("loading model `{}`", model.spec))
        }
    })?;
    let pipeline = &loaded.pipeline;
    pipeline.set_lora_memory_budget(args.lora.lora_memory_max_mb.saturating_mul(1 << 20));
    let defaults = pipeline.model_defaults();
    let generations: Vec<Generation> = requests
        .into_iter()
        .map(|r| {
            let mut g =
                Generation::parse(r, &limits, &defaults).map_err(|e| UsageError(e.to_string()))?;
            // The fetched adapters' hashes, for the images' metadata.
            g.loras = fetched_loras.clone();
            Ok::<_, UsageError>(g)
        })
        .collect::<Result<_, _>>()?;
    let adapter_files: Vec<_> = fetched_loras
        .iter()
        .zip(&held_files)
        .map(|(lora, fetched)| fetched.adapter(lora))
        .collect();
    if let Some(l) = &latents {
        let g = &generations[0];
        let f = pipeline.vae_scale_factor();
        let want = [total_images, 4, g.height as usize / f, g.width as usize / f];
        if l.dims() != want {
            return Err(UsageError(format!(
                "--latents: tensor `latents` has shape {:?}, expected {want:?} for {total_images} image(s) of {}x{}",
                l.dims(),
                g.width,
                g.height
            ))
            .into());
        }
    }

    if args.seed.is_none() {
        eprintln!("seed: {seed} (random; pass --seed {seed} to reproduce)");
    }
    let plan: Vec<Planned> = generations
        .iter()
        .enumerate()
        .flat_map(|(gi, g)| {
            ImageSpec::all_of(g)
                .into_iter()
                .enumerate()
                .map(move |(i, spec)| Planned {
                    generation: gi,
                    index: i as u32,
                    spec,
                })
        })
        .collect();
    if !single_file {
        std::fs::create_dir_all(&args.output)
            .with_context(|| format!("creating output folder {}", args.output.display()))?;
    }

    let g0 = &generations[0];
    let evaluations = g0.scheduler.unet_evaluations(g0.steps as usize) as u64;
    let steps_total = plan.len().div_ceil(args.batch_size) as u64 * evaluations;
    let bar = progress_bar(steps_total, args.quiet);
    let mut timings = Timings::default();
    let mut written = 0usize;
    for (b, chunk) in plan.chunks(args.batch_size).enumerate() {
        let start = b * args.batch_size;
        let images = chunk.iter().map(|p| p.spec.clone()).collect();
        let latents = latents
            .as_ref()
            .map(|l| l.narrow(0, start, chunk.len()))
            .transpose()?;
        let batch = RenderBatch::new(g0, images)
            .with_latents(latents)
            .with_loras(adapter_files.clone());
        let rendered = pipeline
            .render(&batch, &mut |_| {
                bar.inc(1);
                ControlFlow::Continue(())
            })
            .with_context(|| format!("rendering batch {}", b + 1))?;
        timings.add(&rendered.timings);
        let t = Instant::now();
        for (planned, img) in chunk.iter().zip(&rendered.images) {
            let g = &generations[planned.generation];
            let meta = metadata(g, planned, &model);
            let bytes = encode(img, format, args.quality, &meta).context("encoding image")?;
            let path = if single_file {
                args.output.clone()
            } else {
                args.output
                    .join(file_name(written, planned.spec.seed, format))
            };
            write_atomically(&path, &bytes)?;
            bar.suspend(|| println!("{}", path.display()));
            written += 1;
        }
        if rendered.truncated.iter().any(|&t| t) {
            bar.suspend(|| {
                eprintln!(
                    "warning: a prompt was truncated (past 77 tokens with --long-prompt truncate, \
                     past {} chunks of 75 tokens with chunk)",
                    crate::pipeline::prompt::MAX_CHUNKS
                )
            });
        }
        timings.encode += t.elapsed();
    }
    bar.finish_and_clear();
    timings.report(
        loaded.resolve_time,
        loaded.load_time,
        total_start.elapsed(),
        written,
    );
    Ok(())
}

/// `--lora URI[:SCALE]`: the scale is what follows the last `:` when it is a number and the rest is
/// not empty (a URI's own `:` are followed by `//` or a port and a path).
fn lora_request(arg: &str) -> LoraRequest {
    if let Some((uri, scale)) = arg.rsplit_once(':')
        && !uri.is_empty()
        && !scale.contains('/')
        && let Ok(scale) = scale.parse::<f64>()
    {
        return LoraRequest {
            uri: uri.to_string(),
            scale: Some(scale),
        };
    }
    LoraRequest {
        uri: arg.to_string(),
        scale: None,
    }
}

/// Fetches the `--lora` adapters (their hashes filled in) on a runtime of its own; the fetched files
/// are held until the images are written. A refused or unusable adapter is a usage error (exit 2).
fn fetch_loras(
    args: &GenerateArgs,
    mut loras: Vec<crate::job::Lora>,
) -> Result<(Vec<crate::job::Lora>, Vec<crate::adapters::Fetched>)> {
    if loras.is_empty() {
        return Ok((loras, Vec::new()));
    }
    let settings = crate::config::lora_settings(&args.lora, Default::default())?;
    let fetcher = crate::adapters::Fetcher::new(settings).map_err(UsageError)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime for LoRA downloads")?;
    let fetched = runtime.block_on(fetcher.fetch_all(&mut loras));
    match fetched {
        Ok(files) => Ok((loras, files)),
        Err((i, e)) if e.is_retryable() => Err(anyhow::anyhow!("--lora {}: {e}", loras[i].uri)),
        Err((i, e)) => Err(UsageError(format!("--lora {}: {e}", loras[i].uri)).into()),
    }
}

fn collect_prompts(args: &GenerateArgs) -> Result<Vec<String>> {
    let mut prompts = args.prompts.clone();
    if let Some(path) = &args.prompts_file {
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(std::io::BufReader::new(std::io::stdin()))
        } else {
            let f = std::fs::File::open(path)
                .map_err(|e| UsageError(format!("--prompts-file {}: {e}", path.display())))?;
            Box::new(std::io::BufReader::new(f))
        };
        for line in reader.lines() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                prompts.push(line.to_string());
            }
        }
    }
    if prompts.is_empty() {
        return Err(
            UsageError("no prompt: pass --prompt TEXT or --prompts-file PATH".into()).into(),
        );
    }
    Ok(prompts)
}

fn output_format(args: &GenerateArgs) -> Result<ImageFormat> {
    if let Some(f) = &args.format {
        return ImageFormat::parse(f).ok_or_else(|| {
            UsageError(format!(
                "unknown --format `{f}` (expected png, jpeg or webp)"
            ))
            .into()
        });
    }
    Ok(ImageFormat::from_path(&args.output).unwrap_or(ImageFormat::Png))
}

/// `--output x.png` names one file; anything else is a folder.
fn is_single_file(output: &Path, total: usize) -> Result<bool> {
    let looks_like_file = ImageFormat::from_path(output).is_some();
    if looks_like_file && total > 1 {
        return Err(UsageError(format!(
            "--output {} names one file but {total} images will be generated; give a folder",
            output.display()
        ))
        .into());
    }
    Ok(looks_like_file)
}

fn read_latents(path: &Path, total: usize) -> Result<Tensor> {
    let usage =
        |m: String| anyhow::Error::new(UsageError(format!("--latents {}: {m}", path.display())));
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| usage(e.to_string()))?;
    let t = tensors
        .get("latents")
        .ok_or_else(|| usage("no tensor named `latents`".into()))?;
    if t.rank() != 4 || t.dim(0).ok() != Some(total) {
        return Err(usage(format!(
            "shape {:?}; expected [{total}, 4, height/8, width/8]",
            t.dims()
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

fn metadata(g: &Generation, planned: &Planned, model: &ModelConfig) -> ImageMetadata {
    let model_name = model.display_name();
    let parameters = parameters_text(&ParametersText::of(g, planned.spec.seed, &model_name));
    let job = serde_json::json!({
        "prompt": g.prompt,
        "negative_prompt": g.negative_prompt,
        "width": g.width,
        "height": g.height,
        "steps": g.steps,
        "guidance_scale": g.guidance_scale,
        "scheduler": g.scheduler,
        "seed": planned.spec.seed,
        "index": planned.index,
        "num_images": g.num_images,
        "loras": g.loras,
        "model": model.spec,
        "dtype": model.dtype_name(),
    });
    ImageMetadata {
        parameters,
        job_json: job.to_string(),
    }
}

fn file_name(n: usize, seed: u64, format: ImageFormat) -> String {
    format!("{n:05}-{seed}.{}", format.extension())
}

/// Write to a temporary name in the same folder, then rename: a reader never sees half an image.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = {
        let mut name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".partial");
        path.with_file_name(name)
    };
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn progress_bar(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} denoising [{bar:30}] {pos}/{len} steps {elapsed_precise} ({eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[derive(Default)]
struct Timings {
    text_encode: Duration,
    denoise: Duration,
    steps: usize,
    vae_decode: Duration,
    encode: Duration,
}

impl Timings {
    fn add(&mut self, t: &crate::pipeline::PhaseTimings) {
        self.text_encode += t.text_encode;
        self.denoise += t.denoise;
        self.steps += t.steps;
        self.vae_decode += t.vae_decode;
    }

    fn report(&self, resolve: Duration, load: Duration, total: Duration, images: usize) {
        let per_step = if self.steps > 0 {
            self.denoise.as_secs_f64() / self.steps as f64
        } else {
            0.0
        };
        eprintln!(
            "timings: resolve {:.2}s, load {:.2}s, text encode {:.2}s, denoise {:.2}s ({} steps, {:.3}s/step), \
             vae decode {:.2}s, encode+write {:.2}s, total {:.2}s for {images} image(s)",
            resolve.as_secs_f64(),
            load.as_secs_f64(),
            self.text_encode.as_secs_f64(),
            self.denoise.as_secs_f64(),
            self.steps,
            per_step,
            self.vae_decode.as_secs_f64(),
            self.encode.as_secs_f64(),
            total.as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lora_flag_takes_a_scale_only_after_the_last_colon() {
        let r = |a: &str| {
            let r = lora_request(a);
            (r.uri, r.scale)
        };
        assert_eq!(
            r("styles/ink.safetensors"),
            ("styles/ink.safetensors".into(), None)
        );
        assert_eq!(
            r("styles/ink.safetensors:0.8"),
            ("styles/ink.safetensors".into(), Some(0.8))
        );
        assert_eq!(
            r("s3://b/k.safetensors:-1"),
            ("s3://b/k.safetensors".into(), Some(-1.0))
        );
        assert_eq!(r("hf://owner/repo"), ("hf://owner/repo".into(), None));
        assert_eq!(
            r("https://h.example:8443/x.safetensors"),
            ("https://h.example:8443/x.safetensors".into(), None)
        );
        assert_eq!(
            r("hf://owner/repo:1.5"),
            ("hf://owner/repo".into(), Some(1.5))
        );
    }
}
