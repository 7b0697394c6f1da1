//! `DDIMScheduler` with `eta = 0` (the pipeline default): deterministic, `init_noise_sigma = 1`, no input
//! scaling. `x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev)·ε`, with `x0` optionally clipped
//! (`clip_sample`, which the SDXL config turns off but DDIM's class default turns on).

use candle_core::{Result, Tensor};

use super::schedule::{ZeroSnr, np_linspace, round_half_even, trailing_timesteps};
use super::{NoiseSource, Prediction, Sampler, Schedule, SchedulerConfig, Spacing};

pub(super) struct Ddim {
    schedule: Schedule,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    step_ratio: usize,
    clip: Option<f64>,
    prediction: Prediction,
}

impl Ddim {
    pub(super) fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        // DDIMScheduler defaults: linear betas 1e-4..0.02, clip_sample True (range 1), set_alpha_to_one
        // True, steps_offset 0, leading spacing.
        let alphas_cumprod = cfg.alphas_cumprod(0.0001, 0.02, "linear", ZeroSnr::Exact);
        let n_train = cfg.num_train_timesteps;
        let offset = cfg.steps_offset.unwrap_or(0) as f64;
        let timesteps: Vec<f64> = match cfg.spacing.unwrap_or(Spacing::Leading) {
            Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(round_half_even)
                .collect(),
            Spacing::Leading => {
                let ratio = n_train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio) as f64 + offset)
                    .collect()
            }
            Spacing::Trailing => trailing_timesteps(n_train, steps),
        };
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        Self {
            // DDIM works in ᾱ, not sigmas: no sigma table, unit initial noise, the sample fed as is.
            schedule: Schedule {
                timesteps,
                sigmas: Vec::new(),
                init_noise_sigma: 1.0,
                scales_input: false,
            },
            final_alpha_cumprod,
            step_ratio: n_train / steps,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then(|| cfg.clip_sample_range.unwrap_or(1.0)),
            prediction: cfg.prediction,
            alphas_cumprod,
        }
    }
}

impl Sampler for Ddim {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn step(
        &mut self,
        out: &Tensor,
        i: usize,
        x: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.schedule.timesteps[i] as i64;
        let prev_t = t - self.step_ratio as i64;
        let a_t = self.alphas_cumprod[t as usize] as f64;
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize] as f64
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (((x - (out * b_t.sqrt())?)? / a_t.sqrt())?, out.clone()),
            Prediction::VPrediction => (
                ((x * a_t.sqrt())? - (out * b_t.sqrt())?)?,
                ((out * a_t.sqrt())? + (x * b_t.sqrt())?)?,
            ),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }
}
