#!/usr/bin/env bash
# The project's one test command (the README's; .ci/run runs exactly this). It brings up what the
# tests need, then runs the checks in order, stopping at the first failure:
#   cargo fmt --all -- --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test
#   scripts/gpu/ptx.sh   (the project's CUDA kernels compile to PTX; no GPU needed)
#   scripts/deploy/check.sh
#
# Setup is idempotent (a second run only checks, in seconds) and prints one line per step:
#   - rustfmt and clippy (rustup), a C compiler (the build compiles aws-lc and mimalloc);
#   - RabbitMQ on 127.0.0.1:5672, guest/guest: Debian's rabbitmq-server, installed where missing
#     and started where stopped;
#   - Garage (S3): built once into ~/.cargo/bin (cargo install, about 20 minutes on 2 cores), then
#     reused; started by scripts/garage.sh (data under ~/.cache/t2i-worker/garage);
#   - the Python packages of scripts/requirements-test.txt in a venv under ~/.cache/t2i-worker,
#     rebuilt when that file changes; exported as PYTHON;
#   - NVIDIA's nvcc wheels (scripts/gpu/nvcc-requirements.txt, the pins scripts/build-cuda.sh
#     uses) in another venv there, rebuilt when that file changes, for scripts/gpu/ptx.sh;
#   - kubectl (Debian's kubernetes-client) where missing.
# Installs use apt-get (as root, or through sudo), rustup, cargo and pip.
#
#   scripts/test.sh               setup, then the checks
#   scripts/test.sh --setup-only  setup only; prints the environment the tests use as `export` lines,
#                                 so `eval "$(scripts/test.sh --setup-only)"` prepares a shell
#                                 for running single tests by hand
#   scripts/test.sh --no-setup    the checks only: installs nothing and starts nothing (RabbitMQ and
#                                 Garage must already be up)
#
# CARGO_TARGET_DIR defaults to ~/.cache/t2i-worker/target, outside the clone, so repeated runs (and
# fresh clones, and CI) build incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=all
case "${1:-}" in
  "") ;;
  --setup-only) MODE=setup ;;
  --no-setup) MODE=checks ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) echo "usage: $0 [--setup-only | --no-setup]" >&2; exit 2 ;;
esac

CACHE="$HOME/.cache/t2i-worker"
VENV="$CACHE/venv-test"
NVCC_VENV="$CACHE/venv-nvcc"
GARAGE_VERSION=2.5.0 # what `cargo install` builds when no garage is present
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
mkdir -p "$CACHE" "$CARGO_TARGET_DIR"

step() { echo "setup: $*" >&2; }
die() { echo "scripts/test.sh: $*" >&2; exit 1; }

# apt-get install, as root or through sudo; on a machine whose package lists are empty or stale
# the first attempt fails, so it runs `apt-get update` and tries once more. Output goes to a log.
apt_install() {
  local sudo=() log="$CACHE/apt.log"
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need the Debian packages '$*': install them as root"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null || die "need '$*' and there is no apt-get here: install them yourself"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y -q "$@" >"$log" 2>&1; then
    step "  apt-get update (then retrying the install)"
    if ! { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q "$@"; } >"$log" 2>&1; then
      tail -n 20 "$log" >&2
      die "apt-get install $* failed (log: $log)"
    fi
  fi
}

setup_toolchain() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
  if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
    step "rustfmt, clippy: present"
  else
    command -v rustup >/dev/null || die "rustfmt/clippy missing and no rustup to add them"
    step "rustfmt, clippy: rustup component add"
    rustup component add rustfmt clippy
  fi
  if command -v cc >/dev/null; then
    step "C compiler: present"
  else
    step "C compiler: installing build-essential"
    apt_install build-essential
  fi
}

setup_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then
    step "RabbitMQ: installing rabbitmq-server"
    apt_install rabbitmq-server
  fi
  if rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    step "RabbitMQ: running"
  else
    step "RabbitMQ: starting (rabbitmq-server -detached)"
    rabbitmq-server -detached
  fi
  # Right after a start the node may not answer yet; await_startup then fails at once, so retry.
  local i up=""
  for i in $(seq 1 60); do
    rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1 && { up=1; break; }
    sleep 2
  done
  [ -n "$up" ] || rabbitmqctl -q await_startup --timeout 10 || die "RabbitMQ did not come up"
  clear_test_queues
}

