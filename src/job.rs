//! Generation parameters: as requested (`GenerationRequest`, unchecked) and as validated
//! (`Generation`, only made by [`Generation::parse`]).
//!
//! This is the one place the job contract's bounds are enforced (docs/architecture.md §2 "Job
//! message"): sizes are multiples of 8 within the configured side and pixel bounds, steps 1..=150,
//! guidance finite in 0..=30, 1..=8 images, known scheduler names, prompts at most 4000 characters
//! whose weighting syntax parses (`weighting.rs`), at most 8 LoRA adapters with well-formed URIs and
//! scales ([`lora`]). A violation is a [`Rejection`] that
//! names the field, the value and the bound. `t2i generate` builds a request from its flags; the queue
//! worker builds one from a message. Pure: no I/O, no model.

use serde::{Deserialize, Serialize};

mod format;
mod long_prompt;
pub mod lora;
pub mod message;
pub mod model;
mod sampler;
pub mod weighting;
pub use format::ImageFormat;
pub use long_prompt::LongPrompt;
pub use lora::{Lora, LoraRequest, LoraSource};
pub use message::{BadBody, Job, JobId, JobRequest, OutputSpec, parse_job_body};
pub use model::{ModelSlug, model_matches};
pub use sampler::SchedulerKind;
pub use weighting::PromptWeighting;

/// Generation parameters as they arrive. Absent fields take the model's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub num_images: Option<u32>,
    /// `chunk` or `truncate` ([`LongPrompt`]); absent: `chunk`.
    #[serde(default)]
    pub long_prompt: Option<String>,
    /// LoRA adapters ([`lora::parse_loras`]); absent: none.
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
    /// `a1111` or `none` ([`PromptWeighting`]); absent: `a1111`, or `none` with `truncate`.
    #[serde(default)]
    pub prompt_weighting: Option<String>,
}

/// Operator-configured bounds (`t2i` flags); defaults from docs/architecture.md §2 "Job message".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub min_side: u32,
    pub max_side: u32,
    pub max_pixels: u64,
    pub max_steps: u32,
    pub max_guidance: f64,
    pub max_images: u32,
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            min_side: 64,
            max_side: 2048,
            max_pixels: 2048 * 2048,
            max_steps: 150,
            max_guidance: 30.0,
            max_images: 8,
            max_prompt_chars: 4000,
        }
    }
}

/// What the loaded model contributes when a field is absent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    /// `unet.sample_size × vae_scale_factor`: 1024 for SDXL/SSD-1B/Vega.
    pub size: u32,
    /// The shipped scheduler (`euler` for SSD-1B).
    pub scheduler: SchedulerKind,
    /// diffusers' `num_inference_steps` default is 50; SDXL-family model cards use 25-50. We use 25.
    pub steps: u32,
    /// diffusers' `guidance_scale` default for the model's pipeline class (SDXL 5.0, SD 7.5).
    pub guidance_scale: f64,
    /// A sampler the model's scheduler config cannot drive, and why (PNDM without `skip_prk_steps`).
    pub unsupported_scheduler: Option<(SchedulerKind, &'static str)>,
}

impl Default for ModelDefaults {
    fn default() -> Self {
        Self {
            size: 1024,
            scheduler: SchedulerKind::Euler,
            steps: 25,
            guidance_scale: 5.0,
            unsupported_scheduler: None,
        }
    }
}

