#!/usr/bin/env bash
# Builds `t2i` with candle's CUDA backend on a Linux x86-64 machine that has no GPU, no driver and no
# CUDA toolkit: nvcc, the CUDA headers and the libraries to link against all come from NVIDIA's PyPI
# wheels (CUDA 13.0), everything else from crates.io and the system's gcc.
#
#   scripts/build-cuda.sh                      # features cuda,cudnn; kernels for sm_90 (H100/H200)
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh  # A100 (its PTX also JITs on newer GPUs)
#   FEATURES=cuda,cudnn,flash-attn scripts/build-cuda.sh   # + fused attention (trimmed, see below)
#   MODE=clippy scripts/build-cuda.sh          # clippy -D warnings on the CUDA code instead of a build
#
# Each compute capability has its own target directory (target-cuda/sm<cap>) and flash-attn object
# cache, so the sm_80 (A100) and sm_90 (H100/H200) builds are both kept. flash-attn (candle-flash-attn
# from crates.io, unmodified) is trimmed by nvcc flags only: NVCC_APPEND_FLAGS defines the
# FLASHATTENTION_DISABLE_{DROPOUT,ALIBI,SOFTCAP,LOCAL,UNEVEN_K} macros its kernels/static_switch.h
# honours, which removes the kernel variants t2i never launches (it has no dropout, ALiBi, softcap
# or local windows, and takes flash-attn only for head dims equal to a kernel's,
# src/pipeline/ops/attention.rs). All 53 files still compile, each to far fewer instantiations.
#
# Result: $OUT/t2i and $OUT/run-t2i.sh (OUT defaults to target-cuda/sm<cap>/dist). The
# binary needs, at run time, the NVIDIA driver (libcuda.so.1, CUDA 13 capable: driver >= 580) and the
# CUDA 13 runtime libraries (libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10, libnvrtc.so.13,
# libcudnn.so.9 with `cudnn`): those PyTorch's cu13 wheels install, or the CUDA 13 runtime packages.
# run-t2i.sh finds them in a Python environment's site-packages/nvidia and execs the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

FEATURES=${FEATURES:-cuda,cudnn}
MODE=${MODE:-build}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
CACHE=${T2I_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/t2i-cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target-cuda/sm$CUDA_COMPUTE_CAP}
OUT=${OUT:-$CARGO_TARGET_DIR/dist}
PYTHON=${PYTHON:-python3}
step() { printf '\n--- %s\n' "$*"; }

# CUDA 13.0 pieces. The compiler front end (nvcc), its NVVM back end and crt headers must be the same
# 13.0 release: a newer NVVM emits PTX that a 13.0 driver (580) refuses to load. The runtime library
# versions are the ones PyTorch 2.11 (cu130) pins, so the binary links against what GPU hosts have.
step "CUDA 13.0 toolkit wheels into $CACHE/venv"
[ -x "$CACHE/venv/bin/pip" ] || "$PYTHON" -m venv "$CACHE/venv"
PIP=("$CACHE/venv/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" -r "$REPO/scripts/gpu/nvcc-requirements.txt" nvidia-cublas==13.1.0.3 \
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
case ",$FEATURES," in *,cudnn,*) "${PIP[@]}" nvidia-cudnn-cu13==9.19.0.56 ;; esac
NV=$("$CACHE/venv/bin/python" -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
CU=$NV/cu13
[ -x "$CU/bin/nvcc" ] && [ -f "$CU/include/cuda_runtime.h" ] || { echo "nvcc wheel layout unexpected: $CU" >&2; exit 1; }
export PATH=$CU/bin:$PATH
nvcc --version | tail -1

# The linker wants unversioned names (the wheels ship only libX.so.N) and a libcuda.so, which no
# wheel ships: a stub exporting every driver entry point cudarc binds, with the real soname, so the
# binary records libcuda.so.1 and loads the driver's own library at run time.
step "link directory $CACHE/cuda-root"
cargo fetch --manifest-path "$REPO/Cargo.toml" -q
ROOT=$CACHE/cuda-root
mkdir -p "$ROOT/lib/stubs"
for lib in cublas cublasLt cudart nvrtc; do ln -sfn "$CU/lib/lib$lib.so.13" "$ROOT/lib/lib$lib.so"; done
ln -sfn "$CU/lib/libcurand.so.10" "$ROOT/lib/libcurand.so"
if [ -d "$NV/cudnn" ]; then
  ln -sfn "$NV/cudnn/lib/libcudnn.so.9" "$ROOT/lib/libcudnn.so"
  export CPATH=$NV/cudnn/include${CPATH:+:$CPATH}
fi
{
  for src in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs; do
    if [ -f "$src" ]; then grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$src" | sed -E 's/^\s+fn //; s/\($//' || true; fi
  done
  grep -oE '^\s*#define\s+cu[A-Za-z0-9_]+\s+cu[A-Za-z0-9_]+' "$CU/include/cuda.h" | awk '{print $2; print $3}'
  grep -oE 'CUDAAPI\s+cu[A-Za-z0-9_]+\s*\(' "$CU/include/cuda.h" | sed -E 's/CUDAAPI\s+//; s/\s*\($//'
} | sort -u | awk '{print "int " $1 "(void) { return 999; }"}' > "$CACHE/libcuda-stub.c"
gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$CACHE/libcuda-stub.c"
echo "libcuda stub: $(wc -l < "$CACHE/libcuda-stub.c") entry points"

# Build scripts: cudarc reads the CUDA version and library directories from the environment;
# candle's kernel builds (cudaforge) take the compute capability from CUDA_COMPUTE_CAP instead of
# asking nvidia-smi, and compile kernels in parallel.
export CUDA_ROOT=$ROOT CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
case ",$FEATURES," in
  *,flash-attn,*)
    # candle-flash-attn clones CUTLASS v3.5.0 at build time; the nvidia-cutlass 3.5.0.0 wheel holds
    # the same headers, placed where cudaforge looks for its checkout.
    step "CUTLASS 3.5.0 headers for flash-attn"
    export CUDAFORGE_HOME=$CACHE/cudaforge
    C=$CUDAFORGE_HOME/git/checkouts/cutlass-7d49e6c7e2f8896c
    if [ ! -f "$C/include/cutlass/cutlass.h" ]; then
      rm -rf "$CACHE/cutlass-wheel" "$C" && mkdir -p "$CACHE/cutlass-wheel" "$C/tools/util"
      "$CACHE/venv/bin/pip" download -q --no-deps -d "$CACHE/cutlass-wheel" nvidia-cutlass==3.5.0.0
      (cd "$CACHE/cutlass-wheel" && "$CACHE/venv/bin/python" -m zipfile -e nvidia_cutlass-3.5.0.0-*.whl .)
      cp -r "$CACHE/cutlass-wheel/cutlass_library/source/include" "$C/"
      cp -r "$CACHE/cutlass-wheel/cutlass_library/source/tools/util/include" "$C/tools/util/"
      (cd "$C" && git init -q && echo 7d49e6c7e2f8896c47f586706e67e1fb215529dc > .git/HEAD)
    fi
    export CANDLE_FLASH_ATTN_BUILD_DIR=${CANDLE_FLASH_ATTN_BUILD_DIR:-$CACHE/flash-attn-sm$CUDA_COMPUTE_CAP-trimmed}
    mkdir -p "$CANDLE_FLASH_ATTN_BUILD_DIR"
    # -D flags only: nvcc appends them to every compile of this build (candle's kernels and t2i's
    # own too, where they mean nothing).
    export NVCC_APPEND_FLAGS="-DFLASHATTENTION_DISABLE_DROPOUT -DFLASHATTENTION_DISABLE_ALIBI \
-DFLASHATTENTION_DISABLE_SOFTCAP -DFLASHATTENTION_DISABLE_LOCAL -DFLASHATTENTION_DISABLE_UNEVEN_K"
    ;;
