//! Samplers: the six the job contract names, each reproducing its diffusers class.
//!
//! | name | diffusers class | built from the model's `scheduler_config.json` with |
//! |---|---|---|
//! | `euler` | `EulerDiscreteScheduler` | nothing else (SSD-1B/SDXL ship this one) |
//! | `euler_ancestral` | `EulerAncestralDiscreteScheduler` | nothing else |
//! | `ddim` | `DDIMScheduler` | nothing else (eta = 0, the pipeline default) |
//! | `dpmpp_2m` | `DPMSolverMultistepScheduler` | `algorithm_type="dpmsolver++", solver_order=2` |
//! | `dpmpp_2m_karras` | same | and `use_karras_sigmas=True` |
//! | `pndm` | `PNDMScheduler` | nothing else; needs `skip_prk_steps: true` (SD 1.5 ships this one) |
//!
//! As with diffusers' `from_config`, keys present in the shipped config carry over to whichever class
//! is built and absent keys take that class's own default (so DDIM gets `clip_sample` from the SDXL
//! config, DPM++ gets its `timestep_spacing: "leading"`). The schedule arithmetic the classes share is
//! in `schedule.rs`, computed the way PyTorch/NumPy compute it so timesteps and sigmas match to float
//! precision. Sampler state is per batch: build a new one for every render.

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod pndm;
mod schedule;

use std::path::Path;

use candle_core::{Shape, Tensor};

type Result<T> = candle_core::Result<T>;
use serde_json::json;

use super::config::{ConfigError, ConfigFile};
pub use schedule::Schedule;

pub use crate::job::SchedulerKind;

/// What the model side knows of each sampler.
impl SchedulerKind {
    /// Our name for a diffusers scheduler class shipped in `model_index.json`, if we have one.
    pub fn from_diffusers_class(class: &str) -> Option<Self> {
        match class {
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerAncestral),
            "DDIMScheduler" => Some(Self::Ddim),
            "DPMSolverMultistepScheduler" => Some(Self::Dpmpp2m),
            "PNDMScheduler" => Some(Self::Pndm),
            _ => None,
        }
    }

    pub fn is_stochastic(self) -> bool {
        matches!(self, Self::EulerAncestral)
    }

    /// UNet evaluations a run of `steps` steps makes: one per step, and PNDM's one extra for its
    /// warm-up redo of the first step (`PNDMScheduler.set_timesteps` with `skip_prk_steps`).
    pub fn unet_evaluations(self, steps: usize) -> usize {
        match self {
            Self::Pndm if steps > 1 => steps + 1,
            _ => steps,
        }
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
    skip_prk_steps: Option<bool>,
    rescale_betas_zero_snr: bool,
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
            skip_prk_steps: opt_bool("skip_prk_steps"),
            rescale_betas_zero_snr: cfg.bool_or("rescale_betas_zero_snr", false)?,
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
}

impl SchedulerConfig {
    /// A sampler this config cannot drive, and why: PNDM's Runge–Kutta warm-up
    /// (`skip_prk_steps: false`, the class default when the key is absent) is not implemented.
    pub fn unsupported(&self) -> Option<(SchedulerKind, &'static str)> {
        (self.skip_prk_steps != Some(true)).then_some((
            SchedulerKind::Pndm,
            "the model's scheduler config does not set `skip_prk_steps: true`, and PNDM's \
             Runge-Kutta warm-up steps are not implemented",
        ))
    }
}

/// Where per-step noise comes from for stochastic samplers: `Pipeline` draws each image's rows from
/// that image's own seeded stream; tests inject recorded noise.
pub trait NoiseSource {
    fn sample(&mut self, shape: &Shape) -> Result<Tensor>;
}

/// One denoising run's sampler state.
pub trait Sampler: Send {
    /// The schedule this run follows.
    fn schedule(&self) -> &Schedule;
    /// One update from the guided model output `eps` at step `i`.
    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// Timesteps fed to the UNet, one per step (fractional for some schedules).
    fn timesteps(&self) -> &[f64] {
        &self.schedule().timesteps
    }
    /// Sigmas including the final one (Euler-family and DPM++); empty for DDIM.
    fn sigmas(&self) -> &[f64] {
        &self.schedule().sigmas
    }
    /// Factor applied to the initial noise (diffusers `init_noise_sigma`), even user-supplied latents.
    fn init_noise_sigma(&self) -> f64 {
        self.schedule().init_noise_sigma
    }
    /// diffusers `scale_model_input` for step `i`.
    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let schedule = self.schedule();
        if schedule.scales_input {
            let s = schedule.sigmas[i];
            x / (s * s + 1.0).sqrt()
        } else {
            Ok(x.clone())
        }
    }
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
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config, steps)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euler_leading_three_steps_matches_model_notes() {
        // docs/model-notes.md §4: N = 3 → timesteps [667, 334, 1], sigmas [2.9295, 0.9355, 0.0413, 0],
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
}
