#!/usr/bin/env python3
"""Build the tiny Stable Diffusion 1.5 and 2.1-v parity fixtures and their diffusers references.

Writes, under tests/fixtures/ (or --out):
  models/sd15-tiny/      a StableDiffusionPipeline folder with the block structure of SD v1-5: one CLIP
                         text encoder (quick_gelu, last hidden state), four UNet levels with attention
                         in the first three, `attention_head_dim` 2 meaning 2 heads at every level,
                         1x1-convolution projections (`use_linear_projection: false`), no `text_time`,
                         VAE scaling 0.18215, PNDM (skip_prk_steps) as its scheduler, and a safety
                         checker and feature extractor named in model_index.json (as the hub repo has
                         them; the folders are not shipped, nothing runs them).
  models/sd21-v-tiny/    the same for SD 2.1 (768-v): an OpenCLIP-style encoder (gelu, pads with "!"),
                         heads per level, linear projections, `upcast_attention`, DDIM with
                         `prediction_type: v_prediction`, no safety checker.
  reference/<model>.safetensors + .json   tensors computed by diffusers/transformers on those weights
  reference/schedulers-sd.safetensors + .json   timesteps/sigmas of every sampler for both models'
                         scheduler configs, and PNDM's for the SDXL config
  reference/ssd-1b-tiny-pndm.safetensors + .json   PNDM runs of StableDiffusionXLPipeline on the
                         existing ssd-1b-tiny fixture (which this script reads and does not change)

The SDXL-family fixtures and references (make_fixtures.py) are left as they are. The Rust tests
(tests/it/parity_sd.rs) read these files; CI never runs Python. Re-run only when the fixtures must
change:  python scripts/parity/make_sd_fixtures.py  (requirements.txt beside it).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as base  # noqa: E402  (the tokenizer recipe, samplers, NoiseFeed)
from make_fixtures import SCHEDULERS as SDXL_SCHEDULERS  # noqa: E402

SCHEDULERS = SDXL_SCHEDULERS + ["pndm"]
_make_sdxl_family_scheduler = base.make_scheduler


def make_scheduler(name, config):
    """make_fixtures.make_scheduler, and PNDM from the same config (diffusers' `from_config`)."""
    if name == "pndm":
        return PNDMScheduler.from_config(config)
    return _make_sdxl_family_scheduler(name, config)


# SD v1-5's scheduler/scheduler_config.json (no timestep_spacing: each class uses its own default).
SD15_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
# SD 2.1 (768-v)'s scheduler/scheduler_config.json.
SD21V_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
# What zero-terminal-SNR fine-tunes of SD 2.x ship (Lin et al. 2023, arXiv:2305.08891: rescaled betas,
# trailing spacing).
SD21V_ZERO_SNR_SCHEDULER = dict(SD21V_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing")

TE = {
    # CLIP ViT-L/14: hidden 768, 12 layers, 12 heads, MLP 3072, quick_gelu
    "sd15": dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                 hidden_act="quick_gelu"),
    # OpenCLIP ViT-H/14 as converted for SD 2.x: hidden 1024, 23 layers (the 24th dropped), 16 heads,
    # MLP 4096, gelu
    "sd21-v": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   hidden_act="gelu"),
}


def unet_config(kind):
    common = dict(
        in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,  # 32
        block_out_channels=[8, 16, 16, 16],  # [320, 640, 1280, 1280]
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        cross_attention_dim=TE[kind]["hidden_size"],  # 768 (SD 1.x), 1024 (SD 2.x)
    )
    if kind == "sd15":
        return dict(common, sample_size=8,  # 64 (512 px)
                    attention_head_dim=2)  # 8: heads at every level
    return dict(common, sample_size=16,  # 96 (768 px)
                attention_head_dim=[1, 2, 4, 4],  # [5, 10, 20, 20]: heads per level
                use_linear_projection=True, upcast_attention=True)


VAE = dict(base.VAE, scaling_factor=0.18215)  # the SD VAE: same blocks as SDXL's, scaling 0.18215
del VAE["force_upcast"]  # SD v1-5's vae/config.json does not set it (diffusers' default: True)


