#!/usr/bin/env python3
"""Write a full-size SDXL-family pipeline with random weights, in diffusers layout.

Speed does not depend on weight values, so this is a faithful workload for load-time, per-step and
memory measurements where the real weights cannot be downloaded:

    python scripts/parity/make_random_model.py --arch ssd-1b --out /tmp/ssd-1b-random
    t2i generate --model /tmp/ssd-1b-random --prompt "a cat" --width 512 --height 512 --steps 4

The architectures are the published configs of segmind/SSD-1B, stabilityai/stable-diffusion-xl-base-1.0
and segmind/Segmind-Vega (values in docs/model-notes.md §1); the UNet parameter count is checked
against the published one. The tokenizers use a synthetic 49,408-entry CLIP-style vocabulary (byte
tokens, learned merges, fillers, then <|startoftext|>=49406 and <|endoftext|>=49407), because the real
vocab cannot be downloaded here; prompts still tokenize with CLIP's rules and EOS pooling is exact.
Images from random weights are noise, by design.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from make_fixtures import SCHEDULER, build_vocab, bytes_to_unicode, learn_merges, write_tokenizer

UNET_COMMON = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
ARCHS = {
    "ssd-1b": dict(
        unet=dict(transformer_layers_per_block=[1, 2, 4],
                  reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1], mid_block_type="UNetMidBlock2D"),
        params=1_331_334_404,
    ),
    "sdxl": dict(
        unet=dict(transformer_layers_per_block=[1, 2, 10], mid_block_type="UNetMidBlock2DCrossAttn"),
        params=2_567_463_684,
    ),
    "vega": dict(
        unet=dict(transformer_layers_per_block=[[1, 1], [1, 1], [2, 2]],
                  reverse_transformer_layers_per_block=[[2, 2, 2], [1, 1, 1], 1], mid_block_type="UNetMidBlock2D"),
        params=745_225_604,
    ),
}
# CLIP ViT-L/14 text tower (text_encoder) and OpenCLIP bigG (text_encoder_2), SDXL's configs. The legacy
# eos_token_id=2 in those configs selects argmax pooling in transformers.
TE1 = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
           hidden_act="quick_gelu", projection_dim=768)
TE2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
           hidden_act="gelu", projection_dim=1280)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
VOCAB_SIZE = 49408


def full_vocab():
    merges = learn_merges(200)
    vocab = build_vocab(merges)  # bytes, bytes</w>, merges, then the two specials
    specials = ["<|startoftext|>", "<|endoftext|>"]
    for s in specials:
        del vocab[s]
    n = len(vocab)
    for i in range(VOCAB_SIZE - 2 - n):
        vocab[f"<|filler_{i}|>"] = n + i
    vocab["<|startoftext|>"] = VOCAB_SIZE - 2
    vocab["<|endoftext|>"] = VOCAB_SIZE - 1
    return vocab, merges


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(ARCHS), default="ssd-1b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp16-variant", action="store_true", help="also write .fp16.safetensors files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    arch = ARCHS[args.arch]
    torch.manual_seed(args.seed)
    with torch.no_grad():
        unet = UNet2DConditionModel(**UNET_COMMON, **arch["unet"])
        n = sum(p.numel() for p in unet.parameters())
        assert n == arch["params"], f"{args.arch}: {n} UNet parameters, published {arch['params']}"
        common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        te1 = CLIPTextModel(CLIPTextConfig(**common, **TE1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **TE2))
        vae = AutoencoderKL(**VAE)
    vocab, merges = full_vocab()
    tmp = out / "_tok"
    write_tokenizer(tmp / "1", vocab, merges, "<|endoftext|>", object_form=False)
    write_tokenizer(tmp / "2", vocab, merges, "!", object_form=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=CLIPTokenizer.from_pretrained(tmp / "1"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "2"), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER))
    pipe.save_pretrained(out, safe_serialization=True)
    if args.fp16_variant:
        pipe.to(torch.float16).save_pretrained(out, safe_serialization=True, variant="fp16")
    for i, sub in ((1, "tokenizer"), (2, "tokenizer_2")):
        shutil.rmtree(out / sub)
        shutil.copytree(tmp / str(i), out / sub)
    shutil.rmtree(tmp)
    print(json.dumps({"arch": args.arch, "out": str(out), "unet_params": n,
                      "text_encoder_params": sum(p.numel() for p in te1.parameters()),
                      "text_encoder_2_params": sum(p.numel() for p in te2.parameters())}))


if __name__ == "__main__":
    main()
