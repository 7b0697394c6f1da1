//! `EulerDiscreteScheduler` (the scheduler SSD-1B and SDXL ship): first-order Euler steps on the
//! probability-flow ODE in sigma space, `x0 = x − σ·ε`, `x ← x + (x − x0)/σ · (σ_next − σ)`.
//! Deterministic (diffusers' `s_churn` is 0 in the pipeline).
//!
//! Also the home of what the Euler family shares: the sigma schedule ([`schedule`], which
//! `euler_ancestral.rs` builds too) and the data prediction [`x0`].

use candle_core::{Result, Tensor};

use super::schedule::{
    ZeroSnr, interp, karras_schedule, np_linspace, round_half_even, trailing_timesteps,
    train_sigmas,
};
use super::{NoiseSource, Prediction, Sampler, Schedule, SchedulerConfig, Spacing};

pub(super) struct Euler {
    schedule: Schedule,
    prediction: Prediction,
}

impl Euler {
    pub(super) fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        Self {
            schedule: schedule(cfg, steps),
            prediction: cfg.prediction,
        }
    }
}

impl Sampler for Euler {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let x0 = x0(self.prediction, x, eps, sigma)?;
        let derivative = ((x - x0)? / sigma)?;
        x + (derivative * (next - sigma))?
    }
}

/// `EulerDiscreteScheduler.set_timesteps`: training sigmas interpolated at the spaced timesteps (or a
/// Karras schedule), the final sigma appended, all stored as f32 like diffusers' tensors.
pub(super) fn schedule(cfg: &SchedulerConfig, steps: usize) -> Schedule {
    // EulerDiscreteScheduler defaults: linear betas 1e-4..0.02, linspace spacing, offset 0.
    let ac = cfg.alphas_cumprod(0.0001, 0.02, "linear", ZeroSnr::NearZero);
    let table = train_sigmas(&ac);
    let spacing = cfg.spacing.unwrap_or(Spacing::Linspace);
    let mut timesteps = timesteps(
        spacing,
        cfg.num_train_timesteps,
        steps,
        cfg.steps_offset.unwrap_or(0),
    );
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
    if cfg.use_karras_sigmas {
        // Euler's Karras range defaults to the *interpolated* schedule's ends (unlike DPM-Solver).
        let lo = cfg.sigma_min.unwrap_or(*sigmas.last().unwrap_or(&0.0));
        let hi = cfg.sigma_max.unwrap_or(sigmas[0]);
        (sigmas, timesteps) = karras_schedule(&table, lo, hi, steps);
    }
    sigmas.push(cfg.final_sigma(&table));
    // set_timesteps stores sigmas (and timesteps) as f32 tensors.
    let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
    let timesteps = timesteps.into_iter().map(|t| t as f32 as f64).collect();
    let max = sigmas.iter().copied().fold(0.0f64, f64::max);
    let init_noise_sigma = match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    };
    Schedule {
        timesteps,
        sigmas,
        init_noise_sigma,
        scales_input: true,
    }
}

/// Leading/linspace/trailing timesteps of the Euler family, as f32 values (EulerDiscreteScheduler).
fn timesteps(spacing: Spacing, n_train: usize, steps: usize, offset: usize) -> Vec<f64> {
    let t: Vec<f64> = match spacing {
        Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
            .into_iter()
            .rev()
            .collect(),
        Spacing::Leading => {
            let ratio = (n_train / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| round_half_even(i as f64 * ratio) + offset as f64)
                .collect()
        }
        Spacing::Trailing => trailing_timesteps(n_train, steps),
    };
    t.into_iter().map(|v| v as f32 as f64).collect()
}

/// `x0`, the data prediction, from a model output, for the Euler family (`sigma`-parametrised).
pub(super) fn x0(prediction: Prediction, x: &Tensor, out: &Tensor, sigma: f64) -> Result<Tensor> {
    match prediction {
        Prediction::Epsilon => x - (out * sigma)?,
        Prediction::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            let c_skip = 1.0 / (sigma * sigma + 1.0);
            (out * c_out)? + (x * c_skip)?
        }
    }
}