# Queues a test run leaves behind when it is killed before its cleanup (every test queue is named
# `t2it-…`, tests/it/broker.rs). With a few hundred of them idle on the broker, test runs have hung
# in broker tests and `rabbitmqctl status` with them, so they go before the next run. Any test run
# on this broker at the same moment loses its queues: run one suite at a time.
clear_test_queues() {
  local q n=0
  while read -r q; do
    case "$q" in t2it-*) ;; *) continue ;; esac
    rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 && n=$((n + 1))
  done < <(timeout 60 rabbitmqctl -q list_queues name 2>/dev/null || true)
  [ "$n" -eq 0 ] || step "RabbitMQ: deleted $n queues left by interrupted test runs"
}

setup_garage() {
  if command -v garage >/dev/null; then
    step "Garage: $(command -v garage)"
  else
    step "Garage: cargo install --locked garage --version $GARAGE_VERSION (once; about 20 minutes)"
    # Its own temporary target directory: garage's build must not land in (or evict) ours.
    env -u CARGO_TARGET_DIR cargo install --locked garage --version "$GARAGE_VERSION"
  fi
  if ! command -v curl >/dev/null; then # scripts/garage.sh polls the S3 port with curl
    step "Garage: installing curl"
    apt_install curl
  fi
  eval "$(scripts/garage.sh start)"
  step "Garage: running on $AWS_ENDPOINT_URL, bucket $T2I_TEST_BUCKET"
}

setup_python() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null &&
    cmp -s scripts/requirements-test.txt "$VENV/requirements.txt"; then
    step "Python test packages: $VENV (up to date)"
  else
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      step "Python: installing python3, python3-venv"
      apt_install python3 python3-venv
    fi
    step "Python test packages: installing scripts/requirements-test.txt into $VENV"
    python3 -m venv --clear "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-test.txt
    cp scripts/requirements-test.txt "$VENV/requirements.txt" # only once the install succeeded
  fi
  export PYTHON="$VENV/bin/python"
}

# nvcc from PyPI (no CUDA toolkit or GPU needed to compile kernels to PTX).
setup_nvcc() {
  if [ -x "$NVCC_VENV/bin/python" ] && cmp -s scripts/gpu/nvcc-requirements.txt "$NVCC_VENV/requirements.txt"; then
    step "nvcc: $NVCC_VENV (up to date)"
  else
    step "nvcc: installing scripts/gpu/nvcc-requirements.txt into $NVCC_VENV"
    python3 -m venv --clear "$NVCC_VENV"
    "$NVCC_VENV/bin/pip" install -q --disable-pip-version-check -r scripts/gpu/nvcc-requirements.txt
    cp scripts/gpu/nvcc-requirements.txt "$NVCC_VENV/requirements.txt"
  fi
}

# The venv's nvcc, or nothing when setup has not installed it.
nvcc_path() {
  [ -x "$NVCC_VENV/bin/python" ] || return 0
  "$NVCC_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvcc"))'
}

setup_kubectl() {
  if command -v kubectl >/dev/null; then
    step "kubectl: $(command -v kubectl)"
  else
    step "kubectl: installing kubernetes-client"
    apt_install kubernetes-client
  fi
}

if [ "$MODE" = checks ]; then
  # Nothing installed or started: use what a previous setup left, else the machine's own.
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$VENV/bin/python" ]; then export PYTHON="$VENV/bin/python"; else export PYTHON=python3; fi
  fi
  eval "$(scripts/garage.sh env)"
else
  setup_toolchain
  setup_rabbitmq
  setup_garage
  setup_python
  setup_nvcc
  setup_kubectl
fi

# The parity tests read committed fixtures only (tests/fixtures): no Python, network or model
# download. Fail early and clearly if the checkout lacks them (e.g. a partial or LFS-less clone).
test -f tests/fixtures/reference/ssd-1b-tiny.safetensors ||
  die "parity fixtures missing (tests/fixtures/reference): is the clone complete?"

if [ "$MODE" = setup ]; then
  printf "export PYTHON=%q\n" "$PYTHON"
  printf "export CARGO_TARGET_DIR=%q\n" "$CARGO_TARGET_DIR"
  scripts/garage.sh env
  exit 0
fi

check() {
  echo "==> $*" >&2
  "$@"
}
check cargo fmt --all -- --check
check cargo clippy --all-targets -- -D warnings
check cargo test
NVCC=$(nvcc_path)
[ -x "$NVCC" ] || die "no nvcc in $NVCC_VENV: run scripts/test.sh (or --setup-only) once to install it"
check scripts/gpu/ptx.sh "$NVCC" "$CACHE/ptx"
check scripts/deploy/check.sh
echo "==> all checks passed" >&2
