#!/usr/bin/env python3
"""Tiny random LoRA adapters for the tiny SDXL-family fixtures, and diffusers' renders with them.

Reads the existing tiny models (never changes them or their references) and writes NEW files only:
  fixtures/loras/ssd1b-peft.safetensors        diffusers/PEFT format, written by diffusers' own
                                               `save_lora_weights` from PEFT adapters (UNet, both text
                                               encoders), with the adapter metadata diffusers stores in
                                               the header (r 4, lora_alpha 8, a rank_pattern and an
                                               alpha_pattern entry), 3x3 convolution LoRA included
  fixtures/loras/ssd1b-old.safetensors         the same UNet pairs in the older diffusers spelling
                                               (`.lora.down.weight`/`.lora.up.weight`), text encoders as
                                               `.lora_linear_layer.down/up.weight`; no metadata (scale 1)
  fixtures/loras/ssd1b-kohya.safetensors       kohya format, diffusers-layout module names
                                               (`lora_unet_down_blocks_…`, `lora_te1_…`, `lora_te2_…`),
                                               per-module `.alpha`, LoCon (3x3 down, 1x1 up) on resnets
  fixtures/loras/sdxl-kohya-sgm.safetensors    kohya format with sd-scripts' SGM UNet names
                                               (`input_blocks_4_1_…`, `middle_block_…`, `output_blocks_…`,
                                               `input_blocks_0_0` = conv_in, `out_2` = conv_out) for sdxl-tiny
  reference/lora.safetensors + lora.json       per case: initial latents, latents after every step, the
                                               final image, and a few fused weights

Every case loads adapters with `load_lora_weights` and merges them with `fuse_lora` (one adapter:
`fuse_lora(lora_scale=s)`; two: `set_adapters(names, adapter_weights=[...])` then `fuse_lora()`), on
fresh pipelines. Before saving, the script checks that diffusers changed exactly the targeted weights
and that each fused weight is W + scale * alpha / rank * up @ down computed here independently: the
kohya alphas are chosen so that diffusers' handling of per-module alphas agrees with kohya's (the
attention projections and the text encoders share the most common alpha; `kohya_alpha`,
docs/model-notes.md §9).

Run (requirements.txt beside it, which pins peft):  python scripts/parity/make_lora_fixtures.py
Reruns give the same tensors and metadata values; the order of the metadata entries in
ssd1b-peft.safetensors' header may differ (safetensors writes them from a hash map).
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import diffusers
import peft
import torch
import transformers
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import run_case  # noqa: E402  (the base fixtures' own render recipe)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj", "conv_shortcut")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
RANK = 4


def modules(model, suffixes):
    """(name, module) of every Linear/Conv2d whose name ends with one of `suffixes`, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n == s or n.endswith("." + s) for s in suffixes)]


def pair(gen, module, rank, conv_down=True):
    """A random (down, up) for `module`: down (rank, in[, k, k]), up (out, rank[, 1, 1]), scaled so that
    up @ down is a sizeable but bounded change of the tiny random weights."""
    w = module.weight
    if w.ndim == 4:
        k = w.shape[2] if conv_down else 1
        down = torch.randn((rank, w.shape[1], k, k), generator=gen) / (w.shape[1] * k * k) ** 0.5
        up = torch.randn((w.shape[0], rank, 1, 1), generator=gen) * 0.4 / rank ** 0.5
    else:
        down = torch.randn((rank, w.shape[1]), generator=gen) / w.shape[1] ** 0.5
        up = torch.randn((w.shape[0], rank), generator=gen) * 0.4 / rank ** 0.5
    return down, up


