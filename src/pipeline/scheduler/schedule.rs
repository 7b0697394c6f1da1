//! The schedule every sampler is built on: training betas → `alphas_cumprod` → training sigmas, the
//! spaced timesteps, the sigmas interpolated (or Karras-spaced) at them, and the [`Schedule`] a
//! sampler keeps for its run.
//!
//! Computed the way PyTorch/NumPy compute them in diffusers (f32 betas and sigma tables, f64
//! cumulative products and interpolation), so timesteps and sigmas match to float precision. Which
//! spacing and sigma options a class uses, and its defaults, stay in that class's file; nothing here
//! touches a tensor.

use super::SchedulerConfig;

/// A run's timesteps and sigmas, fixed when the sampler is built (diffusers `set_timesteps`). Every
/// sampler keeps one, so the denoise loop and the parity tests read all five the same way.
pub struct Schedule {
    /// Timesteps fed to the UNet, one per step (fractional for some schedules).
    pub(super) timesteps: Vec<f64>,
    /// Sigmas including the final one (Euler family and DPM++); empty for DDIM, which works in ᾱ.
    pub(super) sigmas: Vec<f64>,
    /// Factor applied to the initial noise (diffusers `init_noise_sigma`), even user-supplied latents.
    pub(super) init_noise_sigma: f64,
    /// Whether the UNet sees `x / sqrt(σ² + 1)`: the Euler family's `scale_model_input` brings its
    /// sigma-scaled latents back to unit variance; DDIM and DPM-Solver return the sample as is.
    pub(super) scales_input: bool,
}

/// How a scheduler class honours `rescale_betas_zero_snr` (Lin et al. 2023, arXiv:2305.08891,
/// algorithm 1: the betas rescaled so the last training step has zero signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ZeroSnr {
    /// The class has no such option and `from_config` drops the key (`PNDMScheduler`).
    Ignored,
    /// Rescaled betas, the last ᾱ exactly 0 (`DDIMScheduler`).
    Exact,
    /// Rescaled, then the last ᾱ set to 2⁻²⁴ "so the first sigma is not inf" (the Euler schedulers,
    /// `DPMSolverMultistepScheduler`).
    NearZero,
}

impl SchedulerConfig {
    /// `alphas_cumprod` with the class defaults for beta range and schedule, computed as PyTorch does:
    /// f32 `linspace` (then squared for scaled_linear), f32 `1 - beta`, cumulative product accumulated
    /// in f64 (ATen's CPU `acc_type<float>`) and stored as f32.
    pub(super) fn alphas_cumprod(
        &self,
        default_start: f64,
        default_end: f64,
        default_schedule: &str,
        zero_snr: ZeroSnr,
    ) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = if let Some(tb) = &self.trained_betas {
            tb.iter().map(|&b| b as f32).collect()
        } else {
            let start = self.beta_start.unwrap_or(default_start);
            let end = self.beta_end.unwrap_or(default_end);
            match self.beta_schedule.as_deref().unwrap_or(default_schedule) {
                "scaled_linear" => linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                    .into_iter()
                    .map(|x| x * x)
                    .collect(),
                _ => linspace_f32(start as f32, end as f32, n),
            }
        };
        let rescale = self.rescale_betas_zero_snr && zero_snr != ZeroSnr::Ignored;
        let betas = if rescale {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let mut alphas_cumprod = cumprod(&betas);
        if rescale
            && zero_snr == ZeroSnr::NearZero
            && let Some(last) = alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        alphas_cumprod
    }

    /// The sigma appended after the last step (diffusers `final_sigmas_type`): `"zero"` ends on the
    /// clean image, `"sigma_min"` on the smallest training sigma `table[0]`.
    pub(super) fn final_sigma(&self, table: &[f32]) -> f64 {
        if self.final_sigmas_zero {
            0.0
        } else {
            table[0] as f64
        }
    }
}

/// `cumprod(1 - betas)`: f32 factors, the product accumulated in f64 and stored as f32 (ATen CPU).
fn cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr`, in f32 as its torch code runs: `sqrt(ᾱ)` shifted so the last
/// is 0 and scaled so the first is unchanged, then turned back into betas.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut s: Vec<f32> = cumprod(betas).into_iter().map(f32::sqrt).collect();
    let (Some(&first), Some(&last)) = (s.first(), s.last()) else {
        return betas.to_vec();
    };
    let scale = first / (first - last);
    for v in &mut s {
        *v -= last;
        *v *= scale;
    }
    let alphas_bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut alphas = Vec::with_capacity(alphas_bar.len());
    alphas.push(alphas_bar[0]);
    alphas.extend(alphas_bar.windows(2).map(|w| w[1] / w[0]));
    alphas.into_iter().map(|a| 1.0 - a).collect()
}

/// `torch.linspace(start, end, n, dtype=float32)`: ATen fills the first half forwards from `start` and
/// the second half backwards from `end`, in f32.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `numpy.linspace(start, stop, num)` in f64.
pub(super) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// `numpy.arange(start, stop, step)` for a float step: length `ceil((stop - start) / step)`.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * step).collect()
}

/// NumPy's `round` (half to even).
pub(super) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `sqrt((1 - ᾱ) / ᾱ)` per training step, in f32 like diffusers' torch expression.
pub(super) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `numpy.interp(x, arange(len(table)), table)`.
pub(super) fn interp(x: f64, table: &[f32]) -> f64 {
    if x <= 0.0 {
        return table[0] as f64;
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return table[last] as f64;
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    let (a, b) = (table[i] as f64, table[i + 1] as f64);
    a + (b - a) * frac
}

/// diffusers `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // low_idx = last index with log_sigmas[i] <= log_sigma (cumsum(dists >= 0).argmax()), clipped.
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low = count.saturating_sub(1).min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// Karras et al. 2022 (arXiv:2206.00364) eq. 5 with rho = 7, as diffusers `_convert_to_karras`.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0; // the paper's value
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// A Karras schedule from `sigma_min` to `sigma_max`, with the fractional training timestep of each
/// sigma (diffusers `_convert_to_karras`, then `_sigma_to_t` against the training table).
pub(super) fn karras_schedule(
    table: &[f32],
    sigma_min: f64,
    sigma_max: f64,
    steps: usize,
) -> (Vec<f64>, Vec<f64>) {
    let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
    let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
    let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_table)).collect();
    (sigmas, timesteps)
}

/// `timestep_spacing="trailing"` (Lin et al. 2023, arXiv:2305.08891 table 2), which every class spells
/// the same: `round(arange(n_train, 0, -n_train / steps)) - 1`.
pub(super) fn trailing_timesteps(n_train: usize, steps: usize) -> Vec<f64> {
    np_arange(n_train as f64, 0.0, -(n_train as f64 / steps as f64))
        .into_iter()
        .map(|v| round_half_even(v) - 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_linspace_fills_from_both_ends() {
        let v = linspace_f32(0.0, 1.0, 5);
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }
}
