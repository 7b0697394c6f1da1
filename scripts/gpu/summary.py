#!/usr/bin/env python3
"""One table from a device run's JSON lines (scripts/gpu/device_check.sh): diffusers, t2i with the
ops layer's CUDA kernels off and on, per batch size: s/step, VAE s, s/image, images/s, UNet TFLOP/s
and peak device memory, with t2i's ratios to diffusers.

    python3 scripts/gpu/summary.py OUT_DIR

diffusers reports no TFLOP/s; it is derived from t2i's cost model (the same UNet work per step).
Peak memory is not measured alike: t2i samples the device's used memory (as nvidia-smi shows it),
diffusers reports PyTorch's peak allocation.
"""

import json
import os
import sys


def rows(path):
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def main():
    out = sys.argv[1]
    runs = [("diffusers", rows(os.path.join(out, "diffusers_bench.jsonl")))]
    runs += [(f"t2i {k}", rows(os.path.join(out, f"t2i_bench_{k}.jsonl"))) for k in ("off", "on")]
    flops = {}  # batch -> UNet FLOP per step, from t2i's cost model
    for _, rs in runs[1:]:
        for r in rs:
            if r.get("unet_tflops"):
                flops[r["batch"]] = r["unet_tflops"] * 1e12 * r["step_s"]
    ref = {r["batch"]: r for r in runs[0][1]}
    print(f"{'run':<14} {'batch':>5} {'s/step':>8} {'VAE s':>7} {'s/image':>8} {'images/s':>8} "
          f"{'TFLOP/s':>8} {'mem GiB':>8} {'s/image vs diffusers':>21}")
    for name, rs in runs:
        for r in rs:
            b = r["batch"]
            tflops = r.get("unet_tflops") or (flops[b] / r["step_s"] / 1e12 if b in flops else float("nan"))
            mem = r.get("device_mem_gib")
            vs = r["s_per_image"] / ref[b]["s_per_image"] if b in ref and name != "diffusers" else None
            print(f"{name:<14} {b:>5} {r['step_s']:>8.3f} {r['vae_decode_s']:>7.3f} {r['s_per_image']:>8.3f} "
                  f"{r['images_per_s']:>8.3f} {tflops:>8.1f} {mem if mem is None else round(mem, 2)!s:>8} "
                  f"{'' if vs is None else f'{vs:.2f}x':>21}")


if __name__ == "__main__":
    main()
