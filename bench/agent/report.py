"""The agent benchmark's table, summary and ratios."""

from __future__ import annotations

import dataclasses


def model_s(o) -> float:
    """Model time: the agent's own per-call durations (kiln) or the metering proxy's, the
    larger. They agree for finished calls; a call abandoned when a task's time ran out is
    only in the meter's (it ends when the agent hangs up), and leaving it out would count
    the wait for the model as the agent's overhead."""
    return max(o.reported_model_s or 0.0, o.metered_model_s)


def tokens(o) -> int:
    return o.reported_tokens if o.reported_tokens else o.metered_tokens


def overhead_s(o) -> float:
    """Everything but waiting for the model and for the test command."""
    return max(0.0, o.wall_s - model_s(o) - (o.steps_s or 0.0))


def progress_line(n: int, total: int, o) -> str:
    verdict = "solved" if o.solved else "not solved"
    extra = f" ({o.error})" if o.error else ""
    return (f"[{n}/{total}] {o.task:<16} {o.agent:<5} {verdict:<10} rounds {o.fix_rounds} "
            f"wall {o.wall_s:6.1f} s  model {model_s(o):6.1f} s  tokens {tokens(o):6d}{extra}")


def table(records, agents) -> str:
    by_task: dict[str, dict] = {}
    for r in records:
        by_task.setdefault(r.task, {})[r.agent] = r
    head = f"{'task':<16}"
    for a in agents:
        head += f" | {a + ' ok':>8} {'rnd':>3} {'wall s':>7} {'model s':>7} {'tokens':>7}"
    lines = [head, "-" * len(head)]
    for task, row in by_task.items():
        line = f"{task:<16}"
        for a in agents:
            o = row.get(a)
            if o is None:
                line += f" | {'-':>8} {'':>3} {'':>7} {'':>7} {'':>7}"
                continue
            line += (f" | {'yes' if o.solved else 'no':>8} {o.fix_rounds:>3} {o.wall_s:>7.1f} "
                     f"{model_s(o):>7.1f} {tokens(o):>7}")
        lines.append(line)
    return "\n".join(lines)


def summarize(records, agents) -> dict:
    out: dict = {}
    for a in agents:
        rs = [r for r in records if r.agent == a]
        wall = sum(r.wall_s for r in rs)
        out[a] = {
            "tasks": len(rs),
            "solved": sum(r.solved for r in rs),
            "fix_rounds": sum(r.fix_rounds for r in rs),
            "wall_s": wall,
            "model_s": sum(model_s(r) for r in rs),
            "tokens": sum(tokens(r) for r in rs),
            "metered_tokens": sum(r.metered_tokens for r in rs),
            "metered_model_s": sum(r.metered_model_s for r in rs),
            "steps_s": sum(r.steps_s or 0.0 for r in rs),
            "overhead_s": sum(overhead_s(r) for r in rs),
        }
        out[a]["overhead_share"] = out[a]["overhead_s"] / wall if wall else 0.0
    if "kiln" in out and "aider" in out:
        k, p = out["kiln"], out["aider"]

        def ratio(x, y):
            return x / y if y else None

        out["ratios"] = {
            "solved_kiln_minus_aider": k["solved"] - p["solved"],
            "wall_kiln_over_aider": ratio(k["wall_s"], p["wall_s"]),
            "tokens_kiln_over_aider": ratio(k["tokens"], p["tokens"]),
            "metered_tokens_kiln_over_aider": ratio(k["metered_tokens"], p["metered_tokens"]),
            "model_time_kiln_over_aider": ratio(k["model_s"], p["model_s"]),
        }
    return out


def summary_text(s: dict, agents) -> str:
    lines = []
    for a in agents:
        x = s[a]
        lines.append(
            f"{a:<5}: solved {x['solved']}/{x['tasks']}, fix rounds {x['fix_rounds']}, "
            f"wall {x['wall_s']:.0f} s, model {x['model_s']:.0f} s, tokens {x['tokens']} "
            f"(metered {x['metered_tokens']}), tests {x['steps_s']:.0f} s, "
            f"overhead {x['overhead_s']:.1f} s = {100 * x['overhead_share']:.1f}% of wall")
    r = s.get("ratios")
    if r:
        def fmt(v):
            return "n/a" if v is None else f"{v:.2f}"

        lines.append(
            f"kiln vs aider: solved {r['solved_kiln_minus_aider']:+d}, wall "
            f"{fmt(r['wall_kiln_over_aider'])}x, tokens {fmt(r['tokens_kiln_over_aider'])}x "
            f"(metered {fmt(r['metered_tokens_kiln_over_aider'])}x), model time "
            f"{fmt(r['model_time_kiln_over_aider'])}x")
    return "\n".join(lines)


def record_json(o) -> dict:
    d = dataclasses.asdict(o)
    d["model_s"] = model_s(o)
    d["tokens"] = tokens(o)
    d["overhead_s"] = overhead_s(o)
    return d
