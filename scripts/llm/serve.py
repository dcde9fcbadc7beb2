#!/usr/bin/env python3
"""Start, stop and query the local model server that `make llm` installs.

    serve.py start | stop | status | url      (scripts/llm/serve.sh is the same, from anywhere)

The server is llama.cpp's own HTTP server, embedded in the `xllamacpp` wheel under
.tools/llm/python: OpenAI-compatible /v1/chat/completions (SSE streaming, `response_format`
JSON schema, GBNF `grammar`), /v1/models and /health, on 127.0.0.1 only. `start` runs it in
the background, records its pid and port in .tools/llm/run/, and returns once /health answers;
`stop` ends that pid and nothing else.

Environment (all optional):
  KILN_LLM_PORT     port to listen on (default 8080; when 8080 is taken and the port was not
                    given, a free one is chosen; `url` and run/port say which)
  KILN_LLM_MODEL    a .gguf path, or a part of a file name under .tools/llm/models/
                    (e.g. 0.5b); default: the largest model installed
  KILN_LLM_CTX      context size in tokens (default 8192)
  KILN_LLM_THREADS  CPU threads (default 2)
  KILN_LLM_START_TIMEOUT  seconds to wait for /health (default 300)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLM = os.path.join(ROOT, ".tools", "llm")
MODELS = os.path.join(LLM, "models")
RUN = os.path.join(LLM, "run")
PID_FILE = os.path.join(RUN, "pid")
PORT_FILE = os.path.join(RUN, "port")
LOG_FILE = os.path.join(RUN, "server.log")
HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class ServeError(Exception):
    pass


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ServeError(f"{name}={raw!r} is not a number") from None


def find_model() -> str:
    wanted = os.environ.get("KILN_LLM_MODEL", "")
    if wanted.endswith(".gguf") and os.path.isfile(wanted):
        return os.path.abspath(wanted)
    try:
        names = [n for n in os.listdir(MODELS) if n.endswith(".gguf")]
    except FileNotFoundError:
        names = []
    if wanted:
        names = [n for n in names if wanted.lower() in n.lower()]
    if not names:
        what = f"matching KILN_LLM_MODEL={wanted!r} " if wanted else ""
        raise ServeError(f"no model {what}in {MODELS}: run `make llm` (or `make llm LLM_MODEL=0.5b`)")
    # Largest first: when both are installed, the 1.5B writes better code than the 0.5B.
    names.sort(key=lambda n: os.path.getsize(os.path.join(MODELS, n)), reverse=True)
    return os.path.join(MODELS, names[0])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As the server binds (SO_REUSEADDR): connections of a server stopped moments ago,
        # in TIME_WAIT, do not make the port look taken; a listener still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def our_server(pid: int | None) -> bool:
    """True when pid is alive and is this script's server, not a process that reused the pid."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return os.path.abspath(__file__).encode() in argv and b"run" in argv


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def url() -> str | None:
    port = read_int(PORT_FILE)
    if port is None or not our_server(read_int(PID_FILE)):
        return None
    return f"http://{HOST}:{port}"


