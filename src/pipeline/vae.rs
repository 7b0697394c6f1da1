//! The VAE decoder (`AutoencoderKL.decode`: `post_quant_conv` then `Decoder`), latents → pixels.
//!
//! The pipeline un-scales latents with the config's `scaling_factor` (and `latents_mean/std` when a
//! VAE declares them) before calling [`VaeDecoder::decode`], which returns pixels in [-1, 1]. The
//! encoder half is never loaded. The SDXL VAE overflows in f16; `Pipeline` decides the dtype (f32
//! whenever the model dtype is f16), this module just runs in whatever dtype its weights were loaded.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{Attention, Conv, ResnetBlock2D, ResnetParams, Upsample2D, conv1x1, conv3x3};
use super::config::VaeConfig;
use super::norm::{GroupNorm, group_norm};

/// The decoder's mid-block self-attention: GroupNorm, one head over all channels, residual.
struct MidAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl MidAttention {
    fn load(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let attn = if vb.contains_tensor("to_q.weight") {
            Attention::load(vb.clone(), channels, channels, 1, true)?
        } else {
            Attention::load_legacy(vb.clone(), channels)?
        };
        Ok(Self {
            // diffusers UNetMidBlock2D(resnet_eps=1e-6) passes eps 1e-6 to the attention's GroupNorm.
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            attn,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.group_norm.forward(x)?;
        // One image at a time, so that no projection's GEMM shape depends on the batch (an image
        // must decode to the same bits whatever it is batched with). The tokens are made
        // contiguous first: candle 0.11's CPU matmul folds a batch of lhs matrices into one when
        // the rhs is shared, which is wrong for a transposed lhs (image ≥ 1 read the wrong rows).
        let mut out = Vec::with_capacity(b);
        for i in 0..b {
            let t = normed
                .narrow(0, i, 1)?
                .reshape((1, c, h * w))?
                .transpose(1, 2)?
                .contiguous()?;
            let t = self.attn.forward(&t)?;
            out.push(t.transpose(1, 2)?.reshape((1, c, h, w))?);
        }
        Tensor::cat(&out, 0)? + x
    }
}

struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Upsample2D>,
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid_resnet_1: ResnetBlock2D,
    mid_attention: Option<MidAttention>,
    mid_resnet_2: ResnetBlock2D,
    up: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    pub fn load(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let groups = c.norm_num_groups;
        // diffusers Decoder: every resnet and norm uses eps 1e-6.
        let resnet = |vb: VarBuilder, c_in: usize, c_out: usize| {
            ResnetBlock2D::load(
                vb,
                &ResnetParams {
                    c_in,
                    c_out,
                    temb: None,
                    groups,
                    eps: 1e-6,
                    output_scale_factor: 1.0,
                },
            )
        };
        let dec = vb.pp("decoder");
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let mut up = Vec::new();
        let mut prev = top;
        for (i, &ch) in rev.iter().enumerate() {
            let vb = dec.pp(format!("up_blocks.{i}"));
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    resnet(
                        vb.pp(format!("resnets.{j}")),
                        if j == 0 { prev } else { ch },
                        ch,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = (i + 1 < rev.len())
                .then(|| Upsample2D::load(vb.pp("upsamplers.0"), ch))
                .transpose()?;
            up.push(UpDecoderBlock { resnets, upsample });
            prev = ch;
        }
        let mid = dec.pp("mid_block");
        let c0 = c.block_out_channels[0];
        Ok(Self {
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| {
                    conv1x1(
                        vb.pp("post_quant_conv"),
                        c.latent_channels,
                        c.latent_channels,
                    )
                })
                .transpose()?,
            conv_in: conv3x3(dec.pp("conv_in"), c.latent_channels, top, 1)?,
            mid_resnet_1: resnet(mid.pp("resnets.0"), top, top)?,
            mid_attention: c
                .mid_block_add_attention
                .then(|| MidAttention::load(mid.pp("attentions.0"), top, groups))
                .transpose()?,
            mid_resnet_2: resnet(mid.pp("resnets.1"), top, top)?,
            up,
            conv_norm_out: group_norm(groups, c0, 1e-6, dec.pp("conv_norm_out"))?,
            conv_out: conv3x3(dec.pp("conv_out"), c0, c.out_channels, 1)?,
        })
    }

    /// Decodes already un-scaled latents `(B, 4, h, w)` to pixels `(B, 3, 8h, 8w)` in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid_resnet_1.forward(&x, None)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(&x)?;
        }
        x = self.mid_resnet_2.forward(&x, None)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = &block.upsample {
                x = u.forward(&x, None)?;
            }
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}
