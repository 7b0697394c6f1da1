//! `unet/config.json`, resolved to the structure diffusers' `UNet2DConditionModel.__init__` builds:
//! block kinds, per-layer transformer depths, and the channels each layer's resnet takes and gives.
//!
//! The channel plan ([`DownBlockConfig::layers`], [`UpBlockConfig::layers`], [`UNetConfig::mid_channels`])
//! is worked out once here, so the UNet that loads the weights (`pipeline/unet.rs`) and the FLOP count
//! (`pipeline/cost.rs`) cannot disagree about it. This module only parses; it loads nothing.

use std::path::Path;

use serde_json::Value;

use super::{ConfigError, ConfigFile, as_usize};

/// Per-layer transformer depth: diffusers accepts an int (same for every layer) or a list per layer,
/// mixed freely in one array (`[[4, 4, 10], [2, 1, 1], 1]` in SSD-1B's `reverse_transformer_layers_per_block`).
fn expand_depths(
    cfg: &ConfigFile,
    key: &str,
    v: &Value,
    layers: usize,
) -> Result<Vec<usize>, ConfigError> {
    if let Some(n) = as_usize(v) {
        return Ok(vec![n; layers]);
    }
    let list = v
        .as_array()
        .ok_or_else(|| cfg.err(key, format!("expected an integer or a list, got {v}")))?;
    let depths: Option<Vec<usize>> = list.iter().map(as_usize).collect();
    let depths =
        depths.ok_or_else(|| cfg.err(key, format!("expected a list of integers, got {v}")))?;
    if depths.len() != layers {
        return Err(cfg.err(
            key,
            format!(
                "entry {v} has {} values but the block has {layers} layers",
                depths.len()
            ),
        ));
    }
    Ok(depths)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: each resnet followed by a Transformer2DModel.
    CrossAttn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MidBlock {
    /// `UNetMidBlock2DCrossAttn`: resnet, transformer (`depth` blocks), resnet (SDXL).
    CrossAttn { depth: usize },
    /// `UNetMidBlock2D` with `add_attention=False`: one resnet (SSD-1B, Vega; diffusers `get_mid_block`).
    ResnetOnly,
    /// `mid_block_type: null`.
    None,
}

#[derive(Debug, Clone)]
pub struct DownBlockConfig {
    pub kind: BlockKind,
    /// Channels coming in: the previous down block's output (`conv_in`'s for the first block).
    pub in_channels: usize,
    pub out_channels: usize,
    pub heads: usize,
    /// Transformer depth of each of the block's `layers_per_block` layers.
    pub depths: Vec<usize>,
    pub downsample: bool,
}

#[derive(Debug, Clone)]
pub struct UpBlockConfig {
    pub kind: BlockKind,
    pub out_channels: usize,
    /// Channels of the previous up block (or the mid block): the first resnet's input.
    pub prev_channels: usize,
    /// Channels coming into the matching down block (its `in_channels`): the last resnet's skip input.
    pub in_channels: usize,
    pub heads: usize,
    pub depths: Vec<usize>,
    pub upsample: bool,
}

/// One layer of a down or up block as the weights lay it out: `resnets.{j}` from `c_in` to `c_out`
/// channels, then, in a cross-attention block, `attentions.{j}` of `depth` transformer blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerConfig {
    /// The resnet's input; in an up block, the running features and the skip concatenated onto them.
    pub c_in: usize,
    pub c_out: usize,
    pub depth: usize,
}

impl DownBlockConfig {
    /// The block's layers (diffusers `DownBlock2D`/`CrossAttnDownBlock2D`): the first resnet takes the
    /// previous block's channels, the others the block's own.
    pub fn layers(&self) -> impl Iterator<Item = LayerConfig> + '_ {
        block_layers(&self.depths, self.in_channels, self.out_channels, |_| 0)
    }
}

