#!/usr/bin/env bash
# A single-node Garage S3 server for tests and local use (docs/architecture.md §5), idempotent:
#   scripts/garage.sh start    # start (configuring layout, key and bucket on first run), then print env
#   scripts/garage.sh stop     # stop the server (data is kept)
#   scripts/garage.sh env      # print the AWS_* variables clients need
# Needs `garage` on PATH or in ~/.cargo/bin (cargo install --locked garage).
set -euo pipefail
DIR=${T2I_GARAGE_DIR:-$HOME/.cache/t2i-worker/garage}
GARAGE=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
KEY_ID=GK31c2f218a2e44f485b94239e            # test credentials, local only
KEY_SECRET=b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835
BUCKET=${T2I_GARAGE_BUCKET:-t2i}
CONF=$DIR/garage.toml
g() { "$GARAGE" -c "$CONF" "$@"; }

print_env() {
  cat <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:3900
export AWS_REGION=garage
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$KEY_SECRET
export T2I_TEST_BUCKET=$BUCKET
ENV
}

# Alive and not a zombie (a killed child of an exited shell may linger as <defunct>).
running() {
  [ -f "$DIR/pid" ] || return 1
  local pid; pid=$(cat "$DIR/pid")
  kill -0 "$pid" 2>/dev/null || return 1
  [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != "Z" ]
}

start() {
  mkdir -p "$DIR/meta" "$DIR/data"
  if [ ! -f "$CONF" ]; then
    cat > "$CONF" <<TOML
metadata_dir = "$DIR/meta"
data_dir = "$DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:3900"
root_domain = ".s3.garage.localhost"
TOML
  fi
  if ! running; then
    # The server outlives this script, so it must not keep the caller's descriptors open: a lock
    # taken with flock(1) around a test run would stay held by the server (the outage test restarts
    # it mid-run), and a CI runner's pipe would never reach end of file. Descriptors above 2 are
    # closed in the subshell that becomes the server (255 is bash's own script descriptor).
    (
      for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
      done
      exec nohup "$GARAGE" -c "$CONF" server > "$DIR/server.log" 2>&1 < /dev/null
    ) &
    echo $! > "$DIR/pid"
  fi
  for _ in $(seq 1 100); do g status >/dev/null 2>&1 && break; sleep 0.2; done
  if ! g layout show 2>/dev/null | grep -q "Current cluster layout version: [1-9]"; then
    node=$(g node id -q | cut -d@ -f1)
    g layout assign -z dc1 -c 1G "$node" >/dev/null
    g layout apply --version 1 >/dev/null
  fi
  g key info "$KEY_ID" >/dev/null 2>&1 || g key import --yes "$KEY_ID" "$KEY_SECRET" -n test >/dev/null
  g bucket info "$BUCKET" >/dev/null 2>&1 || g bucket create "$BUCKET" >/dev/null
  g bucket allow --read --write --owner "$BUCKET" --key test >/dev/null
  # The S3 endpoint answers once the layout is live.
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:3900/" && break; sleep 0.2
  done
  print_env
}

stop() {
  # Returns only once the server is gone: Garage drains for several seconds after SIGTERM, and a
  # "stopped" server that still answers would make outage tests meaningless.
  if running; then
    pid=$(cat "$DIR/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do running || break; sleep 0.1; done
    running && kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do running || break; sleep 0.1; done
  fi
  rm -f "$DIR/pid"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
