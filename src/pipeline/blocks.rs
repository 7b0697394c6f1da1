//! diffusers' building blocks, with diffusers' weight names: `ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`, `Attention`, GEGLU `FeedForward`, `BasicTransformerBlock` and `Transformer2DModel`
//! (linear-projection form). The UNet (`unet.rs`) and the VAE decoder (`vae.rs`) are assembled from
//! these. Defaults match `diffusers/models/{resnet,attention,attention_processor}.py`; the numbers that
//! differ between callers (groups, eps) are parameters.

use candle_core::{DType, Module, Result, Storage, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};

use super::attention::attention;
use super::cpu_conv::SameConv;
use super::cpu_ops;
use super::norm::{GroupNorm, group_norm};

/// A 2-D convolution. candle's CPU backend has no bf16 convolution kernel, so on CPU in bf16 the
/// weights are kept in f32 and inputs are widened for the convolution and narrowed after it (bf16
/// activations, f32 convolution arithmetic, as GPU kernels accumulate).
pub(crate) struct Conv {
    inner: Conv2d,
    widen: bool,
}

impl Conv {
    fn load(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        cfg: Conv2dConfig,
    ) -> Result<Self> {
        let widen = vb.device().is_cpu() && vb.dtype() == DType::BF16;
        let vb = if widen { vb.set_dtype(DType::F32) } else { vb };
        Ok(Self {
            inner: candle_nn::conv2d(c_in, c_out, k, cfg, vb)?,
            widen,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.widen {
            let dtype = x.dtype();
            self.forward_f(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
        } else {
            self.forward_f(x)
        }
    }

    fn forward_f(&self, x: &Tensor) -> Result<Tensor> {
        match self.same_conv_on_cpu(x)? {
            Some(shape) => self.forward_banded(x, shape),
            None => self.inner.forward(x),
        }
    }

    /// The shape, when this is a k×k (k > 1), stride-1, "same"-padded f32 convolution on CPU: those
    /// run as banded Winograd or im2col + GEMM ([`SameConv`]) instead of candle's kernel.
    fn same_conv_on_cpu(&self, x: &Tensor) -> Result<Option<SameConv>> {
        let cfg = self.inner.config();
        let weight = self.inner.weight();
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        let (b, _, h, w) = x.dims4()?;
        let eligible = x.device().is_cpu()
            && x.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && kh > 1
            && kh == kw
            && cfg.stride == 1
            && cfg.dilation == 1
            && cfg.groups == 1
            && 2 * cfg.padding == kh - 1;
        Ok(eligible.then_some(SameConv {
            b,
            c_in,
            h,
            w,
            c_out,
            k: kh,
        }))
    }

    fn forward_banded(&self, x: &Tensor, shape: SameConv) -> Result<Tensor> {
        let out = with_cpu_f32(x, |xs| {
            with_cpu_f32(self.inner.weight(), |ws| match self.inner.bias() {
                Some(bias) => with_cpu_f32(bias, |bs| Ok(shape.forward(xs, ws, Some(bs)))),
                None => Ok(shape.forward(xs, ws, None)),
            })
        })?;
        Tensor::from_vec(out, (shape.b, shape.c_out, shape.h, shape.w), x.device())
    }
}

/// Runs `f` on a contiguous f32 CPU tensor's elements, without copying them.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("with_cpu_f32: not a CPU tensor");
    };
    let all = cpu.as_slice::<f32>()?;
    f(&all[layout.start_offset()..][..layout.shape().elem_count()])
}

/// A linear layer (PyTorch `Linear` weights, `(out, in)`). On CPU in f32 it runs as one GEMM on top of
/// the broadcast bias ([`cpu_ops::linear`]); elsewhere as candle-nn's.
pub(crate) struct Linear(candle_nn::Linear);

impl Linear {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.0.weight();
        let fast = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
        if !fast {
            return self.0.forward(x);
        }
        let (n, k) = w.dims2()?;
        let dims = x.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("Linear: input {:?}, weight ({n}, {k})", x.shape());
        }
        let rows = x.elem_count() / k.max(1);
        let out = with_cpu_f32(x, |xs| {
            with_cpu_f32(w, |ws| match self.0.bias() {
                Some(b) => with_cpu_f32(b, |bs| Ok(cpu_ops::linear(xs, rows, k, ws, Some(bs), n))),
                None => Ok(cpu_ops::linear(xs, rows, k, ws, None, n)),
            })
        })?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = n;
        Tensor::from_vec(out, shape, x.device())
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
            (Some(proj), Some(t)) => {
                h.broadcast_add(&proj.forward(t)?.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
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

/// diffusers `Attention` with the default processor: q/k/v projections, SDPA, output projection.
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
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
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, None)?)
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
        let h = self.proj.forward(x)?;
        let width = h.dims().last().copied().unwrap_or(0);
        if h.device().is_cpu() && h.dtype() == DType::F32 && width > 0 && width % 2 == 0 {
            let dims = h.dims();
            let inner = width / 2;
            let out = with_cpu_f32(&h, |hs| Ok(cpu_ops::geglu(hs, inner)))?;
            let mut shape = dims.to_vec();
            *shape
                .last_mut()
                .expect("a linear layer's output has a last dimension") = inner;
            return self.out.forward(&Tensor::from_vec(out, shape, h.device())?);
        }
        let halves = h.chunk(2, candle_core::D::Minus1)?;
        self.out.forward(&(&halves[0] * halves[1].gelu_erf()?)?)
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

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `Transformer2DModel` with `use_linear_projection=True`: GroupNorm (eps 1e-6), tokens = pixels,
/// `proj_in`, `depth` transformer blocks, `proj_out`, residual.
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2D {
    pub(crate) fn load(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        groups: usize,
    ) -> Result<Self> {
        let blocks = (0..depth)
            .map(|i| {
                BasicTransformerBlock::load(
                    vb.pp(format!("transformer_blocks.{i}")),
                    channels,
                    heads,
                    context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: linear(channels, channels, vb.pp("proj_in"))?,
            blocks,
            proj_out: linear(channels, channels, vb.pp("proj_out"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
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
        let t = self.proj_out.forward(&t)?;
        let t = t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        t + x
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn max_element(t: &Tensor) -> f32 {
        t.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_element(&(a - b).unwrap().abs().unwrap())
    }

    #[test]
    fn banded_convolution_matches_candles_kernel_and_ignores_the_batch() {
        let dev = Device::Cpu;
        // Odd sizes and more channels out than in: every border case of the row copies.
        // (8, 16, 70, 33) runs as four bands of rows, the last one shorter; the 5×5 case has no bias.
        for (c_in, c_out, h, w, k, bias) in [
            (3, 5, 7, 6, 3, true),
            (4, 2, 1, 9, 3, true),
            (2, 3, 5, 1, 3, true),
            (8, 16, 70, 33, 3, true),
            (3, 4, 9, 8, 5, false),
        ] {
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev).unwrap();
            let bias = bias.then(|| Tensor::randn(0f32, 1.0, c_out, &dev).unwrap());
            let cfg = Conv2dConfig {
                padding: (k - 1) / 2,
                ..Default::default()
            };
            // Σ|w|·|x| + |b| per output: the scale of each output's rounding error.
            let magnitude = Conv2d::new(
                weight.abs().unwrap(),
                bias.as_ref().map(|b| b.abs().unwrap()),
                cfg,
            );
            let conv = Conv {
                inner: Conv2d::new(weight, bias, cfg),
                widen: false,
            };
            let x = Tensor::randn(0f32, 1.0, (3, c_in, h, w), &dev).unwrap();
            assert!(conv.same_conv_on_cpu(&x).unwrap().is_some());
            let ours = conv.forward(&x).unwrap();
            let candle = conv.inner.forward(&x).unwrap();
            // Both are f32 sums of n = c_in·k² + 1 terms in different orders (different GEMM
            // blockings): each is within γₙ·Σ|terms| of the exact value, γₙ ≈ n·u with u = ε/2
            // (Higham, Accuracy and Stability of Numerical Algorithms, §3.1), so they differ by at
            // most 2γₙ·Σ|terms| (2.2γₙ: the computed magnitude is itself rounded). A misplaced
            // element is off by O(Σ|terms|), some 10⁴ times more.
            let gamma = (c_in * k * k + 1) as f64 * f32::EPSILON as f64 / 2.0;
            let allowed = (magnitude.forward(&x.abs().unwrap()).unwrap() * (2.2 * gamma)).unwrap();
            let excess =
                max_element(&((&ours - &candle).unwrap().abs().unwrap() - allowed).unwrap());
            assert!(
                excess <= 0.0,
                "{c_in}->{c_out} {h}x{w} k{k}: {} over the rounding bound by {excess}",
                max_diff(&ours, &candle)
            );
            for i in 0..3 {
                let alone = conv.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(max_diff(&ours.narrow(0, i, 1).unwrap(), &alone), 0.0);
            }
        }
    }

    #[test]
    fn winograd_convolution_is_within_its_rounding_bound_and_ignores_the_batch() {
        let dev = Device::Cpu;
        // Odd and even sizes (partial tiles at the right and bottom), one row, one column, and
        // (32, 36, 70, 19) in several bands of tile rows, the last one shorter.
        for (c_in, c_out, h, w, bias) in [
            (32, 32, 8, 8, true),
            (32, 40, 9, 7, true),
            (36, 32, 1, 5, false),
            (32, 33, 6, 1, true),
            (32, 36, 70, 19, true),
        ] {
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev).unwrap();
            let bias = bias.then(|| Tensor::randn(0f32, 1.0, c_out, &dev).unwrap());
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let conv = Conv {
                inner: Conv2d::new(weight.clone(), bias.clone(), cfg),
                widen: false,
            };
            let x = Tensor::randn(0f32, 1.0, (3, c_in, h, w), &dev).unwrap();
            let shape = conv.same_conv_on_cpu(&x).unwrap().unwrap();
            assert!(shape.uses_winograd());
            let ours = conv.forward(&x).unwrap();
            let f64_conv = Conv2d::new(
                weight.to_dtype(DType::F64).unwrap(),
                bias.as_ref().map(|b| b.to_dtype(DType::F64).unwrap()),
                cfg,
            );
            let exact = f64_conv
                .forward(&x.to_dtype(DType::F64).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            // Every quantity Winograd F(2×2, 3×3) computes for an output is a signed sum of
            // products g·d of one channel's taps and the 16 inputs of its tile: |G g Gᵀ| ≤ Σ|g|
            // (G's products are ≤ 1), |Bᵀ d B| ≤ Σ|d| (B's entries are 0, ±1), and each output adds
            // 9 of the 16 products (Aᵀ, A: three ±1 per row). So S = 9·Σ_c Σ|g_c|·Σ_tile|d_c|
            // (+ |bias|) bounds every intermediate, and the result is within γₙ·S of the exact
            // value with n = c_in + 16 rounding steps at most (weights 4, input 4, GEMM c_in,
            // output 4, bias 1; Higham §3.1); 2× for slack. A misplaced element is off by
            // O(Σ|g·d|), about S/144, over 10³ times more than the bound.
            let gamma = (c_in + 16) as f64 * f32::EPSILON as f64 / 2.0;
            let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
            let tap_sums = weight.abs().unwrap().sum_keepdim((2, 3)).unwrap();
            let tile_kernel = (tap_sums.broadcast_as((c_out, c_in, 4, 4)).unwrap() * 9.0)
                .unwrap()
                .contiguous()
                .unwrap();
            let padded = x
                .abs()
                .unwrap()
                .pad_with_zeros(2, 0, 2 * th - h)
                .unwrap()
                .pad_with_zeros(3, 0, 2 * tw - w)
                .unwrap();
            let per_tile = padded.conv2d(&tile_kernel, 1, 2, 1, 1).unwrap();
            assert_eq!(per_tile.dims4().unwrap(), (3, c_out, th, tw));
            let mut magnitude = per_tile
                .upsample_nearest2d(2 * th, 2 * tw)
                .unwrap()
                .narrow(2, 0, h)
                .unwrap()
                .narrow(3, 0, w)
                .unwrap();
            if let Some(bias) = &bias {
                magnitude = magnitude
                    .broadcast_add(&bias.abs().unwrap().reshape((1, c_out, 1, 1)).unwrap())
                    .unwrap();
            }
            let allowed = (magnitude * (2.0 * gamma)).unwrap();
            let excess =
                max_element(&((&ours - &exact).unwrap().abs().unwrap() - allowed).unwrap());
            assert!(
                excess <= 0.0,
                "{c_in}->{c_out} {h}x{w}: {} over the rounding bound by {excess}",
                max_diff(&ours, &exact)
            );
            for i in 0..3 {
                let alone = conv.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(max_diff(&ours.narrow(0, i, 1).unwrap(), &alone), 0.0);
            }
        }
    }
}