def build_model(kind, out, vocab, merges, seed):
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=2, pad_token_id=1, **TE[kind]))
    unet = UNet2DConditionModel(**unet_config(kind))
    vae = AutoencoderKL(**VAE)
    with torch.no_grad():  # as make_fixtures.py: every weight matters
        for module in (te, unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    if kind == "sd15":
        sched, pad = PNDMScheduler.from_config(SD15_SCHEDULER), "<|endoftext|>"
    else:
        sched, pad = DDIMScheduler.from_config(SD21V_SCHEDULER), "!"
    tmp_tok = out / "_tok"
    base.write_tokenizer(tmp_tok, vocab, merges, pad, object_form=(pad == "!"))
    tok = CLIPTokenizer.from_pretrained(tmp_tok)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = out / "models" / f"{kind}-tiny"
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The scheduler config exactly as the hub repo ships it: diffusers would write every class default
    # (SD 1.5's lacks `timestep_spacing`, so Euler must fall back to its own default, linspace).
    shipped = {"_class_name": type(sched).__name__, "_diffusers_version": "0.8.0",
               **(SD15_SCHEDULER if kind == "sd15" else SD21V_SCHEDULER)}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(shipped, indent=2) + "\n")
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tmp_tok, folder / "tokenizer")
    shutil.rmtree(tmp_tok)
    if kind == "sd15":
        # The hub's SD v1-5 checkpoint keeps the pre-transformers-5 `text_model.` prefix.
        for f in (folder / "text_encoder").glob("*.safetensors"):
            base.rekey(f, lambda k: k if k.startswith("text_model.") else "text_model." + k)
    print(f"{kind}-tiny: unet {sum(p.numel() for p in unet.parameters())} params, "
          f"te {sum(p.numel() for p in te.parameters())}, vae {sum(p.numel() for p in vae.parameters())}")
    return folder


def name_safety_checker(folder):
    """model_index.json as SD v1-5 ships it: a safety checker and feature extractor are named."""
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["requires_safety_checker"] = True
    path.write_text(json.dumps(index, indent=2) + "\n")


def pipeline_cases(kind):
    size = 64 if kind == "sd15" else 128
    cases = [dict(name=s, scheduler=s, prompts=["a photo of a cat"], negative_prompts=None, guidance_scale=7.5,
                  steps=4, width=size, height=size) for s in SCHEDULERS]
    cases.append(dict(name="pndm_10", scheduler="pndm", prompts=["a photo of the sea"], negative_prompts=None,
                      guidance_scale=7.5, steps=10, width=size, height=size))
    cases.append(dict(name="ddim_negative", scheduler="ddim", prompts=["a wolf, dark fantasy"],
                      negative_prompts=["blurry, low quality"], guidance_scale=7.0, steps=4, width=size, height=size))
    cases.append(dict(name="euler_batch2", scheduler="euler", prompts=["a photo of a cat", "a wolf, half ice and half fire"],
                      negative_prompts=["blurry", "low quality"], guidance_scale=6.0, steps=3, width=size, height=size))
    cases.append(dict(name="euler_no_cfg", scheduler="euler", prompts=["a castle in the mountains"],
                      negative_prompts=None, guidance_scale=1.0, steps=3, width=size, height=size))
    if kind == "sd15":
        # Latent 5x9 through three downsamplers: upsampling goes to each skip's size.
        cases.append(dict(name="pndm_72x40", scheduler="pndm", prompts=["a portrait of an astronaut"],
                          negative_prompts=None, guidance_scale=7.5, steps=3, width=72, height=40))
    return cases


def run_case(pipe, config, case, tensors, seed, prefix=""):
    """make_fixtures.run_case with this script's samplers (PNDM too)."""
    saved = base.make_scheduler
    base.make_scheduler = make_scheduler
    try:
        scratch = {}
        base.run_case(pipe, config, case, scratch, seed)
    finally:
        base.make_scheduler = saved
    tensors.update({prefix + k: v for k, v in scratch.items()})


