"""Rubric judging: a judge model scores answers on named criteria; a score is never NaN.

A rubric (YAML) names criteria, each with a description, an integer scale and a weight.
Constrained output: with a judge that exposes log-likelihoods (`LocalLM`, or an endpoint
honouring `echo`), each criterion's score is read off the judge's distribution over the
scale's values after "<criterion>: " — the expected value, so it is always a number in
range. With free text (`mode="generate"`), the judge is asked for JSON; if that does not
parse, "criterion: 4"-style lines are read; if a criterion is still missing it falls back
to the log-likelihood reading, and failing that to the scale's midpoint, flagged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from ember.errors import EmberError
from ember.eval.tasks import encode_pair


@dataclass
class Criterion:
    name: str
    description: str
    low: int = 1
    high: int = 5
    weight: float = 1.0

    @property
    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1))


@dataclass
class Rubric:
    name: str
    criteria: list[Criterion]
    instructions: str = ("You are a strict, fair grader. Score the answer on each criterion using only the "
                         "given scale.")

    @classmethod
    def load(cls, path: str | Path) -> Rubric:
        p = Path(path)
        if not p.is_file():
            raise EmberError(f"No rubric file at {p}.")
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        return cls.from_dict(raw, str(p))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "rubric") -> Rubric:
        if not isinstance(raw, dict) or not isinstance(raw.get("criteria"), list) or not raw["criteria"]:
            raise EmberError(f"{where} must be a mapping with a non-empty 'criteria' list.")
        crits = []
        for c in raw["criteria"]:
            if not isinstance(c, dict) or "name" not in c:
                raise EmberError(f"{where}: every criterion needs a 'name'.")
            low, high = c.get("scale", [1, 5])
            if not (isinstance(low, int) and isinstance(high, int) and low < high):
                raise EmberError(f"{where}: criterion '{c['name']}' needs an integer scale [low, high], low < high.")
            crits.append(Criterion(str(c["name"]), str(c.get("description", "")), low, high,
                                   float(c.get("weight", 1.0))))
        return cls(str(raw.get("name", "rubric")), crits, str(raw.get("instructions", cls.instructions)))


def judge_prompt(rubric: Rubric, item: dict[str, Any]) -> str:
    lines = [rubric.instructions, "", "Criteria:"]
    for c in rubric.criteria:
        lines.append(f"- {c.name} ({c.low} to {c.high}): {c.description}")
    lines += ["", f"Question: {item.get('question') or item.get('instruction') or item.get('prompt', '')}"]
    if item.get("context"):
        lines.append(f"Context: {item['context']}")
    if item.get("reference"):
        lines.append(f"Reference answer: {item['reference']}")
    lines += [f"Answer: {item.get('answer') or item.get('output', '')}", "", "Scores:"]
    return "\n".join(lines)


def parse_scores(text: str, rubric: Rubric) -> dict[str, float]:
    """Scores found in `text`: a JSON object first, then 'name: 4' lines; only in-range numbers."""
    found: dict[str, float] = {}
    by_lower = {c.name.lower(): c for c in rubric.criteria}
    m = re.search(r"\{.*?\}", text, re.S)
    if m:
        try:
            obj = json.loads(m.group(0))
            for k, v in obj.items() if isinstance(obj, dict) else []:
                c = by_lower.get(str(k).lower())
                if c is not None and isinstance(v, (int, float)) and c.low <= v <= c.high:
                    found[c.name] = float(v)
        except json.JSONDecodeError:
            pass
    for c in rubric.criteria:
        if c.name in found:
            continue
        hit = re.search(rf"{re.escape(c.name)}\W{{0,4}}(\d+(?:\.\d+)?)", text, re.I)
        if hit and c.low <= float(hit.group(1)) <= c.high:
            found[c.name] = float(hit.group(1))
    return found


class Judge:
    def __init__(self, lm: Any, rubric: Rubric, mode: str = "loglikelihood", max_tokens: int = 128) -> None:
        if mode not in ("loglikelihood", "generate"):
            raise EmberError("Judge mode must be 'loglikelihood' or 'generate'.")
        self.lm, self.rubric, self.mode, self.max_tokens = lm, rubric, mode, max_tokens

    def _constrained(self, prompt: str, c: Criterion) -> float | None:
        try:
            reqs = [encode_pair(self.lm, f"{prompt}\n{c.name}:", f" {v}") for v in c.values]
            lls = [r.logprob for r in self.lm.loglikelihood(reqs)]
        except Exception:  # an endpoint without echo, a prompt too long: let the caller fall back
            return None
        top = max(lls)
        w = [math.exp(x - top) for x in lls]
        return sum(v * wi for v, wi in zip(c.values, w)) / sum(w)

    def score(self, item: dict[str, Any]) -> dict[str, Any]:
        prompt = judge_prompt(self.rubric, item)
        scores: dict[str, float] = {}
        method: dict[str, str] = {}
        raw = None
        if self.mode == "generate":
            keys = ", ".join(f'"{c.name}": <{c.low}-{c.high}>' for c in self.rubric.criteria)
            raw = self.lm.generate([prompt + f" Reply with JSON only: {{{keys}}}\n"], until=["\n\n"],
                                   max_tokens=self.max_tokens)[0]
            for k, v in parse_scores(raw, self.rubric).items():
                scores[k], method[k] = v, "parsed"
        for c in self.rubric.criteria:
            if c.name not in scores:
                v = self._constrained(prompt, c)
                scores[c.name], method[c.name] = ((v, "loglikelihood") if v is not None and math.isfinite(v)
                                                  else ((c.low + c.high) / 2, "default"))
        total_w = sum(c.weight for c in self.rubric.criteria)
        overall = sum(scores[c.name] * c.weight for c in self.rubric.criteria) / total_w
        return {"scores": scores, "overall": overall, "method": method, "raw": raw}


def agreement(pred: Sequence[float], human: Sequence[float], low: int = 1, high: int = 5) -> dict[str, float]:
    """Judge vs human labels: Spearman, Pearson, exact and within-one agreement (rounded), quadratic kappa."""
    p, h = np.asarray(pred, dtype=float), np.asarray(human, dtype=float)
    if len(p) != len(h) or len(p) < 2:
        raise EmberError("Agreement needs two or more items with both a judge score and a human label.")

    def ranks(x: np.ndarray) -> np.ndarray:
        order = x.argsort(kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ranks for ties
            r[x == v] = r[x == v].mean()
        return r

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0

    pr, hr = np.clip(np.rint(p), low, high).astype(int), np.clip(np.rint(h), low, high).astype(int)
    k = high - low + 1
    obs = np.zeros((k, k))
    np.add.at(obs, (pr - low, hr - low), 1)
    exp = np.outer(obs.sum(1), obs.sum(0)) / obs.sum()
    wts = (np.subtract.outer(np.arange(k), np.arange(k)) ** 2) / (k - 1) ** 2
    qwk = 1 - (wts * obs).sum() / (wts * exp).sum() if (wts * exp).sum() > 0 else 0.0
    return {"spearman": corr(ranks(p), ranks(h)), "pearson": corr(p, h), "exact": float((pr == hr).mean()),
            "within_one": float((abs(pr - hr) <= 1).mean()), "quadratic_kappa": float(qwk), "n": int(len(p))}


DEFAULT_RUBRIC = {"name": "helpfulness", "criteria": [
    {"name": "correctness", "description": "facts and reasoning are right", "scale": [1, 5], "weight": 2},
    {"name": "completeness", "description": "answers every part of the question", "scale": [1, 5]},
    {"name": "clarity", "description": "easy to follow, well organised", "scale": [1, 5]},
    {"name": "tone", "description": "polite, appropriate for the user", "scale": [1, 5]}]}