impl UpBlockConfig {
    /// The block's layers (diffusers `UpBlock2D`/`CrossAttnUpBlock2D`): each resnet takes the running
    /// features (the previous up block's at first, then the block's own) plus one skip popped from the
    /// down path. The last skip popped at a level is the one pushed first on the way down (the previous
    /// level's downsampler output, `conv_in`'s at the top), so it has `in_channels`; the others have the
    /// block's own.
    pub fn layers(&self) -> impl Iterator<Item = LayerConfig> + '_ {
        let last = self.depths.len() - 1;
        block_layers(
            &self.depths,
            self.prev_channels,
            self.out_channels,
            move |j| {
                if j == last {
                    self.in_channels
                } else {
                    self.out_channels
                }
            },
        )
    }
}

/// Layers whose first resnet runs on `incoming` channels and the rest on the block's own `c_out`,
/// each with `skip(j)` more concatenated onto its input.
fn block_layers<'a>(
    depths: &'a [usize],
    incoming: usize,
    c_out: usize,
    skip: impl Fn(usize) -> usize + 'a,
) -> impl Iterator<Item = LayerConfig> + 'a {
    depths
        .iter()
        .enumerate()
        .map(move |(j, &depth)| LayerConfig {
            c_in: (if j == 0 { incoming } else { c_out }) + skip(j),
            c_out,
            depth,
        })
}

/// The SDXL `text_time` added conditioning: pooled text embedding and six micro-conditioning ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// Sinusoid width per time id (256 in SDXL).
    pub addition_time_embed_dim: usize,
    /// 6 × addition_time_embed_dim + pooled text width (2816 in SDXL).
    pub projection_class_embeddings_input_dim: usize,
}

/// `unet/config.json`, resolved to the structure diffusers' `UNet2DConditionModel.__init__` builds.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub down: Vec<DownBlockConfig>,
    pub up: Vec<UpBlockConfig>,
    pub mid: MidBlock,
    pub mid_heads: usize,
    pub mid_block_scale_factor: f64,
    /// `Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)`.
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub time_embed_dim: usize,
    /// `addition_embed_type: "text_time"` (SDXL family); `None` in SD 1.x/2.x.
    pub text_time: Option<TextTimeConfig>,
    /// `use_linear_projection`: the transformers' `proj_in`/`proj_out` are linear layers (SD 2.x,
    /// SDXL) rather than 1×1 convolutions (SD 1.x; diffusers' default is false).
    pub use_linear_projection: bool,
    /// Default output size in latent pixels (128 for SDXL: 1024 px).
    pub sample_size: usize,
}

