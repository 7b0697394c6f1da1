//! `GroupNorm` (torch `nn.GroupNorm` semantics: biased variance, per-channel affine), optionally
//! followed by SiLU, as every `ResnetBlock2D` and both `conv_norm_out`s use it.
//!
//! candle-nn's `GroupNorm` is a chain of tensor ops (sum, subtract, square, sum, divide, multiply,
//! add) and SiLU one more: about seven read-write passes over the activation. In SSD-1B's VAE at
//! 512² one activation is 128 MiB, so these passes are a visible part of the decode. On CPU in f32
//! the fused kernel here reads each group twice for its statistics and once more to write the
//! normalized (and activated) output. Other devices and dtypes use candle-nn's implementation.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::blocks::with_cpu_f32;
use super::cpu_ops;

pub(crate) struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_maybe_silu(x, false)
    }

    /// `silu(group_norm(x))`.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_maybe_silu(x, true)
    }

    fn forward_maybe_silu(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let fused = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && x.rank() >= 3;
        if !fused {
            let y = self.inner.forward(x)?;
            return if silu { y.silu() } else { Ok(y) };
        }
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        // The channel count was checked against the groups at load; the input must match it.
        if c != self.weight.dim(0)? {
            candle_core::bail!(
                "GroupNorm: input has {c} channels, weights {}",
                self.weight.dim(0)?
            );
        }
        let out = with_cpu_f32(x, |xs| {
            with_cpu_f32(&self.weight, |w| {
                with_cpu_f32(&self.bias, |bias| {
                    Ok(group_norm_f32(
                        xs,
                        c / self.groups,
                        spatial,
                        self.groups,
                        self.eps,
                        (w, bias),
                        silu,
                    ))
                })
            })
        })?;
        debug_assert_eq!(out.len(), b * c * spatial);
        Tensor::from_vec(out, dims, x.device())
    }
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
                cpu_ops::normalize_channel(xs, out, mean, scale, shift, silu);
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
    use candle_core::Device;
    use std::collections::HashMap;

    #[test]
    fn fused_group_norm_matches_candle_nn_with_and_without_silu() {
        let dev = Device::Cpu;
        for (b, c, h, w, groups) in [(2, 8, 5, 7, 4), (1, 6, 1, 1, 3), (3, 4, 9, 2, 1)] {
            let ts = HashMap::from([
                (
                    "weight".to_string(),
                    Tensor::randn(1f32, 0.5, c, &dev).unwrap(),
                ),
                (
                    "bias".to_string(),
                    Tensor::randn(0f32, 0.5, c, &dev).unwrap(),
                ),
            ]);
            let gn = group_norm(
                groups,
                c,
                1e-6,
                VarBuilder::from_tensors(ts, DType::F32, &dev),
            )
            .unwrap();
            // An offset mean, as activations have: the deviations must not cancel badly.
            let x = (Tensor::randn(0f32, 2.0, (b, c, h, w), &dev).unwrap() + 3.0).unwrap();
            let want = gn.inner.forward(&x).unwrap();
            let got = gn.forward(&x).unwrap();
            let d = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap();
            assert!(d.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5);
            let got = gn.forward_silu(&x).unwrap();
            let d = (got - want.silu().unwrap()).unwrap().abs().unwrap();
            let d = d.flatten_all().unwrap().max(0).unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}
