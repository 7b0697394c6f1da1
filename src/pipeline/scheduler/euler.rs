//! `EulerDiscreteScheduler` (the scheduler SSD-1B and SDXL ship): first-order Euler steps on the
//! probability-flow ODE in sigma space, `x0 = x − σ·ε`, `x ← x + (x − x0)/σ · (σ_next − σ)`.
//! Deterministic (diffusers' `s_churn` is 0 in the pipeline).

use candle_core::{Result, Tensor};

use super::{
    NoiseSource, Prediction, Sampler, SchedulerConfig, Spacing, euler_timesteps, euler_x0, interp,
    karras_sigmas, sigma_to_t, train_sigmas,
};

pub(super) struct Euler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl Euler {
    pub(super) fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        // EulerDiscreteScheduler defaults: linear betas 1e-4..0.02, linspace spacing, offset 0.
        let ac = cfg.alphas_cumprod(0.0001, 0.02, "linear");
        let table = train_sigmas(&ac);
        let spacing = cfg.spacing.unwrap_or(Spacing::Linspace);
        let mut timesteps = euler_timesteps(
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
            sigmas = karras_sigmas(lo, hi, steps);
            let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_table)).collect();
        }
        let last = if cfg.final_sigmas_zero {
            0.0
        } else {
            table[0] as f64
        };
        sigmas.push(last);
        // set_timesteps stores sigmas (and timesteps) as f32 tensors.
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        let timesteps = timesteps.into_iter().map(|t| t as f32 as f64).collect();
        let max = sigmas.iter().copied().fold(0.0f64, f64::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: cfg.prediction,
        }
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        x / (s * s + 1.0).sqrt()
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = euler_x0(self.prediction, x, eps, sigma)?;
        let derivative = ((x - x0)? / sigma)?;
        x + (derivative * (next - sigma))?
    }
}
