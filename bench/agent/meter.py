"""A metering proxy in front of the model server: both agents talk to the model through it,
so their tokens and model time are counted by one piece of code, the same way.

It forwards every request to the upstream OpenAI-compatible server unchanged and streams the
answer back as it comes (SSE included). For each chat/completions call it records when the
request arrived, when the last byte of the answer left, and the token counts the server
reported (`usage`, or llama.cpp's `timings` when a streamed answer has no usage). Only
127.0.0.1 is used on both sides.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
import urllib.parse

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    # send_response writes its own.
    "server",
    "date",
}


class Call:
    __slots__ = ("start", "end", "path", "status", "prompt_tokens", "completion_tokens")

    def __init__(self, start: float, path: str) -> None:
        self.start = start
        self.end = start
        self.path = path
        self.status = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class Meter:
    """Runs the proxy on a free 127.0.0.1 port in a background thread."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit(f"the model server must be http on 127.0.0.1, not {upstream}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        # The upstream's path prefix (/v1) is kept: the proxy's URL is http://127.0.0.1:P/v1.
        self.prefix = parsed.path.rstrip("/")
        self.calls: list[Call] = []
        self.inflight = 0
        self.lock = threading.Lock()
        meter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the runner prints its own table
                pass

            def do_GET(self) -> None:
                meter.forward(self)

            def do_POST(self) -> None:
                meter.forward(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.prefix}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Waits for calls still being answered: an agent killed at its time limit leaves
        one that ends (and is recorded) when the proxy notices the hang-up, moments later."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.inflight == 0:
                    return
            time.sleep(0.05)

    def calls_between(self, start: float, end: float) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.start >= start and c.end <= end]

    def forward(self, h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else None
        metered = h.command == "POST" and h.path.rstrip("/").endswith("completions")
        call = Call(time.time(), h.path)
        if metered:
            with self.lock:
                self.inflight += 1
        try:
            self.relay(h, body, metered, call)
        finally:
            if metered:
                with self.lock:
                    self.inflight -= 1

    def relay(self, h, body, metered: bool, call: Call) -> None:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=3600)
        try:
            upstream.request(h.command, h.path, body=body, headers=headers)
            resp = upstream.getresponse()
        except OSError as e:
            h.send_error(502, f"model server unreachable: {e}")
            return
        call.status = resp.status
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                h.send_header(k, v)
        # Length-less and streamed: close-delimited, which every HTTP/1.1 client reads.
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        tail = bytearray()
        whole = bytearray()
        streaming = "event-stream" in (resp.getheader("content-type") or "")
        try:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                h.wfile.write(chunk)
                h.wfile.flush()
                if metered:
                    if streaming:
                        # Usage comes in the last events; keep a bounded tail to find it.
                        tail += chunk
                        del tail[:-262144]
                    else:
                        whole += chunk
        except OSError:
            # The client hung up (an agent abandoning a call at its time limit): the call
            # counts until now, and closing upstream stops the server generating for nobody.
            pass
        finally:
            upstream.close()
        call.end = time.time()
        if metered:
            self.count(call, bytes(tail) if streaming else bytes(whole), streaming)
            with self.lock:
                self.calls.append(call)

    @staticmethod
    def count(call: Call, data: bytes, streaming: bool) -> None:
        objects = []
        if streaming:
            for line in data.split(b"\n"):
                line = line.strip()
                if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                    try:
                        objects.append(json.loads(line[5:]))
                    except ValueError:
                        pass  # the cut first line of the bounded tail
        else:
            try:
                objects.append(json.loads(data))
            except ValueError:
                return
        for obj in reversed(objects):
            if not isinstance(obj, dict):
                continue
            usage = obj.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                call.completion_tokens = int(usage.get("completion_tokens") or 0)
                return
            timings = obj.get("timings")
            if isinstance(timings, dict) and "predicted_n" in timings:
                # llama.cpp counts the prompt tokens it evaluated (prompt_n) apart from the
                # ones it reused from its cache; both were sent.
                cached = int(timings.get("cache_n") or 0)
                call.prompt_tokens = int(timings.get("prompt_n") or 0) + cached
                call.completion_tokens = int(timings.get("predicted_n") or 0)
                return
