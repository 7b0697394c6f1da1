//! `PNDMScheduler` with `skip_prk_steps` (the PLMS sampler, Liu et al. 2022, arXiv:2202.09778; the
//! scheduler SD 1.5 ships): linear multistep on the model output with 1, 2, 3 and then 4 past outputs
//! (Adams–Bashforth coefficients), warmed up by one Heun-like redo of the first step. Deterministic,
//! `init_noise_sigma = 1`, no input scaling.
//!
//! `set_timesteps(n)` spaces `n` timesteps and repeats the second-to-last, so a run evaluates the UNet
//! `n + 1` times (once for `n = 1`): the second evaluation is at the first step's target, and its
//! output, averaged with the first, redoes that step from the same start. Past outputs are kept raw
//! (ε or v), combined, and only then turned into ε (`_get_prev_sample`).

use candle_core::{Result, Tensor};

use super::schedule::{ZeroSnr, np_linspace, round_half_even, trailing_timesteps};
use super::{NoiseSource, Prediction, Sampler, Schedule, SchedulerConfig, Spacing};

pub(super) struct Pndm {
    schedule: Schedule,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    /// `num_train_timesteps // num_inference_steps`: how far back each step goes.
    step_ratio: i64,
    prediction: Prediction,
    /// Raw model outputs of the past steps (at most four are used).
    ets: Vec<Tensor>,
    /// The sample the first step started from, kept for its redo.
    cur_sample: Option<Tensor>,
    counter: usize,
}

/// The spaced training timesteps in ascending order (`PNDMScheduler.set_timesteps`' `_timesteps`).
fn spaced(cfg: &SchedulerConfig, steps: usize) -> Vec<i64> {
    let n_train = cfg.num_train_timesteps;
    // PNDMScheduler defaults: leading spacing, steps_offset 0.
    match cfg.spacing.unwrap_or(Spacing::Leading) {
        Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
            .into_iter()
            .map(|t| round_half_even(t) as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = n_train / steps;
            let offset = cfg.steps_offset.unwrap_or(0);
            (0..steps).map(|i| (i * ratio + offset) as i64).collect()
        }
        // Trailing is the same spacing in every class; PNDM keeps it ascending.
        Spacing::Trailing => trailing_timesteps(n_train, steps)
            .into_iter()
            .rev()
            .map(|t| t as i64)
            .collect(),
    }
}

/// `plms_timesteps`: `[t₀ … t₍ₙ₋₂₎, t₍ₙ₋₂₎, t₍ₙ₋₁₎]` reversed.
fn plms_timesteps(ascending: &[i64]) -> Vec<f64> {
    let n = ascending.len();
    let mut t: Vec<i64> = ascending[..n.saturating_sub(1)].to_vec();
    t.extend_from_slice(&ascending[n.saturating_sub(2)..n.saturating_sub(1)]);
    t.extend_from_slice(&ascending[n.saturating_sub(1)..]);
    t.into_iter().rev().map(|t| t as f64).collect()
}

impl Pndm {
    pub(super) fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        // PNDMScheduler defaults: linear betas 1e-4..0.02, set_alpha_to_one False.
        let alphas_cumprod = cfg.alphas_cumprod(0.0001, 0.02, "linear", ZeroSnr::Ignored);
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        Self {
            schedule: Schedule {
                timesteps: plms_timesteps(&spaced(cfg, steps)),
                sigmas: Vec::new(),
                init_noise_sigma: 1.0,
                scales_input: false,
            },
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (cfg.num_train_timesteps / steps) as i64,
            prediction: cfg.prediction,
            ets: Vec::new(),
            cur_sample: None,
            counter: 0,
        }
    }

    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize] as f64
        } else {
            self.final_alpha_cumprod
        }
    }

    /// `_get_prev_sample`: PNDM's transfer from `t` to `prev_t` (the paper's eq. 9) with the combined
    /// output `out`.
    fn prev_sample(&self, x: &Tensor, t: i64, prev_t: i64, out: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev_t);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            Prediction::Epsilon => out.clone(),
            Prediction::VPrediction => ((out * a_t.sqrt())? + (x * b_t.sqrt())?)?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        (x * sample_coeff)? - (eps * ((a_prev - a_t) / denom))?
    }
}

impl Sampler for Pndm {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// `step_plms`.
    fn step(
        &mut self,
        out: &Tensor,
        i: usize,
        x: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let mut t = self.schedule.timesteps[i] as i64;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(out.clone());
        } else {
            // The redo of the first step: from the first step's start to where it went.
            prev_t = t;
            t += self.step_ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let mut x = x.clone();
        let combined = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(x.clone());
            out.clone()
        } else if n == 1 && self.counter == 1 {
            if let Some(start) = self.cur_sample.take() {
                x = start;
            }
            ((out + &e[0])? / 2.0)?
        } else if n == 2 {
            (((&e[1] * 3.0)? - &e[0])? / 2.0)?
        } else if n == 3 {
            ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?
        } else {
            let sum = ((((&e[n - 1] * 55.0)? - (&e[n - 2] * 59.0)?)? + (&e[n - 3] * 37.0)?)?
                - (&e[n - 4] * 9.0)?)?;
            (sum / 24.0)?
        };
        let prev = self.prev_sample(&x, t, prev_t, &combined)?;
        self.counter += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plms_repeats_the_second_to_last_timestep() {
        // SD 1.5's config (leading, offset 1), 4 steps: _timesteps [1, 251, 501, 751].
        assert_eq!(
            plms_timesteps(&[1, 251, 501, 751]),
            [751.0, 501.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(plms_timesteps(&[1]), [1.0]);
        assert_eq!(plms_timesteps(&[1, 501]), [501.0, 1.0, 1.0]);
    }
}
