#!/usr/bin/env python3
"""Build the tiny SDXL-family parity fixtures and their diffusers reference tensors.

Writes, under tests/fixtures/ (or --out):
  models/{ssd-1b,sdxl,vega}-tiny/   diffusers-layout pipelines with random weights and the exact
                                    block structure of SSD-1B, SDXL base 1.0 and Segmind-Vega
                                    (asymmetric up blocks / resnet-only mid block / attention mid block),
                                    scaled down to a few hundred thousand parameters each.
  reference/<model>.safetensors     tensors computed by diffusers/transformers on those weights
  reference/<model>.json            what each tensor is (prompts, scheduler, steps, ...)
  reference/schedulers.safetensors  timesteps/sigmas per scheduler and step count

The Rust tests (tests/it/parity.rs) read these files; CI never runs Python. Re-run this script only when
the fixtures must change:  python scripts/parity/make_fixtures.py  (requirements.txt beside it).

Layout choices that exercise the loader the way real hub repos do:
  * ssd-1b-tiny: vocab.json + merges.txt tokenizers only, text encoders saved with the hub's legacy
    `text_model.` key prefix, plus a complete `.fp16` variant of every weight file.
  * sdxl-tiny:   UNet split into several safetensors shards with an index file.
  * vega-tiny:   tokenizers also ship a tokenizer.json; text encoders keep transformers 5's key names.
"""

import argparse
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# --------------------------------------------------------------------------------------------------
# Tiny CLIP-style vocabulary (docs/model-notes.md §2 "Tiny test vocabulary").


