//! What one render takes and returns: the images of a batch (prompt, negative prompt, seed), the
//! settings they share, and the pixels and per-phase timings that come back. The one constructor
//! builds a batch from a validated [`Generation`], so every caller renders what the contract checked.

use std::time::Duration;

use candle_core::Tensor;
use image::RgbImage;

use super::SchedulerKind;
use super::lora::AdapterFile;
use crate::job::{Generation, LongPrompt, PromptWeighting};

/// One image of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub prompt: String,
    /// `None`: zeros when the model sets `force_zeros_for_empty_prompt` (SDXL does), else "".
    /// `Some("")` encodes the empty string, as diffusers does for an explicit `negative_prompt=""`.
    pub negative_prompt: Option<String>,
    pub seed: u64,
}

/// Images rendered together: one size, step count, sampler, guidance scale, long-prompt mode and
/// weighting, and set of LoRA adapters.
#[derive(Debug, Clone)]
pub struct RenderBatch {
    pub images: Vec<ImageSpec>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    /// How prompts over 77 tokens are encoded (`prompt.rs`).
    pub long_prompt: LongPrompt,
    /// Whether the prompts' A1111 weighting syntax is read (`prompt.rs`).
    pub prompt_weighting: PromptWeighting,
    /// Explicit unscaled initial latents `(B, 4, h/8, w/8)`, like diffusers' `latents=`; the seeds still
    /// drive per-step noise.
    pub latents: Option<Tensor>,
    /// LoRA adapters merged into the model for the whole batch (local files; empty: none).
    pub loras: Vec<AdapterFile>,
}

impl ImageSpec {
    /// One spec per image `g` asks for: image `i` uses `seed + i` and its own noise.
    pub fn all_of(g: &Generation) -> Vec<ImageSpec> {
        (0..g.num_images)
            .map(|i| ImageSpec {
                prompt: g.prompt.clone(),
                negative_prompt: g.negative_prompt.clone(),
                seed: g.image_seed(i),
            })
            .collect()
    }
}

impl RenderBatch {
    /// `images` rendered with `g`'s size, steps, guidance and sampler, from seeded noise.
    pub fn new(g: &Generation, images: Vec<ImageSpec>) -> Self {
        Self {
            images,
            width: g.width as usize,
            height: g.height as usize,
            steps: g.steps as usize,
            guidance_scale: g.guidance_scale,
            scheduler: g.scheduler,
            long_prompt: g.long_prompt,
            prompt_weighting: g.prompt_weighting,
            latents: None,
            loras: Vec::new(),
        }
    }

    /// The same batch with LoRA adapters (the files of `g.loras`, fetched by the caller).
    pub fn with_loras(self, loras: Vec<AdapterFile>) -> Self {
        Self { loras, ..self }
    }

    /// The images `indices` of this batch (and their rows of explicit latents), the rest as is.
    pub(crate) fn subset(&self, indices: &[usize]) -> candle_core::Result<Self> {
        let latents = match &self.latents {
            Some(l) => {
                let rows: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
                let rows = Tensor::from_vec(rows, indices.len(), l.device())?;
                Some(l.index_select(&rows, 0)?)
            }
            None => None,
        };
        Ok(Self {
            images: indices.iter().map(|&i| self.images[i].clone()).collect(),
            latents,
            ..self.clone()
        })
    }

    /// The same batch from explicit initial latents (diffusers' `latents=`).
    pub fn with_latents(self, latents: Option<Tensor>) -> Self {
        Self { latents, ..self }
    }
}

/// Wall time per phase of one render.
#[derive(Debug, Clone, Default)]
pub struct PhaseTimings {
    pub text_encode: Duration,
    pub denoise: Duration,
    /// UNet evaluations in `denoise` (the steps, and PNDM's extra one).
    pub steps: usize,
    pub vae_decode: Duration,
}

impl PhaseTimings {
    /// Adds the phases of a render that ran after this one (a batch rendered in groups).
    pub(crate) fn add(&mut self, other: &PhaseTimings) {
        self.text_encode += other.text_encode;
        self.denoise += other.denoise;
        self.steps += other.steps;
        self.vae_decode += other.vae_decode;
    }
}

#[derive(Debug)]
pub struct Rendered {
    pub images: Vec<RgbImage>,
    /// Per image: part of the prompt was cut (past 77 tokens with `truncate`, past the chunk bound
    /// with `chunk`).
    pub truncated: Vec<bool>,
    pub timings: PhaseTimings,
}
