//! Analytic FLOP counts for one UNet forward and one VAE decode, from the same configs the modules
//! are built from. Used by `t2i bench` to report achieved TFLOP/s.
//!
//! Counted: every convolution, linear layer and attention matmul (2 FLOPs per multiply-add).
//! Not counted: norms, activations, additions, the time/text embeddings (well under 1%). Checked in
//! the tests against the figures in docs/model-notes.md §1 (SSD-1B 4.21, SDXL 6.76, Vega 2.82 TFLOP per UNet
//! forward at 1024², SDXL VAE decode 10.5 TFLOP) and torch's own count (`scripts/parity/flops.py`) for
//! SD 1.5 and SD 2.1. A 1×1-convolution projection (SD 1.x) costs what the linear one does.

use super::config::{BlockKind, LayerConfig, MidBlock, UNetConfig, VaeConfig};

fn conv(hw: f64, c_in: usize, c_out: usize, k: usize) -> f64 {
    2.0 * hw * (c_in * c_out * k * k) as f64
}

fn resnet(hw: f64, c_in: usize, c_out: usize) -> f64 {
    let shortcut = if c_in != c_out {
        conv(hw, c_in, c_out, 1)
    } else {
        0.0
    };
    conv(hw, c_in, c_out, 3) + conv(hw, c_out, c_out, 3) + shortcut
}

/// `Transformer2DModel` (linear projections) of `depth` blocks over `n` tokens of width `c`, with a
/// `ctx_len × ctx_dim` cross-attention context.
fn transformer(n: f64, c: usize, depth: usize, ctx_len: f64, ctx_dim: usize) -> f64 {
    let c = c as f64;
    let proj = 2.0 * 2.0 * n * c * c;
    let self_attn = 4.0 * 2.0 * n * c * c + 2.0 * 2.0 * n * n * c;
    let cross_attn = 2.0 * 2.0 * n * c * c
        + 2.0 * 2.0 * ctx_len * ctx_dim as f64 * c
        + 2.0 * 2.0 * n * ctx_len * c;
    // GEGLU: dim → 2·4·dim, then 4·dim → dim.
    let ff = 2.0 * n * c * 8.0 * c + 2.0 * n * 4.0 * c * c;
    proj + depth as f64 * (self_attn + cross_attn + ff)
}

/// Adds a down or up block's layers, from the config's channel plan (the one the UNet is loaded
/// from): each resnet and, in a cross-attention block, its transformer, onto the running total one
/// term at a time in the order the layers run.
fn add_layers(
    total: &mut f64,
    hw: f64,
    kind: BlockKind,
    plan: impl Iterator<Item = LayerConfig>,
    ctx_len: f64,
    ctx_dim: usize,
) {
    for layer in plan {
        *total += resnet(hw, layer.c_in, layer.c_out);
        if kind == BlockKind::CrossAttn {
            *total += transformer(hw, layer.c_out, layer.depth, ctx_len, ctx_dim);
        }
    }
}

/// FLOPs of one UNet forward for one sample at latent size `h × w`, with a `ctx_len`-token context.
pub fn unet_flops(c: &UNetConfig, h: usize, w: usize, ctx_len: usize) -> f64 {
    let ctx = ctx_len as f64;
    let cross = c.cross_attention_dim;
    let mut sizes = vec![(h, w)];
    for _ in 1..c.down.len() {
        let (ph, pw) = *sizes.last().unwrap_or(&(h, w));
        // 3×3 stride-2 conv with padding 1: ceil(x / 2).
        sizes.push((ph.div_ceil(2), pw.div_ceil(2)));
    }
    let hw = |i: usize| (sizes[i].0 * sizes[i].1) as f64;
    let c0 = c.block_out_channels[0];
    let mut total = conv(hw(0), c.in_channels, c0, 3) + conv(hw(0), c0, c.out_channels, 3);
    for (i, b) in c.down.iter().enumerate() {
        add_layers(&mut total, hw(i), b.kind, b.layers(), ctx, cross);
        if b.downsample {
            total += conv(hw(i + 1), b.out_channels, b.out_channels, 3);
        }
    }
    let last = c.down.len() - 1;
    let mid_c = c.mid_channels();
    total += match c.mid {
        MidBlock::CrossAttn { depth } => {
            2.0 * resnet(hw(last), mid_c, mid_c) + transformer(hw(last), mid_c, depth, ctx, cross)
        }
        MidBlock::ResnetOnly => resnet(hw(last), mid_c, mid_c),
        MidBlock::None => 0.0,
    };
    for (i, b) in c.up.iter().enumerate() {
        let level = last - i;
        add_layers(&mut total, hw(level), b.kind, b.layers(), ctx, cross);
        if b.upsample {
            total += conv(hw(level - 1), b.out_channels, b.out_channels, 3);
        }
    }
    total
}