def load(folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------
# The files.


def write_peft(folder, out, gen):
    """PEFT adapters filled with seeded random weights, saved by diffusers with their configs as metadata.
    Returns {component: {module: (down, up, scale)}} as diffusers will apply them."""
    pipe = load(folder)
    unet_names = [n for n, _ in modules(pipe.unet, UNET_TARGETS)]
    rank_module = next(n for n in unet_names if n.endswith("attentions.0.proj_in"))
    alpha_module = next(n for n in unet_names if n.endswith("ff.net.2"))
    configs = {
        "unet": LoraConfig(r=RANK, lora_alpha=8, target_modules=list(UNET_TARGETS), init_lora_weights=False,
                           rank_pattern={rank_module: 2}, alpha_pattern={alpha_module: 3}),
        "text_encoder": LoraConfig(r=RANK, lora_alpha=8, target_modules=list(TE_TARGETS), init_lora_weights=False),
        "text_encoder_2": LoraConfig(r=RANK, lora_alpha=6, target_modules=list(TE_TARGETS), init_lora_weights=False),
    }
    layers, expected = {}, {}
    for component, config in configs.items():
        model = getattr(pipe, component)
        model.add_adapter(config)
        expected[component] = {}
        for name, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                conv = a.ndim == 4
                down, up = pair(gen, m.get_base_layer(), a.shape[0], conv_down=conv)
                a.data.copy_(down.reshape(a.shape))
                b.data.copy_(up.reshape(b.shape))
                expected[component][name] = (a.detach().clone(), b.detach().clone(), m.scaling["default"])
        layers[component] = get_peft_model_state_dict(model)
    StableDiffusionXLPipeline.save_lora_weights(
        out.parent, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name=out.name, safe_serialization=True,
        unet_lora_adapter_metadata=metadata(configs["unet"]),
        text_encoder_lora_adapter_metadata=metadata(configs["text_encoder"]),
        text_encoder_2_lora_adapter_metadata=metadata(configs["text_encoder_2"]))
    assert expected["unet"][rank_module][0].shape[0] == 2 and expected["unet"][alpha_module][2] == 3 / RANK
    return expected


def metadata(config):
    """A config as diffusers' training scripts store it (`LoraConfig.to_dict()`), sets sorted so that the
    file is the same on every run."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def write_old(peft_file, out, expected_peft):
    """The PEFT file's pairs in the older diffusers spellings, without metadata: scale 1 everywhere."""
    old = {}
    for key, t in load_file(peft_file).items():
        if key.startswith("unet."):
            key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        else:
            key = key.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(
                ".lora_B.weight", ".lora_linear_layer.up.weight")
        old[key] = t
    save_file(old, out)
    return {c: {m: (d, u, 1.0) for m, (d, u, _) in mods.items()} for c, mods in expected_peft.items()}


def kohya_alpha(component, module, i):
    """Alpha 4 (the most common one) wherever diffusers 0.42.1 does not read a module's own alpha: the
    attention projections (their alpha keys keep the `to_q_lora` spelling PEFT's alpha_pattern never
    matches) and every text-encoder module (with transformers 5's flattened CLIPTextModel the alpha
    keys keep the `text_model.` prefix the weights lose). The other UNet modules vary, so per-module
    alphas are exercised where diffusers reads them."""
    if component != "unet" or module.endswith(ATTENTION):
        return 4.0
    return [2.0, 8.0, 1.5, 6.0][i % 4]


def write_kohya(folder, out, gen, sgm):
    """kohya keys (`lora_unet_…` in diffusers or SGM layout, `lora_te1_`/`lora_te2_` with transformers'
    `text_model_` names) with `.alpha`. Returns the expected pairs and scales by diffusers module."""
    pipe = load(folder)
    tensors, expected = {}, {}
    targets = {"unet": UNET_TARGETS + ("downsamplers.0.conv", "upsamplers.0.conv") + (("conv_in", "conv_out") if sgm else ())}
    targets.update(text_encoder=TE_TARGETS, text_encoder_2=TE_TARGETS)
    for component, suffixes in targets.items():
        model = getattr(pipe, component)
        expected[component] = {}
        for i, (name, m) in enumerate(modules(model, suffixes)):
            if component == "unet":
                key = "lora_unet_" + (to_sgm(name, pipe.unet.config) if sgm else name).replace(".", "_")
            else:
                prefix = "lora_te1_" if component == "text_encoder" else "lora_te2_"
                te_name = name if name.startswith("text_model.") else "text_model." + name
                key = prefix + te_name.replace(".", "_")
            down, up = pair(gen, m, RANK)
            alpha = kohya_alpha(component, name, i)
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            expected[component][name] = (down, up, alpha / RANK)
    save_file(tensors, out)
    if sgm:
        check_sgm_names(tensors, pipe.unet.config, expected["unet"])
    return expected


SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def to_sgm(name, config):
    """A diffusers UNet module name in sd-scripts' SGM numbering (the inverse of diffusers'
    `_maybe_map_sgm_blocks_to_diffusers`; checked against it by `check_sgm_names`)."""
    per = config.layers_per_block + 1
    parts = name.split(".")
    if name in ("conv_in", "conv_out"):
        return {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}[name]

    def resnet(rest):
        return ".".join([SGM_RESNET.get(rest[0], rest[0])] + rest[1:])

    if parts[0] == "down_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * per}.0.op"
        index = 1 + b * per + int(parts[3])
        inner = {"resnets": 0, "attentions": 1}[kind]
        rest = resnet(parts[4:]) if kind == "resnets" else ".".join(parts[4:])
        return f"input_blocks.{index}.{inner}.{rest}"
    if parts[0] == "mid_block":
        block = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        rest = resnet(parts[3:]) if parts[1] == "resnets" else ".".join(parts[3:])
        return f"middle_block.{block}.{rest}"
    if parts[0] == "up_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            return f"output_blocks.{b * per + per - 1}.2.{'.'.join(parts[4:])}"
        index = b * per + int(parts[3])
        inner = {"resnets": 0, "attentions": 1}[kind]
        rest = resnet(parts[4:]) if kind == "resnets" else ".".join(parts[4:])
        return f"output_blocks.{index}.{inner}.{rest}"
    raise ValueError(f"no SGM name for {name}")


def check_sgm_names(tensors, config, expected_unet):
    """diffusers' own mapping takes every SGM key back to the module it was written for."""
    downs = {k: v for k, v in tensors.items() if k.startswith("lora_unet_") and k.endswith("lora_down.weight")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(downs), SimpleNamespace(layers_per_block=config.layers_per_block))
    peft_keys = convert_unet_state_dict_to_peft({_convert_unet_lora_key(k): v for k, v in mapped.items()})
    back = {k.split(".lora_A.")[0].replace(".processor", "") for k in peft_keys}
    assert back == set(expected_unet), sorted(back ^ set(expected_unet))


# --------------------------------------------------------------------------------------------------
# The cases.


def fused_state(pipe):
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in ("unet", "text_encoder", "text_encoder_2")}


