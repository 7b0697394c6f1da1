//! The denoising loop with classifier-free guidance, and the per-image noise streams.
//!
//! CFG runs as one UNet batch `[negatives × B ; positives × B]` and combines `u + g·(c − u)`
//! (diffusers `StableDiffusionXLPipeline.__call__`); with `g ≤ 1` the negative half is skipped, as
//! diffusers' `do_classifier_free_guidance` does. Latents and sampler arithmetic stay in f32 whatever the
//! model dtype. Every image owns a ChaCha20 stream seeded from its 64-bit seed: its initial noise is the
//! first `4·h·w` standard normals of that stream and any per-step noise (Euler a) continues it, so an
//! image never depends on what else was in its batch.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use super::scheduler::{NoiseSource, Sampler};
use super::unet::{Conditioning, UNet};

/// Per-image seeded noise: row `b` of every draw comes from image `b`'s own stream.
pub struct SeededNoise {
    streams: Vec<ChaCha20Rng>,
    device: Device,
}

impl SeededNoise {
    pub fn new(seeds: &[u64], device: &Device) -> Self {
        Self {
            streams: seeds
                .iter()
                .map(|&s| ChaCha20Rng::seed_from_u64(s))
                .collect(),
            device: device.clone(),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &Shape) -> Result<Tensor> {
        let dims = shape.dims();
        if dims.first() != Some(&self.streams.len()) {
            candle_core::bail!(
                "noise shape {shape:?} does not match {} image streams",
                self.streams.len()
            );
        }
        let per_image: usize = dims[1..].iter().product();
        let mut data = Vec::with_capacity(per_image * self.streams.len());
        for rng in &mut self.streams {
            data.extend((0..per_image).map(|_| -> f32 { StandardNormal.sample(rng) }));
        }
        Tensor::from_vec(data, shape, &self.device)
    }
}

/// Noise replayed from a recorded sequence (parity tests against diffusers' own draws).
pub struct RecordedNoise {
    pub draws: std::collections::VecDeque<Tensor>,
}

impl NoiseSource for RecordedNoise {
    fn sample(&mut self, shape: &Shape) -> Result<Tensor> {
        let t = self
            .draws
            .pop_front()
            .ok_or_else(|| candle_core::Error::Msg("recorded noise exhausted".into()))?;
        t.reshape(shape)
    }
}

/// Progress of a denoising run, reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress<'a> {
    /// Steps done so far (1-based).
    pub step: usize,
    pub total: usize,
    pub elapsed: Duration,
    /// The latents after this step (f32, unscaled), for previews and parity checks.
    pub latents: &'a Tensor,
}

/// Everything one denoising run needs besides the UNet.
pub struct DenoiseInputs<'a> {
    /// `(B, 4, h, w)`, unscaled (as drawn, or as the caller's `latents=`), f32.
    pub latents: Tensor,
    /// `(2B or B, 77, cross_dim)`: negatives first when guiding.
    pub context: &'a Tensor,
    pub conditioning: &'a Conditioning,
    pub guidance_scale: f64,
}

/// Why a run stopped early.
#[derive(Debug)]
pub enum DenoiseError {
    Model {
        step: usize,
        source: candle_core::Error,
    },
    Stopped {
        step: usize,
    },
}

/// `true` when the batch is run with classifier-free guidance.
pub fn uses_guidance(guidance_scale: f64) -> bool {
    guidance_scale > 1.0
}

/// Runs the sampler to the end. `on_step` sees each finished step and may stop the run (cancellation,
/// deadlines); it is also where progress bars and events hook in.
pub fn denoise(
    unet: &UNet,
    sampler: &mut dyn Sampler,
    inputs: DenoiseInputs<'_>,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepProgress<'_>) -> ControlFlow<()>,
) -> std::result::Result<Tensor, DenoiseError> {
    let start = Instant::now();
    let guided = uses_guidance(inputs.guidance_scale);
    let total = sampler.timesteps().len();
    let model_err = |step: usize| move |source| DenoiseError::Model { step, source };
    let mut x = (inputs.latents.to_dtype(DType::F32).map_err(model_err(0))?
        * sampler.init_noise_sigma())
    .map_err(model_err(0))?;
    // The text context is the same at every step: project it for cross-attention once.
    let context = unet.text_context(inputs.context).map_err(model_err(0))?;
    for i in 0..total {
        let t = sampler.timesteps()[i];
        let step = || -> Result<Tensor> {
            let input = if guided {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x.clone()
            };
            let input = sampler.scale_model_input(&input, i)?;
            let out = unet
                .forward_with(&input, t, &context, inputs.conditioning)?
                .to_dtype(DType::F32)?;
            if guided {
                let halves = out.chunk(2, 0)?;
                let (uncond, cond) = (&halves[0], &halves[1]);
                uncond + ((cond - uncond)? * inputs.guidance_scale)?
            } else {
                Ok(out)
            }
        };
        let eps = step().map_err(model_err(i))?;
        x = sampler.step(&eps, i, &x, noise).map_err(model_err(i))?;
        let progress = StepProgress {
            step: i + 1,
            total,
            elapsed: start.elapsed(),
            latents: &x,
        };
        if on_step(progress).is_break() && i + 1 < total {
            return Err(DenoiseError::Stopped { step: i + 1 });
        }
    }
    Ok(x)
}
