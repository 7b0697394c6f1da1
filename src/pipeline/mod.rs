//! The text-to-image pipeline of the SD and SDXL families: `Pipeline::load` reads a diffusers folder,
//! `Pipeline::render` turns a batch of prompts into images.
//!
//! `render` reads `encode_prompts → initial_latents → denoise → decode → to_images`, reproducing
//! diffusers' `StableDiffusionXLPipeline.__call__` (SDXL, SSD-1B, Vega) or
//! `StableDiffusionPipeline.__call__` (SD 1.x/2.x) on the same weights, latents and scheduler (the
//! parity tests hold it to that). A batch shares size, steps, sampler, guidance and LoRA adapters
//! (merged into a cached model variant, [`lora`]); each image has its own prompt, negative prompt and seed. This module owns no threads and knows nothing of queues,
//! files or image formats.

mod batch;
pub mod blocks;
pub mod clip;
pub mod config;
pub mod cost;
pub mod denoise;
mod emphasis;
pub mod lora;
mod norm;
pub mod ops;
pub mod prompt;
pub mod runner;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

pub use batch::{ImageSpec, PhaseTimings, RenderBatch, Rendered};
pub use config::{ClipConfig, Family, ModelIndex, ModelInfo, UNetConfig, VaeConfig};
pub use denoise::StepProgress;
pub use prompt::PromptEmbeddings;
pub use scheduler::{SchedulerConfig, SchedulerKind};
pub use weights::{ComponentLoad, ModelSourceError, Variant};

use denoise::{DenoiseError, DenoiseInputs, SeededNoise};
use prompt::{TextEncoders, TextPlan};
pub use scheduler::NoiseSource;
use unet::{TextTimeInputs, UNet};
use vae::VaeDecoder;

/// Failures of the pipeline, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Source(#[from] ModelSourceError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error("loading {component} weights from {}: {source}", path.display())]
    LoadWeights {
        component: &'static str,
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("device {0}: {1}")]
    Device(String, candle_core::Error),
    #[error("tokenizing a prompt: {0}")]
    Tokenize(tokenizers::Error),
    #[error("encoding prompts: {0}")]
    EncodePrompt(candle_core::Error),
    #[error("prompt weighting: {0}")]
    Weighting(crate::job::weighting::WeightError),
    /// A served model that cannot be loaded or does not fit the worker's memory budget.
    #[error("{0}")]
    ModelUnavailable(String),
    #[error("sampler {0}")]
    Sampler(String),
    #[error("latents: {0}")]
    Latents(String),
    #[error("denoising step {step}: {source}")]
    Denoise {
        step: usize,
        source: candle_core::Error,
    },
    #[error("stopped after step {step}")]
    Stopped { step: usize },
    #[error("decoding latents with the VAE: {0}")]
    DecodeVae(candle_core::Error),
    /// The job's LoRA adapters do not fit this model (or could not be read): the job's fault.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
}

