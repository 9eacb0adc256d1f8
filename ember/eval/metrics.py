"""Per-item metrics for benchmark tasks, and the bootstrap standard error of their mean.

Multiple choice (from the log-likelihood of each choice): `acc` (argmax), `acc_norm`
(argmax of ll / characters of the choice, as lm-eval), `acc_bytes` (ll / UTF-8 bytes),
`mc2` (TruthfulQA: normalised probability mass on the true answers). Generation:
`exact_match` and `f1` with SQuAD normalisation (lower case, no punctuation, no
articles, single spaces), `contains`, `regex`, `json_schema`. Every score is per item, so
the task mean and its bootstrap standard error treat all metrics alike.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from typing import Any, Sequence

import numpy as np

from ember.errors import EmberError


# --- multiple choice -------------------------------------------------------------------------
def _argmax(xs: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(xs, dtype=np.float64)))


def _hit(pred: int, gold: int | Sequence[int]) -> float:
    return float(pred in gold) if isinstance(gold, (list, tuple)) else float(pred == gold)


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]) -> dict[str, float]:
    chars = [max(len(c), 1) for c in choices]
    nbytes = [max(len(c.encode("utf-8")), 1) for c in choices]
    return {"acc": _hit(_argmax(lls), gold),
            "acc_norm": _hit(_argmax([ll / n for ll, n in zip(lls, chars)]), gold),
            "acc_bytes": _hit(_argmax([ll / n for ll, n in zip(lls, nbytes)]), gold)}


def mc2(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: P(true answers) / P(all answers), with probabilities exp(ll)."""
    lls_a = np.asarray(lls, dtype=np.float64)
    lab = np.asarray(labels, dtype=bool)
    if not lab.any() or lab.all():
        raise EmberError("MC2 needs at least one true and one false answer per question.")
    p = np.exp(lls_a - lls_a.max())  # shift: the ratio is unchanged and nothing underflows to 0/0
    return float(p[lab].sum() / p.sum())


# --- generation ------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def squad_normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, refs: Sequence[str], regexes_to_ignore: Sequence[str] = (),
                normalize: bool = True) -> float:
    def clean(s: str) -> str:
        for r in regexes_to_ignore:
            s = re.sub(r, "", s)
        return squad_normalize(s) if normalize else s.strip()

    p = clean(pred)
    return float(any(p == clean(r) for r in refs))


def f1(pred: str, refs: Sequence[str]) -> float:
    """SQuAD token F1, best over the references."""
    def one(ref: str) -> float:
        p, r = squad_normalize(pred).split(), squad_normalize(ref).split()
        if not p or not r:
            return float(p == r)
        common = sum((Counter(p) & Counter(r)).values())
        if common == 0:
            return 0.0
        prec, rec = common / len(p), common / len(r)
        return 2 * prec * rec / (prec + rec)

    return max((one(r) for r in refs), default=0.0)


def contains(pred: str, refs: Sequence[str]) -> float:
    p = squad_normalize(pred)
    return float(any(squad_normalize(r) and squad_normalize(r) in p for r in refs))


def regex_match(pred: str, pattern: str) -> float:
    return float(re.search(pattern, pred) is not None)


