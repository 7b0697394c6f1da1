//! `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`: DPM-Solver++(2M)
//! (Lu et al. 2022, arXiv:2211.01095), a second-order multistep solver in log-SNR time on data
//! predictions, optionally on a Karras sigma schedule. First-order on the first step and, with the
//! default `lower_order_final`/`final_sigmas_type="zero"`, on the last one.

use candle_core::{Result, Tensor};

use super::schedule::{
    ZeroSnr, interp, karras_schedule, np_linspace, round_half_even, trailing_timesteps,
    train_sigmas,
};
use super::{NoiseSource, Prediction, Sampler, Schedule, SchedulerConfig, Spacing};

pub(super) struct Dpmpp2m {
    schedule: Schedule,
    prediction: Prediction,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_zero: bool,
    /// The previous step's data prediction (x0), for the second-order correction.
    previous: Option<Tensor>,
}

/// `α_t = 1/sqrt(σ²+1)`, `σ_t = σ·α_t` (diffusers `_sigma_to_alpha_sigma_t`), and `λ = log α_t − log σ_t`.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

impl Dpmpp2m {
    pub(super) fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Self {
        // DPMSolverMultistepScheduler defaults: linear betas 1e-4..0.02, linspace spacing, offset 0.
        let ac = cfg.alphas_cumprod(0.0001, 0.02, "linear", ZeroSnr::NearZero);
        let table = train_sigmas(&ac);
        // lambda_min_clipped = -inf keeps every training step: last_timestep = num_train_timesteps.
        let last = cfg.num_train_timesteps;
        let mut timesteps: Vec<f64> = match cfg.spacing.unwrap_or(Spacing::Linspace) {
            Spacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, (last - 1) as f64, steps + 1)
                    .into_iter()
                    .map(round_half_even)
                    .rev()
                    .collect();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = last / (steps + 1);
                let offset = cfg.steps_offset.unwrap_or(0);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + offset) as f64)
                    .collect()
            }
            Spacing::Trailing => trailing_timesteps(last, steps),
        };
        let mut sigmas: Vec<f64> = if karras || cfg.use_karras_sigmas {
            // DPM-Solver's Karras range is the full training range (in_sigmas = flipped table).
            let lo = cfg.sigma_min.unwrap_or(table[0] as f64);
            let hi = cfg
                .sigma_max
                .unwrap_or(*table.last().unwrap_or(&1.0) as f64);
            let (s, t) = karras_schedule(&table, lo, hi, steps);
            // Rounded to integers (beta_schedule is not squaredcos_cap_v2).
            timesteps = t.into_iter().map(round_half_even).collect();
            s
        } else {
            timesteps.iter().map(|&t| interp(t, &table)).collect()
        };
        sigmas.push(cfg.final_sigma(&table));
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Self {
            // DPM-Solver keeps unit-variance latents: unit initial noise, the sample fed as is.
            schedule: Schedule {
                timesteps,
                sigmas,
                init_noise_sigma: 1.0,
                scales_input: false,
            },
            prediction: cfg.prediction,
            heun: cfg.solver_type_heun,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigmas_zero: cfg.final_sigmas_zero,
            previous: None,
        }
    }
}

impl Sampler for Dpmpp2m {
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
        let n = self.schedule.timesteps.len();
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.schedule.sigmas[i]);
        // convert_model_output: the data prediction x0.
        let x0 = match self.prediction {
            Prediction::Epsilon => ((x - (out * sigma_s0)?)? / alpha_s0)?,
            Prediction::VPrediction => ((x * alpha_s0)? - (out * sigma_s0)?)?,
        };
        let lower_order_final = i == n - 1
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigmas_zero);
        let next = self.schedule.sigmas[i + 1];
        let prev_x0 = self.previous.replace(x0.clone());
        let result = if next == 0.0 {
            // σ_t = 0 only at the final step, which is first order there (final_sigmas_type "zero"):
            // λ_t = +inf, so x_t = (0/σ_s)·x − α_t·(e^−∞ − 1)·x0 = x0.
            x0
        } else {
            let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(next);
            let h = lambda_t - lambda_s0;
            let base = ((x * (sigma_t / sigma_s0))? - (&x0 * (alpha_t * ((-h).exp() - 1.0)))?)?;
            match prev_x0 {
                Some(m1) if !lower_order_final => {
                    let (_, _, lambda_s1) = alpha_sigma_lambda(self.schedule.sigmas[i - 1]);
                    let r0 = (lambda_s0 - lambda_s1) / h;
                    let d1 = ((&x0 - m1)? * (1.0 / r0))?;
                    let coef = if self.heun {
                        alpha_t * (((-h).exp() - 1.0) / h + 1.0)
                    } else {
                        -0.5 * alpha_t * ((-h).exp() - 1.0)
                    };
                    (base + (d1 * coef)?)?
                }
                _ => base,
            }
        };
        Ok(result)
    }
}