/// FLOPs of one VAE decode for one image from an `h × w` latent.
pub fn vae_decode_flops(c: &VaeConfig, h: usize, w: usize) -> f64 {
    let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
    let top = rev[0];
    let hw0 = (h * w) as f64;
    let mut total =
        conv(hw0, c.latent_channels, c.latent_channels, 1) + conv(hw0, c.latent_channels, top, 3);
    total += 2.0 * resnet(hw0, top, top);
    if c.mid_block_add_attention {
        let (n, ch) = (hw0, top as f64);
        total += 4.0 * 2.0 * n * ch * ch + 2.0 * 2.0 * n * n * ch;
    }
    let mut prev = top;
    let mut hw = hw0;
    for (i, &ch) in rev.iter().enumerate() {
        for j in 0..=c.layers_per_block {
            total += resnet(hw, if j == 0 { prev } else { ch }, ch);
        }
        if i + 1 < rev.len() {
            hw *= 4.0;
            total += conv(hw, ch, ch, 3);
        }
        prev = ch;
    }
    total + conv(hw, c.block_out_channels[0], c.out_channels, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::config::ConfigFile;
    use std::path::Path;

    fn unet(depths: &str, reverse: &str, mid: &str) -> UNetConfig {
        let json = format!(
            r#"{{"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2, "mid_block_type": {mid},
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": {depths},
            "reverse_transformer_layers_per_block": {reverse}, "use_linear_projection": true}}"#
        );
        UNetConfig::from_file(&ConfigFile::parse(Path::new("unet/config.json"), &json).unwrap())
            .unwrap()
    }

    fn close(got: f64, want_tflop: f64) {
        let got = got / 1e12;
        assert!(
            (got - want_tflop).abs() / want_tflop < 0.02,
            "{got:.3} TFLOP vs {want_tflop}"
        );
    }

    #[test]
    fn unet_costs_match_the_published_figures_at_1024() {
        let ssd = unet(
            "[1, 2, 4]",
            "[[4, 4, 10], [2, 1, 1], 1]",
            "\"UNetMidBlock2D\"",
        );
        close(unet_flops(&ssd, 128, 128, 77), 4.21);
        let sdxl = unet("[1, 2, 10]", "null", "\"UNetMidBlock2DCrossAttn\"");
        close(unet_flops(&sdxl, 128, 128, 77), 6.76);
        let vega = unet(
            "[[1, 1], [1, 1], [2, 2]]",
            "[[2, 2, 2], [1, 1, 1], 1]",
            "\"UNetMidBlock2D\"",
        );
        close(unet_flops(&vega, 128, 128, 77), 2.82);
    }

    /// torch 2.15 `FlopCounterMode` on the full-size configs (`scripts/parity/flops.py`): SD 1.5 UNet
    /// at 512² 0.8033 TFLOP, SD 2.1 UNet at 768² 2.1491, the SD VAE decode at 512² 2.5145 and at
    /// 768² 5.7543.
    #[test]
    fn sd_unet_and_vae_costs_match_torchs_count() {
        let sd = |heads: &str, cross: usize, linear: bool| {
            let json = format!(
                r#"{{"attention_head_dim": {heads}, "block_out_channels": [320, 640, 1280, 1280],
                "cross_attention_dim": {cross},
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 2, "sample_size": 64, "use_linear_projection": {linear}}}"#
            );
            UNetConfig::from_file(&ConfigFile::parse(Path::new("unet/config.json"), &json).unwrap())
                .unwrap()
        };
        close(unet_flops(&sd("8", 768, false), 64, 64, 77), 0.8033);
        close(
            unet_flops(&sd("[5, 10, 20, 20]", 1024, true), 96, 96, 77),
            2.1491,
        );
        let vae = sd_vae();
        close(vae_decode_flops(&vae, 64, 64), 2.5145);
        close(vae_decode_flops(&vae, 96, 96), 5.7543);
    }

    fn sd_vae() -> VaeConfig {
        let json = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        VaeConfig::load(&path).unwrap()
    }

    #[test]
    fn sdxl_vae_decode_cost_matches_the_published_figure() {
        let json = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.13025}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        let c = VaeConfig::load(&path).unwrap();
        close(vae_decode_flops(&c, 128, 128), 10.5);
    }
}
