//! diffusers' building blocks, with diffusers' weight names: `ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`, `Attention`, GEGLU `FeedForward`, `BasicTransformerBlock` and `Transformer2DModel`
//! (linear-projection form). The UNet (`unet.rs`) and the VAE decoder (`vae.rs`) are assembled from
//! these. Defaults match `diffusers/models/{resnet,attention,attention_processor}.py`; the numbers that
//! differ between callers (groups, eps) are parameters.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};

use super::norm::{GroupNorm, group_norm};
use super::ops;

/// A 2-D convolution layer (weights in [`ops::conv_weight_dtype`]); the arithmetic is
/// [`ops::conv2d`]'s.
pub(crate) struct Conv {
    inner: Conv2d,
}

impl Conv {
    fn load(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        cfg: Conv2dConfig,
    ) -> Result<Self> {
        let dtype = ops::conv_weight_dtype(vb.device(), vb.dtype());
        let vb = vb.set_dtype(dtype);
        Ok(Self {
            inner: candle_nn::conv2d(c_in, c_out, k, cfg, vb)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.inner;
        ops::conv2d(x, c.weight(), c.bias(), *c.config())
    }

    /// `forward(x) + residual`.
    pub(crate) fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let c = &self.inner;
        ops::conv2d_add(x, c.weight(), c.bias(), *c.config(), Some(residual))
    }
}

/// A linear layer (PyTorch `Linear` weights, `(out, in)`); the arithmetic is [`ops::linear`]'s.
pub(crate) struct Linear(candle_nn::Linear);

impl Linear {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, self.0.weight(), self.0.bias())
    }
}

pub(crate) fn linear(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(c_in, c_out, vb).map(Linear)
}

pub(crate) fn linear_no_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(c_in, c_out, vb).map(Linear)
}

pub(crate) fn conv3x3(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Conv> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Conv::load(vb, c_in, c_out, 3, cfg)
}

pub(crate) fn conv1x1(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Conv> {
    Conv::load(vb, c_in, c_out, 1, Conv2dConfig::default())
}

/// `ResnetBlock2D` (time_embedding_norm "default", non-linearity SiLU).
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv,
    /// 1×1 conv when the channel count changes (diffusers `use_in_shortcut`).
    conv_shortcut: Option<Conv>,
    output_scale_factor: f64,
}

pub(crate) struct ResnetParams {
    pub c_in: usize,
    pub c_out: usize,
    /// Width of the (already SiLU-activated) time embedding; `None` in the VAE.
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn load(vb: VarBuilder, p: &ResnetParams) -> Result<Self> {
        let conv_shortcut = if p.c_in != p.c_out {
            Some(conv1x1(vb.pp("conv_shortcut"), p.c_in, p.c_out)?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(p.groups, p.c_in, p.eps, vb.pp("norm1"))?,
            conv1: conv3x3(vb.pp("conv1"), p.c_in, p.c_out, 1)?,
            time_emb_proj: p
                .temb
                .map(|t| linear(t, p.c_out, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(p.groups, p.c_out, p.eps, vb.pp("norm2"))?,
            conv2: conv3x3(vb.pp("conv2"), p.c_out, p.c_out, 1)?,
            conv_shortcut,
            output_scale_factor: p.output_scale_factor,
        })
    }

    /// `temb_act` is `silu(emb)`, computed once per UNet call rather than once per resnet.
    pub(crate) fn forward(&self, x: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb_act) {
            (Some(proj), Some(t)) => ops::add_channel_bias(&h, &proj.forward(t)?)?,
            _ => h,
        };
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = self
            .conv2
            .forward_add(&self.norm2.forward_silu(&h)?, &shortcut)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D(use_conv=True, padding=1)`: 3×3 stride-2 conv, key `downsamplers.0.conv`.
pub(crate) struct Downsample2D {
    conv: Conv,
}

impl Downsample2D {
    pub(crate) fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), channels, channels, 2)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour resize then 3×3 conv, key `upsamplers.0.conv`.
pub(crate) struct Upsample2D {
    conv: Conv,
}

impl Upsample2D {
    pub(crate) fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), channels, channels, 1)?,
        })
    }

    /// `size` is the skip connection's `(h, w)` when the latent is not a multiple of the total
    /// up-sampling factor (diffusers `forward_upsample_size`); otherwise ×2.
    pub(crate) fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

/// The text context of a UNet call or of a whole render, `(B, 77, cross_attention_dim)`.
///
/// A cross-attention layer's keys and values depend on the context alone, which is the same at
/// every denoising step. A context made with [`TextContext::cached`] keeps each layer's keys and
/// values from their first use, so a render computes them once instead of once per step (the
/// values are the same tensors, so results are bit-identical); [`TextContext::once`] computes them
/// per call, as diffusers does.
pub struct TextContext {
    hidden: Tensor,
    /// Keys and values by the id of the [`Attention`] layer that projected them.
    kv: Option<Mutex<HashMap<usize, (Tensor, Tensor)>>>,
}

impl TextContext {
    pub fn once(hidden: Tensor) -> Self {
        Self { hidden, kv: None }
    }

    pub fn cached(hidden: Tensor) -> Self {
        Self {
            hidden,
            kv: Some(Mutex::default()),
        }
    }

    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }

    /// How many layers' keys and values are kept (0 for [`TextContext::once`]).
    pub fn cached_layers(&self) -> usize {
        self.kv
            .as_ref()
            .map_or(0, |m| m.lock().unwrap_or_else(|p| p.into_inner()).len())
    }

    fn keys_values(
        &self,
        layer: usize,
        project: impl FnOnce(&Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let Some(kv) = &self.kv else {
            return project(&self.hidden);
        };
        if let Some(hit) = kv.lock().unwrap_or_else(|p| p.into_inner()).get(&layer) {
            return Ok(hit.clone());
        }
        let fresh = project(&self.hidden)?;
        kv.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer, fresh.clone());
        Ok(fresh)
    }
}

/// Ids of [`Attention`] layers, unique in the process, so a [`TextContext`] can tell them apart.
static NEXT_LAYER_ID: AtomicUsize = AtomicUsize::new(0);

/// diffusers `Attention` with the default processor: q/k/v projections, SDPA, output projection.
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    id: usize,
}

impl Attention {
    /// `kv_dim` is the context width for cross-attention (`cross_attention_dim`), else `query_dim`.
    pub(crate) fn load(
        vb: VarBuilder,
        query_dim: usize,
        kv_dim: usize,
        heads: usize,
        bias: bool,
    ) -> Result<Self> {
        let proj = |name: &str, i: usize| {
            if bias {
                linear(i, query_dim, vb.pp(name))
            } else {
                linear_no_bias(i, query_dim, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: proj("to_q", query_dim)?,
            to_k: proj("to_k", kv_dim)?,
            to_v: proj("to_v", kv_dim)?,
            to_out: linear(query_dim, query_dim, vb.pp("to_out.0"))?,
            heads,
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Same layer from pre-0.14 diffusers VAE checkpoints (`query`/`key`/`value`/`proj_attn`).
    pub(crate) fn load_legacy(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("query"))?,
            to_k: linear(dim, dim, vb.pp("key"))?,
            to_v: linear(dim, dim, vb.pp("value"))?,
            to_out: linear(dim, dim, vb.pp("proj_attn"))?,
            heads: 1,
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Self-attention over `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (k, v) = (self.to_k.forward(x)?, self.to_v.forward(x)?);
        self.attend(x, &k, &v)
    }

    /// Cross-attention from `x` to the text context (its keys and values cached there when it
    /// caches them).
    fn forward_cross(&self, x: &Tensor, context: &TextContext) -> Result<Tensor> {
        let (k, v) = context.keys_values(self.id, |ctx| {
            Ok((self.to_k.forward(ctx)?, self.to_v.forward(ctx)?))
        })?;
        self.attend(x, &k, &v)
    }

    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        self.to_out
            .forward(&ops::attention(&q, k, v, self.heads, None)?)
    }
}

