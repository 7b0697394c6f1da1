#!/usr/bin/env bash
# Prepares `.gpu/` for scripts/gpu/device_check.sh, which runs on a GPU machine that has no toolchain
# and no network: the CUDA build of t2i (scripts/build-cuda.sh, with its FEATURES and
# CUDA_COMPUTE_CAP; sm_90 for the H100/H200 machines), xz-compressed, its wrapper, and the diffusers
# wheel of scripts/parity/requirements.txt for the reference side. `.gpu/` is excluded from git
# (.git/info/exclude) and travels with the device call as a carried path:
#
#   scripts/gpu/prepare.sh                                  # cuda,cudnn
#   FEATURES=cuda,cudnn,flash-attn scripts/gpu/prepare.sh   # + fused attention (trimmed build)
#   device run: carry [".gpu"], command "scripts/gpu/device_check.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/target-cuda/sm$CUDA_COMPUTE_CAP}
OUT=$CARGO_TARGET_DIR/dist scripts/build-cuda.sh
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
rm -rf .gpu && mkdir -p .gpu/whl
# Without its debug sections (line tables: ~200 of ~300 MB) the binary travels as ~16 MB of xz.
objcopy --strip-debug "$CARGO_TARGET_DIR/dist/t2i" .gpu/t2i.stripped
xz -T0 -6 -c .gpu/t2i.stripped > .gpu/t2i.xz && rm .gpu/t2i.stripped
cp "$CARGO_TARGET_DIR/dist/run-t2i.sh" .gpu/
diffusers=$(grep -E '^diffusers==' scripts/parity/requirements.txt)
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl "$diffusers"
du -sh .gpu .gpu/*