esac

if [ "$MODE" = clippy ]; then
  step "cargo clippy --all-targets --features $FEATURES -- -D warnings (sm_$CUDA_COMPUTE_CAP)"
  cargo clippy --locked --all-targets --manifest-path "$REPO/Cargo.toml" --features "$FEATURES" -- -D warnings
  exit 0
fi

step "cargo build --release --features $FEATURES (sm_$CUDA_COMPUTE_CAP)"
start=$(date +%s)
cargo build --release --locked --bin t2i --manifest-path "$REPO/Cargo.toml" --features "$FEATURES"
echo "built in $(( $(date +%s) - start )) s"

step "staging in $OUT"
mkdir -p "$OUT"
cp "$CARGO_TARGET_DIR/release/t2i" "$OUT/t2i"
readelf -d "$OUT/t2i" | grep NEEDED
echo "newest glibc symbol: $(objdump -T "$OUT/t2i" | grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)"
cat > "$OUT/run-t2i.sh" <<'WRAP'
#!/bin/sh
# Runs the t2i beside this script with the CUDA 13 libraries of a Python environment (PyTorch's cu13
# wheels) on LD_LIBRARY_PATH. CUDA_LIBS=dir1:dir2 overrides; PYTHON picks the interpreter.
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${CUDA_LIBS:-}" ]; then
  CUDA_LIBS=$(${PYTHON:-python3} -c 'import nvidia, os; print(":".join(d for p in nvidia.__path__ for d in (os.path.join(p, "cu13", "lib"), os.path.join(p, "cudnn", "lib")) if os.path.isdir(d)))' 2>/dev/null)
fi
[ -n "${CUDA_LIBS:-}" ] || { echo "$0: no CUDA 13 libraries found; set CUDA_LIBS" >&2; exit 1; }
LD_LIBRARY_PATH=$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec "$HERE/t2i" "$@"
WRAP
chmod +x "$OUT/run-t2i.sh"

# Every library and symbol must resolve here too; with the stub as the "driver", the first CUDA call
# fails with an error instead of crashing.
step "smoke test with the stub driver (a CUDA error is expected)"
mkdir -p "$CACHE/stub-driver" && cp "$ROOT/lib/stubs/libcuda.so" "$CACHE/stub-driver/libcuda.so.1"
LIBS=$CU/lib:$CACHE/stub-driver${NV:+:$NV/cudnn/lib}
LD_LIBRARY_PATH=$LIBS "$OUT/t2i" --version
LD_LIBRARY_PATH=$LIBS "$OUT/t2i" generate --device cuda --model tests/fixtures/models/ssd-1b-tiny \
  --prompt smoke --width 64 --height 64 --steps 1 --output "$CACHE/smoke.png" 2>&1 | tail -1 || true
ls -la "$OUT"