/// Why a request was refused: the field, the offending value and the bound it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[error("invalid `{field}`: {value} ({reason})")]
pub struct Rejection {
    /// The JSON path of the offending field (`width`, `output.quality`), or `body` for the whole message.
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl Rejection {
    pub fn new(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// A validated request: the pipeline can run it as is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    /// Seed of image 0; image `i` uses `seed + i` (wrapping).
    pub seed: u64,
    /// Whether the seed was drawn by us rather than given (reported, never hidden).
    pub seed_was_random: bool,
    pub num_images: u32,
    /// How prompts over the encoders' 77 tokens are encoded.
    pub long_prompt: LongPrompt,
    /// LoRA adapters merged into the model for this generation, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<Lora>,
    /// Whether `(word:1.2)`-style weights are read from the prompts.
    pub prompt_weighting: PromptWeighting,
}

impl Generation {
    /// Validates `req` against `limits`, filling absent fields from `defaults`. A missing seed is drawn
    /// from the OS RNG and recorded.
    pub fn parse(
        req: GenerationRequest,
        limits: &Limits,
        defaults: &ModelDefaults,
    ) -> Result<Self, Rejection> {
        let chars = req.prompt.chars().count();
        if chars > limits.max_prompt_chars {
            return Err(Rejection::new(
                "prompt",
                format!("{chars} characters"),
                format!("at most {}", limits.max_prompt_chars),
            ));
        }
        if let Some(n) = &req.negative_prompt {
            let chars = n.chars().count();
            if chars > limits.max_prompt_chars {
                return Err(Rejection::new(
                    "negative_prompt",
                    format!("{chars} characters"),
                    format!("at most {}", limits.max_prompt_chars),
                ));
            }
        }
        let width = side("width", req.width.unwrap_or(defaults.size), limits)?;
        let height = side("height", req.height.unwrap_or(defaults.size), limits)?;
        let pixels = width as u64 * height as u64;
        if pixels > limits.max_pixels {
            return Err(Rejection::new(
                "width",
                format!("{width}x{height} = {pixels} pixels"),
                format!("width × height must be at most {}", limits.max_pixels),
            ));
        }
        let steps = req.steps.unwrap_or(defaults.steps);
        if steps == 0 || steps > limits.max_steps {
            return Err(Rejection::new(
                "steps",
                steps,
                format!("must be in 1..={}", limits.max_steps),
            ));
        }
        let guidance_scale = req.guidance_scale.unwrap_or(defaults.guidance_scale);
        if !guidance_scale.is_finite() || !(0.0..=limits.max_guidance).contains(&guidance_scale) {
            return Err(Rejection::new(
                "guidance_scale",
                guidance_scale,
                format!(
                    "must be a finite number in 0..={} (≤ 1 disables guidance)",
                    limits.max_guidance
                ),
            ));
        }
        let scheduler = match req.scheduler.as_deref() {
            None => defaults.scheduler,
            Some(s) => SchedulerKind::parse(s).ok_or_else(|| {
                let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
                Rejection::new(
                    "scheduler",
                    format!("\"{s}\""),
                    format!("must be one of {}", names.join(", ")),
                )
            })?,
        };
        if let Some((kind, why)) = defaults.unsupported_scheduler
            && kind == scheduler
        {
            return Err(Rejection::new("scheduler", format!("\"{scheduler}\""), why));
        }
        let long_prompt = match req.long_prompt.as_deref() {
            None => LongPrompt::default(),
            Some(s) => LongPrompt::parse(s).ok_or_else(|| {
                let names: Vec<&str> = LongPrompt::ALL.iter().map(|k| k.as_str()).collect();
                Rejection::new(
                    "long_prompt",
                    format!("\"{s}\""),
                    format!("must be one of {}", names.join(", ")),
                )
            })?,
        };
        let prompt_weighting = prompt_weighting(&req, long_prompt)?;
        let num_images = req.num_images.unwrap_or(1);
        if num_images == 0 || num_images > limits.max_images {
            return Err(Rejection::new(
                "num_images",
                num_images,
                format!("must be in 1..={}", limits.max_images),
            ));
        }
        let loras = lora::parse_loras(req.loras.unwrap_or_default())?;
        let (seed, seed_was_random) = match req.seed {
            Some(s) => (s, false),
            None => (rand::random::<u64>(), true),
        };
        Ok(Self {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            width,
            height,
            steps,
            guidance_scale,
            scheduler,
            seed,
            seed_was_random,
            num_images,
            long_prompt,
            loras,
            prompt_weighting,
        })
    }

    /// The seed of image `index`.
    pub fn image_seed(&self, index: u32) -> u64 {
        self.seed.wrapping_add(index as u64)
    }

    /// Whether two generations can share a pipeline batch (same size, steps, sampler, guidance,
    /// long-prompt mode and weighting: the two modes decide how the batch's texts are encoded; the
    /// same LoRA adapters with the same scales, in the same order and, once fetched, the same files:
    /// one batch runs on one merged model).
    pub fn is_batchable_with(&self, other: &Generation) -> bool {
        (self.width, self.height, self.steps, self.scheduler)
            == (other.width, other.height, other.steps, other.scheduler)
            && self.guidance_scale == other.guidance_scale
            && self.long_prompt == other.long_prompt
            && self.loras == other.loras
            && self.prompt_weighting == other.prompt_weighting
    }
}

/// The request's weighting mode, and its prompts checked against the syntax when it is `a1111`.
/// Absent, it is `a1111`, except with `long_prompt: "truncate"`: that mode is diffusers'
/// `encode_prompt` to the bit, which reads no syntax.
fn prompt_weighting(
    req: &GenerationRequest,
    long_prompt: LongPrompt,
) -> Result<PromptWeighting, Rejection> {
    let mode = match req.prompt_weighting.as_deref() {
        None => default_weighting(long_prompt),
        Some(s) => PromptWeighting::parse(s).ok_or_else(|| {
            let names: Vec<&str> = PromptWeighting::ALL.iter().map(|k| k.as_str()).collect();
            Rejection::new(
                "prompt_weighting",
                format!("\"{s}\""),
                format!("must be one of {}", names.join(", ")),
            )
        })?,
    };
    if mode == PromptWeighting::A1111 {
        let texts = [
            ("prompt", Some(&req.prompt)),
            ("negative_prompt", req.negative_prompt.as_ref()),
        ];
        for (field, text) in texts {
            let Some(text) = text else { continue };
            weighting::parse(text).map_err(|e| weight_rejection(field, e))?;
        }
    }
    Ok(mode)
}

/// The weighting of a request that names none.
pub(crate) fn default_weighting(long_prompt: LongPrompt) -> PromptWeighting {
    match long_prompt {
        LongPrompt::Truncate => PromptWeighting::None,
        LongPrompt::Chunk => PromptWeighting::A1111,
    }
}

fn weight_rejection(field: &str, e: weighting::WeightError) -> Rejection {
    use weighting::WeightError;
    match e {
        WeightError::Number { literal } => Rejection::new(
            field,
            format!("weight `{literal}`"),
            "a `(text:weight)` weight must be a decimal number (or set prompt_weighting: none)",
        ),
        WeightError::Range { text, weight } => Rejection::new(
            field,
            format!("weight {weight} of \"{text}\""),
            format!(
                "every weight must be in 0..={} (nested brackets multiply: `(` ×1.1, `[` ÷1.1)",
                weighting::MAX_WEIGHT
            ),
        ),
    }
}

fn side(field: &'static str, v: u32, limits: &Limits) -> Result<u32, Rejection> {
    if !v.is_multiple_of(8) {
        // The VAE maps 8×8 pixels to one latent pixel (vae_scale_factor = 8).
        return Err(Rejection::new(field, v, "must be a multiple of 8"));
    }
    if v < limits.min_side || v > limits.max_side {
        return Err(Rejection::new(
            field,
            v,
            format!("must be in {}..={}", limits.min_side, limits.max_side),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(prompt: &str) -> GenerationRequest {
        GenerationRequest {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    fn parse(r: GenerationRequest) -> Result<Generation, Rejection> {
        Generation::parse(r, &Limits::default(), &ModelDefaults::default())
    }

    #[test]
    fn absent_fields_take_the_model_defaults() {
        let g = parse(GenerationRequest {
            seed: Some(42),
            ..req("a cat")
        })
        .unwrap();
        assert_eq!((g.width, g.height, g.steps), (1024, 1024, 25));
        assert_eq!(g.scheduler, SchedulerKind::Euler);
        assert!(!g.seed_was_random);
    }

    #[test]
    fn sizes_that_are_not_multiples_of_8_are_rejected_with_field_and_bound() {
        let e = parse(GenerationRequest {
            width: Some(1000 + 4),
            ..req("x")
        })
        .unwrap_err();
        assert_eq!(e.field, "width");
        assert_eq!(e.value, "1004");
        assert!(e.reason.contains("multiple of 8"));
    }

    #[test]
    fn zero_steps_and_nan_guidance_are_rejected() {
        assert_eq!(
            parse(GenerationRequest {
                steps: Some(0),
                ..req("x")
            })
            .unwrap_err()
            .field,
            "steps"
        );
        let e = parse(GenerationRequest {
            guidance_scale: Some(f64::NAN),
            ..req("x")
        })
        .unwrap_err();
        assert_eq!(e.field, "guidance_scale");
        assert_eq!(e.value, "NaN");
    }

    #[test]
    fn the_pixel_budget_applies_to_the_product() {
        let limits = Limits {
            max_pixels: 512 * 512,
            ..Limits::default()
        };
        let r = GenerationRequest {
            width: Some(1024),
            height: Some(512),
            ..req("x")
        };
        assert!(Generation::parse(r, &limits, &ModelDefaults::default()).is_err());
    }

    #[test]
    fn unknown_schedulers_list_the_known_ones() {
        let e = parse(GenerationRequest {
            scheduler: Some("heun".into()),
            ..req("x")
        })
        .unwrap_err();
        assert!(e.reason.contains("dpmpp_2m_karras"), "{e}");
    }

    #[test]
    fn over_long_prompts_are_rejected() {
        assert_eq!(parse(req(&"a".repeat(4001))).unwrap_err().field, "prompt");
        assert!(parse(req(&"é".repeat(4000))).is_ok());
    }

    #[test]
    fn image_seeds_are_consecutive_and_wrap() {
        let g = parse(GenerationRequest {
            seed: Some(u64::MAX),
            num_images: Some(2),
            ..req("x")
        })
        .unwrap();
        let seeds: Vec<u64> = (0..g.num_images).map(|i| g.image_seed(i)).collect();
        assert_eq!(seeds, vec![u64::MAX, 0]);
    }

    #[test]
    fn long_prompt_defaults_to_chunk_and_splits_batches() {
        let chunk = parse(req("x")).unwrap();
        assert_eq!(chunk.long_prompt, LongPrompt::Chunk);
        let truncate = parse(GenerationRequest {
            long_prompt: Some("truncate".into()),
            ..req("x")
        })
        .unwrap();
        assert_eq!(truncate.long_prompt, LongPrompt::Truncate);
        assert!(!chunk.is_batchable_with(&truncate));
        assert!(chunk.is_batchable_with(&chunk.clone()));
        let e = parse(GenerationRequest {
            long_prompt: Some("split".into()),
            ..req("x")
        })
        .unwrap_err();
        assert_eq!(e.field, "long_prompt");
        assert!(e.reason.contains("chunk, truncate"), "{e}");
    }

    #[test]
    fn prompt_weighting_defaults_to_a1111_except_with_truncate() {
        let chunk = parse(req("x")).unwrap();
        assert_eq!(chunk.prompt_weighting, PromptWeighting::A1111);
        let truncate = parse(GenerationRequest {
            long_prompt: Some("truncate".into()),
            ..req("(x)")
        })
        .unwrap();
        assert_eq!(truncate.prompt_weighting, PromptWeighting::None);
        let weighted_cut = parse(GenerationRequest {
            long_prompt: Some("truncate".into()),
            prompt_weighting: Some("a1111".into()),
            ..req("x")
        })
        .unwrap();
        assert_eq!(weighted_cut.prompt_weighting, PromptWeighting::A1111);
        let literal = parse(GenerationRequest {
            prompt_weighting: Some("none".into()),
            ..req("x")
        })
        .unwrap();
        assert!(!chunk.is_batchable_with(&literal));
        let e = parse(GenerationRequest {
            prompt_weighting: Some("compel".into()),
            ..req("x")
        })
        .unwrap_err();
        assert_eq!(e.field, "prompt_weighting");
        assert!(e.reason.contains("a1111, none"), "{e}");
    }

    #[test]
    fn bad_weights_are_rejected_naming_the_prompt_unless_weighting_is_off() {
        let e = parse(req("a (cat:1.2.3)")).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("prompt", "weight `1.2.3`")
        );
        let e = parse(GenerationRequest {
            negative_prompt: Some("(blurry:11)".into()),
            ..req("a cat")
        })
        .unwrap_err();
        assert_eq!(e.field, "negative_prompt");
        assert!(e.value.contains("11") && e.reason.contains("0..=10"), "{e}");
        // Literal text: nothing to parse, nothing refused.
        assert!(
            parse(GenerationRequest {
                prompt_weighting: Some("none".into()),
                ..req("a (cat:1.2.3)")
            })
            .is_ok()
        );
    }

    #[test]
    fn unknown_fields_are_rejected_when_deserialising() {
        let e = serde_json::from_str::<GenerationRequest>(r#"{"prompt": "x", "stpes": 3}"#)
            .unwrap_err();
        assert!(e.to_string().contains("stpes"));
    }
}
