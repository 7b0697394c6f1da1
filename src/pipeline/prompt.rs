//! From prompt texts to the UNet's text conditioning: the model family's tokenizers and CLIP text
//! encoders, diffusers' `encode_prompt` for each family, and the CFG batch of embeddings a render
//! feeds the UNet.
//!
//! | family | encoders | context | pooled |
//! |---|---|---|---|
//! | SDXL (`StableDiffusionXLPipeline`) | `text_encoder`, `text_encoder_2` | both penultimate states, concatenated | encoder 2's projection |
//! | SD 1.x/2.x (`StableDiffusionPipeline`) | `text_encoder` | its last hidden state (final layer norm) | none |
//!
//! Prompts over 77 tokens ([`LongPrompt`]): `truncate` is diffusers' `encode_prompt` (cut at 77);
//! `chunk` reproduces compel 2.5.1 with `truncate_long_prompts=False` and
//! `split_long_text_mode=BRUTAL` (docs/model-notes.md §2): every encoder's ids cut into 75-token
//! chunks, each encoded on its own as `BOS … EOS pad…`, the chunks' states concatenated along the
//! tokens; every text of one call padded with the empty prompt's chunk to the longest's count
//! (compel's `pad_conditioning_tensors_to_same_length`, and CompelForSDXL's padding of the shorter
//! encoder); the pooled embedding from the first chunk (compel's `get_pooled_embeddings` encodes the
//! prompt truncated at 77, which is exactly that chunk).
//!
//! Prompt weighting ([`PromptWeighting`]): with `a1111` each text is parsed (`job/weighting.rs`),
//! each piece tokenized on its own with its weight, `BREAK` closing a chunk
//! ([`ClipTokenizer::encode_weighted_chunks`], A1111's `tokenize_line`), and every encoder's chunk
//! states weighted and mean-restored (`emphasis.rs`); the pooled embedding is the first chunk's,
//! unweighted, as A1111's. A text without syntax gets the same ids and weights of 1, so it encodes
//! to the bit as with `none`. compel's own syntax (`word+`, `(words)1.2`, `.and()`) is not read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::PipelineError;
use super::batch::RenderBatch;
use super::clip::{ClipOutput, ClipTextEncoder};
use super::config::{ClipConfig, ConfigError, Family, ModelIndex};
use super::denoise::uses_guidance;
use super::emphasis::emphasize;
use super::tokenizer::{ClipTokenizer, Tokens};
use crate::job::{LongPrompt, PromptWeighting};

/// Most chunks one prompt is encoded in with [`LongPrompt::Chunk`]: 10 × 75 = 750 tokens, past
/// which the rest is cut and reported. The UNet's cross-attention time and its attention-score
/// memory grow linearly with the context (10 chunks: 770 tokens, ten times the 77-token cost);
/// a 4000-character prompt (the contract's `max_prompt_chars`) of ordinary English is about 1000
/// CLIP tokens, so this keeps most of it while a prompt of pathological characters (one byte-level
/// token per UTF-8 byte: up to 16000 tokens) cannot blow up a render.
pub const MAX_CHUNKS: usize = 10;

/// Prompt embeddings for a list of texts.
pub struct PromptEmbeddings {
    /// `(N, 77·chunks, cross_attention_dim)`: the family's context states (SDXL: both encoders'
    /// concatenated); one chunk unless [`LongPrompt::Chunk`] met a prompt over 75 tokens.
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

/// One text's chunks on one tokenizer ([`TextEncoders::chunks_of`]).
struct TextChunks {
    /// Each 77 ids (`BOS … EOS pad…`).
    ids: Vec<Vec<u32>>,
    /// Per id of `ids`, when some weight is not 1.
    weights: Option<Vec<Vec<f32>>>,
    truncated: bool,
}

/// One tokenizer and the encoder it feeds (the tokenizer shared with LoRA variants' encoders).
struct Encoder {
    tokenizer: Arc<ClipTokenizer>,
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