def _extract_json(text: str) -> Any:
    """The first JSON value in `text` (models wrap it in prose or code fences)."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text[i:])[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON value found")


def json_schema_valid(pred: str, schema: dict[str, Any]) -> float:
    """1 when the first JSON value in `pred` validates against `schema` (jsonschema's Draft 2020-12)."""
    try:
        value = _extract_json(pred)
    except ValueError:
        return 0.0
    try:  # jsonschema is a test-only peer; without it the built-in subset validator judges
        import jsonschema
    except ImportError:
        return float(_validate(value, schema))
    return float(jsonschema.Draft202012Validator(schema).is_valid(value))


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _validate(v: Any, s: dict[str, Any]) -> bool:
    """A small fallback validator: type, properties, required, items, enum, min/max, lengths."""
    t = s.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        ok = False
        for name in types:
            if name == "integer":
                ok |= isinstance(v, int) and not isinstance(v, bool)
            elif name == "number":
                ok |= isinstance(v, (int, float)) and not isinstance(v, bool)
            else:
                ok |= isinstance(v, _TYPES.get(name, object))
        if not ok:
            return False
    if "enum" in s and v not in s["enum"]:
        return False
    if isinstance(v, dict):
        if any(k not in v for k in s.get("required", [])):
            return False
        props = s.get("properties", {})
        if s.get("additionalProperties") is False and set(v) - set(props):
            return False
        return all(_validate(v[k], sub) for k, sub in props.items() if k in v)
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", math.inf):
            return False
        return all(_validate(x, s["items"]) for x in v) if "items" in s else True
    if isinstance(v, str):
        return s.get("minLength", 0) <= len(v) <= s.get("maxLength", math.inf) and (
            "pattern" not in s or re.search(s["pattern"], v) is not None)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return s.get("minimum", -math.inf) <= v <= s.get("maximum", math.inf)
    return True


# --- aggregation -----------------------------------------------------------------------------
def bootstrap_stderr(values: Sequence[float], iters: int = 1000, seed: int = 1234) -> float:
    """Standard deviation of the mean over `iters` resamples of the items (with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(iters, len(x)))].mean(axis=1)
    return float(means.std(ddof=1))


def bootstrap_stderr_of(stat: Any, columns: Sequence[Sequence[float]], iters: int = 1000, seed: int = 1234) -> float:
    """Bootstrap SE of a corpus statistic `stat(*column_sums)` (e.g. exp(NLL/words)), resampling items."""
    cols = np.asarray(columns, dtype=np.float64)  # [C, N]
    n = cols.shape[1]
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(iters, n))
    sums = cols[:, idx].sum(axis=2)  # [C, iters]
    return float(np.std([stat(*sums[:, i]) for i in range(iters)], ddof=1))


def aggregate(per_item: Sequence[dict[str, float]], iters: int = 1000) -> dict[str, dict[str, float]]:
    """{metric: {value: mean, stderr: bootstrap SE}} over the items that carry the metric."""
    names = sorted({k for item in per_item for k in item})
    out = {}
    for name in names:
        vals = [item[name] for item in per_item if name in item]
        out[name] = {"value": float(np.mean(vals)), "stderr": bootstrap_stderr(vals, iters), "n": len(vals)}
    return out


# --- calibration -----------------------------------------------------------------------------
def choice_confidence(lls: Sequence[float], gold: int | Sequence[int]) -> tuple[float, float, float]:
    """(confidence, correct, multi-class Brier) of one multiple-choice item.

    The choices' log-likelihoods are softmax-normalised over the choices; the model's answer
    is the argmax (as `acc`), its confidence is that answer's normalised probability, and the
    multi-class Brier term is sum_k (p_k - y_k)^2 with y the one-hot gold answer.
    """
    a = np.asarray(lls, dtype=np.float64)
    p = np.exp(a - a.max())
    p /= p.sum()
    pred = int(np.argmax(a))
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    y = np.zeros_like(p)
    y[[g for g in golds if 0 <= g < len(p)]] = 1.0
    return float(p[pred]), _hit(pred, gold), float(((p - y) ** 2).sum())


def calibration(confidences: Sequence[float], correct: Sequence[float], bins: int = 10) -> dict[str, Any]:
    """Reliability diagram bins, Expected Calibration Error and Brier score.

    Equal-width bins over [0, 1]: bin m holds confidences in ((m-1)/M, m/M] (0 goes to the
    first bin), and ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| (Guo et al., 2017). MCE is
    the largest gap over non-empty bins. Brier here is the top-label score mean (conf - correct)^2.
    """
    c = np.asarray(confidences, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1:
        raise EmberError("calibration needs one confidence and one correctness value per item.")
    if bins < 1:
        raise EmberError("calibration needs at least one bin.")
    if c.size and (c.min() < 0 or c.max() > 1):
        raise EmberError("Confidences must lie in [0, 1].")
    n = c.size
    idx = np.clip(np.ceil(c * bins).astype(int) - 1, 0, bins - 1)  # right-closed bins
    table, ece, mce = [], 0.0, 0.0
    for m in range(bins):
        sel = idx == m
        k = int(sel.sum())
        row: dict[str, Any] = {"lo": m / bins, "hi": (m + 1) / bins, "count": k,
                               "confidence": float(c[sel].mean()) if k else None,
                               "accuracy": float(y[sel].mean()) if k else None}
        if k:
            gap = abs(row["accuracy"] - row["confidence"])
            ece += k / n * gap
            mce = max(mce, gap)
        table.append(row)
    return {"ece": float(ece), "mce": float(mce), "brier": float(((c - y) ** 2).mean()) if n else float("nan"),
            "accuracy": float(y.mean()) if n else float("nan"), "confidence": float(c.mean()) if n else float("nan"),
            "n": n, "bins": table}
