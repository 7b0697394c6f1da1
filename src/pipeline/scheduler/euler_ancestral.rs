//! `EulerAncestralDiscreteScheduler` ("Euler a"): an Euler step down to `σ_down`, then fresh noise
//! scaled by `σ_up` (`σ_up = sqrt(σ_next²(σ² − σ_next²)/σ²)`, `σ_down = sqrt(σ_next² − σ_up²)`).
//! Stochastic: noise is drawn at every step, including the last (where `σ_up = 0`), so the stream of
//! draws lines up with diffusers' when noise is injected. The schedule is Euler's (`euler.rs`).

use candle_core::{Result, Tensor};

use super::euler::{schedule, x0};
use super::{NoiseSource, Prediction, Sampler, Schedule, SchedulerConfig};

pub(super) struct EulerAncestral {
    schedule: Schedule,
    prediction: Prediction,
}

impl EulerAncestral {
    pub(super) fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        // EulerAncestralDiscreteScheduler.set_timesteps is EulerDiscreteScheduler's without its Karras
        // and final-sigma options: interpolated sigmas, always ending on σ = 0.
        let cfg = SchedulerConfig {
            use_karras_sigmas: false,
            final_sigmas_zero: true,
            ..cfg.clone()
        };
        Self {
            schedule: schedule(&cfg, steps),
            prediction: cfg.prediction,
        }
    }
}

impl Sampler for EulerAncestral {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (from, to) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let x0 = x0(self.prediction, x, eps, from)?;
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