def bytes_to_unicode():
    """CLIP's byte -> printable unicode table, in CLIP's order (so '!' is id 0)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


CORPUS = """
a photo of a cat sitting on the table a photo of a dog a wolf half ice and half fire dark fantasy
cinematic lighting the cat and the dog a portrait of an astronaut riding a horse on the moon
blurry low quality photo of the sea at sunset a painting of a castle in the mountains
"""


def learn_merges(n_merges):
    """Greedy BPE on a small corpus: deterministic, and enough merges to exercise the BPE path."""
    words = Counter()
    for w in CORPUS.split():
        symbols = list(w)
        symbols[-1] = symbols[-1] + "</w>"
        words[tuple(symbols)] += 1
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def build_vocab(merges):
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base]
    for a, b in merges:
        vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last, so EOS has the highest id (argmax pooling)
    return {tok: i for i, tok in enumerate(vocab)}


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(folder, vocab, merges, pad_token, object_form):
    """vocab.json + merges.txt + special_tokens_map.json + tokenizer_config.json, as the hub repos ship them.

    `object_form` writes bos/eos/unk as AddedToken objects (SDXL's tokenizer_2 style); otherwise plain strings.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = (lambda s: added_token(s)) if object_form else (lambda s: s)
    special = {
        "bos_token": tok("<|startoftext|>"),
        "eos_token": tok("<|endoftext|>"),
        "pad_token": pad_token if pad_token == "!" else tok(pad_token),
        "unk_token": tok("<|endoftext|>"),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------------------------------
# Tiny architectures. Real values in comments (docs/model-notes.md §1 table).

TE1 = dict(  # CLIP ViT-L/14 text model: hidden 768, 12 layers, 12 heads, MLP 3072, quick_gelu
    hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, hidden_act="quick_gelu",
)
TE2 = dict(  # OpenCLIP bigG text model: hidden 1280, 32 layers, 20 heads, MLP 5120, gelu, projection 1280
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, hidden_act="gelu",
    projection_dim=24,
)
ADD_TIME_DIM = 8  # addition_time_embed_dim: 256 in SDXL


def unet_config(kind):
    cfg = dict(
        sample_size=8,  # 128 in SDXL (1024 px); 8 here = 64 px
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[8, 16, 16],  # [320, 640, 1280]
        layers_per_block=2,
        norm_num_groups=8,  # 32
        attention_head_dim=[1, 2, 4],  # [5, 10, 20]: number of heads (diffusers naming quirk)
        cross_attention_dim=TE1["hidden_size"] + TE2["hidden_size"],  # 2048 = 768 + 1280
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + TE2["projection_dim"],  # 2816 = 6*256 + 1280
    )
    if kind == "sdxl":
        cfg.update(transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2DCrossAttn")  # [1, 2, 10]
    elif kind == "ssd-1b":
        cfg.update(
            transformer_layers_per_block=[1, 1, 2],  # [1, 2, 4]
            reverse_transformer_layers_per_block=[[2, 2, 1], [2, 1, 1], 1],  # [[4, 4, 10], [2, 1, 1], 1]
            mid_block_type="UNetMidBlock2D",
        )
    elif kind == "vega":
        cfg.update(
            transformer_layers_per_block=[[1, 1], 1, [1, 2]],  # [[1, 1], [1, 1], [2, 2]]
            reverse_transformer_layers_per_block=[[1, 2, 1], [1, 1, 1], 1],  # [[2, 2, 2], [1, 1, 1], 1]
            mid_block_type="UNetMidBlock2D",
        )
    return cfg


VAE = dict(  # SDXL VAE: block_out_channels [128, 256, 512, 512], 32 groups, scaling 0.13025, force_upcast
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16], layers_per_block=2, norm_num_groups=8, sample_size=64,
    scaling_factor=0.13025, force_upcast=True,
)

# SDXL base 1.0's scheduler/scheduler_config.json (SSD-1B and Vega ship the same values).
SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def make_scheduler(name, base):
    """Scheduler names as docs/model-notes.md §4 maps them, each `from_config` of the model's shipped config."""
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base)
    if name == "euler_ancestral":
        return EulerAncestralDiscreteScheduler.from_config(base)
    if name == "ddim":
        return DDIMScheduler.from_config(base)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    raise ValueError(name)


SCHEDULERS = ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_karras"]

# --------------------------------------------------------------------------------------------------


def rekey(path, fn):
    tensors = load_file(path)
    save_file({fn(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})


def build_model(kind, out, vocab, merges, seed):
    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=2, pad_token_id=1, **TE1))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77,
                                                     bos_token_id=0, eos_token_id=2, pad_token_id=1, **TE2))
    unet = UNet2DConditionModel(**unet_config(kind))
    vae = AutoencoderKL(**VAE)
    # Random init leaves many weights at exactly 0/1 (norms, biases); perturb everything so that every
    # tensor matters to the output and a mis-wired weight cannot hide.
    with torch.no_grad():
        for module in (te1, te2, unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    sched = EulerDiscreteScheduler.from_config(SCHEDULER)
    tmp_tok = out / "_tok"
    write_tokenizer(tmp_tok / "1", vocab, merges, "<|endoftext|>", object_form=False)
    write_tokenizer(tmp_tok / "2", vocab, merges, "!", object_form=True)
    tok1 = CLIPTokenizer.from_pretrained(tmp_tok / "1")
    tok2 = CLIPTokenizer.from_pretrained(tmp_tok / "2")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched)
    folder = out / "models" / f"{kind}-tiny"
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    if kind == "sdxl":
        shutil.rmtree(folder / "unet")
        unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="150KB")
    if kind == "ssd-1b":
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
        pipe.to(torch.float32)
    # Tokenizers exactly as the hub repos ship them (transformers 5 rewrites them otherwise).
    for i, sub in ((1, "tokenizer"), (2, "tokenizer_2")):
        shutil.rmtree(folder / sub)
        shutil.copytree(tmp_tok / str(i), folder / sub)
        if kind == "vega":
            (tok1 if i == 1 else tok2).backend_tokenizer.save(str(folder / sub / "tokenizer.json"))
    shutil.rmtree(tmp_tok)
    if kind != "vega":
        # Real hub checkpoints (SDXL, SSD-1B) use the pre-transformers-5 `text_model.` prefix on CLIPTextModel.
        for f in (folder / "text_encoder").glob("*.safetensors"):
            rekey(f, lambda k: k if k.startswith("text_model.") else "text_model." + k)
    n_unet = sum(p.numel() for p in unet.parameters())
    print(f"{kind}-tiny: unet {n_unet} params, te1 {sum(p.numel() for p in te1.parameters())}, "
          f"te2 {sum(p.numel() for p in te2.parameters())}, vae {sum(p.numel() for p in vae.parameters())}")
    return folder


# --------------------------------------------------------------------------------------------------
# References.

TOKEN_PROMPTS = [
    "a photo of a cat",
    "A wolf, half ICE and half fire!!   dark\tfantasy, cinematic",
    "hello! it's the cat's toy",
    "",
    "café naïve 1234 — 東京",
    " ".join(["a photo of a cat sitting on the table"] * 12),  # > 77 tokens: truncated
]


