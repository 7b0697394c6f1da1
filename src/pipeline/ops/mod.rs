//! The model's hot ops, one function each: convolution (+ residual), linear (+ bias), group norm
//! (+ SiLU), GEGLU, attention and the adds between them (a per-channel bias, residuals). The model
//! code (`unet`, `blocks`, `vae`, `clip`) calls only these; each picks its kernel by device, dtype
//! and switch here, in one place:
//!
//! | op | CPU, f32 | CUDA, switch on ([`switch`]) | everything else |
//! |---|---|---|---|
//! | [`conv2d`], [`conv2d_add`] | stride-1 "same" k×k: banded im2col or Winograd ([`cpu::conv`]) | `conv`: the project's cuDNN call, bias and residual fused ([`cuda`]); `bias`: candle's convolution, then the row bias kernel | candle's kernel (cuDNN with the `cudnn` feature), bias broadcast-added |
//! | [`linear`] | one GEMM onto the broadcast bias (at least 65 rows, so a row's bits never depend on the batch) | `bias`: candle's GEMM, then the column bias kernel | candle-nn's `Linear` |
//! | [`group_norm`] | fused statistics + normalize (+ SiLU) | `groupnorm`: two passes, f32 statistics, many blocks per group | candle-nn's `GroupNorm` (+ `silu`) |
//! | [`geglu`] | one pass, exact erf | `geglu`: one pass, exact erf | chunk, `gelu_erf`, multiply |
//! | [`attention`] | blocked GEMM + softmax tasks, unmasked | `attn`: flash-attn (feature `flash-attn`) for its head dims, half dtypes, no mask | the textbook form, f32 softmax |
//! | [`add_channel_bias`] | candle's broadcast add | `bias`: the row bias kernel | candle's broadcast add |
//! | [`residual_add`], [`add_tokens_to_image`] | candle's add | `residual`: contiguous add; tiled transpose-add | candle's add (strided for the tokens) |
//!
//! Every CUDA switch is off by default ([`switch`]): then the CUDA path is exactly candle's, as
//! before the switches existed. With profiling on ([`profile`]) every op is timed by category and
//! pipeline phase. The CPU kernels are in [`cpu`], the CUDA ones in [`cuda`]; [`check`] compares
//! each CUDA kernel with candle's path on a device (`t2i bench --check-ops`). Every kernel here
//! computes each image of a batch independently of the others.

mod attention;
pub mod check;
mod cpu;
mod cuda;
pub mod profile;
pub mod switch;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Conv2dConfig;

use cpu::SameConv;
use profile::{Op, span};
use switch::Kernel;

/// Whether `t` is on a CUDA device with kernel `k` switched on.
fn takes(k: Kernel, t: &Tensor) -> bool {
    t.device().is_cuda() && switch::on(k)
}

/// The dtype a convolution's weights are loaded in for compute dtype `dtype` on `device`. candle's
/// CPU backend has no bf16 convolution kernel, so on CPU in bf16 the weights stay f32 and
/// [`conv2d`] widens the input (bf16 activations, f32 convolution arithmetic, as GPU kernels
/// accumulate).
pub(crate) fn conv_weight_dtype(device: &Device, dtype: DType) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// A 2-D convolution of `x` `(B, C_in, H, W)` with `weight` `(C_out, C_in, k, k)` and an optional
/// bias. An input narrower than the weights (see [`conv_weight_dtype`]) is widened for the
/// convolution and the result narrowed back.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: Conv2dConfig,
) -> Result<Tensor> {
    conv2d_add(x, weight, bias, cfg, None)
}

/// [`conv2d`] plus `residual` (the output's shape): a resnet's second convolution and its
/// shortcut, one call where cuDNN fuses them.
pub(crate) fn conv2d_add(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: Conv2dConfig,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let _span = span(Op::Conv2d, x.device());
    if takes(Kernel::Conv, x) && cuda::conv_fits(x, weight, bias, &cfg, residual) {
        return cuda::conv2d(x, weight, bias, cfg, residual);
    }
    let y = if x.dtype() != weight.dtype() {
        let dtype = x.dtype();
        let wide = x.to_dtype(weight.dtype())?;
        conv2d_same_dtype(&wide, weight, bias, cfg)?.to_dtype(dtype)?
    } else {
        conv2d_same_dtype(x, weight, bias, cfg)?
    };
    match residual {
        Some(r) => add(r, &y),
        None => Ok(y),
    }
}

fn conv2d_same_dtype(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: Conv2dConfig,
) -> Result<Tensor> {
    if let Some(shape) = same_conv_on_cpu(x, weight, &cfg)? {
        return cpu::conv2d(x, weight, bias, shape);
    }
    if let Some(b) = bias
        && takes(Kernel::Bias, x)
    {
        let y = candle_nn::Conv2d::new(weight.clone(), None, cfg).forward(x)?;
        if cuda::bias_rows_fits(&y, b) {
            return cuda::bias_rows(&y, b);
        }
        return y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?);
    }
    candle_nn::Conv2d::new(weight.clone(), bias.cloned(), cfg).forward(x)
}