impl UNetConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&ConfigFile::open(path)?)
    }

    pub(crate) fn from_file(cfg: &ConfigFile) -> Result<Self, ConfigError> {
        use serde_json::json;
        // Options this implementation does not have; each is at its diffusers default in the SD and
        // SDXL families. `addition_embed_type` is "text_time" in SDXL and absent in SD 1.x/2.x.
        cfg.require("addition_embed_type", &[json!("text_time")])?;
        cfg.require("act_fn", &[json!("silu")])?;
        cfg.require("resnet_time_scale_shift", &[json!("default")])?;
        cfg.require("time_embedding_type", &[json!("positional")])?;
        cfg.require("class_embed_type", &[])?;
        cfg.require("encoder_hid_dim", &[])?;
        cfg.require("encoder_hid_dim_type", &[])?;
        cfg.require("time_cond_proj_dim", &[])?;
        cfg.require("timestep_post_act", &[])?;
        cfg.require("time_embedding_act_fn", &[])?;
        cfg.require("cross_attention_norm", &[])?;
        cfg.require("num_class_embeds", &[])?;
        cfg.require("dual_cross_attention", &[json!(false)])?;
        cfg.require("only_cross_attention", &[json!(false)])?;
        cfg.require("center_input_sample", &[json!(false)])?;
        cfg.require("attention_type", &[json!("default")])?;
        cfg.require("conv_in_kernel", &[json!(3)])?;
        cfg.require("conv_out_kernel", &[json!(3)])?;
        cfg.require("downsample_padding", &[json!(1)])?;
        cfg.require("resnet_out_scale_factor", &[json!(1.0)])?;
        cfg.require("resnet_skip_time_act", &[json!(false)])?;
        cfg.require("upcast_attention", &[json!(false), json!(true)])?;

        let block_out_channels = cfg.usize_list("block_out_channels")?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(cfg.err(
                "block_out_channels",
                "empty: a UNet needs at least one block",
            ));
        }
        let down_types = cfg.str_list("down_block_types")?;
        let up_types = cfg.str_list("up_block_types")?;
        if down_types.len() != n || up_types.len() != n {
            return Err(cfg.err(
                "down_block_types",
                format!(
                    "{} down and {} up block types for {n} block_out_channels",
                    down_types.len(),
                    up_types.len()
                ),
            ));
        }
        let layers_per_block = cfg.usize_or("layers_per_block", 2)?;
        let norm_num_groups = cfg.usize_or("norm_num_groups", 32)?;
        // `num_attention_heads` falls back to `attention_head_dim`, which in SD/SDXL configs holds the
        // number of heads (diffusers' naming quirk, UNet2DConditionModel.__init__).
        let heads_key = if cfg.get("num_attention_heads").is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads = match cfg.get(heads_key) {
            None => vec![8; n], // diffusers default attention_head_dim = 8
            Some(v) => match as_usize(v) {
                Some(h) => vec![h; n],
                None => cfg.usize_list(heads_key)?,
            },
        };
        if heads.len() != n {
            return Err(cfg.err(heads_key, format!("{} entries for {n} blocks", heads.len())));
        }
        let cross_attention_dim = cfg.usize_req("cross_attention_dim")?;

        let down_depths_raw: Vec<Value> = match cfg.get("transformer_layers_per_block") {
            None => vec![Value::from(1); n],
            Some(v) if as_usize(v).is_some() => vec![v.clone(); n],
            Some(Value::Array(a)) => a.clone(),
            Some(v) => {
                return Err(cfg.err(
                    "transformer_layers_per_block",
                    format!("expected an integer or a list, got {v}"),
                ));
            }
        };
        if down_depths_raw.len() != n {
            return Err(cfg.err(
                "transformer_layers_per_block",
                format!("{} entries for {n} blocks", down_depths_raw.len()),
            ));
        }
        let up_depths_raw: Vec<Value> = match cfg.get("reverse_transformer_layers_per_block") {
            None => down_depths_raw.iter().rev().cloned().collect(),
            Some(Value::Array(a)) => a.clone(),
            Some(v) => {
                return Err(cfg.err(
                    "reverse_transformer_layers_per_block",
                    format!("expected a list, got {v}"),
                ));
            }
        };
        if up_depths_raw.len() != n {
            return Err(cfg.err(
                "reverse_transformer_layers_per_block",
                format!("{} entries for {n} blocks", up_depths_raw.len()),
            ));
        }

        let block_kind =
            |key: &str, t: &str, plain: &str, cross: &str| -> Result<BlockKind, ConfigError> {
                if t == plain {
                    Ok(BlockKind::Plain)
                } else if t == cross {
                    Ok(BlockKind::CrossAttn)
                } else {
                    Err(cfg.err(
                        key,
                        format!("block type `{t}` is not supported (supported: {plain}, {cross})"),
                    ))
                }
            };

        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let kind = block_kind(
                "down_block_types",
                &down_types[i],
                "DownBlock2D",
                "CrossAttnDownBlock2D",
            )?;
            let depths = expand_depths(
                cfg,
                "transformer_layers_per_block",
                &down_depths_raw[i],
                layers_per_block,
            )?;
            down.push(DownBlockConfig {
                kind,
                in_channels: block_out_channels[i.saturating_sub(1)],
                out_channels: block_out_channels[i],
                heads: heads[i],
                depths,
                downsample: i + 1 < n,
            });
        }
        let rev_channels: Vec<usize> = block_out_channels.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let kind = block_kind(
                "up_block_types",
                &up_types[i],
                "UpBlock2D",
                "CrossAttnUpBlock2D",
            )?;
            let depths = expand_depths(
                cfg,
                "reverse_transformer_layers_per_block",
                &up_depths_raw[i],
                layers_per_block + 1,
            )?;
            up.push(UpBlockConfig {
                kind,
                out_channels: rev_channels[i],
                prev_channels: rev_channels[i.saturating_sub(1)],
                in_channels: rev_channels[(i + 1).min(n - 1)],
                heads: rev_heads[i],
                depths,
                upsample: i + 1 < n,
            });
        }
        let mid = match cfg.get("mid_block_type") {
            // diffusers' default mid block is the cross-attention one.
            None if cfg.map.contains_key("mid_block_type") => MidBlock::None,
            None => MidBlock::CrossAttn {
                depth: first_depth(&down_depths_raw[n - 1]),
            },
            Some(v) => match v.as_str() {
                Some("UNetMidBlock2DCrossAttn") => MidBlock::CrossAttn {
                    // get_mid_block receives transformer_layers_per_block[-1]; a list there uses its first entry.
                    depth: first_depth(&down_depths_raw[n - 1]),
                },
                Some("UNetMidBlock2D") => MidBlock::ResnetOnly,
                _ => {
                    return Err(cfg.err(
                        "mid_block_type",
                        format!("{v} is not supported (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null)"),
                    ));
                }
            },
        };
        let text_time = match cfg.get("addition_embed_type") {
            Some(_) => Some(TextTimeConfig {
                addition_time_embed_dim: cfg.usize_req("addition_time_embed_dim")?,
                projection_class_embeddings_input_dim: cfg
                    .usize_req("projection_class_embeddings_input_dim")?,
            }),
            None => None,
        };
        Ok(Self {
            in_channels: cfg.usize_or("in_channels", 4)?,
            out_channels: cfg.usize_or("out_channels", 4)?,
            layers_per_block,
            norm_num_groups,
            norm_eps: cfg.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim,
            mid,
            mid_heads: heads[n - 1],
            mid_block_scale_factor: cfg.f64_or("mid_block_scale_factor", 1.0)?,
            flip_sin_to_cos: cfg.bool_or("flip_sin_to_cos", true)?,
            freq_shift: cfg.f64_or("freq_shift", 0.0)?,
            // TimestepEmbedding width: block_out_channels[0] * 4 unless set (1280 in SDXL).
            time_embed_dim: cfg
                .opt_usize("time_embedding_dim")?
                .unwrap_or(block_out_channels[0] * 4),
            text_time,
            // diffusers' UNet2DConditionModel default.
            use_linear_projection: cfg.bool_or("use_linear_projection", false)?,
            sample_size: cfg.usize_or("sample_size", 128)?,
            block_out_channels,
            down,
            up,
        })
    }

    /// Channels through the mid block: the last down block's output.
    pub fn mid_channels(&self) -> usize {
        // `from_file` rejects an empty `block_out_channels`, so there is a last block.
        self.block_out_channels[self.block_out_channels.len() - 1]
    }
}