def tokenize(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def independent_tokenizer_check(folder, prompts, ids1, ids2):
    """Cross-check transformers' ids with a tokenizer built from docs/model-notes.md §2's recipe."""
    for sub, ids, pad in (("tokenizer", ids1, "<|endoftext|>"), ("tokenizer_2", ids2, "!")):
        independent_tokenizer_check_one(folder / sub, prompts, ids, pad)


def independent_tokenizer_check_one(tokenizer_dir, prompts, ids, pad):
    """One tokenizer folder's ids against the recipe, padding with `pad`."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    lines = (tokenizer_dir / "merges.txt").read_text().splitlines()[1:]
    merges = [tuple(l.split(" ")) for l in lines if l]
    t = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    t.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()])
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    t.add_special_tokens([AddedToken("<|startoftext|>", special=True), AddedToken("<|endoftext|>", special=True),
                          AddedToken(pad, special=True)])
    t.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    t.enable_truncation(77)
    t.enable_padding(length=77, pad_id=vocab[pad], pad_token=pad)
    mine = torch.tensor([e.ids for e in t.encode_batch(prompts)])
    assert torch.equal(mine, ids), f"{tokenizer_dir}: transformers and the recipe disagree:\n{mine}\n{ids}"


def pipeline_cases(kind):
    cases = []
    for sched in SCHEDULERS:
        cases.append(dict(name=sched, scheduler=sched, prompts=["a photo of a cat"], negative_prompts=None,
                          guidance_scale=5.0, steps=4, width=64, height=64))
    cases.append(dict(name="ddim_negative", scheduler="ddim", prompts=["a wolf, dark fantasy"],
                      negative_prompts=["blurry, low quality"], guidance_scale=7.0, steps=4, width=64, height=64))
    cases.append(dict(name="euler_batch2", scheduler="euler", prompts=["a photo of a cat", "a wolf, half ice and half fire"],
                      negative_prompts=["blurry", "low quality"], guidance_scale=6.0, steps=3, width=64, height=64))
    cases.append(dict(name="euler_no_cfg", scheduler="euler", prompts=["a castle in the mountains"],
                      negative_prompts=None, guidance_scale=1.0, steps=3, width=64, height=64))
    cases.append(dict(name="dpmpp_2m_karras_10", scheduler="dpmpp_2m_karras", prompts=["a photo of the sea"],
                      negative_prompts=None, guidance_scale=5.0, steps=10, width=64, height=64))
    if kind == "ssd-1b":
        # Latent 5x9: not a multiple of the 2 upsamplers' factor 4, so upsampling goes to the skip's size.
        cases.append(dict(name="euler_72x40", scheduler="euler", prompts=["a portrait of an astronaut"],
                          negative_prompts=None, guidance_scale=5.0, steps=3, width=72, height=40))
    return cases


class NoiseFeed:
    """Replaces diffusers' randn_tensor inside the ancestral scheduler with pre-drawn noise (recorded)."""

    def __init__(self, gen):
        self.gen = gen
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        n = torch.randn(shape, generator=self.gen, dtype=torch.float32)
        self.drawn.append(n.clone())
        return n.to(dtype=dtype or torch.float32)


def run_case(pipe, base_config, case, tensors, seed):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as anc

    name = case["name"]
    # Always from the model's shipped config, never from the previous case's scheduler.
    pipe.scheduler = make_scheduler(case["scheduler"], base_config)
    b = len(case["prompts"])
    g = torch.Generator().manual_seed(seed)
    h, w = case["height"] // 8, case["width"] // 8
    latents = torch.randn((b, 4, h, w), generator=g, dtype=torch.float32)
    steps = []

    def on_step(p, i, t, kw):
        steps.append(kw["latents"].detach().clone())
        return kw

    feed = NoiseFeed(torch.Generator().manual_seed(seed + 1))
    orig = anc.randn_tensor
    anc.randn_tensor = feed
    try:
        with torch.no_grad():
            out = pipe(prompt=case["prompts"], negative_prompt=case["negative_prompts"], height=case["height"],
                       width=case["width"], num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                       latents=latents.clone(), output_type="latent", callback_on_step_end=on_step)
            final = out.images
            vae_out = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
    finally:
        anc.randn_tensor = orig
    img = pipe.image_processor.postprocess(vae_out, output_type="np")  # (x/2+0.5).clamp(0,1), NHWC float
    u8 = torch.from_numpy((img * 255).round().astype("uint8"))  # diffusers' numpy_to_pil rounding
    tensors[f"{name}.latents"] = latents
    tensors[f"{name}.steps"] = torch.stack(steps)
    tensors[f"{name}.timesteps"] = pipe.scheduler.timesteps.to(torch.float32)
    if name in ("euler", "euler_batch2"):
        tensors[f"{name}.vae_out"] = vae_out
    tensors[f"{name}.image"] = u8
    if feed.drawn:
        tensors[f"{name}.noise"] = torch.stack(feed.drawn)


def module_references(pipe, tensors):
    tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
    ids1, ids2 = tokenize(tok1, TOKEN_PROMPTS), tokenize(tok2, TOKEN_PROMPTS)
    tensors["tokens.ids1"], tensors["tokens.ids2"] = ids1, ids2
    with torch.no_grad():
        o1 = pipe.text_encoder(ids1, output_hidden_states=True)
        o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        tensors["text.hidden1"] = o1.hidden_states[-2]  # penultimate layer, no final layer norm
        tensors["text.hidden2"] = o2.hidden_states[-2]
        tensors["text.pooled"] = o2.text_embeds  # text_projection(final_layer_norm(last)[eos])
        # The pipeline's own encode_prompt (CFG with a negative prompt, and with zeros).
        pe, ne, pp, npool = pipe.encode_prompt(prompt=["a photo of a cat", "hello!"], device="cpu",
                                               num_images_per_prompt=1, do_classifier_free_guidance=True,
                                               negative_prompt=["blurry", ""])
        tensors["encode.prompt_embeds"], tensors["encode.negative_embeds"] = pe, ne
        tensors["encode.pooled"], tensors["encode.negative_pooled"] = pp, npool
        unet = pipe.unet
        t = torch.tensor([999.0, 751.0, 500.5, 1.0])
        tensors["temb.t"] = t
        tensors["temb.out"] = unet.time_embedding(unet.time_proj(t))
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 32.0, 1024.0, 1024.0],
                                 [64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [40.0, 72.0, 0.0, 0.0, 40.0, 72.0]])
        pooled = torch.cat([pp, npool])
        tensors["temb.time_ids"], tensors["temb.pooled"] = time_ids, pooled
        add = unet.add_time_proj(time_ids.flatten()).reshape(4, -1)
        tensors["temb.aug"] = unet.add_embedding(torch.cat([pooled, add], dim=-1))
        # One UNet forward on a CFG-shaped batch.
        g = torch.Generator().manual_seed(7)
        x = torch.randn((4, 4, 8, 8), generator=g)
        ehs = torch.cat([ne, pe])
        tensors["unet.sample"], tensors["unet.encoder_hidden_states"] = x, ehs
        tensors["unet.timestep"] = torch.tensor([751.0])
        tensors["unet.text_embeds"], tensors["unet.time_ids"] = torch.cat([npool, pp]), time_ids[[0, 0, 0, 0]]
        tensors["unet.out"] = unet(x, 751.0, encoder_hidden_states=ehs,
                                   added_cond_kwargs={"text_embeds": torch.cat([npool, pp]),
                                                      "time_ids": time_ids[[0, 0, 0, 0]]}).sample
        # VAE decode of a known latent.
        z = torch.randn((1, 4, 8, 8), generator=g)
        tensors["vae.latents"], tensors["vae.out"] = z, pipe.vae.decode(z, return_dict=False)[0]
    return ids1, ids2


