//! CLIP text encoders (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`).
//!
//! SDXL conditions on the **penultimate** hidden states of both encoders (`hidden_states[-2]`, before
//! the last layer and without the final layer norm), and on encoder 2's pooled projection
//! (`text_projection(final_layer_norm(last)[eos])`). Encoder 1's last layer is therefore never run.
//! SD 1.x/2.x condition on the one encoder's `last_hidden_state`, after the final layer norm
//! (`StableDiffusionPipeline.encode_prompt` without `clip_skip`; SD 2.x's "penultimate layer of
//! OpenCLIP ViT-H" is that, because its converted encoder was saved with the last layer removed).
//! Weights are read with or without the `text_model.` prefix: hub checkpoints written before
//! transformers 5 carry it on `CLIPTextModel`, newer ones do not. Tokenization lives in `tokenizer.rs`.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::blocks::{Linear, linear, linear_no_bias};
use super::config::{ClipActivation, ClipConfig};
use super::ops::attention;

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = match self.activation {
            // transformers QuickGELUActivation: x * sigmoid(1.702 x).
            ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            ClipActivation::Gelu => h.gelu_erf()?,
        };
        self.fc2.forward(&h)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    mlp: Mlp,
    heads: usize,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let d = c.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: linear(d, d, attn.pp("q_proj"))?,
            k_proj: linear(d, d, attn.pp("k_proj"))?,
            v_proj: linear(d, d, attn.pp("v_proj"))?,
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: Mlp {
                fc1: linear(d, c.intermediate_size, vb.pp("mlp.fc1"))?,
                fc2: linear(c.intermediate_size, d, vb.pp("mlp.fc2"))?,
                activation: c.activation,
            },
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = (
            self.q_proj.forward(&h)?,
            self.k_proj.forward(&h)?,
            self.v_proj.forward(&h)?,
        );
        let a = self
            .out_proj
            .forward(&attention(&q, &k, &v, self.heads, Some(causal_mask))?)?;
        let x = (x + a)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        x + h
    }
}

/// Which of an encoder's outputs a pipeline conditions on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipOutput {
    /// `hidden_states[-2]` (SDXL's `text_encoder`).
    Penultimate,
    /// `hidden_states[-2]` and the pooled projection (SDXL's `text_encoder_2`).
    PenultimateAndPooled,
    /// `final_layer_norm(last hidden state)` (SD 1.x/2.x).
    LastHidden,
}

/// What a pipeline takes from one encoder.
pub struct TextEncoding {
    /// `(B, L, hidden)`: the states [`ClipOutput`] names.
    pub hidden: Tensor,
    /// `text_projection(final_layer_norm(last_hidden)[eos])`: `(B, projection_dim)`, when asked for.
    pub pooled: Option<Tensor>,
}

pub struct ClipTextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    text_projection: Option<Linear>,
    output: ClipOutput,
    eos_token_id: u32,
    device: Device,
}

impl ClipTextEncoder {
    /// Loads what `output` needs: the final layer norm for pooling or the last hidden state, and
    /// `text_projection` for pooling.
    pub fn load(vb: VarBuilder, c: &ClipConfig, output: ClipOutput) -> Result<Self> {
        let root = vb.clone();
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let d = c.hidden_size;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(vb.pp(format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = (output != ClipOutput::Penultimate)
            .then(|| candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("final_layer_norm")))
            .transpose()?;
        let text_projection = (output == ClipOutput::PenultimateAndPooled)
            .then(|| {
                let proj_dim = c.projection_dim.unwrap_or(d);
                linear_no_bias(d, proj_dim, root.pp("text_projection"))
            })
            .transpose()?;
        Ok(Self {
            token_embedding: candle_nn::embedding(
                c.vocab_size,
                d,
                vb.pp("embeddings.token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                c.max_position_embeddings,
                d,
                vb.pp("embeddings.position_embedding"),
            )?,
            layers,
            final_layer_norm,
            text_projection,
            output,
            eos_token_id: c.eos_token_id,
            device: vb.device().clone(),
        })
    }

    /// Encodes a batch of token-id rows (all the same length).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<TextEncoding> {
        let b = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (b, len), &self.device)?;
        let positions = Tensor::arange(0u32, len as u32, &self.device)?;
        let mut x = self
            .token_embedding
            .forward(&input)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(len, &self.device)?;
        let n = self.layers.len();
        let mut penultimate = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n && self.output != ClipOutput::LastHidden {
                penultimate = Some(x.clone());
                if self.output == ClipOutput::Penultimate {
                    break;
                }
            }
            x = layer.forward(&x, &mask)?;
        }
        let last = match &self.final_layer_norm {
            Some(norm) if self.output != ClipOutput::Penultimate => Some(norm.forward(&x)?),
            _ => None,
        };
        let pooled = match (&last, &self.text_projection) {
            (Some(last), Some(proj)) => {
                let rows = ids
                    .iter()
                    .enumerate()
                    .map(|(i, row)| last.i((i, self.pool_position(row)))?.unsqueeze(0))
                    .collect::<Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::cat(&rows, 0)?)?)
            }
            _ => None,
        };
        let hidden = match self.output {
            ClipOutput::LastHidden => last.unwrap_or(x),
            // A one-layer encoder's penultimate state is its input embedding.
            _ => penultimate.unwrap_or(x),
        };
        Ok(TextEncoding { hidden, pooled })
    }

    /// transformers `CLIPTextTransformer`: configs with the legacy `eos_token_id == 2` pool at
    /// `argmax(input_ids)` (EOS has the highest id in CLIP's vocab); others at the first EOS.
    fn pool_position(&self, row: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            // First maximum, as torch.argmax returns.
            let max = row.iter().copied().max().unwrap_or(0);
            row.iter().position(|&t| t == max).unwrap_or(0)
        } else {
            row.iter()
                .position(|&t| t == self.eos_token_id)
                .unwrap_or(row.len().saturating_sub(1))
        }
    }
}

/// Additive causal mask `(1, 1, L, L)`: `-inf` above the diagonal.
fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (1, 1, len, len), device)?.to_dtype(DType::F32)
}