impl PipelineError {
    /// Out-of-memory on the device: the job fails, the worker survives.
    pub fn is_out_of_memory(&self) -> bool {
        let msg = self.to_string().to_ascii_lowercase();
        msg.contains("out of memory") || msg.contains("cuda_error_out_of_memory")
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// UNet and text-encoder dtype. The VAE uses f32 instead of f16 (it overflows in f16).
    pub dtype: DType,
    pub variant: Variant,
}

pub struct Pipeline {
    root: PathBuf,
    index: ModelIndex,
    text: TextEncoders,
    unet: UNet,
    vae: VaeDecoder,
    vae_config: VaeConfig,
    vae_dtype: DType,
    scheduler_config: SchedulerConfig,
    device: Device,
    dtype: DType,
    load_report: Vec<ComponentLoad>,
    /// The recorded base weights LoRA variants are built from, and the variants' cache.
    adapters: lora::Adapters,
}

impl Pipeline {
    /// Loads every component of the diffusers folder `root` (already resolved from a repo id).
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<Self, PipelineError> {
        ops::profile::enable_from_env();
        let index = ModelIndex::load(root)?;
        let unet_config = UNetConfig::load(&root.join("unet/config.json"))?;
        let text_plan = TextPlan::load(root, &index)?;
        let vae_config = VaeConfig::load(&root.join("vae/config.json"))?;
        let scheduler_config = config::scheduler_config(root)?;
        prompt::check_context_width(root, &text_plan, unet_config.cross_attention_dim)?;
        if (unet_config.text_time.is_some()) != (index.family == Family::Sdxl) {
            return Err(config::ConfigError::Key {
                path: root.join("unet/config.json"),
                key: "addition_embed_type".into(),
                message: format!(
                    "a {} needs {}",
                    index.class_name,
                    match index.family {
                        Family::Sdxl => "\"text_time\" conditioning",
                        Family::Sd => "none (it has no pooled text embedding)",
                    }
                ),
            }
            .into());
        }

        let dtype = opts.dtype;
        // The SDXL VAE overflows to NaN in f16 (docs/model-notes.md §3); diffusers upcasts when force_upcast is
        // set. We never run it in plain f16 at all.
        let vae_dtype = if dtype == DType::F16 {
            DType::F32
        } else {
            dtype
        };
        // The tensors of the components LoRA adapters may change are recorded as they load (`lora`).
        let recorder = lora::Recorder::new();
        let vb = |component: &'static str, stem: &str, dt: DType| -> Result<_, PipelineError> {
            let dir = root.join(component);
            let files = weights::weight_files(&dir, stem, opts.variant, dtype)?;
            let (vb, stats) = recorder
                .var_builder(&files, dt, &opts.device, component)
                .map_err(|source| PipelineError::LoadWeights {
                    component,
                    path: dir.clone(),
                    source,
                })?;
            Ok((vb, stats, dir))
        };
        // Builds one component and records where its time went.
        fn build<T>(
            (vb, stats, dir): (VarBuilder<'static>, weights::LoadStats, PathBuf),
            component: &'static str,
            load: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
        ) -> Result<(T, ComponentLoad), PipelineError> {
            let started = Instant::now();
            let built = load(vb).map_err(|source| PipelineError::LoadWeights {
                component,
                path: dir,
                source,
            })?;
            let mut report = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
            report.total = started.elapsed();
            Ok((built, report))
        }
        let load_unet = || {
            build(vb("unet", "diffusion_pytorch_model", dtype)?, "unet", |v| {
                UNet::load(v, &unet_config)
            })
        };
        let load_others = || {
            let mut encoders = Vec::new();
            let mut reports = Vec::new();
            for (i, (folder, _)) in text_plan.components().into_iter().enumerate() {
                let (encoder, report) = build(vb(folder, "model", dtype)?, folder, |v| {
                    text_plan.build_encoder(i, v)
                })?;
                encoders.push(encoder);
                reports.push(report);
            }
            let vae = build(
                vb("vae", "diffusion_pytorch_model", vae_dtype)?,
                "vae",
                |v| VaeDecoder::load(v, &vae_config),
            )?;
            Ok::<_, PipelineError>((encoders, reports, vae))
        };
        // On CPU the UNet (over half of the bytes) loads on a thread of its own while the text
        // encoders and the VAE load here: reading and building tensors is memory-bound copying
        // and page faulting, which the second core speeds up. Other devices load on one thread
        // until a device run has checked concurrent uploads there.
        let (unet, others) = if opts.device.is_cpu() {
            std::thread::scope(|s| {
                let unet = s.spawn(load_unet);
                let others = load_others();
                let unet = unet
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (unet, others)
            })
        } else {
            (load_unet(), load_others())
        };
        let ((unet, unet_load), (encoders, mut load_report, (vae, vae_load))) = (unet?, others?);
        load_report.extend([unet_load, vae_load]);
        let adapters = recorder.into_adapters(unet_config, &text_plan, dtype, &opts.device);
        let text = text_plan.into_encoders(encoders, index.force_zeros_for_empty_prompt);
        Ok(Self {
            root: root.to_path_buf(),
            index,
            text,
            unet,
            vae,
            vae_config,
            vae_dtype,
            scheduler_config,
            device: opts.device.clone(),
            dtype,
            load_report,
            adapters,
        })
    }

    /// Where each component's load time went.
    pub fn load_report(&self) -> &[ComponentLoad] {
        &self.load_report
    }

