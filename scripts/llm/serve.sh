#!/usr/bin/env bash
# serve.sh start|stop|status|url — the local model server `make llm` installs (see serve.py).
set -euo pipefail
exec python3 "$(dirname "$0")/serve.py" "$@"
