"""Reports and resumable runs: a SQLite response cache, and Markdown + HTML summaries of run directories.

`CachedLM` wraps any evaluator LM: every log-likelihood and generation is stored under a
hash of the model identity and the request, committed batch by batch, so a run that is
interrupted and started again repeats no call it already made. `write_report` reads the
`<task>.json` files `ember eval run --out DIR` writes (and `compare` results with
ratings) and renders tables plus inline-SVG bar charts with error bars; for multiple-choice
runs it reads `<task>.samples.jsonl` too and adds calibration (reliability diagram, ECE, Brier).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import sqlite3
from pathlib import Path
from typing import Any, Sequence

from ember.errors import EmberError
from ember.eval.lm import LLResult
from ember.eval.metrics import calibration, choice_confidence


class CachedLM:
    def __init__(self, lm: Any, path: str | Path, model_id: str, batch_size: int = 256) -> None:
        self.lm, self.model_id, self.batch_size = lm, model_id, batch_size
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.commit()
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:  # encode, decode, prefix_token, max_length ...
        return getattr(self.lm, name)

    def _key(self, *parts: Any) -> str:
        return hashlib.sha256(json.dumps([self.model_id, *parts]).encode()).hexdigest()

    def _get(self, keys: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self.db.execute(f"SELECT key, value FROM cache WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            found.update({k: json.loads(v) for k, v in rows})
        return found

    def _put(self, items: dict[str, Any]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO cache VALUES (?, ?)", [(k, json.dumps(v)) for k, v in items.items()])
        self.db.commit()

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list:
        keys = [self._key("ll", list(c), list(t)) for c, t in requests]
        found = self._get(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        step = self.batch_size
        for s in range(0, len(missing), step):  # commit as we go: an interruption loses one batch at most
            idx = missing[s:s + step]
            res = self.lm.loglikelihood([requests[i] for i in idx])
            new = {keys[i]: [r.logprob, r.is_greedy, r.num_tokens] for i, r in zip(idx, res)}
            self._put(new)
            found.update(new)
        return [LLResult(*found[k]) for k in keys]

    def generate(self, prompts: list[str], until: list[str], max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        keys = [self._key("gen", p, until, max_tokens, temperature, seed) for p in prompts]
        found = self._get(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for s in range(0, len(missing), 16):
            idx = missing[s:s + 16]
            outs = self.lm.generate([prompts[i] for i in idx], until, max_tokens, temperature, seed)
            new = {keys[i]: o for i, o in zip(idx, outs)}
            self._put(new)
            found.update(new)
        return [found[k] for k in keys]


# --- reports ---------------------------------------------------------------------------------
def _collect(run_dirs: Sequence[str | Path]) -> tuple[list[dict], list[dict]]:
    tasks, ratings = [], []
    for d in run_dirs:
        d = Path(d)
        files = sorted(d.glob("*.json")) if d.is_dir() else [d]
        if not files:
            raise EmberError(f"No results JSON in {d}.")
        for f in files:
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise EmberError(f"Cannot read {f}: {e}.") from None
            if "results" in obj and "task" in obj:
                tasks.append(obj | {"run": d.name, "_samples": f.with_name(f"{obj['task']}.samples.jsonl")})
            elif "systems" in obj:
                ratings.append(obj | {"run": d.name})
    return tasks, ratings


def _svg_bars(rows: list[tuple[str, float, float]], width: int = 520) -> str:
    """Horizontal bars with ±1.96·SE whiskers; values in [0, 1] or scaled to the largest."""
    if not rows:
        return ""
    top = max(max(v + 1.96 * (e or 0) for _, v, e in rows), 1e-9)
    scale = (width - 200) / top
    h = 22 * len(rows) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-size="12">']
    for i, (label, v, e) in enumerate(rows):
        y = 5 + 22 * i
        parts.append(f'<text x="0" y="{y + 14}">{html.escape(label[:28])}</text>'
                     f'<rect x="190" y="{y + 3}" width="{max(v, 0) * scale:.1f}" height="14" fill="#4a7bd0"/>')
        if e and e == e:  # not NaN
            lo, hi = 190 + max(v - 1.96 * e, 0) * scale, 190 + (v + 1.96 * e) * scale
            parts.append(f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + 10}" y2="{y + 10}" stroke="black"/>')
    return "".join(parts) + "</svg>"


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """report.md and report.html under `out`; returns their paths."""
    tasks, ratings = _collect(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Evaluation report", ""]
    body = ["<h1>Evaluation report</h1>"]
    if tasks:
        md += ["## Tasks", "", "| run | task | metric | value | ± SE | n |", "|---|---|---|---|---|---|"]
        rows = []
        for t in tasks:
            for m, v in t["results"].items():
                md.append(f"| {t['run']} | {t['task']} | {m} | {v['value']:.4f} | {v['stderr']:.4f} | {v['n']} |")
                rows.append((f"{t['run']}/{t['task']}/{m}", v["value"], v["stderr"]))
        body += ["<h2>Tasks</h2>", _html_table(["run", "task", "metric", "value", "± SE", "n"],
                                               [[t["run"], t["task"], m, f"{v['value']:.4f}", f"{v['stderr']:.4f}",
                                                 v["n"]] for t in tasks for m, v in t["results"].items()]),
                 _svg_bars([r for r in rows if 0 <= r[1] <= 1])]
    for r in ratings:
        systems = sorted(r["systems"].items(), key=lambda kv: -kv[1]["bt"])
        md += ["", f"## Ratings ({r['run']})", "", "| system | Bradley–Terry | 95% CI | Elo | win rate |",
               "|---|---|---|---|---|"]
        md += [f"| {n} | {s['bt']:.1f} | [{s['bt_ci'][0]:.1f}, {s['bt_ci'][1]:.1f}] | {s['elo']:.1f} | "
               f"{s['win_rate']:.3f} |" for n, s in systems]
        names = [n for n, _ in systems]
        wm = r.get("win_matrix", {})
        body += [f"<h2>Ratings ({html.escape(r['run'])})</h2>",
                 _html_table(["system", "BT", "95% CI", "Elo", "win rate"],
                             [[n, f"{s['bt']:.1f}", f"[{s['bt_ci'][0]:.1f}, {s['bt_ci'][1]:.1f}]", f"{s['elo']:.1f}",
                               f"{s['win_rate']:.3f}"] for n, s in systems]),
                 "<h3>Win-rate matrix (row beats column)</h3>",
                 _html_table([""] + names, [[a] + [_cell(wm.get(a, {}).get(b)) for b in names] for a in names])]
    for t in tasks:  # multiple-choice runs: is the model's confidence in its answer its accuracy?
        cal = task_calibration(t["_samples"])
        if cal is None:
            continue
        md += ["", f"## Calibration ({t['run']}/{t['task']})", "",
               f"ECE {cal['ece']:.4f} · MCE {cal['mce']:.4f} · Brier (top label) {cal['brier']:.4f} · "
               f"Brier (all choices) {cal['brier_multiclass']:.4f} · accuracy {cal['accuracy']:.4f} · "
               f"mean confidence {cal['confidence']:.4f} · n {cal['n']}", "",
               "| bin | count | mean confidence | accuracy | gap |", "|---|---|---|---|---|"]
        md += [f"| ({b['lo']:.1f}, {b['hi']:.1f}] | {b['count']} | {_f(b['confidence'])} | {_f(b['accuracy'])} | "
               f"{_f(None if b['count'] == 0 else abs(b['accuracy'] - b['confidence']))} |" for b in cal["bins"]]
        body += [f"<h2>Calibration ({html.escape(t['run'])}/{html.escape(t['task'])})</h2>",
                 f"<p>ECE {cal['ece']:.4f}, MCE {cal['mce']:.4f}, Brier (top label) {cal['brier']:.4f}, "
                 f"Brier (all choices) {cal['brier_multiclass']:.4f}, n {cal['n']}</p>",
                 _reliability_png(cal, f"{t['run']}/{t['task']}"),
                 _html_table(["bin", "count", "mean confidence", "accuracy"],
                             [[f"({b['lo']:.1f}, {b['hi']:.1f}]", b["count"], _f(b["confidence"]), _f(b["accuracy"])]
                              for b in cal["bins"]])]
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    paths["markdown"].write_text("\n".join(md) + "\n", encoding="utf-8")
    paths["html"].write_text("<!doctype html><meta charset='utf-8'><title>Evaluation report</title>"
                             "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border:1px solid #ccc}"
                             "table{border-collapse:collapse}</style>" + "\n".join(body), encoding="utf-8")
    return paths


def task_calibration(samples_path: Path, bins: int = 10) -> dict[str, Any] | None:
    """Calibration of a multiple-choice run from its per-sample log: None when it is not one."""
    if not Path(samples_path).is_file():
        return None
    conf, hit, brier = [], [], []
    with open(samples_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            s = json.loads(line)
            if "loglikelihoods" not in s or "gold" not in s:
                return None
            c, h, b = choice_confidence(s["loglikelihoods"], s["gold"])
            conf.append(c), hit.append(h), brier.append(b)
    if not conf:
        return None
    return calibration(conf, hit, bins) | {"brier_multiclass": sum(brier) / len(brier)}


def _reliability_png(cal: dict[str, Any], title: str) -> str:
    """The reliability diagram as an embedded PNG (matplotlib, headless); empty when matplotlib is missing."""
    try:  # matplotlib is slow to import and only this figure needs it; the report is whole without it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "<p>(install matplotlib for the reliability diagram)</p>"

    full = [b for b in cal["bins"] if b["count"]]
    width = 1.0 / len(cal["bins"])
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=100)
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           color="#4a7bd0", edgecolor="black", label="accuracy")
    ax.bar([b["lo"] for b in full], [b["confidence"] - b["accuracy"] for b in full], width=width, align="edge",
           bottom=[b["accuracy"] for b in full], color="#e06666", alpha=0.4, edgecolor="#e06666", label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title}\nECE {cal['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="reliability diagram {html.escape(title)}" src="data:image/png;base64,{data}"/>'


def _f(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _cell(v: float | None) -> str:
    if v is None:
        return ""
    shade = int(255 - 120 * abs(v - 0.5) * 2)
    color = f"rgb({shade},{255},{shade})" if v >= 0.5 else f"rgb(255,{shade},{shade})"
    return f'<span style="background:{color}">{v:.2f}</span>'


def _html_table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        s = str(x)
        return s if s.startswith("<span") else html.escape(s)

    return ("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
