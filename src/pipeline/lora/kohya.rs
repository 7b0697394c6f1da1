//! kohya-format files (sd-scripts' `networks/lora.py`, A1111's and ComfyUI's LoRA format):
//! `lora_{unet,te,te1,te2}_<module with every `.` written `_`>` with `.lora_down.weight`,
//! `.lora_up.weight` and an optional `.alpha`; a convolution adapter (LoCon) has a `k×k` down and a
//! `1×1` up.
//!
//! Underscored names are mapped back through the model's own weight names (every `.` of a weight's
//! module path written `_`, [`super::format::ComponentTargets`]), not by guessing where the dots were.
//! sd-scripts trains SDXL on the original SGM UNet, so SDXL files name UNet modules by SGM blocks
//! (`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_2_2_conv`): those are renumbered into
//! diffusers' blocks first, with the arithmetic of diffusers' `_maybe_map_sgm_blocks_to_diffusers`
//! and the renames of `_convert_unet_lora_key` (diffusers 0.42.1, `loaders/lora_conversion_utils.py`).
//!
//! Scale per module: `alpha / rank`, the module's own alpha; without one, 1 (alpha = rank), as
//! sd-scripts and A1111 read it. diffusers agrees whenever every module has an alpha and the
//! attention projections share the most common one (docs/model-notes.md §9 says where it departs).

use std::collections::BTreeMap;

use super::LoraError;
use super::format::{Component, ModuleLora, RawFile, Targets, scalar};

/// The pairs of a kohya file.
pub(crate) fn parse(
    raw: &RawFile,
    targets: &Targets,
    uri: &str,
) -> Result<Vec<ModuleLora>, LoraError> {
    let err = |tensor: &str, message: String| LoraError::Tensor {
        uri: uri.to_string(),
        tensor: tensor.to_string(),
        message,
    };
    // lora name → (down, up, alpha) keys.
    let mut groups: BTreeMap<&str, [Option<&str>; 3]> = BTreeMap::new();
    for (key, _) in &raw.tensors {
        let (name, part) = key.split_once('.').unwrap_or((key, ""));
        let slot = match part {
            "lora_down.weight" => 0,
            "lora_up.weight" => 1,
            "alpha" => 2,
            _ => {
                return Err(err(
                    key,
                    "unknown kohya key (expected .lora_down.weight, .lora_up.weight or .alpha)"
                        .into(),
                ));
            }
        };
        groups.entry(name).or_default()[slot] = Some(key);
    }
    let sgm = uses_sgm_blocks(groups.keys().copied());
    let mut out = Vec::with_capacity(groups.len());
    for (name, [down_key, up_key, alpha_key]) in groups {
        let (Some(down_key), Some(up_key)) = (down_key, up_key) else {
            let present = down_key.or(up_key).or(alpha_key).unwrap_or(name);
            return Err(err(
                present,
                "has no matching lora_down/lora_up weight".into(),
            ));
        };
        let (component, rest) =
            component_of(name).ok_or_else(|| err(down_key, "unknown prefix".into()))?;
        let ct = targets
            .components
            .get(&component)
            .ok_or_else(|| err(down_key, format!("the model has no {}", component.name())))?;
        let module = match (component, sgm) {
            (Component::Unet, Some(true)) => match sgm_to_diffusers(rest, targets.layers_per_block)
            {
                Some(m) => m,
                None => {
                    return Err(err(
                        down_key,
                        "an SGM UNet module this loader does not know".into(),
                    ));
                }
            },
            // diffusers drops the SGM-named keys of a file that also has diffusers-named ones.
            (Component::Unet, Some(false)) if is_sgm(rest) => {
                tracing::warn!(
                    tensor = down_key,
                    "ignoring an SGM-named key beside diffusers-named ones, as diffusers does"
                );
                continue;
            }
            _ => rest.to_string(),
        };
        let weight = ct
            .underscored(&module)
            .map_err(|()| {
                err(
                    down_key,
                    format!("`{module}` names more than one module of the model"),
                )
            })?
            .ok_or_else(|| {
                err(
                    down_key,
                    format!(
                        "no module of the model's {} is named `{module}` (with `_` for `.`)",
                        component.name()
                    ),
                )
            })?;
        let (down, up) = (raw.get(down_key).cloned(), raw.get(up_key).cloned());
        let (Some(down), Some(up)) = (down, up) else {
            return Err(err(down_key, "missing tensor".into()));
        };
        let rank = down.dims().first().copied().unwrap_or(0);
        if rank == 0 {
            return Err(err(down_key, "rank 0".into()));
        }
        let alpha = match alpha_key {
            Some(k) => {
                let t = raw.get(k).ok_or_else(|| err(k, "missing tensor".into()))?;
                scalar(t).ok_or_else(|| {
                    err(
                        k,
                        format!("alpha must be one number, got shape {:?}", t.dims()),
                    )
                })?
            }
            None => rank as f64,
        };
        out.push(ModuleLora {
            component,
            weight,
            key: down_key.to_string(),
            down,
            up,
            scale: alpha / rank as f64,
        });
    }
    Ok(out)
}

