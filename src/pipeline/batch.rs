//! What one render takes and returns: the images of a batch (prompt, negative prompt, seed), the
//! settings they share, and the pixels and per-phase timings that come back. The one constructor
//! builds a batch from a validated [`Generation`], so every caller renders what the contract checked.

use std::time::Duration;

use candle_core::Tensor;
use image::RgbImage;

use super::SchedulerKind;
use crate::job::Generation;

/// One image of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub prompt: String,
    /// `None`: zeros when the model sets `force_zeros_for_empty_prompt` (SDXL does), else "".
    /// `Some("")` encodes the empty string, as diffusers does for an explicit `negative_prompt=""`.
    pub negative_prompt: Option<String>,
    pub seed: u64,
}

/// Images rendered together: one size, step count, sampler and guidance scale.
#[derive(Debug, Clone)]
pub struct RenderBatch {
    pub images: Vec<ImageSpec>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    /// Explicit unscaled initial latents `(B, 4, h/8, w/8)`, like diffusers' `latents=`; the seeds still
    /// drive per-step noise.
    pub latents: Option<Tensor>,
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
            latents: None,
        }
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

#[derive(Debug)]
pub struct Rendered {
    pub images: Vec<RgbImage>,
    /// Per image: the prompt was longer than the 77-token context and was cut.
    pub truncated: Vec<bool>,
    pub timings: PhaseTimings,
}
