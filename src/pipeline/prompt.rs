//! From prompt texts to the UNet's text conditioning: the model family's tokenizers and CLIP text
//! encoders, diffusers' `encode_prompt` for each family, and the CFG batch of embeddings a render
//! feeds the UNet.
//!
//! | family | encoders | context | pooled |
//! |---|---|---|---|
//! | SDXL (`StableDiffusionXLPipeline`) | `text_encoder`, `text_encoder_2` | both penultimate states, concatenated | encoder 2's projection |
//! | SD 1.x/2.x (`StableDiffusionPipeline`) | `text_encoder` | its last hidden state (final layer norm) | none |

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::PipelineError;
use super::batch::RenderBatch;
use super::clip::{ClipOutput, ClipTextEncoder};
use super::config::{ClipConfig, ConfigError, Family, ModelIndex};
use super::denoise::uses_guidance;
use super::tokenizer::{ClipTokenizer, Tokens};

/// Prompt embeddings for a list of texts.
pub struct PromptEmbeddings {
    /// `(N, 77, cross_attention_dim)`: the family's context states (SDXL: both encoders' concatenated).
    pub context: Tensor,
    /// `(N, projection_dim)`: encoder 2's pooled projection (SDXL family only).
    pub pooled: Option<Tensor>,
    pub truncated: Vec<bool>,
}

/// The CFG batch's text conditioning, `[negatives ; positives]` (positives only without guidance).
pub(crate) struct BatchEmbeddings {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
    /// Per image: its prompt was cut at the encoders' length.
    pub truncated: Vec<bool>,
}

/// One tokenizer and the encoder it feeds.
struct Encoder {
    tokenizer: ClipTokenizer,
    encoder: ClipTextEncoder,
}

/// Configs and tokenizers of a family's text side, read before any weights are.
pub(crate) struct TextPlan {
    family: Family,
    configs: Vec<ClipConfig>,
    tokenizers: Vec<ClipTokenizer>,
}

impl TextPlan {
    pub(crate) fn load(root: &Path, index: &ModelIndex) -> Result<Self, PipelineError> {
        let mut configs = Vec::new();
        let mut tokenizers = Vec::new();
        for (encoder, tokenizer) in index.family.text_components() {
            let config = ClipConfig::load(&root.join(encoder).join("config.json"))?;
            tokenizers.push(ClipTokenizer::load(
                &root.join(tokenizer),
                config.max_position_embeddings,
            )?);
            configs.push(config);
        }
        Ok(Self {
            family: index.family,
            configs,
            tokenizers,
        })
    }

    /// The context width the encoders give: the UNet's `cross_attention_dim` must equal it.
    pub(crate) fn context_width(&self) -> usize {
        self.configs.iter().map(|c| c.hidden_size).sum()
    }

    /// The encoders' folders, weight stems and what each is asked for.
    pub(crate) fn components(&self) -> Vec<(&'static str, ClipOutput)> {
        self.family
            .text_components()
            .iter()
            .enumerate()
            .map(|(i, (folder, _))| (*folder, self.output(i)))
            .collect()
    }

    fn output(&self, i: usize) -> ClipOutput {
        match (self.family, i) {
            (Family::Sd, _) => ClipOutput::LastHidden,
            (Family::Sdxl, 0) => ClipOutput::Penultimate,
            (Family::Sdxl, _) => ClipOutput::PenultimateAndPooled,
        }
    }

