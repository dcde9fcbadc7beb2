#!/usr/bin/env python3
"""Smoke test of the local model server: the calls kiln's agent makes, against the real model.

Starts the server (scripts/llm/serve.py; an already running one is used and left running),
asks /v1/models, then streams one /v1/chat/completions with an OpenAI-style `response_format`
JSON schema for `{"files": [{"path", "content"}]}` asking for a `calc.py` with `add(a, b)`.
Passes when the SSE stream parses, its text is JSON matching the schema, and calc.py parses as
Python defining add(a, b). The model's code is parsed, never run: outside kiln's sandbox it is
untrusted input like any other. Prints the server's start time, time to first token, tokens/s.

Run by `make test-llm`; KILN_LLM_MODEL and the other serve.py variables apply.
"""

import ast
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402

FILES_SCHEMA = {
    "type": "object",
    "properties": {
        "files": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["files"],
    "additionalProperties": False,
}

PROMPT = (
    "Write a Python module calc.py that defines add(a, b) returning a + b, with a docstring. "
    'Answer with JSON only: {"files": [{"path": "calc.py", "content": "<the file>"}]}.'
)


class SmokeError(Exception):
    pass


def check_files(doc: object) -> list[dict]:
    """Validate against FILES_SCHEMA by hand: the test needs no jsonschema package."""
    if not isinstance(doc, dict) or set(doc) != {"files"}:
        raise SmokeError(f"top level must be an object with exactly 'files', got {doc!r:.200}")
    files = doc["files"]
    if not isinstance(files, list) or not 1 <= len(files) <= 4:
        raise SmokeError(f"'files' must be a list of 1..4 entries, got {files!r:.200}")
    for f in files:
        if not isinstance(f, dict) or set(f) != {"path", "content"}:
            raise SmokeError(f"each file must have exactly path and content, got {f!r:.200}")
        if not isinstance(f["path"], str) or not isinstance(f["content"], str):
            raise SmokeError(f"path and content must be strings, got {f!r:.200}")
    return files


def check_calc(files: list[dict]) -> None:
    calc = [f for f in files if f["path"].lstrip("./") == "calc.py"]
    if not calc:
        raise SmokeError(f"no calc.py among {[f['path'] for f in files]}")
    try:
        tree = ast.parse(calc[0]["content"], "calc.py")
    except SyntaxError as e:
        raise SmokeError(f"calc.py does not parse: {e}") from None
    adds = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "add"]
    if not adds or len(adds[0].args.args) != 2:
        raise SmokeError("calc.py defines no add(a, b)")


def models(base: str) -> list[str]:
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        ids = [m["id"] for m in json.load(r)["data"]]
    if not ids:
        raise SmokeError("/v1/models lists no model")
    return ids


def chat_stream(base: str, model: str) -> dict:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a careful Python programmer."},
            {"role": "user", "content": PROMPT},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 400,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "files", "strict": True, "schema": FILES_SCHEMA},
        },
    }
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    sent = time.monotonic()
    first = None
    text, usage, timings, finish, done = [], None, None, None, False
    with urllib.request.urlopen(req, timeout=300) as r:
        if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise SmokeError(f"not an SSE stream: Content-Type {r.headers.get('Content-Type')}")
        for raw in r:
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: "):
                continue  # blank separators, comments, pings
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.monotonic()
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
    end = time.monotonic()
    if not done:
        raise SmokeError("the stream ended without data: [DONE]")
    if first is None:
        raise SmokeError("the stream carried no content")
    return {"text": "".join(text), "usage": usage or {}, "timings": timings or {}, "finish": finish,
            "ttft": first - sent, "total": end - sent, "generating": end - first}


def main() -> int:
    began = time.monotonic()
    already = serve.url()
    base = None
    try:
        base = serve.start()
        started = time.monotonic() - began
        ids = models(base)
        print(f"/v1/models: {ids}")
        result = chat_stream(base, ids[0])
        print(f"model output ({result['finish']}):\n{result['text']}")
        try:
            doc = json.loads(result["text"])
        except json.JSONDecodeError as e:
            raise SmokeError(f"the streamed text is not JSON: {e}") from None
        check_calc(check_files(doc))
        tokens = result["usage"].get("completion_tokens")
        prompt = result["usage"].get("prompt_tokens")
        rate = result["timings"].get("predicted_per_second")
        if rate is None and tokens:
            rate = tokens / result["generating"]
        print(
            f"ok: server ready in {started:.1f} s; prompt {prompt} tokens, completion {tokens} tokens; "
            f"first token after {result['ttft']:.2f} s, whole answer {result['total']:.1f} s; "
            f"{rate:.1f} tokens/s generating"
        )
        return 0
    except (SmokeError, serve.ServeError) as e:
        print(f"smoke test FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if base and not already:
            serve.stop()


if __name__ == "__main__":
    sys.exit(main())