    /// Encoder `i`'s config and output: what rebuilding it over other weights takes (LoRA variants).
    pub(crate) fn encoder_spec(&self, i: usize) -> (ClipConfig, ClipOutput) {
        (self.configs[i].clone(), self.output(i))
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
                .map(|(tokenizer, encoder)| Encoder {
                    tokenizer: Arc::new(tokenizer),
                    encoder,
                })
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
    /// The same tokenizers over other encoders, in the same order (a LoRA variant's).
    pub(crate) fn with_encoders(&self, encoders: Vec<ClipTextEncoder>) -> Self {
        Self {
            encoders: self
                .encoders
                .iter()
                .zip(encoders)
                .map(|(e, encoder)| Encoder {
                    tokenizer: e.tokenizer.clone(),
                    encoder,
                })
                .collect(),
            force_zeros_for_empty_prompt: self.force_zeros_for_empty_prompt,
        }
    }

    /// Token ids of every tokenizer for one prompt, in encoder order.
    pub(crate) fn tokenize(&self, text: &str) -> Result<Vec<Tokens>, PipelineError> {
        self.encoders
            .iter()
            .map(|e| e.tokenizer.encode(text).map_err(PipelineError::Tokenize))
            .collect()
    }

    /// Embeddings for a list of texts in `mode`, read literally, without CFG handling; every text
    /// gets the same context length.
    pub(crate) fn encode_prompts_as(
        &self,
        texts: &[&str],
        mode: LongPrompt,
    ) -> Result<PromptEmbeddings, PipelineError> {
        self.encode_prompts_with(texts, mode, PromptWeighting::None)
    }

    /// Embeddings for a list of texts in `mode` with `weighting`, without CFG handling; every text
    /// gets the same context length.
    pub(crate) fn encode_prompts_with(
        &self,
        texts: &[&str],
        mode: LongPrompt,
        weighting: PromptWeighting,
    ) -> Result<PromptEmbeddings, PipelineError> {
        match (mode, weighting) {
            (LongPrompt::Truncate, PromptWeighting::None) => self.encode_prompts(texts),
            _ => self.encode_chunked(texts, mode, weighting),
        }
    }

    /// One text's chunks on `encoder`'s tokenizer: compel's plain chunks, or with `a1111` A1111's
    /// weighted ones (`truncate` keeps one chunk). No weights when every weight is 1.
    fn chunks_of(
        encoder: &Encoder,
        text: &str,
        mode: LongPrompt,
        weighting: PromptWeighting,
    ) -> Result<TextChunks, PipelineError> {
        let max_chunks = match mode {
            LongPrompt::Chunk => MAX_CHUNKS,
            LongPrompt::Truncate => 1,
        };
        let tok = &encoder.tokenizer;
        let t = PipelineError::Tokenize;
        Ok(match weighting {
            PromptWeighting::None => {
                let c = tok.encode_chunks(text, max_chunks).map_err(t)?;
                TextChunks {
                    ids: c.chunks,
                    weights: None,
                    truncated: c.truncated,
                }
            }
            PromptWeighting::A1111 => {
                let pieces =
                    crate::job::weighting::parse(text).map_err(PipelineError::Weighting)?;
                let c = tok.encode_weighted_chunks(&pieces, max_chunks).map_err(t)?;
                let plain = c.weights.iter().flatten().all(|&w| w == 1.0);
                TextChunks {
                    ids: c.chunks.chunks,
                    weights: (!plain).then_some(c.weights),
                    truncated: c.chunks.truncated,
                }
            }
        })
    }

    /// compel's long-prompt encoding (module docs): chunks of 75 tokens, every text padded with
    /// the empty prompt's chunk to the longest text's count, over every encoder; with `a1111` the
    /// weighted chunks, each encoder's states weighted per chunk.
    fn encode_chunked(
        &self,
        texts: &[&str],
        mode: LongPrompt,
        weighting: PromptWeighting,
    ) -> Result<PromptEmbeddings, PipelineError> {
        let mut truncated = vec![false; texts.len()];
        let mut per_encoder = Vec::with_capacity(self.encoders.len());
        for encoder in &self.encoders {
            let mut column = Vec::with_capacity(texts.len());
            for (i, text) in texts.iter().enumerate() {
                let chunks = Self::chunks_of(encoder, text, mode, weighting)?;
                truncated[i] |= chunks.truncated;
                column.push(chunks);
            }
            per_encoder.push(column);
        }
        let count = per_encoder
            .iter()
            .flatten()
            .map(|c| c.ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let e = PipelineError::EncodePrompt;
        let mut hidden = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (encoder, column) in self.encoders.iter().zip(per_encoder) {
            let empty = encoder.tokenizer.empty_chunk();
            let weighted = column.iter().any(|c| c.weights.is_some());
            // One encoder row per chunk, text by text: chunk c of text t is row t·count + c. The
            // padding chunks weigh 1 everywhere.
            let mut rows: Vec<Vec<u32>> = Vec::with_capacity(texts.len() * count);
            let mut weights: Vec<Vec<f32>> = Vec::new();
            for c in column {
                let len = empty.len();
                let n = c.ids.len();
                rows.extend(c.ids);
                rows.resize(rows.len() + count - n, empty.clone());
                if weighted {
                    let mut w = c.weights.unwrap_or_else(|| vec![vec![1.0; len]; n]);
                    w.resize(count, vec![1.0; len]);
                    weights.extend(w);
                }
            }
            let out = encoder.encoder.forward(&rows).map_err(e)?;
            let states = match weighted {
                true => emphasize(&out.hidden, &weights).map_err(e)?,
                false => out.hidden,
            };
            let (_, len, width) = states.dims3().map_err(e)?;
            hidden.push(
                states
                    .reshape((texts.len(), count * len, width))
                    .map_err(e)?,
            );
            if let Some(all) = out.pooled {
                let first: Vec<u32> = (0..texts.len()).map(|t| (t * count) as u32).collect();
                let first = Tensor::from_vec(first, texts.len(), all.device()).map_err(e)?;
                pooled = pooled.or(Some(all.index_select(&first, 0).map_err(e)?));
            }
        }
        joined(hidden, pooled, truncated)
    }

    /// Images of `batch` that can share a render without changing a pixel, in batch order: with
    /// [`LongPrompt::Chunk`] an image's context is as long as its longer prompt (positive or
    /// negative, in chunks), and padding it further with empty chunks (what one CFG batch of mixed
    /// lengths would need) would change it, so images are grouped by that chunk count. One group
    /// with `truncate`, or whenever every prompt fits one chunk.
    pub(crate) fn context_groups(
        &self,
        batch: &RenderBatch,
    ) -> Result<Vec<Vec<usize>>, PipelineError> {
        if batch.long_prompt == LongPrompt::Truncate {
            return Ok(vec![(0..batch.images.len()).collect()]);
        }
        let guided = uses_guidance(batch.guidance_scale);
        let count = |text: &str| self.chunk_count(text, batch.prompt_weighting);
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, img) in batch.images.iter().enumerate() {
            let mut chunks = count(&img.prompt)?;
            if let (true, Some(n)) = (guided, &img.negative_prompt) {
                chunks = chunks.max(count(n)?);
            }
            match groups.iter_mut().find(|(c, _)| *c == chunks) {
                Some((_, members)) => members.push(i),
                None => groups.push((chunks, vec![i])),
            }
        }
        Ok(groups.into_iter().map(|(_, members)| members).collect())
    }

    /// Chunks `text` takes in [`LongPrompt::Chunk`] (the most over the encoders' tokenizers).
    fn chunk_count(&self, text: &str, weighting: PromptWeighting) -> Result<usize, PipelineError> {
        let mut most = 1;
        for e in &self.encoders {
            let chunks = Self::chunks_of(e, text, LongPrompt::Chunk, weighting)?;
            most = most.max(chunks.ids.len());
        }
        Ok(most)
    }

    /// diffusers `encode_prompt` for a list of texts, without CFG handling (cut at 77 tokens).
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
        joined(hidden, pooled, truncated)
    }

    /// Context (and pooled) embeddings for the whole CFG batch, `[negatives ; positives]` (positives
    /// only without guidance). Each distinct text is encoded once, all of them in one call, so every
    /// row has the same context length (a zero row takes its shape too).
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
        let emb = self.encode_prompts_with(&unique, batch.long_prompt, batch.prompt_weighting)?;
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

/// The embeddings of the encoders' outputs: the context states side by side along the width (SDXL's
/// `[768 | 1280]`; SD's one encoder as is), the pooled projection when an encoder gave one.
fn joined(
    mut hidden: Vec<Tensor>,
    pooled: Option<Tensor>,
    truncated: Vec<bool>,
) -> Result<PromptEmbeddings, PipelineError> {
    let context = match hidden.len() {
        1 => hidden.pop().expect("one encoder"),
        _ => Tensor::cat(&hidden, 2).map_err(PipelineError::EncodePrompt)?,
    };
    Ok(PromptEmbeddings {
        context,
        pooled,
        truncated,
    })
}
