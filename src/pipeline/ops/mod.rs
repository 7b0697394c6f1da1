//! The model's hot ops, one function each: convolution, linear (+ bias), group norm (+ SiLU),
//! GEGLU and attention. The model code (`unet`, `blocks`, `vae`, `clip`) calls only these; each
//! picks its kernel by device and dtype here, in one place:
//!
//! | op | CPU, f32 | everything else |
//! |---|---|---|
//! | [`conv2d`] | stride-1 "same" k×k: banded im2col or Winograd ([`cpu::conv`]) | candle's kernel (cuDNN with the `cudnn` feature) |
//! | [`linear`] | one GEMM onto the broadcast bias (at least 65 rows, so a row's bits never depend on the batch) | candle-nn's `Linear` |
//! | [`group_norm`] | fused statistics + normalize (+ SiLU) | candle-nn's `GroupNorm` (+ `silu`) |
//! | [`geglu`] | one pass, exact erf | chunk, `gelu_erf`, multiply |
//! | [`attention`] | blocked GEMM + softmax tasks, unmasked | flash-attn (CUDA, half, feature `flash-attn`), else the textbook form |
//!
//! With profiling on ([`profile`]) every op is timed by category and pipeline phase. The CPU kernels
//! are in [`cpu`]; new device kernels get a folder of their own beside it, behind a
//! run-time switch whose default is the proven path above. Every kernel here computes each image
//! of a batch independently of the others.

mod attention;
mod cpu;
pub mod profile;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Conv2dConfig;

use cpu::SameConv;
use profile::{Op, span};

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
    let _span = span(Op::Conv2d, x.device());
    if x.dtype() != weight.dtype() {
        let dtype = x.dtype();
        let wide = x.to_dtype(weight.dtype())?;
        return conv2d_same_dtype(&wide, weight, bias, cfg)?.to_dtype(dtype);
    }
    conv2d_same_dtype(x, weight, bias, cfg)
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
    let halves = h.chunk(2, candle_core::D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

#[cfg(test)]
#[path = "conv_tests.rs"]
mod conv_tests;
