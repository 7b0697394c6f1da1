#!/usr/bin/env bash
# One prepared run on a GPU machine (the `device` tool), from the repository root, with `.gpu/` carried:
#   .gpu/t2i.xz, .gpu/run-t2i.sh     the CUDA build (scripts/build-cuda.sh, features cuda,cudnn), xz-compressed
#   .gpu/whl/diffusers-*.whl         diffusers for the reference side (PyTorch is on the machine)
# 1. GPU-vs-diffusers agreement on the tiny fixtures (f32 and bf16) through `t2i generate`.
# 2. A full-size random-weight SSD-1B generated there; process start -> model warm of `t2i worker`;
#    the per-op profile of t2i at 1024², batch 1
#    (`t2i bench --profile`: every op synchronised, so slower than the timed run), then `t2i bench`
#    and diffusers at 1024², 25 Euler steps, CFG, bf16, in the same call. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/t2i-device-out}; mkdir -p "$OUT"
STEPS=${STEPS:-25}; BATCHES=${BATCHES:-1,4,8}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/t2i.xz'), open('.gpu/t2i', 'wb'))" && chmod +x .gpu/t2i
T2I=$PWD/.gpu/run-t2i.sh

echo "== 1. tiny fixtures: cuda vs diffusers (CPU f32 references)"
timeout 120 python3 scripts/gpu/tiny_parity.py --t2i "$T2I" 2>&1 | tee "$OUT/tiny_parity.txt"

echo "== 2. full-size random SSD-1B"
start=$(date +%s)
(cd scripts/parity && timeout 180 python3 make_random_model.py --arch ssd-1b --out /tmp/ssd-1b-random) 2>&1 | grep -v Warning | tail -2
echo "model written in $(( $(date +%s) - start )) s"
ARGS="--model /tmp/ssd-1b-random --device cuda --dtype bf16 --width 1024 --height 1024 --steps $STEPS --batch-sizes $BATCHES --warmup 1 --runs 1 --json"
echo "== cold start: process start -> model warm (t2i worker, no broker needed for this part)"
start=$(date +%s%N)
T2I_LOG=info timeout 120 "$T2I" worker --model /tmp/ssd-1b-random --device cuda --dtype bf16 \
  --amqp-url amqp://guest:guest@127.0.0.1:1/%2f > "$OUT/worker_start.log" 2>&1 &
wpid=$!
for _ in $(seq 1 1200); do grep -q "model warm" "$OUT/worker_start.log" && break; sleep 0.1; done
echo "process start -> model warm: $(( ($(date +%s%N) - start) / 1000000 )) ms"; kill $wpid 2>/dev/null; wait $wpid 2>/dev/null
echo "== t2i per-op profile, batch 1, 3 steps"
timeout 120 "$T2I" bench --model /tmp/ssd-1b-random --device cuda --dtype bf16 --width 1024 --height 1024 \
  --steps 3 --batch-sizes 1 --warmup 1 --runs 1 --profile 2>&1 | tee "$OUT/t2i_profile.txt"
echo "== diffusers"
timeout 120 python3 scripts/bench/diffusers_bench.py $ARGS 2>&1 | grep -v Warning | tee "$OUT/diffusers_bench.jsonl"
echo "== t2i bench"
timeout 400 "$T2I" bench $ARGS 2>&1 | tee "$OUT/t2i_bench.jsonl"
# diffusers first: the t2i run is the long one; each batch size's line is written as it finishes.