/// `FeedForward(activation_fn="geglu")`: `Linear(dim, 2·inner)` → `hidden · gelu(gate)` → `Linear(inner, dim)`.
/// The GELU is the exact (erf) one; tanh-GELU differs by up to 4.7e-4 (docs/model-notes.md §1).
struct GegluFeedForward {
    proj: Linear,
    out: Linear,
}

impl GegluFeedForward {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim; // FeedForward(mult=4)
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&ops::geglu(&self.proj.forward(x)?)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm
/// (eps 1e-5, diffusers `norm_eps` default) with a residual.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: GegluFeedForward,
}

impl BasicTransformerBlock {
    fn load(vb: VarBuilder, dim: usize, heads: usize, context_dim: usize) -> Result<Self> {
        let ln = |name: &str| candle_nn::layer_norm(dim, 1e-5, vb.pp(name));
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::load(vb.pp("attn1"), dim, dim, heads, false)?,
            norm2: ln("norm2")?,
            attn2: Attention::load(vb.pp("attn2"), dim, context_dim, heads, false)?,
            norm3: ln("norm3")?,
            ff: GegluFeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &TextContext) -> Result<Tensor> {
        let x = ops::residual_add(&self.attn1.forward(&self.norm1.forward(x)?)?, x)?;
        let cross = self
            .attn2
            .forward_cross(&self.norm2.forward(&x)?, context)?;
        let x = ops::residual_add(&cross, &x)?;
        ops::residual_add(&self.ff.forward(&self.norm3.forward(&x)?)?, &x)
    }
}

/// `Transformer2DModel`: GroupNorm (eps 1e-6), tokens = pixels, `proj_in`, `depth` transformer
/// blocks, `proj_out`, residual.
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

/// The shape of one `Transformer2DModel`.
pub(crate) struct TransformerParams {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    /// `use_linear_projection`: `proj_in`/`proj_out` are `Linear` layers; otherwise 1×1 `Conv2d`s
    /// (SD 1.x), applied before the pixels are flattened to tokens and after they are folded back.
    /// A 1×1 convolution is the same per-pixel matrix product over channels, so both load into one
    /// linear layer (the `(out, in, 1, 1)` kernel viewed as `(out, in)`) applied to the tokens.
    pub linear_projection: bool,
}

/// A projection stored as `Linear` (`(out, in)`) or as a 1×1 `Conv2d` (`(out, in, 1, 1)`).
fn projection(vb: VarBuilder, c: usize, as_linear: bool) -> Result<Linear> {
    if as_linear {
        return linear(c, c, vb);
    }
    let weight = vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?;
    let bias = vb.get(c, "bias")?;
    Ok(Linear(candle_nn::Linear::new(weight, Some(bias))))
}

impl Transformer2D {
    pub(crate) fn load(vb: VarBuilder, p: &TransformerParams) -> Result<Self> {
        let blocks = (0..p.depth)
            .map(|i| {
                BasicTransformerBlock::load(
                    vb.pp(format!("transformer_blocks.{i}")),
                    p.channels,
                    p.heads,
                    p.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(p.groups, p.channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection(vb.pp("proj_in"), p.channels, p.linear_projection)?,
            blocks,
            proj_out: projection(vb.pp("proj_out"), p.channels, p.linear_projection)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &TextContext) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        ops::add_tokens_to_image(&self.proj_out.forward(&t)?, x)
    }
}
