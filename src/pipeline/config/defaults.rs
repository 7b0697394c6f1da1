//! What a model contributes to the jobs it serves, from its config files alone: the defaults of
//! the fields a job leaves out, and whether it ships a safety checker. A worker serving several
//! models reads this for each before any of them is loaded (their jobs are parsed with their own
//! model's defaults); a loaded [`crate::pipeline::Pipeline`] gives the same from the same files.

use std::path::Path;

use super::{ConfigError, Family, ModelIndex, UNetConfig, VaeConfig};
use crate::job::ModelDefaults;
use crate::pipeline::scheduler::{SchedulerConfig, SchedulerKind};

/// A model folder's facts for the contract, read without its weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInfo {
    pub defaults: ModelDefaults,
    /// The folder names a safety checker (SD 1.x): reported as not run in every event.
    pub has_safety_checker: bool,
}

impl ModelInfo {
    /// Reads `model_index.json`, the UNet's, the VAE's and the scheduler's configs under `root`.
    pub fn read(root: &Path) -> Result<Self, ConfigError> {
        let index = ModelIndex::load(root)?;
        let unet = UNetConfig::load(&root.join("unet/config.json"))?;
        let vae = VaeConfig::load(&root.join("vae/config.json"))?;
        let scheduler = scheduler_config(root)?;
        Ok(Self {
            defaults: model_defaults(&index, &unet, &vae, &scheduler),
            has_safety_checker: index.has_safety_checker,
        })
    }
}

/// `scheduler/scheduler_config.json`, or SDXL's when the folder has none.
pub(crate) fn scheduler_config(root: &Path) -> Result<SchedulerConfig, ConfigError> {
    let path = root.join("scheduler/scheduler_config.json");
    if path.exists() {
        SchedulerConfig::load(&path)
    } else {
        Ok(SchedulerConfig::sdxl_default())
    }
}

/// The model's native size (`sample_size × vae_scale_factor`), its shipped sampler (`euler` when
/// it ships one we don't name), diffusers' guidance default for its pipeline class
/// (`StableDiffusionXLPipeline.__call__`: 5.0, `StableDiffusionPipeline.__call__`: 7.5), and the
/// sampler its scheduler config cannot drive.
pub(crate) fn model_defaults(
    index: &ModelIndex,
    unet: &UNetConfig,
    vae: &VaeConfig,
    scheduler: &SchedulerConfig,
) -> ModelDefaults {
    ModelDefaults {
        size: (unet.sample_size * vae.scale_factor()) as u32,
        scheduler: index
            .scheduler_class
            .as_deref()
            .and_then(SchedulerKind::from_diffusers_class)
            .unwrap_or(SchedulerKind::Euler),
        guidance_scale: match index.family {
            Family::Sdxl => 5.0,
            Family::Sd => 7.5,
        },
        unsupported_scheduler: scheduler.unsupported(),
        ..ModelDefaults::default()
    }
}
