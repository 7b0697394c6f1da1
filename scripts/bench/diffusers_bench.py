#!/usr/bin/env python3
"""Reference timings: diffusers' pipeline for a model folder (`StableDiffusionXLPipeline` or
`StableDiffusionPipeline`, as its model_index.json says; SD's safety checker not loaded, as t2i does not
run it), printing the same figures as `t2i bench --json` (one JSON object per batch size,
"implementation": "diffusers").

    python scripts/bench/diffusers_bench.py --model DIR --width 512 --height 512 --steps 4 --batch-sizes 1,2

With `--generate-to FILE` it is instead what a user runs once: load, render one image, write it as a PNG
(the diffusers side of `compare.py --whole-process`, which times the whole process from outside).

Same prompt, sampler (built from the model's scheduler config as t2i does; the shipped one by default),
guidance (the pipeline's default unless given) and step count as `t2i bench`; `step_s` is per UNet
evaluation (PNDM makes one more than its steps); initial latents are drawn per image from a fixed seed. Attention uses PyTorch SDPA (the
diffusers default). Needs scripts/parity/requirements.txt (+ a CUDA build of torch for --device cuda).
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from diffusers import DiffusionPipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from make_sd_fixtures import make_scheduler  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--scheduler", help="a t2i sampler name [default: the model's shipped scheduler]")
    ap.add_argument("--guidance-scale", type=float, help="[default: the pipeline's, 5 SDXL, 7.5 SD]")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--generate-to", help="render one image to this PNG and exit (whole-process runs)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]

    t = time.perf_counter()
    with open(os.path.join(args.model, "model_index.json")) as f:
        sd = json.load(f).get("_class_name") == "StableDiffusionPipeline"
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) if sd else {}
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, **extra).to(args.device)
    sync(args.device)
    load_s = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, dict(pipe.scheduler.config))
    if args.guidance_scale is None:
        args.guidance_scale = 7.5 if sd else 5.0  # the pipelines' __call__ defaults
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    cfg = args.guidance_scale > 1
    if args.generate_to:
        with torch.no_grad():
            image = pipe(prompt=PROMPT, width=args.width, height=args.height, num_inference_steps=args.steps,
                         guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(0)).images[0]
        image.save(args.generate_to)
        return

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        latents = torch.cat([
            torch.randn((1, 4, args.height // scale, args.width // scale), generator=torch.Generator().manual_seed(i))
            for i in range(batch)
        ]).to(args.device, dtype)

        def render():
            marks = {}
            original = pipe.encode_prompt

            def timed_encode(*a, **k):
                out = original(*a, **k)
                sync(args.device)
                marks["encoded"] = time.perf_counter()
                return out

            def on_step(p, i, ts, kw):
                sync(args.device)
                marks["last_step"] = time.perf_counter()
                marks["evaluations"] = i + 1
                return kw

            pipe.encode_prompt = timed_encode
            sync(args.device)
            start = time.perf_counter()
            with torch.no_grad():
                out = pipe(prompt=[PROMPT] * batch, width=args.width, height=args.height,
                           num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                           latents=latents.clone(), output_type="latent", callback_on_step_end=on_step).images
                t_vae = time.perf_counter()
                img = pipe.vae.decode(out.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
                pipe.image_processor.postprocess(img, output_type="np")
                sync(args.device)
            end = time.perf_counter()
            pipe.encode_prompt = original
            return (marks["encoded"] - start, (marks["last_step"] - marks["encoded"]) / marks["evaluations"],
                    end - t_vae, end - start)

        for _ in range(args.warmup):
            render()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        res = [render() for _ in range(args.runs)]
        enc, step, vae, total = [sum(r[i] for r in res) / len(res) for i in range(4)]
        row = {
            "implementation": "diffusers", "model": args.model, "device": args.device, "dtype": args.dtype,
            "width": args.width, "height": args.height, "steps": args.steps, "batch": batch, "cfg": cfg,
            "load_s": load_s, "text_encode_s": enc, "step_s": step, "vae_decode_s": vae, "total_s": total,
            "s_per_image": total / batch, "images_per_s": batch / total, "unet_tflops": None,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "device_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
        }
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(row, flush=True)


if __name__ == "__main__":
    main()
