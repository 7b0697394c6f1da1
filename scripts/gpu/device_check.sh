#!/usr/bin/env bash
# One prepared run on a GPU machine (the `device` tool), from the repository root, with `.gpu/` carried
# (scripts/gpu/prepare.sh makes it; no toolchain is needed on the GPU machine):
#   .gpu/t2i.xz, .gpu/run-t2i.sh     the CUDA build (scripts/build-cuda.sh), xz-compressed
#   .gpu/whl/diffusers-*.whl         diffusers for the reference side (PyTorch is on the machine)
# Parts, in order (PARTS=ops,parity,profile,bench,start by default; each bounded by `timeout`):
#   ops      t2i bench --check-ops: every CUDA kernel of the ops layer against candle's path at
#            SSD-1B's shapes (errors against f32, time, PASS/FAIL per kernel), bf16 (CHECK_DTYPES)
#   parity   the tiny fixtures through `t2i generate` on CUDA with every kernel this build has
#            switched on, against diffusers' CPU f32 images (f32 and bf16)
#   profile  a full-size random-weight SSD-1B written here; the per-op profile at 1024², batch 1,
#            with the kernels off and on (every op synchronised: slower than the timed runs)
#   bench    diffusers, then t2i with the kernels off and on, at 1024², 25 Euler steps, CFG, bf16,
#            batch 1 and 4, in the same call; then one table (scripts/gpu/summary.py)
#   start    process start -> "model warm" of `t2i worker` (no broker needed for that part)
# Sized for one 9-minute call on an H100 (about 8 minutes with the kernels as slow as candle's
# path). Results go to $OUT: ops_<dtype>.txt, tiny_parity.txt, profile_{off,on}.txt, *.jsonl.
set -uo pipefail
OUT=${OUT:-/tmp/t2i-device-out}; mkdir -p "$OUT"
STEPS=${STEPS:-25}; BATCHES=${BATCHES:-1,4}; PARTS=${PARTS:-ops,parity,profile,bench,start}
CHECK_DTYPES=${CHECK_DTYPES:-bf16}
KERNELS=${KERNELS:-all} # what "on" means: every kernel this build has
part() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
t0=$(date +%s); elapsed() { echo "[$(( $(date +%s) - t0 )) s]"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/t2i.xz'), open('.gpu/t2i', 'wb'))" && chmod +x .gpu/t2i
T2I=$PWD/.gpu/run-t2i.sh
"$T2I" --version

if part ops; then
  for dt in ${CHECK_DTYPES//,/ }; do
    echo "== ops: CUDA kernels against candle's path, $dt $(elapsed)"
    # Plain f32 for the reference (no TF32 in cuDNN or cuBLAS).
    NVIDIA_TF32_OVERRIDE=0 timeout 150 "$T2I" bench --check-ops --device cuda --dtype "$dt" 2>&1 |
      tee "$OUT/ops_$dt.txt"
  done
fi

if part parity; then
  echo "== parity: tiny fixtures on CUDA, kernels $KERNELS, against diffusers (CPU f32) $(elapsed)"
  T2I_CUDA_KERNELS=$KERNELS timeout 150 python3 scripts/gpu/tiny_parity.py --t2i "$T2I" 2>&1 |
    tee "$OUT/tiny_parity.txt"
fi

if part profile || part bench || part start; then
  echo "== full-size random SSD-1B $(elapsed)"
  (cd scripts/parity && timeout 180 python3 make_random_model.py --arch ssd-1b --out /tmp/ssd-1b-random) 2>&1 |
    grep -v Warning | tail -2
fi

if part profile; then
  for k in none "$KERNELS"; do
    name=$([ "$k" = none ] && echo off || echo on)
    echo "== profile, kernels $k, batch 1, 3 steps $(elapsed)"
    T2I_CUDA_KERNELS=$k timeout 100 "$T2I" bench --model /tmp/ssd-1b-random --device cuda --dtype bf16 \
      --width 1024 --height 1024 --steps 3 --batch-sizes 1 --warmup 1 --runs 1 --profile 2>&1 |
      tee "$OUT/profile_$name.txt"
  done
fi

if part bench; then
  ARGS="--model /tmp/ssd-1b-random --device cuda --dtype bf16 --width 1024 --height 1024 --steps $STEPS --batch-sizes $BATCHES --warmup 1 --runs 1 --json"
  echo "== diffusers $(elapsed)"
  timeout 150 python3 scripts/bench/diffusers_bench.py $ARGS 2>&1 | grep -v Warning | tee "$OUT/diffusers_bench.jsonl"
  for k in "$KERNELS" none; do
    name=$([ "$k" = none ] && echo off || echo on)
    echo "== t2i, kernels $k $(elapsed)"
    T2I_CUDA_KERNELS=$k timeout 200 "$T2I" bench $ARGS 2>&1 | tee "$OUT/t2i_bench_$name.jsonl"
  done
  python3 scripts/gpu/summary.py "$OUT" | tee "$OUT/summary.txt"
fi
if part start; then
  echo "== cold start: process start -> model warm (t2i worker) $(elapsed)"
  start=$(date +%s%N)
  T2I_LOG=info timeout 120 "$T2I" worker --model /tmp/ssd-1b-random --device cuda --dtype bf16 \
    --amqp-url amqp://guest:guest@127.0.0.1:1/%2f > "$OUT/worker_start.log" 2>&1 &
  wpid=$!
  for _ in $(seq 1 1200); do grep -q "model warm" "$OUT/worker_start.log" && break; sleep 0.1; done
  echo "process start -> model warm: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  kill $wpid 2>/dev/null; wait $wpid 2>/dev/null
fi
echo "== done $(elapsed)"
