"""Tests of the benchmark's own parts that need no model: the metering proxy in front of a
real HTTP server on 127.0.0.1, the reading of kiln's NDJSON, the scoring, the native tasks.

    python3 bench/agent/test_harness.py        (no venv needed; not part of CI)
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import sys
import tempfile
import socket
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import agents  # noqa: E402
import run  # noqa: E402
import tasks  # noqa: E402
from meter import Meter  # noqa: E402


class FakeModel(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible answer: streamed with usage in the last event, or whole."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if request.get("model") == "slow":
            # 100 deltas over about 10 s: a client that hangs up early must not wait for them.
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            self.close_connection = True
        elif request.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for delta in ("def ", "f(): ", "pass"):
                chunk = {"choices": [{"delta": {"content": delta}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            last = {"choices": [], "usage": {"prompt_tokens": 120, "completion_tokens": 3}}
            self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
            self.close_connection = True
        else:
            body = json.dumps({"choices": [{"message": {"content": "x"}}],
                               "usage": {"prompt_tokens": 50, "completion_tokens": 7}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


class MeterTest(unittest.TestCase):
    def setUp(self):
        self.upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeModel)
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        self.meter = Meter(f"http://127.0.0.1:{self.upstream.server_address[1]}/v1")

    def tearDown(self):
        self.meter.close()
        self.upstream.shutdown()
        self.upstream.server_close()

    def post(self, stream: bool) -> bytes:
        req = urllib.request.Request(
            self.meter.url + "/chat/completions",
            data=json.dumps({"model": "m", "stream": stream, "messages": []}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def test_streamed_and_whole_answers_pass_through_and_are_counted(self):
        streamed = self.post(True)
        self.assertIn(b'"content": "def "', streamed)
        self.assertTrue(streamed.rstrip().endswith(b"data: [DONE]"))
        whole = json.loads(self.post(False))
        self.assertEqual(whole["choices"][0]["message"]["content"], "x")
        calls = self.meter.calls_between(0, float("inf"))
        self.assertEqual([(c.prompt_tokens, c.completion_tokens) for c in calls],
                         [(120, 3), (50, 7)])
        self.assertTrue(all(c.end >= c.start and c.status == 200 for c in calls))

    def test_a_call_abandoned_by_the_client_counts_until_it_hangs_up(self):
        port = int(self.meter.url.split(":")[2].split("/")[0])
        body = json.dumps({"model": "slow", "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            got = b""
            while b"data:" not in got:
                chunk = s.recv(4096)
                self.assertTrue(chunk, "the stream closed before its first event")
                got += chunk
        self.meter.wait_idle(8)
        calls = self.meter.calls_between(0, float("inf"))
        self.assertEqual(len(calls), 1, "the abandoned call is recorded")
        self.assertLess(calls[0].end - calls[0].start, 5, "and ends when the client left")

    def test_other_requests_are_forwarded_but_not_counted(self):
        with urllib.request.urlopen(self.meter.url + "/models", timeout=10) as r:
            self.assertEqual(json.load(r)["data"][0]["id"], "m")
        self.assertEqual(self.meter.calls_between(0, float("inf")), [])

    def test_refuses_a_model_server_off_this_machine(self):
        with self.assertRaises(SystemExit):
            Meter("http://192.0.2.1:8080/v1")


class KilnEventsTest(unittest.TestCase):
    def test_sums_usage_and_steps_and_reads_the_result(self):
        # The shapes of cli/src/output.rs (task_event_json, build_event_json).
        lines = [
            {"type": "phase_changed", "previous_phase": "ANALYZE", "phase": "PLAN",
             "iteration": 0, "message": "", "sequence": 2},
            {"type": "usage", "phase": "PLAN", "call_index": 0,
             "call": {"prompt_tokens": 100, "completion_tokens": 20, "model_calls": 1},
             "total": {"prompt_tokens": 100, "completion_tokens": 20, "model_calls": 1},
             "duration_ms": 2500.0, "sequence": 3},
            {"type": "build_event", "build_id": "b1", "iteration": 0,
             "event": {"type": "step_finished", "step_index": 0, "exit_code": 1,
                       "duration_ms": 250.0, "cpu_time_ms": 200.0, "succeeded": False}},
            {"type": "build_event", "build_id": "b1", "iteration": 0,
             "event": {"type": "output", "step_index": 0, "data": "duration_ms"}},
            {"type": "usage", "phase": "FIX", "call_index": 1,
             "call": {"prompt_tokens": 300, "completion_tokens": 40, "model_calls": 1},
             "total": {"prompt_tokens": 400, "completion_tokens": 60, "model_calls": 2},
             "duration_ms": 1500.0},
            "not json",
            {"type": "result", "phase": "DONE", "message": "green", "reason": "",
             "workspace_id": "w1", "build_id": "b2", "iterations": 1,
             "usage": {"prompt_tokens": 400, "completion_tokens": 60, "model_calls": 2}},
        ]
        text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
        got = agents.parse_kiln_events(text)
        self.assertEqual(got["calls"], 2)
        self.assertAlmostEqual(got["model_s"], 4.0)
        self.assertAlmostEqual(got["steps_s"], 0.25)
        self.assertEqual(got["tokens"], 460)
        self.assertEqual(got["phase"], "DONE")
        self.assertEqual(got["iterations"], 1)

    def test_no_result_means_no_phase(self):
        got = agents.parse_kiln_events('{"type": "heartbeat", "sequence": 4}\n')
        self.assertNotIn("phase", got)
        self.assertEqual(got["tokens"], 0)

    def test_durations_in_the_forms_the_cli_may_print(self):
        self.assertEqual(agents.seconds("1.5s"), 1.5)
        self.assertEqual(agents.seconds({"seconds": 2, "nanos": 500_000_000}), 2.5)
        self.assertEqual(agents.seconds(250, "duration_ms"), 0.25)
        self.assertEqual(agents.seconds(None), 0.0)


class AiderRoundsTest(unittest.TestCase):
    def test_counts_the_reflections_acted_on(self):
        with tempfile.TemporaryDirectory() as repo:
            self.assertEqual(agents.aider_fix_rounds(repo), 0, "no history: no rounds")
            history = "".join(
                "> Attempt to fix test errors? (Y)es/(N)o [Yes]: y  \n" for _ in range(3))
            history += "> Only 3 reflections allowed, stopping.  \n"
            with open(os.path.join(repo, ".aider.chat.history.md"), "w") as f:
                f.write("> Attempt to fix lint errors? (Y)es/(N)o [Yes]: y  \n" + history)
            # Four answers (lint and test share the 3 reflections); the last one was refused.
            self.assertEqual(agents.aider_fix_rounds(repo), 3)


class ScoringTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.dir)

    def test_native_task_solved_only_with_right_code_and_original_tests(self):
        task = tasks.native_task("c/count_primes")
        start = os.path.join(self.dir, "start")
        task.write(start)
        solved, out = run.score(task, start, os.path.join(self.dir, "s1"))
        self.assertFalse(solved, "the stub must fail its tests")
        with open(os.path.join(start, "calc.c"), "w") as f:
            f.write('#include "calc.h"\nint count_primes(int n){int c=0;for(int i=2;i<n;i++)'
                    '{int p=1;for(int d=2;d*d<=i;d++)if(i%d==0){p=0;break;}c+=p;}return c;}\n')
        # An agent that guts the test does not score by it: the original comes back.
        with open(os.path.join(start, "test_calc.c"), "w") as f:
            f.write("int main(void){return 0;}\n")
        solved, out = run.score(task, start, os.path.join(self.dir, "s2"))
        self.assertTrue(solved, out)
        self.assertIn("all tests passed", out)

    def test_prompt_names_the_file_the_tests_and_the_command(self):
        task = tasks.native_task("rust/roman")
        self.assertEqual(task.test_command, "cargo test --offline -q")
        self.assertIn("src/lib.rs", task.prompt)
        self.assertIn("tests/hidden.rs", task.prompt)
        self.assertIn("MCMXCIV", task.prompt)


if __name__ == "__main__":
    unittest.main()
