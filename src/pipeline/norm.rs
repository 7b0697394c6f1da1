//! The `GroupNorm` layer (torch `nn.GroupNorm` weights), optionally followed by SiLU, as every
//! `ResnetBlock2D`, every `Transformer2DModel` and both `conv_norm_out`s use it. The arithmetic is
//! [`ops::group_norm`]'s.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::ops;

pub(crate) struct GroupNorm {
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
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {channels} channels do not split into {groups} groups");
    }
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
    }

    /// `silu(group_norm(x))`.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
    }
}