/// The component of a lora name and the module part after its prefix.
fn component_of(name: &str) -> Option<(Component, &str)> {
    [
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
    ]
    .into_iter()
    .find_map(|(p, c)| name.strip_prefix(p).map(|rest| (c, rest)))
}

fn is_sgm(module: &str) -> bool {
    ["input_blocks", "middle_block", "output_blocks"]
        .iter()
        .any(|p| module.contains(p))
}

/// `None` without UNet SGM names; `Some(true)` when the UNet keys use SGM block names only;
/// `Some(false)` when SGM names appear beside diffusers ones (diffusers then drops the SGM ones).
fn uses_sgm_blocks<'a>(names: impl Iterator<Item = &'a str>) -> Option<bool> {
    let (mut sgm, mut diffusers) = (false, false);
    for name in names {
        if let Some(rest) = name.strip_prefix("lora_unet_") {
            if is_sgm(rest) {
                sgm = true;
            } else if ["down_blocks", "mid_block", "up_blocks"]
                .iter()
                .any(|p| rest.contains(p))
            {
                diffusers = true;
            }
        }
    }
    sgm.then_some(!diffusers)
}

/// An SGM module name (underscored, without `lora_unet_`) → the diffusers one (underscored), as
/// diffusers 0.42.1 renames it: blocks renumbered with `layers_per_block`, then the resnet and
/// embedding renames. `None` for a name outside SGM's layout.
pub(crate) fn sgm_to_diffusers(module: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    // Modules outside the blocks (`_convert_unet_lora_key`).
    for (sgm, diffusers) in [
        ("input_blocks_0_0", "conv_in"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_2", "conv_out"),
    ] {
        if module == sgm {
            return Some(diffusers.to_string());
        }
    }
    let mut it = module.splitn(2, '_');
    let (head, rest) = (it.next()?, it.next()?);
    let (kind, rest) = match (head, rest) {
        ("input", r) => ("input", r.strip_prefix("blocks_")?),
        ("middle", r) => ("middle", r.strip_prefix("block_")?),
        ("output", r) => ("output", r.strip_prefix("blocks_")?),
        _ => return None,
    };
    let (index, rest) = split_number(rest)?;
    let renamed = match kind {
        "middle" => {
            let (inner, layer) = match index {
                0 => ("resnets", 0),
                1 => ("attentions", 0),
                2 => ("resnets", 1),
                _ => return None,
            };
            format!("mid_block_{inner}_{layer}_{}", resnet_parts(rest))
        }
        "input" => {
            let block = index.checked_sub(1)? / per;
            let layer = (index - 1) % per;
            let (inner_index, tail) = split_number(rest)?;
            if tail == "op" {
                format!("down_blocks_{block}_downsamplers_0_conv")
            } else {
                let inner = ["resnets", "attentions"].get(inner_index)?;
                format!("down_blocks_{block}_{inner}_{layer}_{}", resnet_parts(tail))
            }
        }
        _ => {
            let (block, layer) = (index / per, index % per);
            let (inner_index, tail) = split_number(rest)?;
            let inner = ["resnets", "attentions", "upsamplers"].get(inner_index)?;
            let layer = if inner_index < 2 { layer } else { 0 };
            format!("up_blocks_{block}_{inner}_{layer}_{}", resnet_parts(tail))
        }
    };
    Some(renamed)
}

/// `12_rest` → (12, "rest").
fn split_number(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('_').unwrap_or((s, ""));
    Some((n.parse().ok()?, rest))
}

/// An SGM resnet's layer names → diffusers' (`in_layers_2` → `conv1`, `out_layers_3` → `conv2`,
/// `emb_layers_1` → `time_emb_proj`, `skip_connection` → `conv_shortcut`); other names unchanged.
fn resnet_parts(tail: &str) -> String {
    match tail {
        "in_layers_2" => "conv1".into(),
        "out_layers_3" => "conv2".into(),
        "emb_layers_1" => "time_emb_proj".into(),
        "skip_connection" => "conv_shortcut".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names from diffusers 0.42.1's own mapping (`_maybe_map_sgm_blocks_to_diffusers` then
    /// `_convert_unet_lora_key`) for SDXL (`layers_per_block` 2):
    /// ```python
    /// sd = {f"lora_unet_{k}.lora_down.weight": torch.zeros(1) for k in SGM}
    /// sd = _maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    /// [_convert_unet_lora_key(k) for k in sd]
    /// ```
    #[test]
    fn sgm_blocks_are_renumbered_as_diffusers_does_for_sdxl() {
        let cases = [
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            (
                "input_blocks_2_0_emb_layers_1",
                "down_blocks_0_resnets_1_time_emb_proj",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "input_blocks_4_0_skip_connection",
                "down_blocks_1_resnets_0_conv_shortcut",
            ),
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_8_1_proj_out",
                "down_blocks_2_attentions_1_proj_out",
            ),
            ("middle_block_0_out_layers_3", "mid_block_resnets_0_conv2"),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            ("middle_block_2_in_layers_2", "mid_block_resnets_1_conv1"),
            (
                "output_blocks_0_0_skip_connection",
                "up_blocks_0_resnets_0_conv_shortcut",
            ),
            (
                "output_blocks_2_1_transformer_blocks_1_ff_net_2",
                "up_blocks_0_attentions_2_transformer_blocks_1_ff_net_2",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_8_0_out_layers_3",
                "up_blocks_2_resnets_2_conv2",
            ),
            ("input_blocks_0_0", "conv_in"),
            ("out_2", "conv_out"),
            ("time_embed_0", "time_embedding_linear_1"),
            ("label_emb_0_2", "add_embedding_linear_2"),
        ];
        for (sgm, want) in cases {
            assert_eq!(sgm_to_diffusers(sgm, 2).as_deref(), Some(want), "{sgm}");
        }
        assert_eq!(sgm_to_diffusers("middle_block_3_proj_in", 2), None);
        assert_eq!(sgm_to_diffusers("down_blocks_0_resnets_0_conv1", 2), None);
    }

    #[test]
    fn sgm_names_beside_diffusers_names_are_the_ones_diffusers_drops() {
        let sgm_only = [
            "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_te1_text_model_x",
        ];
        assert_eq!(uses_sgm_blocks(sgm_only.into_iter()), Some(true));
        let mixed = [
            "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_down_blocks_0_x",
        ];
        assert_eq!(uses_sgm_blocks(mixed.into_iter()), Some(false));
        assert_eq!(
            uses_sgm_blocks(["lora_unet_down_blocks_0_x"].into_iter()),
            None
        );
    }
}
