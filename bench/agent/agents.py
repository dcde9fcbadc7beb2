"""The two agents under test, each run on one task the way a user would run it.

kiln: `kiln workspace create --from` the task, `kiln agent run … -o json` with the test
command as the task's fixed step, `kiln workspace download` of the result; its own NDJSON
events give the fix rounds, tokens and model time (sum of the per-call durations).

aider: a fresh git repository with the task, one `aider --message` run with `--auto-test`
and the same test command; the fix rounds are the "Attempt to fix … errors?" answers in its
chat history that it acted on (lint and test reflections, at most 3 by aider's default).

Tokens and model time are also taken for both from the metering proxy (meter.py) that sits
between each agent and the model server, so the two are counted by the same code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import time

from tasks import Task

AIDER_FIX_PROMPTS = re.compile(r"Attempt to fix (?:lint|test) errors\?")
AIDER_OUT_OF_REFLECTIONS = "reflections allowed, stopping"


@dataclasses.dataclass
class Outcome:
    """What one agent did on one task (scored later by run.py)."""

    agent: str
    task: str
    # The directory holding the agent's final code.
    result_dir: str
    wall_s: float
    exit_code: int
    fix_rounds: int = 0
    # From the agent's own report (kiln: NDJSON usage; aider: none, see `metered_*`).
    reported_tokens: int | None = None
    reported_model_s: float | None = None
    # Time spent in the test command inside the agent's loop (kiln: the build steps).
    steps_s: float | None = None
    phase: str = ""
    reason: str = ""
    error: str = ""
    # Filled in by run.py from the metering proxy and the scoring run.
    metered_calls: int = 0
    metered_tokens: int = 0
    metered_model_s: float = 0.0
    solved: bool = False
    score_output: str = ""


def run_logged(argv, log, *, cwd=None, env=None, input_text=None, timeout=None):
    """Runs argv to completion; stdout returned, stderr appended to `log`. On a timeout the
    whole process group is killed (aider's and kiln's children with it)."""
    with open(log, "ab") as err:
        err.write(f"\n$ {shlex.join(argv)}\n".encode())
        err.flush()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(input_text.encode() if input_text else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return 124, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


# ---------------------------------------------------------------------------------------
# kiln


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def find_key(obj, *names):
    """The first value under a key named like one of `names` (snake or camel case), depth
    first. The CLI's NDJSON is read by meaning, not by an exact nesting."""
    wanted = {_norm(n) for n in names}
    stack = [obj]
    while stack:
        cur = stack.pop(0)
        if isinstance(cur, dict):
            for k, v in cur.items():
                if _norm(k) in wanted:
                    return v
            stack.extend(v for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            stack.extend(v for v in cur if isinstance(v, (dict, list)))
    return None


def seconds(value, key_hint: str = "") -> float:
    """A duration as the CLI may print it: proto JSON "1.5s", {"seconds", "nanos"}, or a
    number (milliseconds when the key says so)."""
    if value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return value / 1000.0 if key_hint.endswith("ms") else float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s)?\s*", value)
        if m:
            v = float(m.group(1))
            return v / 1000.0 if m.group(2) == "ms" else v
        return 0.0
    if isinstance(value, dict):
        return float(value.get("seconds", 0) or 0) + float(value.get("nanos", 0) or 0) / 1e9
    return 0.0


def event_kind(event: dict) -> str:
    # The CLI puts the kind in `type` (cli/src/output.rs, task_event_json).
    kind = event.get("type") or event.get("kind")
    if isinstance(kind, str):
        return _norm(kind)
    for k, v in event.items():
        if isinstance(v, dict) and _norm(k) in KINDS:
            return _norm(k)
    return ""


KINDS = {
    "phasechanged", "modeloutput", "fileswritten", "findings", "buildevent",
    "relayedbuildevent", "heartbeat", "result", "taskresult", "usage", "modelusage",
}


def duration_of(payload) -> float:
    for name in ("duration_ms", "durationMs"):
        v = find_key(payload, name)
        if v is not None:
            return seconds(v, "ms")
    return seconds(find_key(payload, "duration", "duration_s", "duration_secs", "duration_seconds"))


