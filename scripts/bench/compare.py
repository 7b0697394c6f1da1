#!/usr/bin/env python3
"""Run `t2i bench` and diffusers on the same model, settings and machine, one after the other, and print
both with their ratio (t2i / diffusers: below 1 means t2i is faster or smaller).

    python scripts/bench/compare.py --t2i target/release/t2i --python .venv/bin/python \
        --model /path/to/ssd-1b-random --width 512 --height 512 --steps 4 --batch-sizes 1,2 --warmup 0

Every other flag is passed to both. Any model folder t2i serves works (SDXL family or SD 1.x/2.x: the
diffusers side picks the pipeline class from model_index.json). The diffusers side needs
scripts/parity/requirements.txt.

`--whole-process N` times what a user waits for instead: the whole process, from its start to the image
written (imports, model load, one image), `t2i generate` against `diffusers_bench.py --generate-to`, run N
times each, interleaved (t2i, diffusers, t2i, ...), with the median and the peak RSS of each process:

    python scripts/bench/compare.py --t2i target/release/t2i --python .venv/bin/python --whole-process 3 \
        --model /path/to/ssd-1b-random --width 512 --height 512 --steps 4
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = ["load_s", "text_encode_s", "step_s", "vae_decode_s", "total_s", "s_per_image", "images_per_s",
          "peak_rss_gib", "device_mem_gib"]


def run(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def timed(cmd):
    """Wall seconds from the process's start to its exit, and its peak RSS in GiB (wait4's rusage)."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 2**20


def whole_process(args, rest):
    opts = dict(zip(rest[::2], rest[1::2]))
    keep = ["--model", "--width", "--height", "--steps", "--guidance-scale", "--device", "--dtype"]
    common = [x for k in keep if k in opts for x in (k, opts[k])]
    out = tempfile.mkdtemp()
    t2i = [args.t2i, "generate", "--quiet", "--seed", "0", "--prompt", "a photo of an astronaut riding a horse on the moon",
           *common, "--output", os.path.join(out, "t2i.png")]
    ref = [args.python, os.path.join(HERE, "diffusers_bench.py"), *common, "--generate-to",
           os.path.join(out, "diffusers.png")]
    runs = {"t2i": [], "diffusers": []}
    for _ in range(args.whole_process):
        runs["t2i"].append(timed(t2i))
        runs["diffusers"].append(timed(ref))
    print(f"\nwhole process, {args.whole_process} runs each, interleaved: {' '.join(common)}")
    print(f"{'':>16} {'t2i':>10} {'diffusers':>10} {'ratio':>7}")
    for i, name in [(0, "wall_s"), (1, "peak_rss_gib")]:
        x = statistics.median(r[i] for r in runs["t2i"])
        y = statistics.median(r[i] for r in runs["diffusers"])
        print(f"{name + ' (median)':>16} {x:>10.3f} {y:>10.3f} {x / y:>7.2f}")
    for name, rs in runs.items():
        print(f"{name:>16} wall " + ", ".join(f"{w:.2f}" for w, _ in rs) + " s; RSS "
              + ", ".join(f"{m:.2f}" for _, m in rs) + " GiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t2i", default="t2i")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--order", choices=["t2i-first", "diffusers-first"], default="t2i-first")
    ap.add_argument("--whole-process", type=int, default=0, metavar="N")
    args, rest = ap.parse_known_args()
    if args.whole_process:
        return whole_process(args, rest)
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