def module_references(pipe, tensors):
    ids = base.tokenize(pipe.tokenizer, base.TOKEN_PROMPTS)
    tensors["tokens.ids1"] = ids
    with torch.no_grad():
        tensors["text.hidden1"] = pipe.text_encoder(ids)[0]  # last_hidden_state (final layer norm)
        pe, ne = pipe.encode_prompt(prompt=["a photo of a cat", "hello!"], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=["blurry", ""])
        tensors["encode.prompt_embeds"], tensors["encode.negative_embeds"] = pe, ne
        unet = pipe.unet
        t = torch.tensor([999.0, 751.0, 500.5, 1.0])
        tensors["temb.t"], tensors["temb.out"] = t, unet.time_embedding(unet.time_proj(t))
        g = torch.Generator().manual_seed(7)
        x = torch.randn((4, 4, 8, 8), generator=g)
        ehs = torch.cat([ne, pe])
        tensors["unet.sample"], tensors["unet.encoder_hidden_states"] = x, ehs
        tensors["unet.timestep"] = torch.tensor([751.0])
        tensors["unet.out"] = unet(x, 751.0, encoder_hidden_states=ehs).sample
        z = torch.randn((1, 4, 8, 8), generator=g)
        tensors["vae.latents"], tensors["vae.out"] = z, pipe.vae.decode(z, return_dict=False)[0]
    return ids


def scheduler_references(configs):
    tensors = {}
    for prefix, config, names in configs:
        for name in names:
            for n in (1, 2, 3, 4, 7, 10, 25, 50, 150):
                s = make_scheduler(name, config)
                s.set_timesteps(n)
                key = f"{prefix}.{name}.{n}"
                tensors[f"{key}.timesteps"] = s.timesteps.to(torch.float64)
                if getattr(s, "sigmas", None) is not None and name not in ("ddim", "pndm"):
                    tensors[f"{key}.sigmas"] = torch.as_tensor(s.sigmas, dtype=torch.float64)
                tensors[f"{key}.init_noise_sigma"] = torch.tensor([float(s.init_noise_sigma)], dtype=torch.float64)
    return tensors


def meta(model, cases, **extra):
    return {"generated_by": "scripts/parity/make_sd_fixtures.py", "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "model": model,
            "cases": cases, **extra}


def write(out, stem, tensors, info):
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "reference" / f"{stem}.safetensors")
    (out / "reference" / f"{stem}.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
    ap.add_argument("--schedulers-only", action="store_true", help="only reference/schedulers-sd.*")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    merges = base.learn_merges(48)
    vocab = base.build_vocab(merges)
    (out / "reference").mkdir(parents=True, exist_ok=True)

    configs = {"sd15": SD15_SCHEDULER, "sd21-v": SD21V_SCHEDULER, "sd21-v-zero-snr": SD21V_ZERO_SNR_SCHEDULER,
               "sdxl": base.SCHEDULER}
    sched = scheduler_references([(k, v, ["pndm"] if k == "sdxl" else SCHEDULERS) for k, v in configs.items()])
    write(out, "schedulers-sd", sched, {"generated_by": "scripts/parity/make_sd_fixtures.py", "configs": configs})
    if args.schedulers_only:
        return

    for seed, kind in enumerate(["sd15", "sd21-v"]):
        folder = build_model(kind, out, vocab, merges, seed=2000 + seed)
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        tensors = {}
        ids = module_references(pipe, tensors)
        base.independent_tokenizer_check_one(folder / "tokenizer", base.TOKEN_PROMPTS, ids,
                                             "<|endoftext|>" if kind == "sd15" else "!")
        cases = pipeline_cases(kind)
        config = dict(pipe.scheduler.config)
        for i, case in enumerate(cases):
            run_case(pipe, config, case, tensors, seed=100 * (seed + 7) + i)
        write(out, f"{kind}-tiny", tensors, meta(f"models/{kind}-tiny", cases, token_prompts=base.TOKEN_PROMPTS,
                                                  encode={"prompts": ["a photo of a cat", "hello!"],
                                                          "negative_prompts": ["blurry", ""]}))
        if kind == "sd15":
            name_safety_checker(folder)

    # PNDM on an SDXL-family model (the existing fixture, read only).
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "models" / "ssd-1b-tiny", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cases = [dict(name="pndm", scheduler="pndm", prompts=["a photo of a cat"], negative_prompts=None,
                  guidance_scale=5.0, steps=4, width=64, height=64),
             dict(name="pndm_10", scheduler="pndm", prompts=["a photo of the sea"], negative_prompts=["blurry"],
                  guidance_scale=5.0, steps=10, width=64, height=64)]
    tensors = {}
    config = dict(pipe.scheduler.config)
    for i, case in enumerate(cases):
        run_case(pipe, config, case, tensors, seed=900 + i)
    write(out, "ssd-1b-tiny-pndm", tensors, meta("models/ssd-1b-tiny", cases))


if __name__ == "__main__":
    main()
