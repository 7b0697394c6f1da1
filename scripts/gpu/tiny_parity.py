#!/usr/bin/env python3
"""GPU-vs-diffusers agreement on the tiny parity fixtures, through the real `t2i generate` binary.

For each deterministic sampler: write the reference latents, run `t2i generate --device cuda` (f32,
then bf16) and compare the PNG with diffusers' CPU f32 image. Prints one line per run; exits non-zero
if an f32 image differs by more than 1/255 or a bf16 image has a mean error above 2/255. The ops
layer's CUDA kernels are those `T2I_CUDA_KERNELS` in the environment switches on (none by default).
Needs torch, safetensors, numpy and Pillow (all on the GPU machines).
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t2i", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    ok = True
    print(f"kernels: {os.environ.get('T2I_CUDA_KERNELS') or 'none'}", flush=True)
    for model in ["ssd-1b-tiny", "sdxl-tiny", "vega-tiny"]:
        ref = load_file(os.path.join(ROOT, "tests/fixtures/reference", f"{model}.safetensors"))
        for sched in ["euler", "ddim", "dpmpp_2m", "dpmpp_2m_karras"]:
            for dtype in ["f32", "bf16"]:
                with tempfile.TemporaryDirectory() as d:
                    lat = os.path.join(d, "latents.safetensors")
                    save_file({"latents": ref[f"{sched}.latents"]}, lat)
                    out = os.path.join(d, "out.png")
                    cmd = [args.t2i, "generate", "--model", os.path.join(ROOT, "tests/fixtures/models", model),
                           "--prompt", "a photo of a cat", "--width", "64", "--height", "64", "--steps", "4",
                           "--guidance-scale", "5", "--scheduler", sched, "--seed", "0", "--latents", lat,
                           "--device", args.device, "--dtype", dtype, "--output", out, "--quiet"]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"{model} {sched} {dtype}: FAILED rc={r.returncode}: {r.stderr.strip()[-500:]}")
                        ok = False
                        continue
                    got = np.asarray(Image.open(out).convert("RGB")).astype(np.int32)
                    want = ref[f"{sched}.image"][0].astype(np.int32)
                    diff = np.abs(got - want)
                    bad = diff.max() > 1 if dtype == "f32" else diff.mean() > 2
                    ok &= not bad
                    print(f"{model} {sched} {args.device} {dtype}: max |diff| {diff.max()}/255, "
                          f"mean {diff.mean():.3f}/255 {'FAIL' if bad else 'ok'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
