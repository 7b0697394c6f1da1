//! The CPU f32 kernels behind [`super`]'s ops, with the tensor plumbing they share: each takes
//! contiguous f32 slices of candle CPU tensors ([`with_cpu_f32`], no copies) and returns the
//! output's elements. `unsafe` is allowed in `conv.rs` and `kernels.rs` only, each use with its
//! SAFETY note.
//!
//! * [`conv`]: stride-1 "same" convolutions as banded im2col + GEMM or Winograd F(2×2, 3×3).
//! * [`kernels`]: linear layers, attention, GEGLU, the vectorized exp/erf and the GEMM helper.
//! * group norm (here): two-pass f64 statistics per (image, group), then one normalize (+ SiLU) pass.
//!
//! candle-nn's `GroupNorm` is a chain of tensor ops (sum, subtract, square, sum, divide, multiply,
//! add) and SiLU one more: about seven read-write passes over the activation. In SSD-1B's VAE at
//! 512² one activation is 128 MiB, so these passes are a visible part of the decode; the fused
//! kernel reads each group twice for its statistics and once more to write the output.

pub(super) mod conv;
pub(super) mod kernels;

use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

pub(super) use conv::SameConv;
pub(super) use kernels::AttentionShape;

/// Runs `f` on a contiguous f32 CPU tensor's elements, without copying them.
pub(super) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("with_cpu_f32: not a CPU tensor");
    };
    let all = cpu.as_slice::<f32>()?;
    f(&all[layout.start_offset()..][..layout.shape().elem_count()])
}

pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    shape: SameConv,
) -> Result<Tensor> {
    let out = with_cpu_f32(x, |xs| {
        with_cpu_f32(weight, |ws| match bias {
            Some(bias) => with_cpu_f32(bias, |bs| Ok(shape.forward(xs, ws, Some(bs)))),
            None => Ok(shape.forward(xs, ws, None)),
        })
    })?;
    Tensor::from_vec(out, (shape.b, shape.c_out, shape.h, shape.w), x.device())
}

pub(super) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("Linear: input {:?}, weight ({n}, {k})", x.shape());
    }
    let rows = x.elem_count() / k.max(1);
    let out = with_cpu_f32(x, |xs| {
        with_cpu_f32(w, |ws| match bias {
            Some(b) => with_cpu_f32(b, |bs| Ok(kernels::linear(xs, rows, k, ws, Some(bs), n))),
            None => Ok(kernels::linear(xs, rows, k, ws, None, n)),
        })
    })?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("checked above") = n;
    Tensor::from_vec(out, shape, x.device())
}

pub(super) fn geglu(h: &Tensor) -> Result<Tensor> {
    let dims = h.dims();
    let inner = dims.last().copied().unwrap_or(0) / 2;
    let out = with_cpu_f32(h, |hs| Ok(kernels::geglu(hs, inner)))?;
    let mut shape = dims.to_vec();
    *shape
        .last_mut()
        .expect("a linear layer's output has a last dimension") = inner;
    Tensor::from_vec(out, shape, h.device())
}

pub(super) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    let (b, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    // The channel count was checked against the groups at load; the input must match it.
    if c != weight.dim(0)? {
        candle_core::bail!(
            "GroupNorm: input has {c} channels, weights {}",
            weight.dim(0)?
        );
    }
    let out = with_cpu_f32(x, |xs| {
        with_cpu_f32(weight, |w| {
            with_cpu_f32(bias, |bias| {
                Ok(group_norm_f32(
                    xs,
                    c / groups,
                    spatial,
                    groups,
                    eps,
                    (w, bias),
                    silu,
                ))
            })
        })
    })?;
    debug_assert_eq!(out.len(), b * c * spatial);
    Tensor::from_vec(out, dims, x.device())
}

/// Contiguous `(b, groups · per_group, spatial)` input; one parallel task per (image, group).
fn group_norm_f32(
    x: &[f32],
    per_group: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    (weight, bias): (&[f32], &[f32]),
    silu: bool,
) -> Vec<f32> {
    let n = per_group * spatial;
    let mut out = vec![0f32; x.len()];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .enumerate()
        .for_each(|(i, (out, xs))| {
            // Two passes with f64 sums (mean, then the biased variance of the deviations): exact
            // enough for 10⁶-element groups, unlike a one-pass sum of squares.
            let mean = sum_f64(xs.iter().map(|&v| v as f64)) / n as f64;
            let var = sum_f64(xs.iter().map(|&v| (v as f64 - mean).powi(2))) / n as f64;
            let inv_std = 1.0 / (var + eps).sqrt();
            let mean = mean as f32;
            let first = (i % groups) * per_group;
            for (ch, (out, xs)) in out.chunks_mut(spatial).zip(xs.chunks(spatial)).enumerate() {
                let scale = (inv_std * weight[first + ch] as f64) as f32;
                let shift = bias[first + ch];
                kernels::normalize_channel(xs, out, mean, scale, shift, silu);
            }
        });
    out
}

/// Sum with eight independent accumulators (vectorizable, and a shorter dependency chain).
fn sum_f64(values: impl Iterator<Item = f64>) -> f64 {
    let mut acc = [0f64; 8];
    for (i, v) in values.enumerate() {
        acc[i % 8] += v;
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Module};

    /// Every shape class of the gemm crate (one row; rows × columns ≤ 256; ≤ 64 × 64 with k > 512;
    /// the general case): a row's output must not depend on how many rows come with it.
    #[test]
    fn a_linear_row_has_the_same_bits_whatever_the_row_count() {
        let value = |i: usize, salt: usize| ((i * 31 + salt) as f32 * 0.618).sin();
        for (k, n) in [(7, 8), (96, 32), (640, 48), (1280, 160), (2816, 1280)] {
            let w: Vec<f32> = (0..n * k).map(|i| value(i, 1)).collect();
            let bias: Vec<f32> = (0..n).map(|i| value(i, 2)).collect();
            let x: Vec<f32> = (0..200 * k).map(|i| value(i, 3)).collect();
            let all = kernels::linear(&x, 200, k, &w, Some(&bias), n);
            for rows in [1, 2, 3, 8, 64, 65, 130] {
                let some = kernels::linear(&x[..rows * k], rows, k, &w, Some(&bias), n);
                assert!(
                    some == all[..rows * n],
                    "k {k}, n {n}: {rows} rows differ from the same rows among 200"
                );
            }
        }
    }

    #[test]
    fn fused_group_norm_matches_candle_nn_with_and_without_silu() {
        let dev = Device::Cpu;
        for (b, c, h, w, groups) in [(2, 8, 5, 7, 4), (1, 6, 1, 1, 3), (3, 4, 9, 2, 1)] {
            let weight = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            let reference =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, 1e-6).unwrap();
            // An offset mean, as activations have: the deviations must not cancel badly.
            let x = (Tensor::randn(0f32, 2.0, (b, c, h, w), &dev).unwrap() + 3.0).unwrap();
            assert_eq!(x.dtype(), DType::F32);
            let want = reference.forward(&x).unwrap();
            for (silu, want) in [(false, want.clone()), (true, want.silu().unwrap())] {
                let got = group_norm(&x, &weight, &bias, groups, 1e-6, silu).unwrap();
                let d = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap();
                assert!(
                    d.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5,
                    "silu {silu}"
                );
            }
        }
    }
}
