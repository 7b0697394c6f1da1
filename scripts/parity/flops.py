#!/usr/bin/env python3
"""FLOPs of one UNet forward and one VAE decode, counted by torch, for the cost model's tests.

Builds each model's full-size UNet and VAE decoder from its shipped config on the `meta` device (no
weights, no memory) and runs them under `torch.utils.flop_counter.FlopCounterMode`, which counts every
convolution, matmul and attention (2 FLOPs per multiply-add), for one sample at the model's native
size with a 77-token context. `src/pipeline/cost.rs` is checked against the numbers this prints
(docs/model-notes.md §1 keeps them). Run with the parity venv:  python scripts/parity/flops.py
"""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

SD_UNET = dict(  # stable-diffusion-v1-5/unet/config.json
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], in_channels=4, layers_per_block=2,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1/unet/config.json
    SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=True, sample_size=96,
)
SDXL_COMMON = dict(  # stabilityai/stable-diffusion-xl-base-1.0/unet/config.json
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
    projection_class_embeddings_input_dim=2816, sample_size=128, use_linear_projection=True,
)
SDXL_UNET = dict(SDXL_COMMON, transformer_layers_per_block=[1, 2, 10])
SSD1B_UNET = dict(SDXL_COMMON, transformer_layers_per_block=[1, 2, 4],  # segmind/SSD-1B/unet/config.json
                  reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1], mid_block_type="UNetMidBlock2D")
VAE = dict(  # the SD and SDXL VAE's blocks
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
)


def unet_flops(cfg, ctx_dim, latent):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        x = torch.randn(1, 4, latent, latent)
        ctx = torch.randn(1, 77, ctx_dim)
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx, added_cond_kwargs=added)
    return counter.get_total_flops()


def vae_decode_flops(latent):
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE)
        z = torch.randn(1, 4, latent, latent)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.decode(z)
    return counter.get_total_flops()


def main():
    rows = [
        ("SD 1.5 UNet @512", unet_flops(SD_UNET, 768, 64)),
        ("SD 2.1 UNet @768", unet_flops(SD21_UNET, 1024, 96)),
        ("SDXL UNet @1024", unet_flops(SDXL_UNET, 2048, 128)),
        ("SSD-1B UNet @1024", unet_flops(SSD1B_UNET, 2048, 128)),
        ("VAE decode @512", vae_decode_flops(64)),
        ("VAE decode @768", vae_decode_flops(96)),
        ("VAE decode @1024", vae_decode_flops(128)),
    ]
    print(f"torch {torch.__version__}, FlopCounterMode, batch 1, 77-token context")
    for name, flops in rows:
        print(f"{name:20s} {flops / 1e12:8.4f} TFLOP")


if __name__ == "__main__":
    main()
