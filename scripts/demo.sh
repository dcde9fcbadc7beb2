#!/usr/bin/env bash
# The kiln demo: start the suite on a temporary data directory, show it serving, stop it.
# Run through `make demo`, which builds kiln and installs grpcurl into .tools/ first.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$PWD/.tools/bin:$PATH"
KILN="${CARGO_TARGET_DIR:-target}/debug/kiln"
DATA="$(mktemp -d -t kiln-demo.XXXXXX)"
UP_PID=""

bold() { if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi; }

cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    bold "Stopping the suite (SIGTERM: health goes NOT_SERVING, calls finish, then exit)"
    kill -TERM "$UP_PID"
    wait "$UP_PID" || true
    tail -n 1 "$DATA/up.out"
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT

bold "Starting kiln up (auth + build + agent on one port, development PKI)"
"$KILN" up --listen 127.0.0.1:0 --data-dir "$DATA" --log-format text >"$DATA/up.out" 2>"$DATA/up.log" &
UP_PID=$!

for _ in $(seq 1 300); do
  grep -q '^kiln is serving on' "$DATA/up.out" 2>/dev/null && break
  if ! kill -0 "$UP_PID" 2>/dev/null; then
    echo "kiln up exited early; its log:" >&2
    cat "$DATA/up.log" >&2
    exit 1
  fi
  sleep 0.1
done
grep -q '^kiln is serving on' "$DATA/up.out" || { echo "kiln up did not start within 30 s" >&2; cat "$DATA/up.log" >&2; exit 1; }
cat "$DATA/up.out"
ENDPOINT="$(sed -n 's/^kiln is serving on //p' "$DATA/up.out")"
ADDR="${ENDPOINT#https://}"
CA="$DATA/pki/ca.pem"

bold "Health of each service (kiln health)"
"$KILN" health --endpoint "$ENDPOINT" --ca "$CA"

bold "Services, found through gRPC reflection (grpcurl list)"
grpcurl -cacert "$CA" "$ADDR" list

bold "The RPCs of the build service (grpcurl describe)"
grpcurl -cacert "$CA" "$ADDR" describe kiln.build.v1.BuildService | grep -E '^\s*rpc ' | sed 's/ {$//'

bold "A SERVICE-only RPC called without a workload certificate is refused"
grpcurl -cacert "$CA" -d '{"key":"kiln_x_y"}' "$ADDR" kiln.auth.v1.AuthService/AuthenticateApiKey 2>&1 | sed 's/^/  /' || true

bold "A signed-in RPC without a token asks for one"
grpcurl -cacert "$CA" "$ADDR" kiln.auth.v1.AuthService/WhoAmI 2>&1 | sed 's/^/  /' || true
