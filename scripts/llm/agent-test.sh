#!/usr/bin/env bash
# The agent's test against the real local model (cli/tests/agent_llm.rs): starts the model
# server `make llm` installed (or uses a running one, and leaves it running), runs the test
# with KILN_TEST_LLM_URL pointing at it, and stops the server it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=0
if ! scripts/llm/serve.sh status >/dev/null 2>&1; then
  scripts/llm/serve.sh start
  started=1
fi
trap '[ "$started" = 1 ] && scripts/llm/serve.sh stop >/dev/null 2>&1 || true' EXIT
url="$(scripts/llm/serve.sh url)"
KILN_TEST_LLM_URL="$url" "${CARGO:-cargo}" test -p kiln-cli --test agent_llm -- --nocapture
