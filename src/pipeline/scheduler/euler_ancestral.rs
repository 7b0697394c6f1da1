//! `EulerAncestralDiscreteScheduler` ("Euler a"): an Euler step down to `σ_down`, then fresh noise
//! scaled by `σ_up` (`σ_up = sqrt(σ_next²(σ² − σ_next²)/σ²)`, `σ_down = sqrt(σ_next² − σ_up²)`).
//! Stochastic: noise is drawn at every step, including the last (where `σ_up = 0`), so the stream of
//! draws lines up with diffusers' when noise is injected.

use candle_core::{Result, Tensor};

use super::{
    NoiseSource, Prediction, Sampler, SchedulerConfig, Spacing, euler_timesteps, euler_x0, interp,
    train_sigmas,
};

pub(super) struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerAncestral {
    pub(super) fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        // EulerAncestralDiscreteScheduler defaults: linear betas 1e-4..0.02, linspace spacing, offset 0.
        let ac = cfg.alphas_cumprod(0.0001, 0.02, "linear");
        let table = train_sigmas(&ac);
        let spacing = cfg.spacing.unwrap_or(Spacing::Linspace);
        let timesteps = euler_timesteps(
            spacing,
            cfg.num_train_timesteps,
            steps,
            cfg.steps_offset.unwrap_or(0),
        );
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(t, &table) as f32 as f64)
            .collect();
        sigmas.push(0.0);
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

impl Sampler for EulerAncestral {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = euler_x0(self.prediction, x, eps, from)?;
        let up = (to * to * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        let derivative = ((x - x0)? / from)?;
        let prev = (x + (derivative * (down - from))?)?;
        let n = noise.sample(x.shape())?;
        prev + (n * up)?
    }
}
