//! The UNet (`UNet2DConditionModel`), built from `UNetConfig` so that SD 1.x's four levels and
//! convolution projections, SD 2.x's per-level heads, SDXL's symmetric blocks, SSD-1B's asymmetric up
//! blocks and resnet-only mid block, and Vega's per-layer depths all come from the same code.
//!
//! One call predicts the noise for a whole CFG batch at one timestep. The SDXL family's conditioning
//! that does not change across denoising steps (pooled text + micro-conditioning time ids →
//! `add_embedding`) is computed once per batch by [`UNet::conditioning`]; [`UNet::forward`] adds the
//! timestep part. SD 1.x/2.x UNets have no added conditioning.
//! Sinusoids are computed on the host in f32 as diffusers' `get_timestep_embedding` does (in f16 they
//! are off by up to 0.27, docs/model-notes.md §1) and only then cast to the model dtype.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{Linear, linear};

pub use super::blocks::TextContext;
use super::blocks::{
    Conv, Downsample2D, ResnetBlock2D, ResnetParams, Transformer2D, TransformerParams, Upsample2D,
    conv3x3,
};
use super::config::{BlockKind, LayerConfig, MidBlock, TextTimeConfig, UNetConfig};

/// diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift)` with
/// `max_period = 10000`, in f32 like PyTorch. Returns `values.len() × dim` row-major.
pub(crate) fn sinusoids(values: &[f32], dim: usize, flip_sin_to_cos: bool, shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_period * i as f32 / (half as f32 - shift)).exp())
        .collect();
    let mut out = Vec::with_capacity(values.len() * dim);
    for &t in values {
        let args = freqs.iter().map(|f| t * f);
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// `TimestepEmbedding`: linear → SiLU → linear.
struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(c_in, c_out, vb.pp("linear_1"))?,
            linear_2: linear(c_out, c_out, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// One resnet with its optional transformer: a layer of a down or up block.
struct Layer {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2D>,
}

impl Layer {
    fn forward(&self, x: &Tensor, temb: &Tensor, context: &TextContext) -> Result<Tensor> {
        let x = self.resnet.forward(x, Some(temb))?;
        match &self.attention {
            Some(a) => a.forward(&x, context),
            None => Ok(x),
        }
    }
}

struct DownBlock {
    layers: Vec<Layer>,
    downsample: Option<Downsample2D>,
}

struct UpBlock {
    layers: Vec<Layer>,
    upsample: Option<Upsample2D>,
}

struct MidCrossAttn {
    resnet_1: ResnetBlock2D,
    attention: Transformer2D,
    resnet_2: ResnetBlock2D,
}

enum Mid {
    CrossAttn(Box<MidCrossAttn>),
    ResnetOnly(Box<ResnetBlock2D>),
    None,
}

/// A resnet with the norm settings and time-embedding width every UNet resnet shares.
fn resnet(
    vb: VarBuilder,
    c: &UNetConfig,
    c_in: usize,
    c_out: usize,
    output_scale_factor: f64,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::load(
        vb,
        &ResnetParams {
            c_in,
            c_out,
            temb: Some(c.time_embed_dim),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale_factor,
        },
    )
}

/// A `Transformer2DModel` attending to the text context (`cross_attention_dim` wide).
fn transformer(
    vb: VarBuilder,
    c: &UNetConfig,
    channels: usize,
    heads: usize,
    depth: usize,
) -> Result<Transformer2D> {
    Transformer2D::load(
        vb,
        &TransformerParams {
            channels,
            heads,
            depth,
            context_dim: c.cross_attention_dim,
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
        },
    )
}

/// A down or up block's layers from the config's channel plan: `resnets.{j}`, and in a
/// cross-attention block `attentions.{j}` after it. Down and up blocks differ only in the plan.
fn load_layers(
    vb: &VarBuilder,
    c: &UNetConfig,
    kind: BlockKind,
    heads: usize,
    plan: impl Iterator<Item = LayerConfig>,
) -> Result<Vec<Layer>> {
    plan.enumerate()
        .map(|(j, layer)| {
            Ok(Layer {
                resnet: resnet(
                    vb.pp(format!("resnets.{j}")),
                    c,
                    layer.c_in,
                    layer.c_out,
                    1.0,
                )?,
                attention: match kind {
                    BlockKind::CrossAttn => Some(transformer(
                        vb.pp(format!("attentions.{j}")),
                        c,
                        layer.c_out,
                        heads,
                        layer.depth,
                    )?),
                    BlockKind::Plain => None,
                },
            })
        })
        .collect()
}

/// Step-invariant conditioning for one batch of `rows` UNet inputs: SDXL's
/// `add_embedding([pooled ; sinusoid(time_ids)])`, nothing for SD 1.x/2.x.
pub struct Conditioning {
    aug_emb: Option<Tensor>,
    rows: usize,
}

/// What the SDXL family's added conditioning is made from, per UNet input row.
pub struct TextTimeInputs<'a> {
    /// `(rows, pooled_dim)`: encoder 2's pooled projection.
    pub pooled: &'a Tensor,
    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` per row.
    pub time_ids: &'a [[f64; 6]],
}

pub struct UNet {
    config: UNetConfig,
    conv_in: Conv,
    time_embedding: Mlp,
    add_embedding: Option<(Mlp, TextTimeConfig)>,
    down: Vec<DownBlock>,
    mid: Mid,
    up: Vec<UpBlock>,
    conv_norm_out: super::norm::GroupNorm,
    conv_out: Conv,
    dtype: DType,
    device: Device,
}

impl UNet {
    pub fn load(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let temb = c.time_embed_dim;

        let mut down = Vec::new();
        for (i, b) in c.down.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let layers = load_layers(&vb, c, b.kind, b.heads, b.layers())?;
            let downsample = b
                .downsample
                .then(|| Downsample2D::load(vb.pp("downsamplers.0"), b.out_channels))
                .transpose()?;
            down.push(DownBlock { layers, downsample });
        }

        let mid_vb = vb.pp("mid_block");
        let mid_ch = c.mid_channels();
        let scale = c.mid_block_scale_factor;
        let mid = match c.mid {
            MidBlock::CrossAttn { depth } => Mid::CrossAttn(Box::new(MidCrossAttn {
                resnet_1: resnet(mid_vb.pp("resnets.0"), c, mid_ch, mid_ch, scale)?,
                attention: transformer(mid_vb.pp("attentions.0"), c, mid_ch, c.mid_heads, depth)?,
                resnet_2: resnet(mid_vb.pp("resnets.1"), c, mid_ch, mid_ch, scale)?,
            })),
            MidBlock::ResnetOnly => Mid::ResnetOnly(Box::new(resnet(
                mid_vb.pp("resnets.0"),
                c,
                mid_ch,
                mid_ch,
                scale,
            )?)),
            MidBlock::None => Mid::None,
        };

        let mut up = Vec::new();
        for (i, b) in c.up.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let layers = load_layers(&vb, c, b.kind, b.heads, b.layers())?;
            let upsample = b
                .upsample
                .then(|| Upsample2D::load(vb.pp("upsamplers.0"), b.out_channels))
                .transpose()?;
            up.push(UpBlock { layers, upsample });
        }

        let c0 = c.block_out_channels[0];
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), c.in_channels, c0, 1)?,
            time_embedding: Mlp::load(vb.pp("time_embedding"), c0, temb)?,
            add_embedding: c
                .text_time
                .map(|tt| {
                    Mlp::load(
                        vb.pp("add_embedding"),
                        tt.projection_class_embeddings_input_dim,
                        temb,
                    )
                    .map(|mlp| (mlp, tt))
                })
                .transpose()?,
            down,
            mid,
            up,
            conv_norm_out: super::norm::group_norm(
                c.norm_num_groups,
                c0,
                c.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv3x3(vb.pp("conv_out"), c0, c.out_channels, 1)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `time_embedding(time_proj(t))` for each timestep: `(len, time_embed_dim)`.
    pub fn time_embedding(&self, timesteps: &[f64]) -> Result<Tensor> {
        let c = &self.config;
        let dim = c.block_out_channels[0];
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let emb = sinusoids(&t, dim, c.flip_sin_to_cos, c.freq_shift as f32);
        let emb = Tensor::from_vec(emb, (t.len(), dim), &self.device)?.to_dtype(self.dtype)?;
        self.time_embedding.forward(&emb)
    }

    /// The step-invariant conditioning of `rows` UNet inputs. SDXL-family UNets need `text_time`
    /// (one pooled row and one time-id row per input); SD 1.x/2.x UNets take none and refuse one.
    pub fn conditioning(
        &self,
        rows: usize,
        text_time: Option<TextTimeInputs<'_>>,
    ) -> Result<Conditioning> {
        let aug_emb = match (&self.add_embedding, text_time) {
            (None, None) => None,
            (Some((mlp, tt)), Some(inputs)) => Some(self.text_time(mlp, tt, rows, inputs)?),
            (Some(_), None) => {
                candle_core::bail!(
                    "this UNet needs `text_time` conditioning (pooled text, time ids)"
                )
            }
            (None, Some(_)) => candle_core::bail!(
                "unet/config.json has no `addition_embed_type`: this UNet takes no pooled text"
            ),
        };
        Ok(Conditioning { aug_emb, rows })
    }

    fn text_time(
        &self,
        mlp: &Mlp,
        tt: &TextTimeConfig,
        rows: usize,
        TextTimeInputs { pooled, time_ids }: TextTimeInputs<'_>,
    ) -> Result<Tensor> {
        let c = &self.config;
        if time_ids.len() != rows || pooled.dim(0)? != rows {
            candle_core::bail!(
                "text_time conditioning for {rows} rows got {} pooled rows and {} time-id rows",
                pooled.dim(0)?,
                time_ids.len()
            );
        }
        let flat: Vec<f32> = time_ids.iter().flatten().map(|&v| v as f32).collect();
        // add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift).
        let emb = sinusoids(
            &flat,
            tt.addition_time_embed_dim,
            c.flip_sin_to_cos,
            c.freq_shift as f32,
        );
        let width = 6 * tt.addition_time_embed_dim;
        let time =
            Tensor::from_vec(emb, (time_ids.len(), width), &self.device)?.to_dtype(self.dtype)?;
        let pooled = pooled.to_dtype(self.dtype)?;
        let expected = tt.projection_class_embeddings_input_dim;
        let got = pooled.dim(1)? + width;
        if got != expected {
            candle_core::bail!(
                "unet/config.json projection_class_embeddings_input_dim is {expected} but the pooled text \
                 embedding ({}) plus 6 time ids × {} give {got}",
                pooled.dim(1)?,
                tt.addition_time_embed_dim
            );
        }
        let input = Tensor::cat(&[&pooled, &time], 1)?;
        mlp.forward(&input)
    }

    /// Raw `add_embedding` output (`None` without `text_time`), for parity tests.
    pub fn conditioning_tensor(cond: &Conditioning) -> Option<&Tensor> {
        cond.aug_emb.as_ref()
    }

    /// Predicts the noise: `sample` `(B, 4, h, w)` at `timestep`, `context` `(B, 77, cross_dim)`.
    /// Every call projects the context again; a render uses [`UNet::text_context`] and
    /// [`UNet::forward_with`] instead.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        let context = TextContext::once(context.to_dtype(self.dtype)?);
        self.forward_with(sample, timestep, &context, cond)
    }

    /// The text context of a render, in the UNet's dtype, keeping every cross-attention layer's
    /// keys and values from the first step for the later ones.
    pub fn text_context(&self, context: &Tensor) -> Result<TextContext> {
        Ok(TextContext::cached(context.to_dtype(self.dtype)?))
    }

    /// [`UNet::forward`] with a context made by [`UNet::text_context`].
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &TextContext,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        let sample = sample.to_dtype(self.dtype)?;
        let rows = sample.dim(0)?;
        if rows != cond.rows {
            candle_core::bail!(
                "conditioning made for {} rows, sample has {rows}",
                cond.rows
            );
        }
        let time = self.time_embedding(&[timestep])?;
        // One embedding row per input: the resnets add it per batch entry.
        let emb = match &cond.aug_emb {
            Some(aug) => time.broadcast_add(aug)?,
            None => time.broadcast_as((rows, time.dim(1)?))?.contiguous()?,
        };
        // Every resnet applies SiLU to the embedding first; do it once.
        let temb = emb.silu()?;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for layer in &block.layers {
                x = layer.forward(&x, &temb, context)?;
                skips.push(x.clone());
            }
            if let Some(d) = &block.downsample {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }

        x = match &self.mid {
            Mid::CrossAttn(m) => {
                let h = m.resnet_1.forward(&x, Some(&temb))?;
                let h = m.attention.forward(&h, context)?;
                m.resnet_2.forward(&h, Some(&temb))?
            }
            Mid::ResnetOnly(r) => r.forward(&x, Some(&temb))?,
            Mid::None => x,
        };

        for block in &self.up {
            for layer in &block.layers {
                // Invariant: the down path pushed exactly one skip per up-block resnet.
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet skip stack empty".into()))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = layer.forward(&x, &temb, context)?;
            }
            if let Some(u) = &block.upsample {
                // Up-sample to the next skip's size (equal to ×2 unless the latent size is odd somewhere).
                let size = match skips.last() {
                    Some(s) => {
                        let (_, _, h, w) = s.dims4()?;
                        Some((h, w))
                    }
                    None => None,
                };
                x = u.forward(&x, size)?;
            }
        }

        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoid_matches_diffusers_get_timestep_embedding() {
        // python: get_timestep_embedding(torch.tensor([0., 1.]), 4, flip_sin_to_cos=True, downscale_freq_shift=0)
        // -> [[1, 1, 0, 0], [0.5403023, 0.99995, 0.84147096, 0.00999983]]
        let e = sinusoids(&[0.0, 1.0], 4, true, 0.0);
        let want = [
            1.0,
            1.0,
            0.0,
            0.0,
            0.540_302_3,
            0.999_95,
            0.841_470_96,
            0.009_999_833,
        ];
        for (a, b) in e.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{e:?}");
        }
    }
}