def parse_kiln_events(stdout: str) -> dict:
    """Sums what the NDJSON of `kiln agent run -o json` says: model calls and their time
    (`usage` events, `duration_ms`), tokens, the build steps' time (relayed `step_finished`)
    and the `result` (phase DONE/FAILED/CANCELLED, reason, iterations, usage)."""
    calls = 0
    model_s = 0.0
    call_tokens = 0
    steps_s = 0.0
    result = None
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event_kind(event)
        if kind in ("usage", "modelusage"):
            calls += 1
            model_s += duration_of(event)
            call = find_key(event, "call")
            if isinstance(call, dict):
                call_tokens += int(find_key(call, "prompt_tokens") or 0)
                call_tokens += int(find_key(call, "completion_tokens") or 0)
        elif kind in ("buildevent", "relayedbuildevent"):
            # {"type": "build_event", "event": {"type": "step_finished", "duration_ms": …}}
            inner = event.get("event")
            if isinstance(inner, dict) and _norm(str(inner.get("type", ""))) == "stepfinished":
                steps_s += duration_of(inner)
            else:
                finished = find_key(event, "step_finished")
                if isinstance(finished, dict):
                    steps_s += duration_of(finished)
        elif kind in ("result", "taskresult"):
            result = event
    out = {"calls": calls, "model_s": model_s, "steps_s": steps_s, "tokens": call_tokens}
    if result is not None:
        usage = find_key(result, "usage")
        if isinstance(usage, dict):
            total = int(find_key(usage, "prompt_tokens") or 0) + int(
                find_key(usage, "completion_tokens") or 0
            )
            out["tokens"] = max(total, call_tokens)
        phase = find_key(result, "phase")
        out["phase"] = str(phase or "")
        out["reason"] = str(find_key(result, "reason") or "")
        out["iterations"] = int(find_key(result, "iterations") or 0)
        out["workspace_id"] = str(find_key(result, "workspace_id") or "")
    return out


class Kiln:
    """A `kiln up` suite of its own (temporary data directory, free port, the shipped
    defaults), logged in as the bootstrap admin, its agent pointed at the model URL."""

    def __init__(self, binary: str, model_url: str, workdir: str, log: str) -> None:
        self.binary = binary
        self.log = log
        self.data = os.path.join(workdir, "kiln-data")
        os.makedirs(self.data)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        self.up_out = os.path.join(workdir, "up.out")
        with open(self.up_out, "wb") as out, open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [binary, "up", "--listen", "127.0.0.1:0", "--data-dir", self.data,
                 "--log-format", "text", "--llm-url", model_url],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                start_new_session=True,
            )
        self.endpoint = self._wait_serving()
        self.env = dict(
            env,
            KILN_CONFIG_DIR=os.path.join(workdir, "cli"),
            KILN_ENDPOINT=self.endpoint,
            KILN_CA=os.path.join(self.data, "pki", "ca.pem"),
        )
        with open(os.path.join(self.data, "auth", "admin-password")) as f:
            password = f.read()
        rc, _ = run_logged([binary, "login", "--username", "admin", "--password-stdin"],
                           log, env=self.env, input_text=password, timeout=60)
        if rc != 0:
            self.close()
            raise SystemExit(f"kiln login failed (exit {rc}); see {log}")

    def _wait_serving(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(self.up_out) as f:
                for line in f:
                    if line.startswith("kiln is serving on "):
                        return line.split("kiln is serving on ", 1)[1].strip()
            if self.proc.poll() is not None:
                raise SystemExit(f"kiln up exited with code {self.proc.returncode}; see {self.log}")
            time.sleep(0.1)
        self.close()
        raise SystemExit(f"kiln up did not serve within 60 s; see {self.log}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def run_task(self, task: Task, model_id: str, task_dir: str, out_dir: str,
                 max_iterations: int, timeout_s: float) -> Outcome:
        started = time.monotonic()
        outcome = Outcome("kiln", task.id, out_dir, 0.0, 0)
        rc, out = run_logged([self.binary, "-o", "json", "workspace", "create", "--from", task_dir],
                             self.log, env=self.env, timeout=120)
        try:
            workspace = json.loads(out)["id"]
        except (ValueError, KeyError, TypeError):
            outcome.exit_code, outcome.error = rc, f"workspace create failed (exit {rc})"
            outcome.wall_s = time.monotonic() - started
            return outcome
        argv = [self.binary, "-o", "json", "agent", "run", task.prompt,
                "--toolchain", task.toolchain, "--model", model_id, "--workspace", workspace,
                "--step", task.test_command, "--max-iterations", str(max_iterations),
                # The task's own budget ends it with a result; the process limit is a backstop.
                "--timeout", f"{min(int(timeout_s), 7200)}s"]
        rc, out = run_logged(argv, self.log, env=self.env, timeout=timeout_s + 60)
        with open(os.path.join(os.path.dirname(out_dir), "kiln-events.ndjson"), "w") as f:
            f.write(out)
        events = parse_kiln_events(out)
        rc_dl, _ = run_logged([self.binary, "workspace", "download", workspace, "--out", out_dir],
                              self.log, env=self.env, timeout=120)
        outcome.wall_s = time.monotonic() - started
        outcome.exit_code = rc
        outcome.fix_rounds = events.get("iterations", 0)
        outcome.reported_tokens = events["tokens"]
        outcome.reported_model_s = events["model_s"]
        outcome.steps_s = events["steps_s"]
        outcome.phase = events.get("phase", "")
        outcome.reason = events.get("reason", "")
        if "phase" not in events:
            outcome.error = f"no result event (kiln agent run exit {rc})"
        if rc_dl != 0:
            outcome.error = (outcome.error + "; " if outcome.error else "") + "download failed"
        return outcome


# ---------------------------------------------------------------------------------------
# aider

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@127.0.0.1",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@127.0.0.1",
}


