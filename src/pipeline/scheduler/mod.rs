//! Samplers: the five the job contract names, each reproducing its diffusers class.
//!
//! | name | diffusers class | built from the model's `scheduler_config.json` with |
//! |---|---|---|
//! | `euler` | `EulerDiscreteScheduler` | nothing else (SSD-1B/SDXL ship this one) |
//! | `euler_ancestral` | `EulerAncestralDiscreteScheduler` | nothing else |
//! | `ddim` | `DDIMScheduler` | nothing else (eta = 0, the pipeline default) |
//! | `dpmpp_2m` | `DPMSolverMultistepScheduler` | `algorithm_type="dpmsolver++", solver_order=2` |
//! | `dpmpp_2m_karras` | same | and `use_karras_sigmas=True` |
//!
//! As with diffusers' `from_config`, keys present in the shipped config carry over to whichever class
//! is built and absent keys take that class's own default (so DDIM gets `clip_sample` from the SDXL
//! config, DPM++ gets its `timestep_spacing: "leading"`). Schedules are computed the way PyTorch/NumPy
//! compute them (f32 betas and sigma tables, f64 cumulative products and interpolation) so timesteps and
//! sigmas match to float precision. Sampler state is per batch: build a new one for every render.

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;

use std::path::Path;

use candle_core::{Shape, Tensor};

type Result<T> = candle_core::Result<T>;
use serde_json::json;

use super::config::{ConfigError, ConfigFile};

/// A sampler name from the job contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Ddim,
    #[serde(rename = "dpmpp_2m")]
    Dpmpp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    Dpmpp2mKarras,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        Self::Euler,
        Self::EulerAncestral,
        Self::Ddim,
        Self::Dpmpp2m,
        Self::Dpmpp2mKarras,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_ancestral",
            Self::Ddim => "ddim",
            Self::Dpmpp2m => "dpmpp_2m",
            Self::Dpmpp2mKarras => "dpmpp_2m_karras",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The sampler label A1111/ComfyUI-style `parameters` text uses ("Sampler: Euler a").
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::Ddim => "DDIM",
            Self::Dpmpp2m => "DPM++ 2M",
            Self::Dpmpp2mKarras => "DPM++ 2M Karras",
        }
    }

    /// Our name for a diffusers scheduler class shipped in `model_index.json`, if we have one.
    pub fn from_diffusers_class(class: &str) -> Option<Self> {
        match class {
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerAncestral),
            "DDIMScheduler" => Some(Self::Ddim),
            "DPMSolverMultistepScheduler" => Some(Self::Dpmpp2m),
            _ => None,
        }
    }

    pub fn is_stochastic(self) -> bool {
        matches!(self, Self::EulerAncestral)
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// The shipped `scheduler_config.json`, with absent keys left as `None` so each sampler can apply its
/// own class default (diffusers `from_config` semantics).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    pub prediction: Prediction,
    spacing: Option<Spacing>,
    steps_offset: Option<usize>,
    use_karras_sigmas: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    set_alpha_to_one: Option<bool>,
    final_sigmas_zero: bool,
    solver_type_heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> std::result::Result<Self, ConfigError> {
        Self::from_file(&ConfigFile::open(path)?)
    }

    pub(crate) fn from_file(cfg: &ConfigFile) -> std::result::Result<Self, ConfigError> {
        cfg.require("rescale_betas_zero_snr", &[json!(false)])?;
        cfg.require("timestep_type", &[json!("discrete")])?;
        cfg.require("interpolation_type", &[json!("linear")])?;
        cfg.require("use_exponential_sigmas", &[json!(false)])?;
        cfg.require("use_beta_sigmas", &[json!(false)])?;
        cfg.require("use_lu_lambdas", &[json!(false)])?;
        cfg.require("use_flow_sigmas", &[json!(false)])?;
        cfg.require("thresholding", &[json!(false)])?;
        cfg.require("variance_type", &[])?;
        cfg.require("beta_schedule", &[json!("linear"), json!("scaled_linear")])?;
        cfg.require("lambda_min_clipped", &[json!(f64::NEG_INFINITY)])?;
        let prediction = match cfg.str_or("prediction_type", "epsilon")? {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => {
                return Err(cfg.err(
                    "prediction_type",
                    format!("\"{other}\" is not supported (supported: epsilon, v_prediction)"),
                ));
            }
        };
        let spacing = match cfg.get("timestep_spacing").and_then(|v| v.as_str()) {
            None => None,
            Some("linspace") => Some(Spacing::Linspace),
            Some("leading") => Some(Spacing::Leading),
            Some("trailing") => Some(Spacing::Trailing),
            Some(other) => {
                return Err(cfg.err(
                    "timestep_spacing",
                    format!(
                        "\"{other}\" is not supported (supported: linspace, leading, trailing)"
                    ),
                ));
            }
        };
        let trained_betas = match cfg.get("trained_betas") {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| cfg.err("trained_betas", "expected a list of numbers"))?,
            ),
        };
        let opt_f64 = |key: &str| cfg.get(key).and_then(|v| v.as_f64());
        let opt_bool = |key: &str| cfg.get(key).and_then(|v| v.as_bool());
        let final_sigmas_zero = match cfg.str_or("final_sigmas_type", "zero")? {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(cfg.err(
                    "final_sigmas_type",
                    format!("\"{other}\" is not supported (supported: zero, sigma_min)"),
                ));
            }
        };
        let solver_type_heun = match cfg.str_or("solver_type", "midpoint")? {
            "midpoint" => false,
            "heun" => true,
            other => {
                return Err(cfg.err(
                    "solver_type",
                    format!("\"{other}\" is not supported (supported: midpoint, heun)"),
                ));
            }
        };
        Ok(Self {
            num_train_timesteps: cfg.usize_or("num_train_timesteps", 1000)?,
            beta_start: opt_f64("beta_start"),
            beta_end: opt_f64("beta_end"),
            beta_schedule: cfg
                .get("beta_schedule")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            trained_betas,
            prediction,
            spacing,
            steps_offset: cfg.opt_usize("steps_offset")?,
            use_karras_sigmas: cfg.bool_or("use_karras_sigmas", false)?,
            sigma_min: opt_f64("sigma_min"),
            sigma_max: opt_f64("sigma_max"),
            clip_sample: opt_bool("clip_sample"),
            clip_sample_range: opt_f64("clip_sample_range"),
            set_alpha_to_one: opt_bool("set_alpha_to_one"),
            final_sigmas_zero,
            solver_type_heun,
            lower_order_final: cfg.bool_or("lower_order_final", true)?,
            euler_at_final: cfg.bool_or("euler_at_final", false)?,
        })
    }

    /// SDXL base 1.0's shipped `scheduler_config.json` (also SSD-1B's and Vega's).
    pub fn sdxl_default() -> Self {
        let text = r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading",
            "trained_betas": null, "use_karras_sigmas": false}"#;
        let cfg = ConfigFile::parse(Path::new("(built-in SDXL scheduler config)"), text)
            .expect("built-in JSON is valid");
        Self::from_file(&cfg).expect("built-in config is supported")
    }

    /// `alphas_cumprod` with the class defaults for beta range and schedule, computed as PyTorch does:
    /// f32 `linspace` (then squared for scaled_linear), f32 `1 - beta`, cumulative product accumulated
    /// in f64 (ATen's CPU `acc_type<float>`) and stored as f32.
    fn alphas_cumprod(
        &self,
        default_start: f64,
        default_end: f64,
        default_schedule: &str,
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
        let mut acc = 1.0f64;
        betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect()
    }
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
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
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
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `sqrt((1 - ᾱ) / ᾱ)` per training step, in f32 like diffusers' torch expression.
fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `numpy.interp(x, arange(len(table)), table)`.
fn interp(x: f64, table: &[f32]) -> f64 {
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

/// Where per-step noise comes from for stochastic samplers: `Pipeline` draws each image's rows from
/// that image's own seeded stream; tests inject recorded noise.
pub trait NoiseSource {
    fn sample(&mut self, shape: &Shape) -> Result<Tensor>;
}

/// One denoising run's sampler state.
pub trait Sampler: Send {
    /// Timesteps fed to the UNet, one per step (fractional for some schedules).
    fn timesteps(&self) -> &[f64];
    /// Sigmas including the final one (Euler-family and DPM++); empty for DDIM.
    fn sigmas(&self) -> &[f64];
    /// Factor applied to the initial noise (diffusers `init_noise_sigma`), even user-supplied latents.
    fn init_noise_sigma(&self) -> f64;
    /// diffusers `scale_model_input` for step `i`.
    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor>;
    /// One update from the guided model output `eps` at step `i`.
    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// Builds the named sampler from the model's scheduler config, set up for `steps` steps.
pub fn build(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> Box<dyn Sampler> {
    match kind {
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, steps)),
        SchedulerKind::EulerAncestral => {
            Box::new(euler_ancestral::EulerAncestral::new(config, steps))
        }
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, steps)),
        SchedulerKind::Dpmpp2m => Box::new(dpmpp_2m::Dpmpp2m::new(config, steps, false)),
        SchedulerKind::Dpmpp2mKarras => Box::new(dpmpp_2m::Dpmpp2m::new(config, steps, true)),
    }
}