def start() -> str:
    running = url()
    if running:
        print(f"already running: {running}/v1 (pid {read_int(PID_FILE)})")
        return running
    model = find_model()
    given = os.environ.get("KILN_LLM_PORT", "")
    port = env_int("KILN_LLM_PORT", DEFAULT_PORT)
    if not port_is_free(port):
        if given:
            raise ServeError(f"port {port} (KILN_LLM_PORT) is in use")
        # A free port the kernel picks now; the small window before the server binds it is
        # acceptable for a developer tool, and a lost race fails loudly below.
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        print(f"port {DEFAULT_PORT} is in use; using {port}")
    os.makedirs(RUN, exist_ok=True)
    for stale in (PID_FILE, PORT_FILE):
        if os.path.exists(stale):
            os.remove(stale)
    env = dict(os.environ, PYTHONPATH=os.path.join(LLM, "python"))
    with open(LOG_FILE, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start {model} on port {port}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "run", model, str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            # Its own session: a Ctrl-C in the caller's terminal does not reach it, and
            # `stop` remains the one way it ends.
            start_new_session=True,
        )
    with open(PID_FILE, "w") as f:
        f.write(f"{proc.pid}\n")
    with open(PORT_FILE, "w") as f:
        f.write(f"{port}\n")
    base = f"http://{HOST}:{port}"
    size = os.path.getsize(model) / 1e6
    print(f"starting {os.path.basename(model)} ({size:.0f} MB) on {base}, pid {proc.pid}, log {LOG_FILE}")
    began = time.monotonic()
    deadline = began + env_int("KILN_LLM_START_TIMEOUT", 300)
    last_report = began
    while True:
        if proc.poll() is not None:
            stop_files()
            raise ServeError(f"the server exited with code {proc.returncode}; the end of {LOG_FILE}:\n" + tail(LOG_FILE))
        try:
            status, _ = get(base + "/health", timeout=1.0)
            if status == 200:
                break
        except (urllib.error.URLError, OSError):
            pass  # not listening yet: it binds, then loads the model, then answers
        now = time.monotonic()
        if now > deadline:
            kill(proc.pid)
            raise ServeError(f"no answer from {base}/health within {now - began:.0f} s; see {LOG_FILE}")
        if now - last_report >= 5:
            print(f"  waiting for {base}/health ... {now - began:.0f} s", flush=True)
            last_report = now
        time.sleep(0.2)
    print(f"serving after {time.monotonic() - began:.1f} s: {base}/v1 (OpenAI-compatible)")
    return base


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return ""


def stop_files() -> None:
    for path in (PID_FILE, PORT_FILE):
        if os.path.exists(path):
            os.remove(path)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        # SIGTERM is handled once the model is loaded; a server still loading gets SIGKILL.
        for _ in range(150):
            if not our_server(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited on its own in the meantime


def stop() -> None:
    pid = read_int(PID_FILE)
    if not our_server(pid):
        stop_files()
        print("not running")
        return
    kill(pid)
    stop_files()
    print(f"stopped (pid {pid})")


def status() -> int:
    base = url()
    if not base:
        print("not running")
        return 3
    code, body = get(base + "/v1/models")
    models = [m.get("id") for m in json.loads(body).get("data", [])] if code == 200 else []
    print(f"running: {base}/v1 (pid {read_int(PID_FILE)}), models {models}")
    return 0


def run(model: str, port: int) -> None:
    """The server process itself (started by `start`; not meant to be called by hand)."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = model
    # The file name, without .gguf, is the model's id in /v1/models and requests.
    params.model_alias = {os.path.basename(model)[: -len(".gguf")]}
    params.hostnames = [HOST]
    params.port = port
    # 8k tokens hold a prompt, a few small files and a compiler diagnosis; the 1.5B model's
    # KV cache for it is about 230 MB. One slot: two cores gain nothing from parallel decoding.
    params.n_ctx = env_int("KILN_LLM_CTX", 8192)
    params.n_parallel = 1
    threads = env_int("KILN_LLM_THREADS", 2)
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    # The prompt cache defaults to 8 GiB of RAM; these machines are shared.
    params.cache_ram_mib = 1024
    params.ui = False  # an API server only: no web UI on the port
    stopping = threading.Event()
    # Handlers before the (blocking) load so a SIGTERM then is kept, not fatal mid-write.
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        server = xlc.Server(params)
    except RuntimeError as e:
        # llama.cpp has logged why (bind failure, unreadable model) just above.
        print(f"the server did not start: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"listening on {server.listening_address}", flush=True)
    stopping.wait()
    del server  # joins llama.cpp's loop: in-flight requests end, the port is released


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        if cmd == "start":
            start()
        elif cmd == "stop":
            stop()
        elif cmd == "status":
            return status()
        elif cmd == "url":
            base = url()
            if not base:
                return 3
            print(base + "/v1")
        elif cmd == "run" and len(sys.argv) == 4:
            run(sys.argv[2], int(sys.argv[3]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except ServeError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
