//! Reading the diffusers folder layout's JSON configs into validated, resolved structs.
//!
//! Every architectural fact the pipeline uses comes from here: `model_index.json`, `unet/config.json`,
//! `text_encoder{,_2}/config.json`, `vae/config.json` and `scheduler/scheduler_config.json`. Nothing is
//! hard-coded per model; SSD-1B, SDXL base 1.0 and Segmind-Vega differ only in these files
//! (`docs/model-notes.md` §1 has the table). A key the code cannot honour is an error naming the file,
//! the key and the value, never a silent default and never a panic.
//!
//! This module only parses. The UNet's config, the largest, is in `unet.rs`; weights are found in
//! `weights.rs`; schedules are computed in `scheduler/`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

mod defaults;
mod unet;
pub use defaults::ModelInfo;
pub(crate) use defaults::{model_defaults, scheduler_config};
pub use unet::{
    BlockKind, DownBlockConfig, LayerConfig, MidBlock, TextTimeConfig, UNetConfig, UpBlockConfig,
};

/// A config file that is missing, malformed, or asks for something this pipeline does not implement.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: key `{key}`: {message}", path.display())]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A parsed JSON object that remembers its file, so that every error can name file and key.
pub(crate) struct ConfigFile {
    path: PathBuf,
    map: Map<String, Value>,
}

impl ConfigFile {
    pub(crate) fn open(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        match value {
            Value::Object(map) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            _ => Err(ConfigError::Key {
                path: path.to_path_buf(),
                key: "(top level)".into(),
                message: "expected a JSON object".into(),
            }),
        }
    }

    pub(crate) fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The value of `key`, treating JSON `null` as absent (diffusers writes explicit nulls).
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                as_usize(v).ok_or_else(|| self.err(key, format!("expected an integer, got {v}")))
            }
        }
    }

    pub(crate) fn usize_req(&self, key: &str) -> Result<usize, ConfigError> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        as_usize(v).ok_or_else(|| self.err(key, format!("expected an integer, got {v}")))
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.get(key)
            .map(|v| {
                as_usize(v).ok_or_else(|| self.err(key, format!("expected an integer, got {v}")))
            })
            .transpose()
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    pub(crate) fn str_or<'a>(
        &'a self,
        key: &str,
        default: &'a str,
    ) -> Result<&'a str, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(key, format!("expected a string, got {v}"))),
        }
    }

    pub(crate) fn usize_list(&self, key: &str) -> Result<Vec<usize>, ConfigError> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list of integers, got {v}")))?;
        arr.iter()
            .map(|x| {
                as_usize(x)
                    .ok_or_else(|| self.err(key, format!("expected a list of integers, got {v}")))
            })
            .collect()
    }

    pub(crate) fn str_list(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list of strings, got {v}")))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(key, format!("expected a list of strings, got {v}")))
            })
            .collect()
    }

    /// Fails unless `key` is absent/null or equal to one of `allowed` (the values this code implements).
    pub(crate) fn require(&self, key: &str, allowed: &[Value]) -> Result<(), ConfigError> {
        match self.get(key) {
            None => Ok(()),
            Some(v) if allowed.iter().any(|a| values_equal(a, v)) => Ok(()),
            Some(v) => Err(self.err(
                key,
                format!(
                    "value {v} is not supported (supported: {})",
                    allowed
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize).or_else(|| {
        // Some configs write integral floats (e.g. `"freq_shift": 0.0`); accept those only.
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as usize)
    })
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Which pipeline class a model folder is for: what conditions its UNet and how prompts are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionXLPipeline` (SDXL, SSD-1B, Vega): two CLIP encoders' penultimate states, the
    /// second one's pooled projection and `text_time` micro-conditioning.
    Sdxl,
    /// `StableDiffusionPipeline` (SD 1.x, 2.x): one CLIP encoder's last hidden state (after its final
    /// layer norm), nothing else.
    Sd,
}

impl Family {
    /// The text components a pipeline of this family needs, in encoder order.
    pub fn text_components(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Sdxl => &[
                ("text_encoder", "tokenizer"),
                ("text_encoder_2", "tokenizer_2"),
            ],
            Self::Sd => &[("text_encoder", "tokenizer")],
        }
    }

    /// How the family is named in metadata and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sdxl => "sdxl",
            Self::Sd => "sd",
        }
    }
}

/// `model_index.json`: which components the pipeline has, and pipeline-level flags.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub class_name: String,
    pub family: Family,
    /// diffusers `StableDiffusionXLPipeline.force_zeros_for_empty_prompt`: with no negative prompt the
    /// unconditional embeddings are zeros instead of the encoding of "" (true for the SDXL family;
    /// `StableDiffusionPipeline` has no such option and always encodes "").
    pub force_zeros_for_empty_prompt: bool,
    /// The scheduler class the model ships (`scheduler: ["diffusers", "EulerDiscreteScheduler"]`).
    pub scheduler_class: Option<String>,
    /// The folder ships a `safety_checker` (SD 1.x): it is not run, and results say so.
    pub has_safety_checker: bool,
}

impl ModelIndex {
    pub(crate) fn load(root: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&ConfigFile::open(&root.join("model_index.json"))?)
    }

    pub(crate) fn from_file(cfg: &ConfigFile) -> Result<Self, ConfigError> {
        let class_name = cfg.str_or("_class_name", "")?.to_string();
        // An index without a class name is read as SDXL-family, as before SD support existed.
        let family = match class_name.as_str() {
            "" => Family::Sdxl,
            c if c.starts_with("StableDiffusionXL") => Family::Sdxl,
            "StableDiffusionPipeline" => Family::Sd,
            other => {
                return Err(cfg.err(
                    "_class_name",
                    format!(
                        "`{other}` is not supported (supported: StableDiffusionXLPipeline, \
                         StableDiffusionPipeline)"
                    ),
                ));
            }
        };
        let needed = family
            .text_components()
            .iter()
            .flat_map(|(encoder, tokenizer)| [*encoder, *tokenizer])
            .chain(["unet", "vae"]);
        for component in needed {
            if cfg.get(component).is_none() {
                return Err(cfg.err(
                    component,
                    format!(
                        "missing: a {class_name} needs {}, a UNet and a VAE",
                        match family {
                            Family::Sdxl => "both CLIP text encoders, both tokenizers",
                            Family::Sd => "a CLIP text encoder, a tokenizer",
                        }
                    ),
                ));
            }
        }
        let scheduler_class = cfg
            .get("scheduler")
            .and_then(|v| v.as_array())
            .and_then(|a| a.get(1))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        // A component listed as `[null, null]` is absent (diffusers writes that when saving without it).
        let has_safety_checker = cfg
            .get("safety_checker")
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().any(|x| !x.is_null()));
        Ok(Self {
            class_name,
            family,
            // diffusers' StableDiffusionXLPipeline.__init__ default is True.
            force_zeros_for_empty_prompt: family == Family::Sdxl
                && cfg.bool_or("force_zeros_for_empty_prompt", true)?,
            scheduler_class,
            has_safety_checker,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP ViT-L (text_encoder).
    QuickGelu,
    /// Exact erf GELU: OpenCLIP bigG (text_encoder_2).
    Gelu,
}

/// `text_encoder{,_2}/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub activation: ClipActivation,
    /// transformers pools at `argmax(input_ids)` when the config's eos_token_id is the legacy value 2
    /// (the SDXL configs), otherwise at the first `eos_token_id`.
    pub eos_token_id: u32,
    pub projection_dim: Option<usize>,
}

impl ClipConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = ConfigFile::open(path)?;
        let activation = match cfg.str_or("hidden_act", "quick_gelu")? {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => {
                return Err(cfg.err(
                    "hidden_act",
                    format!("\"{other}\" is not supported (supported: quick_gelu, gelu)"),
                ));
            }
        };
        Ok(Self {
            vocab_size: cfg.usize_req("vocab_size")?,
            hidden_size: cfg.usize_req("hidden_size")?,
            intermediate_size: cfg.usize_req("intermediate_size")?,
            num_hidden_layers: cfg.usize_req("num_hidden_layers")?,
            num_attention_heads: cfg.usize_req("num_attention_heads")?,
            max_position_embeddings: cfg.usize_or("max_position_embeddings", 77)?,
            layer_norm_eps: cfg.f64_or("layer_norm_eps", 1e-5)?,
            activation,
            eos_token_id: cfg.usize_or("eos_token_id", 2)? as u32,
            projection_dim: cfg.opt_usize("projection_dim")?,
        })
    }
}

