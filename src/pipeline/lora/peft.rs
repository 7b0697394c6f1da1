//! diffusers/PEFT-format files: `{unet,text_encoder,text_encoder_2}.<module>.lora_A.weight` and
//! `.lora_B.weight` (what `save_lora_weights` writes today), and the older diffusers spellings that
//! `load_lora_weights` still converts (`state_dict_utils.py`): `.lora.down/up.weight`,
//! `.lora_linear_layer.down/up.weight`, and the attention-processor form
//! `attn1.processor.to_q_lora.down.weight` (`to_out_lora` → `to_out.0`; in text encoders
//! `to_q_lora` → `q_proj`, …, `to_out_lora` → `out_proj`).
//!
//! Scale per module, as diffusers 0.42.1 builds PEFT's `LoraConfig`: from the adapter metadata
//! diffusers writes into the safetensors header (`__metadata__["lora_adapter_metadata"]`, keys
//! `unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`, `unet.use_rslora`, …)
//! when present: `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA), each taken from its pattern
//! when one matches the module (PEFT `get_pattern_key`); without metadata these files carry no
//! alphas and the scale is 1 (`get_peft_kwargs`: `lora_alpha = r`).

use std::collections::BTreeMap;

use serde_json::Value;

use super::LoraError;
use super::format::{Component, ModuleLora, RawFile, Targets};

/// diffusers' key for its adapter metadata in the safetensors header
/// (`LORA_ADAPTER_METADATA_KEY`, loaders/lora_base.py).
const METADATA_KEY: &str = "lora_adapter_metadata";

/// Which matrix of a pair a key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
}

/// The pairs of a diffusers/PEFT file.
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
    let metadata = adapter_metadata(raw).map_err(|m| LoraError::File {
        uri: uri.to_string(),
        message: m,
    })?;
    // (component, module) → [down key, up key].
    let mut pairs: BTreeMap<(Component, String), [Option<&str>; 2]> = BTreeMap::new();
    for (key, _) in &raw.tensors {
        let (component, rest) = split_component(key).ok_or_else(|| {
            err(key, "expected a key starting with unet., text_encoder. or text_encoder_2. (diffusers) or lora_unet_/lora_te… (kohya)".into())
        })?;
        let (module, part) = module_and_part(component, rest).ok_or_else(|| {
            err(key, "unknown LoRA key (expected <module>.lora_A.weight / .lora_B.weight or an older diffusers spelling)".into())
        })?;
        let slot = &mut pairs.entry((component, module)).or_default()[part as usize];
        if slot.replace(key).is_some() {
            return Err(err(
                key,
                "a second tensor for the same module and matrix".into(),
            ));
        }
    }
    let mut out = Vec::with_capacity(pairs.len());
    for ((component, module), [down_key, up_key]) in pairs {
        let (Some(down_key), Some(up_key)) = (down_key, up_key) else {
            let present = down_key.or(up_key).unwrap_or_default();
            return Err(err(
                present,
                "has no matching lora_A/lora_B (down/up) weight".into(),
            ));
        };
        let ct = targets
            .components
            .get(&component)
            .ok_or_else(|| err(down_key, format!("the model has no {}", component.name())))?;
        let weight = ct.dotted(&module).ok_or_else(|| {
            err(
                down_key,
                format!("the model's {} has no module `{module}`", component.name()),
            )
        })?;
        let (Some(down), Some(up)) = (raw.get(down_key).cloned(), raw.get(up_key).cloned()) else {
            return Err(err(down_key, "missing tensor".into()));
        };
        let rank = down.dims().first().copied().unwrap_or(0);
        if rank == 0 {
            return Err(err(down_key, "rank 0".into()));
        }
        let scale = match &metadata {
            None => 1.0,
            Some(all) => {
                config_scale(all, component, &module, rank).map_err(|m| err(down_key, m))?
            }
        };
        out.push(ModuleLora {
            component,
            weight,
            key: down_key.to_string(),
            down,
            up,
            scale,
        });
    }
    Ok(out)
}

fn split_component(key: &str) -> Option<(Component, &str)> {
    // `text_encoder_2.` before `text_encoder.`: the longer prefix first.
    [
        Component::TextEncoder2,
        Component::TextEncoder,
        Component::Unet,
    ]
    .into_iter()
    .find_map(|c| {
        key.strip_prefix(c.name())?
            .strip_prefix('.')
            .map(|rest| (c, rest))
    })
}

/// `<module><suffix>` → the module's dotted path (in the model's naming) and the matrix.
fn module_and_part(component: Component, rest: &str) -> Option<(String, Part)> {
    const SUFFIXES: [(&str, Part); 6] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
    ];
    let text = component != Component::Unet;
    let (module, part) = match SUFFIXES
        .iter()
        .find_map(|(s, p)| rest.strip_suffix(s).map(|m| (m.to_string(), *p)))
    {
        Some(found) => found,
        None => {
            // The attention-processor form: `<attn>.to_q_lora.down.weight`.
            let (head, part) = match rest.strip_suffix("_lora.down.weight") {
                Some(h) => (h, Part::Down),
                None => (rest.strip_suffix("_lora.up.weight")?, Part::Up),
            };
            let (attn, proj) = head.rsplit_once('.')?;
            let proj = match (proj, text) {
                ("to_q", false) => "to_q",
                ("to_k", false) => "to_k",
                ("to_v", false) => "to_v",
                ("to_out", false) => "to_out.0",
                ("to_q", true) => "q_proj",
                ("to_k", true) => "k_proj",
                ("to_v", true) => "v_proj",
                ("to_out", true) => "out_proj",
                _ => return None,
            };
            (format!("{attn}.{proj}"), part)
        }
    };
    // diffusers removes the processor level of UNet keys (`KEYS_TO_ALWAYS_REPLACE`).
    let module = module.replace(".processor.", ".");
    let module = module
        .strip_suffix(".processor")
        .unwrap_or(&module)
        .to_string();
    Some((module, part))
}

