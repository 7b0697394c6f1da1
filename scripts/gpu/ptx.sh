#!/usr/bin/env bash
# Compiles the ops layer's CUDA kernels (src/pipeline/ops/cuda/kernels/*.cu) to PTX for compute
# capabilities 8.0 (A100) and 9.0 (H100/H200) with the flags build.rs uses (kernels/nvcc.flags), so
# that a kernel that does not compile fails the checks on a machine without a GPU or the `cuda`
# feature. A stamp of the sources, flags and nvcc version skips the work when nothing changed.
#
#   scripts/gpu/ptx.sh NVCC OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=$1 OUT=$2
K=src/pipeline/ops/cuda/kernels
mkdir -p "$OUT"
stamp=$({ cat "$K"/*; "$NVCC" --version; echo 80 90; } | sha256sum | cut -c1-16)
if [ -f "$OUT/ok-$stamp" ]; then
  echo "CUDA kernels: PTX up to date ($OUT)"
  exit 0
fi
read -ra FLAGS < "$K/nvcc.flags"
for cap in 80 90; do
  for src in "$K"/*.cu; do
    name=$(basename "${src%.cu}")
    "$NVCC" "${FLAGS[@]}" -arch="compute_$cap" --ptx -o "$OUT/$name-$cap.ptx" "$src"
  done
done
rm -f "$OUT"/ok-*
touch "$OUT/ok-$stamp"
echo "CUDA kernels: $(ls "$K"/*.cu | wc -l) files compiled to PTX for compute 8.0 and 9.0 ($OUT)"