/// `x0` and the implied noise from a model output, for the Euler family (`sigma`-parametrised).
fn euler_x0(prediction: Prediction, x: &Tensor, out: &Tensor, sigma: f64) -> Result<Tensor> {
    match prediction {
        Prediction::Epsilon => x - (out * sigma)?,
        Prediction::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            let c_skip = 1.0 / (sigma * sigma + 1.0);
            (out * c_out)? + (x * c_skip)?
        }
    }
}

/// Leading/linspace/trailing timesteps of the Euler family, as f32 values (EulerDiscreteScheduler).
fn euler_timesteps(spacing: Spacing, n_train: usize, steps: usize, offset: usize) -> Vec<f64> {
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
        Spacing::Trailing => np_arange(n_train as f64, 0.0, -(n_train as f64 / steps as f64))
            .into_iter()
            .map(|v| round_half_even(v) - 1.0)
            .collect(),
    };
    t.into_iter().map(|v| v as f32 as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euler_leading_three_steps_matches_model_notes() {
        // MODEL_NOTES.md: N = 3 → timesteps [667, 334, 1], sigmas [2.9295, 0.9355, 0.0413, 0],
        // init_noise_sigma 3.0955.
        let s = build(SchedulerKind::Euler, &SchedulerConfig::sdxl_default(), 3);
        assert_eq!(s.timesteps(), &[667.0, 334.0, 1.0]);
        let want = [2.9295, 0.9355, 0.0413, 0.0];
        for (a, b) in s.sigmas().iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{:?}", s.sigmas());
        }
        assert!((s.init_noise_sigma() - 3.0955).abs() < 1e-4);
    }

    #[test]
    fn scheduler_names_round_trip() {
        for k in SchedulerKind::ALL {
            assert_eq!(SchedulerKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(SchedulerKind::parse("heun"), None);
    }

    #[test]
    fn torch_linspace_fills_from_both_ends() {
        let v = linspace_f32(0.0, 1.0, 5);
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }
}