/// The `lora_adapter_metadata` JSON object of the header, when there is one.
fn adapter_metadata(raw: &RawFile) -> Result<Option<serde_json::Map<String, Value>>, String> {
    let Some(text) = raw.metadata.get(METADATA_KEY) else {
        return Ok(None);
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) | Err(_) => Err(format!(
            "header metadata `{METADATA_KEY}` is not a JSON object"
        )),
    }
}

/// `alpha / rank` for `module` from the component's entries of the adapter metadata (PEFT's
/// `LoraLayer.update_layer`: `scaling = lora_alpha / r`, or `/ sqrt(r)` with `use_rslora`).
fn config_scale(
    all: &serde_json::Map<String, Value>,
    component: Component,
    module: &str,
    actual_rank: usize,
) -> Result<f64, String> {
    let prefix = format!("{}.", component.name());
    let get = |key: &str| all.get(&format!("{prefix}{key}"));
    if !all.keys().any(|k| k.starts_with(&prefix)) {
        return Err(format!(
            "the adapter metadata has no `{prefix}*` entries for this {}",
            component.name()
        ));
    }
    if get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err("DoRA adapters (use_dora) are not supported".into());
    }
    if get("lora_bias").and_then(Value::as_bool) == Some(true) {
        return Err("LoRA-with-bias adapters (lora_bias) are not supported".into());
    }
    // Absent values take `LoraConfig`'s defaults (peft 0.22: r = 8, lora_alpha = 8).
    let r = get("r").and_then(Value::as_f64).unwrap_or(8.0);
    let alpha = get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let pattern = |name: &str| get(name).and_then(|p| pattern_value(p, module));
    let r = pattern("rank_pattern").unwrap_or(r);
    let alpha = pattern("alpha_pattern").unwrap_or(alpha);
    if r != actual_rank as f64 {
        return Err(format!(
            "rank {actual_rank}, but the adapter metadata says {r} for `{module}`"
        ));
    }
    let rslora = get("use_rslora").and_then(Value::as_bool) == Some(true);
    Ok(if rslora { alpha / r.sqrt() } else { alpha / r })
}

/// The value of the first key of a `rank_pattern`/`alpha_pattern` object that matches `module`, as
/// PEFT's `get_pattern_key` matches (`(.*\.)?(key)$`): the whole path, or its end after a `.`; a
/// key starting with `^` (diffusers writes those) only the whole path. Keys are compared literally.
fn pattern_value(patterns: &Value, module: &str) -> Option<f64> {
    patterns.as_object()?.iter().find_map(|(key, value)| {
        let hit = match key.strip_prefix('^') {
            Some(exact) => module == exact,
            None => module == key || module.ends_with(&format!(".{key}")),
        };
        hit.then(|| value.as_f64()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_diffusers_spelling_names_the_module_and_matrix() {
        let unet = |k: &str| module_and_part(Component::Unet, k).map(|(m, p)| (m, p == Part::Down));
        let te =
            |k: &str| module_and_part(Component::TextEncoder, k).map(|(m, p)| (m, p == Part::Down));
        let a = "down_blocks.1.attentions.0.transformer_blocks.0.attn1";
        assert_eq!(
            unet(&format!("{a}.to_q.lora_A.weight")),
            Some((format!("{a}.to_q"), true))
        );
        assert_eq!(
            unet(&format!("{a}.to_out.0.lora.up.weight")),
            Some((format!("{a}.to_out.0"), false))
        );
        assert_eq!(
            unet(&format!("{a}.processor.to_out_lora.down.weight")),
            Some((format!("{a}.to_out.0"), true))
        );
        let s = "text_model.encoder.layers.0.self_attn";
        assert_eq!(
            te(&format!("{s}.to_k_lora.up.weight")),
            Some((format!("{s}.k_proj"), false))
        );
        assert_eq!(
            te("text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight"),
            Some(("text_model.encoder.layers.0.mlp.fc1".into(), true))
        );
        assert_eq!(unet("conv_in.alpha"), None);
        assert_eq!(unet(&format!("{a}.to_x_lora.up.weight")), None);
    }

    #[test]
    fn metadata_patterns_pick_the_rank_and_alpha_of_each_module() {
        let all: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"^mid_block.attentions.0.proj_in": 2},
                "unet.alpha_pattern": {"proj_out": 3}, "text_encoder.r": 4, "text_encoder.use_rslora": true}"#,
        )
        .unwrap();
        let scale = |c, m: &str, r| config_scale(&all, c, m, r);
        assert_eq!(scale(Component::Unet, "conv_in", 4), Ok(2.0));
        assert_eq!(
            scale(Component::Unet, "mid_block.attentions.0.proj_in", 2),
            Ok(4.0)
        );
        // `^` anchors the whole path: a longer path ending the same way does not match.
        assert!(scale(Component::Unet, "x.mid_block.attentions.0.proj_in", 2).is_err());
        assert_eq!(
            scale(Component::Unet, "up_blocks.0.attentions.1.proj_out", 4),
            Ok(0.75)
        );
        // rsLoRA: alpha (absent: LoraConfig's 8) over sqrt(r).
        assert_eq!(scale(Component::TextEncoder, "q", 4), Ok(4.0));
        let e = scale(Component::TextEncoder2, "q", 4).unwrap_err();
        assert!(e.contains("text_encoder_2.*"), "{e}");
    }
}