fn first_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.first().and_then(as_usize).unwrap_or(1),
        v => as_usize(v).unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(json: &str) -> Result<UNetConfig, ConfigError> {
        UNetConfig::from_file(&ConfigFile::parse(Path::new("unet/config.json"), json).unwrap())
    }

    const SSD1B: &str = r#"{
        "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2, "mid_block_type": "UNetMidBlock2D",
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 4],
        "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],
        "use_linear_projection": true, "class_embed_type": null, "upcast_attention": null
    }"#;

    #[test]
    fn ssd1b_asymmetric_up_blocks_expand_mixed_int_and_list_entries() {
        let c = unet(SSD1B).unwrap();
        assert_eq!(c.down[2].depths, vec![4, 4]);
        assert_eq!(c.up[0].depths, vec![4, 4, 10]);
        assert_eq!(c.up[1].depths, vec![2, 1, 1]);
        assert_eq!(c.up[2].depths, vec![1, 1, 1]);
        assert_eq!(c.up[0].heads, 20);
        assert_eq!(c.mid, MidBlock::ResnetOnly);
        assert_eq!(c.time_embed_dim, 1280);
        assert_eq!((c.up[0].prev_channels, c.up[0].in_channels), (1280, 640));
        assert_eq!((c.up[2].prev_channels, c.up[2].in_channels), (640, 320));
    }

    #[test]
    fn each_resnet_takes_its_features_plus_its_skip() {
        // The conv1 input widths of SDXL base 1.0's UNet weights (same channels as SSD-1B's), e.g.
        // `up_blocks.0.resnets.2.conv1.weight` is 1280×1920×3×3.
        let c = unet(SSD1B).unwrap();
        let c_in = |layers: Vec<LayerConfig>| layers.iter().map(|l| l.c_in).collect::<Vec<_>>();
        let down: Vec<_> = c.down.iter().map(|b| c_in(b.layers().collect())).collect();
        assert_eq!(down, [[320, 320], [320, 640], [640, 1280]]);
        let up: Vec<_> = c.up.iter().map(|b| c_in(b.layers().collect())).collect();
        assert_eq!(up, [[2560, 2560, 1920], [1920, 1280, 960], [960, 640, 640]]);
        assert_eq!(
            c.up[0].layers().map(|l| l.depth).collect::<Vec<_>>(),
            [4, 4, 10]
        );
        assert_eq!(c.mid_channels(), 1280);
        // An up block's last skip has what came into the down block at its level.
        for (up, down) in c.up.iter().zip(c.down.iter().rev()) {
            assert_eq!(up.in_channels, down.in_channels);
        }
    }

    #[test]
    fn an_empty_block_list_is_an_error_not_a_panic() {
        let json = SSD1B
            .replace("[320, 640, 1280]", "[]")
            .replace(
                r#"["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]"#,
                "[]",
            )
            .replace(
                r#"["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]"#,
                "[]",
            );
        let err = unet(&json).unwrap_err().to_string();
        assert!(err.contains("block_out_channels"), "{err}");
    }

    #[test]
    fn sdxl_without_reverse_list_mirrors_the_down_depths_and_keeps_attention_mid_block() {
        let json = SSD1B
            .replace(
                r#""reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],"#,
                "",
            )
            .replace(r#""mid_block_type": "UNetMidBlock2D","#, "")
            .replace("[1, 2, 4]", "[1, 2, 10]");
        let c = unet(&json).unwrap();
        assert_eq!(c.up[0].depths, vec![10, 10, 10]);
        assert_eq!(c.up[1].depths, vec![2, 2, 2]);
        assert_eq!(c.mid, MidBlock::CrossAttn { depth: 10 });
    }

    #[test]
    fn a_list_entry_of_the_wrong_length_names_file_and_key() {
        let json = SSD1B.replace("[[4, 4, 10], [2, 1, 1], 1]", "[[4, 10], [2, 1, 1], 1]");
        let err = unet(&json).unwrap_err().to_string();
        assert!(err.contains("unet/config.json"), "{err}");
        assert!(
            err.contains("reverse_transformer_layers_per_block"),
            "{err}"
        );
    }

    /// stable-diffusion-v1-5's `unet/config.json` (the keys it sets).
    const SD15: &str = r#"{
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;

    #[test]
    fn sd15_has_no_text_time_eight_heads_everywhere_and_convolution_projections() {
        let c = unet(SD15).unwrap();
        assert_eq!(c.text_time, None);
        assert!(!c.use_linear_projection);
        assert!(c.down.iter().all(|b| b.heads == 8) && c.up.iter().all(|b| b.heads == 8));
        assert_eq!(c.mid, MidBlock::CrossAttn { depth: 1 });
        assert_eq!(c.mid_heads, 8);
        assert_eq!(c.down[3].kind, BlockKind::Plain);
        assert_eq!(c.up[0].kind, BlockKind::Plain);
        assert_eq!(c.sample_size, 64);
        assert_eq!(c.time_embed_dim, 1280);
    }

    #[test]
    fn text_time_without_its_widths_names_the_key() {
        let json = SSD1B.replace(r#""addition_time_embed_dim": 256,"#, "");
        let err = unet(&json).unwrap_err().to_string();
        assert!(err.contains("addition_time_embed_dim"), "{err}");
    }

    #[test]
    fn unsupported_values_are_named() {
        let json = SSD1B.replace(
            r#""addition_embed_type": "text_time""#,
            r#""addition_embed_type": "text_image""#,
        );
        let err = unet(&json).unwrap_err().to_string();
        assert!(
            err.contains("addition_embed_type") && err.contains("text_image"),
            "{err}"
        );
    }
}