    /// Builds encoder `i` from its weights.
    pub(crate) fn build_encoder(
        &self,
        i: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<ClipTextEncoder> {
        ClipTextEncoder::load(vb, &self.configs[i], self.output(i))
    }

    /// Pairs the tokenizers with their loaded encoders (in [`TextPlan::components`] order).
    pub(crate) fn into_encoders(
        self,
        encoders: Vec<ClipTextEncoder>,
        force_zeros_for_empty_prompt: bool,
    ) -> TextEncoders {
        TextEncoders {
            encoders: self
                .tokenizers
                .into_iter()
                .zip(encoders)
                .map(|(tokenizer, encoder)| Encoder { tokenizer, encoder })
                .collect(),
            force_zeros_for_empty_prompt,
        }
    }
}

/// Checks the UNet's `cross_attention_dim` against the encoders' widths.
pub(crate) fn check_context_width(
    root: &Path,
    plan: &TextPlan,
    cross_attention_dim: usize,
) -> Result<(), ConfigError> {
    let width = plan.context_width();
    if cross_attention_dim == width {
        return Ok(());
    }
    Err(ConfigError::Key {
        path: root.join("unet/config.json"),
        key: "cross_attention_dim".into(),
        message: format!(
            "is {cross_attention_dim} but the text encoders' hidden sizes sum to {width}"
        ),
    })
}

/// A model's tokenizers and text encoders.
pub(crate) struct TextEncoders {
    encoders: Vec<Encoder>,
    force_zeros_for_empty_prompt: bool,
}

impl TextEncoders {
    /// Token ids of every tokenizer for one prompt, in encoder order.
    pub(crate) fn tokenize(&self, text: &str) -> Result<Vec<Tokens>, PipelineError> {
        self.encoders
            .iter()
            .map(|e| e.tokenizer.encode(text).map_err(PipelineError::Tokenize))
            .collect()
    }

    /// diffusers `encode_prompt` for a list of texts, without CFG handling.
    pub(crate) fn encode_prompts(&self, texts: &[&str]) -> Result<PromptEmbeddings, PipelineError> {
        let mut ids: Vec<Vec<Vec<u32>>> =
            vec![Vec::with_capacity(texts.len()); self.encoders.len()];
        let mut truncated = Vec::with_capacity(texts.len());
        for t in texts {
            let tokens = self.tokenize(t)?;
            truncated.push(tokens.iter().any(|t| t.truncated));
            for (column, t) in ids.iter_mut().zip(tokens) {
                column.push(t.ids);
            }
        }
        let e = PipelineError::EncodePrompt;
        let mut hidden = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (encoder, ids) in self.encoders.iter().zip(&ids) {
            let out = encoder.encoder.forward(ids).map_err(e)?;
            hidden.push(out.hidden);
            pooled = pooled.or(out.pooled);
        }
        let context = match hidden.len() {
            1 => hidden.pop().expect("one encoder"),
            _ => Tensor::cat(&hidden, 2).map_err(e)?,
        };
        Ok(PromptEmbeddings {
            context,
            pooled,
            truncated,
        })
    }

    /// Context (and pooled) embeddings for the whole CFG batch, `[negatives ; positives]` (positives
    /// only without guidance). Each distinct text is encoded once.
    pub(crate) fn encode_batch(
        &self,
        batch: &RenderBatch,
    ) -> Result<BatchEmbeddings, PipelineError> {
        let guided = uses_guidance(batch.guidance_scale);
        let force_zeros = self.force_zeros_for_empty_prompt;
        // Which text each row needs; None = a zero row.
        let mut rows: Vec<Option<&str>> = Vec::new();
        if guided {
            for img in &batch.images {
                rows.push(match (&img.negative_prompt, force_zeros) {
                    (Some(n), _) => Some(n.as_str()),
                    (None, true) => None,
                    (None, false) => Some(""),
                });
            }
        }
        rows.extend(batch.images.iter().map(|i| Some(i.prompt.as_str())));
        let mut unique: Vec<&str> = Vec::new();
        let mut slot: HashMap<&str, usize> = HashMap::new();
        for text in rows.iter().flatten() {
            slot.entry(text).or_insert_with(|| {
                unique.push(text);
                unique.len() - 1
            });
        }
        let emb = self.encode_prompts(&unique)?;
        let e = PipelineError::EncodePrompt;
        let gather = |all: &Tensor| -> Result<Tensor, PipelineError> {
            let zero = all.get(0).and_then(|t| t.zeros_like()).map_err(e)?;
            let picked = rows
                .iter()
                .map(|row| match row {
                    Some(text) => all.get(slot[text]).map_err(e),
                    None => Ok(zero.clone()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Tensor::stack(&picked, 0).map_err(e)
        };
        let context = gather(&emb.context)?;
        let pooled = emb.pooled.as_ref().map(gather).transpose()?;
        let truncated = batch
            .images
            .iter()
            .map(|i| emb.truncated[slot[i.prompt.as_str()]])
            .collect();
        Ok(BatchEmbeddings {
            context,
            pooled,
            truncated,
        })
    }
}