    /// Bytes the model's loaded tensors hold on its device (weights only, not working memory).
    pub fn loaded_bytes(&self) -> u64 {
        self.load_report.iter().map(|c| c.loaded_bytes).sum()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    pub fn vae_decoder(&self) -> &VaeDecoder {
        &self.vae
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Pixels per latent pixel (8 for the SDXL VAE).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// The model's native size in pixels (`sample_size × vae_scale_factor`: 1024 for SDXL/SSD-1B).
    pub fn default_size(&self) -> usize {
        self.model_defaults().size as usize
    }

    /// The sampler the model ships, as a contract name (`euler` when it ships one we don't name).
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.model_defaults().scheduler
    }

    /// The model family and what its `model_index.json` says.
    pub fn index(&self) -> &ModelIndex {
        &self.index
    }

    /// What the model contributes to a job that leaves fields out (`config::ModelInfo`, which
    /// reads the same from the files alone).
    pub fn model_defaults(&self) -> crate::job::ModelDefaults {
        config::model_defaults(
            &self.index,
            self.unet.config(),
            &self.vae_config,
            &self.scheduler_config,
        )
    }

    /// Token ids of every tokenizer for one prompt, in encoder order.
    pub fn tokenize(&self, text: &str) -> Result<Vec<tokenizer::Tokens>, PipelineError> {
        self.text.tokenize(text)
    }

    /// diffusers `encode_prompt` for a list of texts, without CFG handling (cut at 77 tokens).
    pub fn encode_prompts(&self, texts: &[&str]) -> Result<PromptEmbeddings, PipelineError> {
        self.text.encode_prompts(texts)
    }

    /// Embeddings for a list of texts with prompts over 77 tokens encoded as `mode` says (`chunk`:
    /// compel's chunked encoding, every text padded to the same number of chunks).
    pub fn encode_prompts_as(
        &self,
        texts: &[&str],
        mode: crate::job::LongPrompt,
    ) -> Result<PromptEmbeddings, PipelineError> {
        self.text.encode_prompts_as(texts, mode)
    }

    /// Embeddings for a list of texts in `mode` with `weighting` (`a1111`: the A1111 syntax read,
    /// weights applied per chunk as A1111 does), every text padded to the same number of chunks.
    pub fn encode_prompts_with(
        &self,
        texts: &[&str],
        mode: crate::job::LongPrompt,
        weighting: crate::job::PromptWeighting,
    ) -> Result<PromptEmbeddings, PipelineError> {
        self.text.encode_prompts_with(texts, mode, weighting)
    }

    /// Initial noise from each image's seed, or the caller's latents after a shape check.
    fn initial_latents(
        &self,
        batch: &RenderBatch,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let f = self.vae_scale_factor();
        let channels = self.unet.config().in_channels;
        let shape = (
            batch.images.len(),
            channels,
            batch.height / f,
            batch.width / f,
        );
        match &batch.latents {
            Some(l) => {
                if l.dims() != [shape.0, shape.1, shape.2, shape.3] {
                    return Err(PipelineError::Latents(format!(
                        "expected shape {:?} for {} image(s) of {}x{}, got {:?}",
                        [shape.0, shape.1, shape.2, shape.3],
                        batch.images.len(),
                        batch.width,
                        batch.height,
                        l.dims()
                    )));
                }
                l.to_device(&self.device)
                    .and_then(|l| l.to_dtype(DType::F32))
                    .map_err(|e| PipelineError::Latents(e.to_string()))
            }
            None => noise
                .sample(&shape.into())
                .map_err(|e| PipelineError::Latents(e.to_string())),
        }
    }

    /// Renders a batch. `on_step` is called after every denoising step and may stop the run.
    ///
    /// Images whose long prompts need different context lengths are rendered one group after the
    /// other ([`prompt::TextEncoders::context_groups`]), each image from its own seed's noise, so
    /// that a batch still renders every image as it would alone; `on_step` then counts the groups'
    /// steps one after the other (`total` = groups × steps).
    pub fn render(
        &self,
        batch: &RenderBatch,
        on_step: &mut dyn FnMut(StepProgress<'_>) -> ControlFlow<()>,
    ) -> Result<Rendered, PipelineError> {
        let groups = self.text.context_groups(batch)?;
        if groups.len() <= 1 {
            return self.render_group(batch, on_step);
        }
        let n = batch.images.len();
        let mut images = vec![None; n];
        let mut truncated = vec![false; n];
        let mut timings = PhaseTimings::default();
        let count = groups.len();
        for (g, members) in groups.into_iter().enumerate() {
            let sub = batch
                .subset(&members)
                .map_err(|e| PipelineError::Latents(e.to_string()))?;
            // Progress counts over the whole batch: group g's step s is step g·total + s of
            // count·total (every group runs the same steps and sampler).
            let mut remapped = |s: StepProgress<'_>| {
                on_step(StepProgress {
                    step: g * s.total + s.step,
                    total: count * s.total,
                    ..s
                })
            };
            let rendered = self.render_group(&sub, &mut remapped)?;
            timings.add(&rendered.timings);
            for ((i, image), cut) in members
                .into_iter()
                .zip(rendered.images)
                .zip(rendered.truncated)
            {
                images[i] = Some(image);
                truncated[i] = cut;
            }
        }
        Ok(Rendered {
            images: images.into_iter().flatten().collect(),
            truncated,
            timings,
        })
    }

    /// One render of the whole batch from its seeds' noise.
    fn render_group(
        &self,
        batch: &RenderBatch,
        on_step: &mut dyn FnMut(StepProgress<'_>) -> ControlFlow<()>,
    ) -> Result<Rendered, PipelineError> {
        let seeds: Vec<u64> = batch.images.iter().map(|i| i.seed).collect();
        let mut noise = SeededNoise::new(&seeds, &self.device);
        self.render_with_noise(batch, &mut noise, on_step)
    }

    /// [`Pipeline::render`] with the per-step noise source supplied (tests inject diffusers' draws).
    /// Initial latents still come from `noise` when `batch.latents` is `None`. The whole batch is
    /// one CFG batch: with `chunk`, every prompt is padded to the longest one's chunks.
    pub fn render_with_noise(
        &self,
        batch: &RenderBatch,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(StepProgress<'_>) -> ControlFlow<()>,
    ) -> Result<Rendered, PipelineError> {
        let mut timings = PhaseTimings::default();
        let t0 = Instant::now();
        // The batch's adapters (one set per batch: the batch key): their variant's components
        // where it has them, the base model's elsewhere.
        let variant = self.adapted(&batch.loras)?;
        let (text, unet) = match &variant {
            Some(v) => (
                v.text().unwrap_or(&self.text),
                v.unet().unwrap_or(&self.unet),
            ),
            None => (&self.text, &self.unet),
        };
        let phase = ops::profile::phase(ops::profile::Phase::TextEncode);
        let prompt::BatchEmbeddings {
            context,
            pooled,
            truncated,
        } = text.encode_batch(batch)?;
        let rows = context.dim(0).map_err(PipelineError::EncodePrompt)?;
        let (h, w) = (batch.height as f64, batch.width as f64);
        // SDXL micro-conditioning: original size = target size = (H, W), crop (0, 0) (diffusers defaults).
        let time_ids = vec![[h, w, 0.0, 0.0, h, w]; rows];
        let text_time = pooled.as_ref().map(|pooled| TextTimeInputs {
            pooled,
            time_ids: &time_ids,
        });
        let conditioning = unet
            .conditioning(rows, text_time)
            .map_err(PipelineError::EncodePrompt)?;
        // Device work is asynchronous on CUDA/Metal: synchronise so phase timings mean something.
        self.device
            .synchronize()
            .map_err(PipelineError::EncodePrompt)?;
        timings.text_encode = t0.elapsed();

        let t1 = Instant::now();
        drop(phase);
        let phase = ops::profile::phase(ops::profile::Phase::Denoise);
        let latents = self.initial_latents(batch, noise)?;
        if let Some((kind, why)) = self.scheduler_config.unsupported()
            && kind == batch.scheduler
        {
            return Err(PipelineError::Sampler(format!("{kind}: {why}")));
        }
        let mut sampler = scheduler::build(batch.scheduler, &self.scheduler_config, batch.steps);
        let inputs = DenoiseInputs {
            latents,
            context: &context,
            conditioning: &conditioning,
            guidance_scale: batch.guidance_scale,
        };
        let latents = denoise::denoise(unet, sampler.as_mut(), inputs, noise, on_step).map_err(
            |e| match e {
                DenoiseError::Model { step, source } => PipelineError::Denoise { step, source },
                DenoiseError::Stopped { step } => PipelineError::Stopped { step },
            },
        )?;
        self.device
            .synchronize()
            .map_err(|source| PipelineError::Denoise {
                step: batch.steps,
                source,
            })?;
        timings.denoise = t1.elapsed();
        timings.steps = batch.scheduler.unet_evaluations(batch.steps);

        let t2 = Instant::now();
        drop(phase);
        let _phase = ops::profile::phase(ops::profile::Phase::VaeDecode);
        let images = self.decode(&latents)?;
        timings.vae_decode = t2.elapsed();
        Ok(Rendered {
            images,
            truncated,
            timings,
        })
    }

    /// Un-scales final latents and decodes them to pixels in [-1, 1], `(B, 3, H, W)` f32. Images are
    /// decoded a few at a time ([`images_per_decode`]): on CPU the decoder is bit-for-bit
    /// batch-independent (every kernel works per image; a parity test checks), so chunking only
    /// trades per-call overhead against peak memory.
    pub fn decode_to_pixels(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        let e = PipelineError::DecodeVae;
        let c = &self.vae_config;
        let z = match (&c.latents_mean, &c.latents_std) {
            (Some(mean), Some(std)) => {
                let n = mean.len();
                let mean = Tensor::from_vec(
                    mean.iter().map(|&v| v as f32).collect(),
                    (1, n, 1, 1),
                    &self.device,
                );
                let std = Tensor::from_vec(
                    std.iter().map(|&v| v as f32).collect(),
                    (1, n, 1, 1),
                    &self.device,
                );
                let (mean, std) = (mean.map_err(e)?, std.map_err(e)?);
                latents
                    .broadcast_mul(&std)
                    .and_then(|z| z / c.scaling_factor)
                    .and_then(|z| z.broadcast_add(&mean))
                    .map_err(e)?
            }
            _ => (latents / c.scaling_factor).map_err(e)?,
        };
        let (n, _, h, w) = z.dims4().map_err(e)?;
        let f = self.vae_scale_factor();
        let per_call = images_per_decode(h * f * w * f);
        let mut out = Vec::with_capacity(n.div_ceil(per_call));
        for start in (0..n).step_by(per_call) {
            let zi = z
                .narrow(0, start, per_call.min(n - start))
                .and_then(|t| t.to_dtype(self.vae_dtype))
                .map_err(e)?;
            out.push(
                self.vae
                    .decode(&zi)
                    .and_then(|x| x.to_dtype(DType::F32))
                    .map_err(e)?,
            );
        }
        Tensor::cat(&out, 0).map_err(e)
    }

    fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
        let pixels = self.decode_to_pixels(latents)?;
        to_images(&pixels).map_err(PipelineError::DecodeVae)
    }
}

/// Most output pixels one VAE decode call produces: one 1024² image (SDXL's native size, whose
/// decode already peaks at several GiB of activations: 128 channels × 1024² × 4 B = 512 MiB per
/// tensor), or several smaller ones. Small images are decoded together so that per-op overhead and
/// thread dispatch are paid once per chunk instead of once per image.
const MAX_DECODE_PIXELS: usize = 1024 * 1024;

/// How many images of `pixels` output pixels each go into one decode call (at least one).
fn images_per_decode(pixels: usize) -> usize {
    (MAX_DECODE_PIXELS / pixels.max(1)).max(1)
}

/// `(B, 3, H, W)` in [-1, 1] → RGB8, as diffusers' `postprocess` + `numpy_to_pil`:
/// `round(clamp(x/2 + 0.5, 0, 1) · 255)`.
pub fn to_images(pixels: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, _, h, w) = pixels.dims4()?;
    let u8s = ((pixels / 2.0)? + 0.5)?
        .clamp(0.0, 1.0)?
        .affine(255.0, 0.0)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::U8)?
        .to_device(&Device::Cpu)?;
    let flat = u8s.flatten_all()?.to_vec1::<u8>()?;
    let per = h * w * 3;
    (0..b)
        .map(|i| {
            RgbImage::from_raw(w as u32, h as u32, flat[i * per..(i + 1) * per].to_vec())
                .ok_or_else(|| candle_core::Error::Msg("image buffer size mismatch".into()))
        })
        .collect()
}