/// The shape, when this is a k×k (k > 1), stride-1, "same"-padded f32 convolution on CPU: those
/// run as banded Winograd or im2col + GEMM ([`SameConv`]) instead of candle's kernel.
fn same_conv_on_cpu(x: &Tensor, weight: &Tensor, cfg: &Conv2dConfig) -> Result<Option<SameConv>> {
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

/// `x · weightᵀ + bias` over the last dimension (PyTorch `Linear` weights, `(out, in)`).
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _span = span(Op::Linear, x.device());
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if cpu_f32 {
        return cpu::linear(x, weight, bias);
    }
    if let Some(b) = bias
        && takes(Kernel::Bias, x)
    {
        let y = candle_nn::Linear::new(weight.clone(), None).forward(x)?;
        if cuda::bias_cols_fits(&y, b) {
            return cuda::bias_cols(&y, b);
        }
        return y.broadcast_add(b);
    }
    candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)
}

/// torch `nn.GroupNorm` (biased variance, per-channel affine) over `(B, C, ...)`, followed by SiLU
/// when `silu` is set.
pub(crate) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let _span = span(Op::GroupNorm, x.device());
    let cpu_f32 = x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x.rank() >= 3;
    if cpu_f32 {
        return cpu::group_norm(x, weight, bias, groups, eps, silu);
    }
    if takes(Kernel::GroupNorm, x) && cuda::group_norm_fits(x, weight, bias, groups) {
        return cuda::group_norm(x, weight, bias, groups, eps, silu);
    }
    candle_group_norm(x, weight, bias, groups, eps, silu)
}

/// [`group_norm`] as candle-nn computes it (the path every device but a CPU in f32 takes unless
/// switched).
fn candle_group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let channels = weight.dim(0)?;
    let gn = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    let y = gn.forward(x)?;
    if silu { y.silu() } else { Ok(y) }
}

/// `softmax(q kᵀ / sqrt(d) + mask) v` over `heads` heads ([`attention::attention`]).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let _span = span(Op::Attention, q.device());
    attention::attention(q, k, v, heads, mask)
}

/// diffusers' `GEGLU` after its projection: `h` is `(..., 2·inner)`, the result
/// `hidden · gelu_erf(gate)` is `(..., inner)`, with `hidden, gate = h.chunk(2, -1)`.
pub(crate) fn geglu(h: &Tensor) -> Result<Tensor> {
    let _span = span(Op::Geglu, h.device());
    let width = h.dims().last().copied().unwrap_or(0);
    if h.device().is_cpu() && h.dtype() == DType::F32 && width > 0 && width % 2 == 0 {
        return cpu::geglu(h);
    }
    if takes(Kernel::Geglu, h) && cuda::geglu_fits(h) {
        return cuda::geglu(h);
    }
    candle_geglu(h)
}

fn candle_geglu(h: &Tensor) -> Result<Tensor> {
    let halves = h.chunk(2, candle_core::D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// `x` `(B, C, H, W)` plus a bias per image and channel, `bias` `(B, C)`: a resnet's projected
/// time embedding.
pub(crate) fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let _span = span(Op::Add, x.device());
    if takes(Kernel::Bias, x) && cuda::bias_rows_fits(x, bias) {
        return cuda::bias_rows(x, bias);
    }
    candle_add_channel_bias(x, bias)
}

fn candle_add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.broadcast_add(&bias.unsqueeze(2)?.unsqueeze(3)?)
}

/// `a + b`, one shape: the residual connections.
pub(crate) fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _span = span(Op::Add, a.device());
    add(a, b)
}

/// [`residual_add`] without its profile span, for ops that end in a residual.
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if takes(Kernel::Residual, a) && cuda::add_fits(a, b) {
        return cuda::add(a, b);
    }
    a + b
}

/// `Transformer2DModel`'s residual: `tokens` `(B, H·W, C)` folded back to `(B, C, H, W)`, plus `x`.
pub(crate) fn add_tokens_to_image(tokens: &Tensor, x: &Tensor) -> Result<Tensor> {
    let _span = span(Op::Add, x.device());
    if takes(Kernel::Residual, x) && cuda::add_tokens_fits(tokens, x) {
        return cuda::add_tokens(tokens, x);
    }
    candle_add_tokens(tokens, x)
}

fn candle_add_tokens(tokens: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    tokens.reshape((b, h, w, c))?.permute((0, 3, 1, 2))? + x
}

#[cfg(test)]
#[path = "conv_tests.rs"]
mod conv_tests;
