"""Did my change help? Two `ember eval run --out` directories compared item by item.

Both runs scored the same documents of a task, so the comparison is paired: for each metric,
the difference of the means (B − A) over the items both runs carry, a paired bootstrap 95%
confidence interval (the same resampled items in both runs), and, for metrics that are 0 or
1 per item (accuracy, exact match), McNemar's exact test on the items where the runs
disagree. Pairing is what makes a small difference detectable: the items' own difficulty
cancels, and only the items whose score changed carry information.

Items are matched by `doc_id` (their position in the task's test split); when both runs
recorded an item's prompt and the prompts differ (another few-shot count or template), the
item is still paired and the report says how many prompts differed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ember.errors import EmberError

SAMPLES_SUFFIX = ".samples.jsonl"


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided p-value of McNemar's exact test.

    Under the null hypothesis that both systems are equally good, each discordant item (right
    in exactly one run) is equally likely to favour either, so the count favouring B is
    Binomial(a_only + b_only, 1/2); the p-value doubles the smaller tail, capped at 1.
    """
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    # log-space terms: comb(n, i) / 2^n underflows a float for n in the thousands
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2.0 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int = 10000, seed: int = 1234,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(b − a), resampling items with replacement (pairs kept together)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if len(d) == 0:
        raise EmberError("No shared items to compare.")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(iters, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _read_samples(path: Path) -> dict[int, dict[str, Any]]:
    items = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items[int(row["doc_id"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise EmberError(f"{path}, line {line_no}: not a sample row with a 'doc_id' ({e}).") from None
            if not isinstance(row.get("metrics"), dict):
                raise EmberError(f"{path}, line {line_no}: the row has no 'metrics' object.")
    return items


def _tasks(run: Path) -> dict[str, Path]:
    if not run.is_dir():
        raise EmberError(f"{run} is not a directory; pass two directories written by `ember eval run --out`.")
    found = {p.name[: -len(SAMPLES_SUFFIX)]: p for p in sorted(run.glob(f"*{SAMPLES_SUFFIX}"))}
    if not found:
        raise EmberError(f"{run} holds no *{SAMPLES_SUFFIX} files; write them with `ember eval run --out {run}`.")
    return found


def _is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def diff_task(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], iters: int = 10000,
              seed: int = 1234) -> dict[str, Any]:
    """Per-metric paired comparison of two runs' samples of one task."""
    shared = sorted(set(a) & set(b))
    prompts_differ = sum(1 for i in shared if "context" in a[i] and "context" in b[i]
                         and a[i]["context"] != b[i]["context"])
    metrics: dict[str, Any] = {}
    names = sorted({m for i in shared for m in a[i]["metrics"] if not m.startswith("_")}
                   & {m for i in shared for m in b[i]["metrics"] if not m.startswith("_")})
    for name in names:
        ids = [i for i in shared if name in a[i]["metrics"] and name in b[i]["metrics"]]
        xa = [float(a[i]["metrics"][name]) for i in ids]
        xb = [float(b[i]["metrics"][name]) for i in ids]
        low, high = paired_bootstrap(xa, xb, iters, seed)
        row: dict[str, Any] = {"n": len(ids), "a": float(np.mean(xa)), "b": float(np.mean(xb)),
                               "diff": float(np.mean(xb) - np.mean(xa)), "ci_low": low, "ci_high": high}
        if _is_binary(xa) and _is_binary(xb):
            a_only = sum(1 for u, v in zip(xa, xb) if u == 1.0 and v == 0.0)
            b_only = sum(1 for u, v in zip(xa, xb) if u == 0.0 and v == 1.0)
            row.update(a_only=a_only, b_only=b_only, mcnemar_p=mcnemar_exact(a_only, b_only))
        metrics[name] = row
    return {"shared_items": len(shared), "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a)),
            "prompts_differ": prompts_differ, "metrics": metrics}


def diff_runs(run_a: str | Path, run_b: str | Path, iters: int = 10000, seed: int = 1234) -> dict[str, Any]:
    """{tasks: {task: diff_task(...)}, only_in_a: [...], only_in_b: [...]} for two run directories."""
    ta, tb = _tasks(Path(run_a)), _tasks(Path(run_b))
    shared = sorted(set(ta) & set(tb))
    if not shared:
        raise EmberError(f"{run_a} and {run_b} share no task (A has {sorted(ta)}, B has {sorted(tb)}).")
    tasks = {t: diff_task(_read_samples(ta[t]), _read_samples(tb[t]), iters, seed) for t in shared}
    return {"run_a": str(run_a), "run_b": str(run_b), "bootstrap_iters": iters, "tasks": tasks,
            "only_in_a": sorted(set(ta) - set(tb)), "only_in_b": sorted(set(tb) - set(ta))}


def format_diff(res: dict[str, Any]) -> str:
    """A table for the terminal: one row per task and metric."""
    lines = [f"A = {res['run_a']}", f"B = {res['run_b']}", "",
             (f"{'task':<20} {'metric':<12} {'n':>6} {'A':>8} {'B':>8} {'B - A':>8} {'95% CI':>20} "
              f"{'A only':>6} {'B only':>6} {'McNemar p':>10}")]
    for task, t in res["tasks"].items():
        for name, m in t["metrics"].items():
            ci = f"[{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"
            tail = (f"{m['a_only']:>6} {m['b_only']:>6} {m['mcnemar_p']:>10.4f}" if "mcnemar_p" in m
                    else f"{'':>6} {'':>6} {'':>10}")
            lines.append(f"{task:<20} {name:<12} {m['n']:>6} {m['a']:>8.4f} {m['b']:>8.4f} {m['diff']:>+8.4f} "
                         f"{ci:>20} {tail}")
        notes = []
        if t["only_a"] or t["only_b"]:
            notes.append(f"{t['only_a']} items only in A, {t['only_b']} only in B (left out)")
        if t["prompts_differ"]:
            notes.append(f"{t['prompts_differ']} of {t['shared_items']} items were asked with different prompts")
        lines += [f"{'':<20} note: {n}" for n in notes]
    for side in ("a", "b"):
        if res[f"only_in_{side}"]:
            lines.append(f"tasks only in {side.upper()}: {', '.join(res[f'only_in_{side}'])}")
    lines.append("")
    lines.append("An interval that excludes 0 (or McNemar p < 0.05) says the difference is unlikely to be chance.")
    return "\n".join(lines)
