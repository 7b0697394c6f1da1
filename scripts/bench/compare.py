#!/usr/bin/env python3
"""Run `t2i bench` and diffusers on the same model, settings and machine, one after the other, and print
both with their ratio (t2i / diffusers: below 1 means t2i is faster or smaller).

    python scripts/bench/compare.py --t2i target/release/t2i --python .venv/bin/python \
        --model /path/to/ssd-1b-random --width 512 --height 512 --steps 4 --batch-sizes 1,2 --warmup 0

Every other flag is passed to both. The diffusers side needs scripts/parity/requirements.txt.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = ["load_s", "text_encode_s", "step_s", "vae_decode_s", "total_s", "s_per_image", "images_per_s",
          "peak_rss_gib", "device_mem_gib"]


def run(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t2i", default="t2i")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--order", choices=["t2i-first", "diffusers-first"], default="t2i-first")
    args, rest = ap.parse_known_args()
    t2i = [args.t2i, "bench", "--json", *rest]
    ref = [args.python, os.path.join(HERE, "diffusers_bench.py"), "--json", *rest]
    if args.order == "t2i-first":
        ours, theirs = run(t2i), run(ref)
    else:
        theirs, ours = run(ref), run(t2i)
    for a, b in zip(ours, theirs):
        print(f"\nbatch {a['batch']}  {a['width']}x{a['height']}  {a['steps']} steps  {a['device']} {a['dtype']}"
              f"  (t2i UNet {a['unet_tflops']:.2f} TFLOP/s)")
        print(f"{'':>16} {'t2i':>10} {'diffusers':>10} {'ratio':>7}")
        for f in FIELDS:
            x, y = a.get(f), b.get(f)
            if x is None or y is None:
                continue
            ratio = x / y if y else float("nan")
            print(f"{f:>16} {x:>10.3f} {y:>10.3f} {ratio:>7.2f}")


if __name__ == "__main__":
    main()