/// `vae/config.json` (diffusers `AutoencoderKL`); only the decoder side is used.
#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// 0.13025 for the SDXL VAE (SD 1.x: 0.18215).
    pub scaling_factor: f64,
    /// The VAE overflows in f16: decode in f32 (diffusers `needs_upcasting`).
    pub force_upcast: bool,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use serde_json::json;
        let cfg = ConfigFile::open(path)?;
        cfg.require("act_fn", &[json!("silu")])?;
        cfg.require("shift_factor", &[])?;
        let up_types = cfg.str_list("up_block_types")?;
        if let Some(bad) = up_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(cfg.err(
                "up_block_types",
                format!("`{bad}` is not supported (supported: UpDecoderBlock2D)"),
            ));
        }
        let block_out_channels = cfg.usize_list("block_out_channels")?;
        if up_types.len() != block_out_channels.len() {
            return Err(cfg.err("up_block_types", "length differs from block_out_channels"));
        }
        let float_list = |key: &str| -> Result<Option<Vec<f64>>, ConfigError> {
            cfg.get(key)
                .map(|v| {
                    v.as_array()
                        .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| cfg.err(key, format!("expected a list of numbers, got {v}")))
                })
                .transpose()
        };
        Ok(Self {
            latent_channels: cfg.usize_or("latent_channels", 4)?,
            out_channels: cfg.usize_or("out_channels", 3)?,
            layers_per_block: cfg.usize_or("layers_per_block", 1)?,
            norm_num_groups: cfg.usize_or("norm_num_groups", 32)?,
            scaling_factor: cfg.f64_or("scaling_factor", 0.18215)?,
            force_upcast: cfg.bool_or("force_upcast", true)?,
            latents_mean: float_list("latents_mean")?,
            latents_std: float_list("latents_std")?,
            use_post_quant_conv: cfg.bool_or("use_post_quant_conv", true)?,
            mid_block_add_attention: cfg.bool_or("mid_block_add_attention", true)?,
            block_out_channels,
        })
    }

    /// Pixels per latent pixel: 2^(number of VAE blocks - 1) = 8 for SD/SDXL (diffusers `vae_scale_factor`).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}