def check_fused(before, after, adapters):
    """Exactly the targeted weights changed, each to W + Σ s · scale · up @ down (computed here)."""
    want = {c: {} for c in before}
    for expected, s in adapters:
        for c, mods in expected.items():
            for m, (down, up, scale) in mods.items():
                delta = (up.flatten(1) @ down.flatten(1)).reshape(before[c][m + ".weight"].shape) * (s * scale)
                want[c][m + ".weight"] = want[c].get(m + ".weight", before[c][m + ".weight"]) + delta
    for c in before:
        changed = {k for k in before[c] if not torch.equal(before[c][k], after[c][k])}
        assert changed == set(want[c]), (c, sorted(changed ^ set(want[c]))[:5])
        for k, w in want[c].items():
            err = (after[c][k] - w).abs().max().item()
            assert err <= 1e-5 * max(1.0, w.abs().max().item()), (c, k, err)


CASE = dict(scheduler="euler", prompts=["a photo of a cat"], negative_prompts=["blurry"], guidance_scale=5.0,
            steps=4, width=64, height=64)


def render(models, case, adapters, tensors, seed):
    """Loads `adapters` [(file, scale, expected)] into a fresh pipeline of `case["model"]`, fuses them,
    checks the fused weights, renders the case and keeps a few fused weights."""
    pipe = load(models / case["model"])
    before = fused_state(pipe)
    names = []
    for i, (file, _, _) in enumerate(adapters):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    if len(adapters) == 1:
        pipe.fuse_lora(lora_scale=adapters[0][1], adapter_names=names)
    else:
        pipe.set_adapters(names, adapter_weights=[s for _, s, _ in adapters])
        pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    after = fused_state(pipe)
    check_fused(before, after, [(e, s) for _, s, e in adapters])
    run_case(pipe, dict(pipe.scheduler.config), case, tensors, seed)
    for c, k in case["fused"]:
        tensors[f"{case['name']}.fused.{c}.{k}"] = after[c][k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
    args = ap.parse_args()
    out = Path(args.out)
    models, loras = out / "models", out / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(2024)

    peft_file = loras / "ssd1b-peft.safetensors"
    exp_peft = write_peft(models / "ssd-1b-tiny", peft_file, gen)
    exp_old = write_old(peft_file, loras / "ssd1b-old.safetensors", exp_peft)
    exp_kohya = write_kohya(models / "ssd-1b-tiny", loras / "ssd1b-kohya.safetensors", gen, sgm=False)
    exp_sgm = write_kohya(models / "sdxl-tiny", loras / "sdxl-kohya-sgm.safetensors", gen, sgm=True)

    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused = [["unet", attn], ["unet", "down_blocks.0.resnets.0.conv1.weight"],
             ["unet", "down_blocks.1.attentions.0.proj_in.weight"],
             ["text_encoder", next(k for k in exp_peft["text_encoder"] if k.endswith("layers.0.self_attn.q_proj")) + ".weight"],
             ["text_encoder_2", next(k for k in exp_peft["text_encoder_2"] if k.endswith("layers.1.mlp.fc1")) + ".weight"]]
    cases = [
        dict(CASE, name="peft", model="ssd-1b-tiny", loras=[["ssd1b-peft.safetensors", 0.8]], fused=fused),
        dict(CASE, name="old", model="ssd-1b-tiny", loras=[["ssd1b-old.safetensors", 1.2]], fused=fused),
        dict(CASE, name="kohya", model="ssd-1b-tiny", loras=[["ssd1b-kohya.safetensors", -0.7]], fused=fused),
        dict(CASE, name="sgm", model="sdxl-tiny", loras=[["sdxl-kohya-sgm.safetensors", 1.0]],
             fused=[["unet", "conv_in.weight"], ["unet", "mid_block.attentions.0.proj_in.weight"],
                    ["unet", "up_blocks.0.upsamplers.0.conv.weight"]]),
        dict(CASE, name="stack", model="ssd-1b-tiny",
             loras=[["ssd1b-peft.safetensors", 0.6], ["ssd1b-kohya.safetensors", -0.4]], fused=fused),
    ]
    expected = {"ssd1b-peft.safetensors": exp_peft, "ssd1b-old.safetensors": exp_old,
                "ssd1b-kohya.safetensors": exp_kohya, "sdxl-kohya-sgm.safetensors": exp_sgm}
    tensors = {}
    for i, case in enumerate(cases):
        adapters = [(loras / f, s, expected[f]) for f, s in case["loras"]]
        render(models, case, adapters, tensors, seed=7000 + i)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "reference" / "lora.safetensors")
    info = {"generated_by": "scripts/parity/make_lora_fixtures.py", "diffusers": diffusers.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "how": "load_lora_weights per adapter; one adapter: fuse_lora(lora_scale=s); several: "
                   "set_adapters(adapter_weights=[...]) then fuse_lora(); unload_lora_weights; render",
            "cases": cases}
    (out / "reference" / "lora.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