def aider_argv(aider: str, model_id: str, model_url: str, task: Task) -> list[str]:
    argv = [
        aider,
        "--model", f"openai/{model_id}",
        "--openai-api-base", model_url,
        "--openai-api-key", "none",
        "--auto-test", "--test-cmd", task.test_command,
        "--yes-always",
        # No model calls for commit messages: kiln writes none either, and the test
        # command, not git history, is what is scored.
        "--no-auto-commits",
        "--no-show-model-warnings", "--no-analytics", "--no-check-update",
        "--no-pretty", "--no-fancy-input",
        "--no-show-release-notes", "--no-detect-urls",
        "--message", task.prompt,
    ]
    for path in task.read_only:
        argv += ["--read", path]
    return argv + task.editable


def aider_fix_rounds(repo: str) -> int:
    """The reflections aider ran. Its answers to "Attempt to fix … errors?" (taken as yes
    with --yes-always) go only to its chat history; the last one is not acted on when it
    then says the reflections are used up."""
    try:
        with open(os.path.join(repo, ".aider.chat.history.md"), errors="replace") as f:
            history = f.read()
    except FileNotFoundError:
        return 0
    rounds = len(AIDER_FIX_PROMPTS.findall(history))
    if AIDER_OUT_OF_REFLECTIONS in history:
        rounds -= 1
    return max(rounds, 0)


# Variables of the caller's shell that change what a test prints or where it builds; kiln's
# sandbox clears the environment, so aider's test runs and the scoring run drop them too
# (RUST_BACKTRACE=1 alone turns a failed `cargo test` into 80 lines of backtrace).
CALLER_ONLY_ENV = ("RUST_BACKTRACE", "RUST_LOG", "CARGO_TARGET_DIR", "CARGO_INCREMENTAL")


def test_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CALLER_ONLY_ENV}
    env.update(extra or {})
    return env


def run_aider(aider: str, model_id: str, model_url: str, task: Task, repo: str, log: str,
              timeout_s: float) -> Outcome:
    env = test_env(GIT_ENV)
    started = time.monotonic()
    for argv in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "task"]):
        subprocess.run(argv, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    rc, out = run_logged(aider_argv(aider, model_id, model_url, task), log, cwd=repo, env=env,
                         timeout=timeout_s)
    wall = time.monotonic() - started
    with open(os.path.join(os.path.dirname(repo), "aider.out"), "w") as f:
        f.write(out)
    outcome = Outcome("aider", task.id, repo, wall, rc)
    outcome.fix_rounds = aider_fix_rounds(repo)
    if rc == 124:
        outcome.error = f"timed out after {timeout_s:.0f} s"
    elif rc != 0:
        outcome.error = f"aider exit {rc}"
    return outcome