def scheduler_references(base):
    tensors = {}
    for name in SCHEDULERS:
        for n in (1, 2, 3, 4, 7, 10, 25, 50, 150):
            s = make_scheduler(name, base)
            s.set_timesteps(n)
            tensors[f"{name}.{n}.timesteps"] = s.timesteps.to(torch.float64)
            if hasattr(s, "sigmas") and s.sigmas is not None and name != "ddim":
                tensors[f"{name}.{n}.sigmas"] = torch.as_tensor(s.sigmas, dtype=torch.float64)
            tensors[f"{name}.{n}.init_noise_sigma"] = torch.tensor([float(s.init_noise_sigma)], dtype=torch.float64)
    return tensors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    merges = learn_merges(48)
    vocab = build_vocab(merges)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    save_file(scheduler_references(SCHEDULER), out / "reference" / "schedulers.safetensors")
    for seed, kind in enumerate(["ssd-1b", "sdxl", "vega"]):
        folder = build_model(kind, out, vocab, merges, seed=1000 + seed)
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        tensors = {}
        ids1, ids2 = module_references(pipe, tensors)
        independent_tokenizer_check(folder, TOKEN_PROMPTS, ids1, ids2)
        cases = pipeline_cases(kind)
        base_config = dict(pipe.scheduler.config)
        for i, case in enumerate(cases):
            run_case(pipe, base_config, case, tensors, seed=100 * (seed + 1) + i)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, out / "reference" / f"{kind}-tiny.safetensors")
        meta = {
            "generated_by": "scripts/parity/make_fixtures.py",
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "model": f"models/{kind}-tiny", "token_prompts": TOKEN_PROMPTS,
            "encode": {"prompts": ["a photo of a cat", "hello!"], "negative_prompts": ["blurry", ""]},
            "cases": cases,
        }
        (out / "reference" / f"{kind}-tiny.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    (out / "reference" / "schedulers.json").write_text(json.dumps({"config": SCHEDULER}, indent=2) + "\n")


if __name__ == "__main__":
    main()
