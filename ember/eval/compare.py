"""Side-by-side comparison: position-swapped judging, win rates, Bradley–Terry and Elo with bootstrap CIs.

- `judge_pair` asks a judge twice, once with each output first; verdicts that disagree
  once swapped back (position bias) become a tie.
- `win_rate`: (wins + ½ ties) / battles, with its binomial standard error.
- `length_controlled_win_rate`: AlpacaEval 2's idea without its per-instruction term. A
  logistic model of the preference, logit p = θ + φ·tanh(Δlen / sd(Δlen)), Δlen = model
  length − baseline length, fitted by Newton's method (soft labels allowed, a little L2 on
  φ); the length-controlled win rate is sigmoid(θ): the predicted preference when the two
  outputs have the same length.
- `bradley_terry`: strengths p_i with P(i beats j) = p_i / (p_i + p_j), fitted by Hunter's
  MM iteration with ties as half a win each; reported on the Elo scale
  (400·log10 p_i, centred at 1000). `elo`: the online K-factor update in battle order.
  Percentile bootstrap intervals resample battles with replacement.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ember.errors import EmberError
from ember.eval.lm import open_lm
from ember.eval.tasks import encode_pair
from ember.files import read_jsonl

Battle = tuple[str, str, str]  # (model_a, model_b, winner in {"a", "b", "tie"})


# --- judging ---------------------------------------------------------------------------------
def judge_pair(judge: Callable[[str, str, str], str], instruction: str, out_a: str, out_b: str) -> str:
    """'a', 'b' or 'tie'. `judge(instruction, first, second)` returns '1', '2' or 'tie'."""
    first = judge(instruction, out_a, out_b)
    swapped = judge(instruction, out_b, out_a)
    v1 = {"1": "a", "2": "b"}.get(str(first).strip(), "tie")
    v2 = {"1": "b", "2": "a"}.get(str(swapped).strip(), "tie")
    return v1 if v1 == v2 else "tie"


# --- win rates -------------------------------------------------------------------------------
def win_rate(scores: Sequence[float]) -> dict[str, float]:
    """`scores`: 1 = win, 0 = loss, 0.5 = tie (or any soft preference in [0, 1])."""
    s = np.asarray(scores, dtype=np.float64)
    return {"win_rate": float(s.mean()), "stderr": float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0,
            "n": int(len(s))}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def length_controlled_win_rate(prefs: Sequence[float], len_model: Sequence[int], len_base: Sequence[int],
                               l2: float = 1e-4, iters: int = 50) -> dict[str, float]:
    """Fit logit p = θ + φ·tanh(Δlen/sd); return sigmoid(θ) (preference at equal length), θ, φ."""
    y = np.asarray(prefs, dtype=np.float64)
    d = np.asarray(len_model, dtype=np.float64) - np.asarray(len_base, dtype=np.float64)
    sd = d.std() or 1.0
    X = np.stack([np.ones_like(d), np.tanh(d / sd)], axis=1)
    w = np.zeros(2)
    reg = np.array([0.0, l2 * len(y)])  # no penalty on the intercept
    for _ in range(iters):  # Newton on the (soft-label) log-likelihood
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p) - reg * w
        hess = -(X.T * (p * (1 - p))) @ X - np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return {"lc_win_rate": float(_sigmoid(w[0])), "theta": float(w[0]), "phi": float(w[1]),
            "raw_win_rate": float(y.mean())}


# --- Bradley–Terry and Elo -------------------------------------------------------------------
def _index(battles: Sequence[Battle]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    names = sorted({m for a, b, _ in battles for m in (a, b)})
    idx = {n: i for i, n in enumerate(names)}
    ia = np.array([idx[a] for a, _, _ in battles])
    ib = np.array([idx[b] for _, b, _ in battles])
    wa = np.array([{"a": 1.0, "b": 0.0, "tie": 0.5}[w] for _, _, w in battles])
    return names, ia, ib, wa


def _bt_fit(n: int, ia: np.ndarray, ib: np.ndarray, wa: np.ndarray, counts: np.ndarray | None = None,
            iters: int = 2000, tol: float = 1e-8, prior: float = 0.01) -> np.ndarray:
    """Log-strengths (mean 0) by MM, for R weightings of the battles at once.

    `counts` [R, N] says how often each battle is counted (bootstrap resamples); `prior`
    adds that many virtual ties with every other system so a system that never lost still
    has a finite strength. Returns [R, n] (or [n] without `counts`).
    """
    single = counts is None
    c = np.ones((1, len(wa))) if single else np.asarray(counts, dtype=np.float64)
    A, B = np.eye(n)[ia], np.eye(n)[ib]  # one-hot [N, n]
    wins = c @ (A * wa[:, None] + B * (1 - wa)[:, None]) + prior * (n - 1) / 2
    games = np.einsum("rk,ki,kj->rij", c, A, B)
    games = games + games.transpose(0, 2, 1) + prior * (1 - np.eye(n))
    p = np.ones_like(wins)
    for _ in range(iters):
        new = wins / (games / (p[:, :, None] + p[:, None, :])).sum(axis=2)
        new /= np.exp(np.log(new).mean(axis=1, keepdims=True))
        done = np.abs(np.log(new) - np.log(p)).max() < tol
        p = new
        if done:
            break
    return np.log(p[0]) if single else np.log(p)


def _elo_online(n: int, ia: np.ndarray, ib: np.ndarray, wa: np.ndarray, k: float = 4.0) -> np.ndarray:
    """Sequential Elo over the battles in order; ia/ib/wa may be [R, N] (R replicates at once)."""
    ia, ib, wa = np.atleast_2d(ia), np.atleast_2d(ib), np.atleast_2d(wa)
    r = np.full((ia.shape[0], n), 1000.0)
    rows = np.arange(ia.shape[0])
    for t in range(ia.shape[1]):
        a, b, w = ia[:, t], ib[:, t], wa[:, t]
        delta = k * (w - 1.0 / (1.0 + 10 ** ((r[rows, b] - r[rows, a]) / 400)))
        r[rows, a] += delta
        r[rows, b] -= delta
    return r[0] if r.shape[0] == 1 else r


def _to_elo(log_p: np.ndarray) -> np.ndarray:
    return 1000.0 + 400.0 * log_p / math.log(10)


def rate(battles: Sequence[Battle], bootstrap: int = 200, seed: int = 0, elo_k: float = 4.0,
         alpha: float = 0.05) -> dict[str, Any]:
    """Bradley–Terry (Elo scale) and online Elo ratings of every system, with bootstrap intervals."""
    if not battles:
        raise EmberError("No battles to rate.")
    names, ia, ib, wa = _index(battles)
    n, N = len(names), len(wa)
    bt = _to_elo(_bt_fit(n, ia, ib, wa))
    elo = _elo_online(n, ia, ib, wa, elo_k)
    bt_ci, elo_ci = np.stack([bt, bt]), np.stack([elo, elo])
    if bootstrap:
        rng = np.random.default_rng(seed)
        sample = rng.integers(0, N, (bootstrap, N))  # resampled battles, in resampled order for Elo
        counts = np.zeros((bootstrap, N))
        np.add.at(counts, (np.arange(bootstrap)[:, None], sample), 1.0)
        q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
        bt_ci = np.percentile(_to_elo(_bt_fit(n, ia, ib, wa, counts)), q, axis=0)
        elo_ci = np.percentile(_elo_online(n, ia[sample], ib[sample], wa[sample], elo_k).reshape(bootstrap, n),
                               q, axis=0)
    wins: dict[str, list[float]] = {m: [] for m in names}
    for a, b, w in zip(ia, ib, wa):
        wins[names[a]].append(w)
        wins[names[b]].append(1 - w)
    return {"systems": {m: {"bt": float(bt[i]), "bt_ci": [float(bt_ci[0, i]), float(bt_ci[1, i])],
                            "elo": float(elo[i]), "elo_ci": [float(elo_ci[0, i]), float(elo_ci[1, i])],
                            "win_rate": float(np.mean(wins[m])), "battles": len(wins[m])}
                        for i, m in enumerate(names)},
            "win_matrix": _win_matrix(names, ia, ib, wa), "battles": N, "bootstrap": bootstrap}


def _win_matrix(names: list[str], ia: np.ndarray, ib: np.ndarray, wa: np.ndarray) -> dict[str, dict[str, float]]:
    n = len(names)
    w, g = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(w, (ia, ib), wa)
    np.add.at(w, (ib, ia), 1 - wa)
    np.add.at(g, (ia, ib), 1)
    np.add.at(g, (ib, ia), 1)
    return {names[i]: {names[j]: float(w[i, j] / g[i, j]) for j in range(n) if g[i, j]} for i in range(n)}


# --- files -----------------------------------------------------------------------------------
def lm_judge(lm: Any, margin: float = 0.0) -> Callable[[str, str, str], str]:
    """A pairwise judge from any evaluator LM: compares log p(" 1") with log p(" 2") after the question."""
    def judge(instruction: str, first: str, second: str) -> str:
        prompt = (f"Which response answers the instruction better?\n\nInstruction: {instruction}\n\n"
                  f"Response 1: {first}\n\nResponse 2: {second}\n\nThe better response is Response")
        one, two = (r.logprob for r in lm.loglikelihood([encode_pair(lm, prompt, " 1"), encode_pair(lm, prompt, " 2")]))
        return "tie" if abs(one - two) <= margin else ("1" if one > two else "2")

    return judge


def judge_outputs(outputs: dict[str, list[dict[str, Any]]], judge: Callable[[str, str, str], str]) -> list[Battle]:
    """Every pair of systems on every instruction they share, position-swapped."""
    names = sorted(outputs)
    by_sys = {n: {str(r["instruction"]): str(r["output"]) for r in rows} for n, rows in outputs.items()}
    battles: list[Battle] = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for ins in sorted(set(by_sys[a]) & set(by_sys[b])):
                battles.append((a, b, judge_pair(judge, ins, by_sys[a][ins], by_sys[b][ins])))
    return battles


def compare_files(files: Sequence[str], judge: str | None = None, bootstrap: int = 200,
                  seed: int = 0) -> dict[str, Any]:
    """Battles files ({model_a, model_b, winner}) are rated directly; outputs files
    ({instruction, output}, one file per system) are judged pairwise by `judge` (a model dir or URL)."""
    per_file = {Path(f).stem: [row for _, row in read_jsonl(f)] for f in files}
    rows = [r for rs in per_file.values() for r in rs]
    if rows and all({"model_a", "model_b", "winner"} <= set(r) for r in rows):
        battles = [(str(r["model_a"]), str(r["model_b"]), _winner(r["winner"])) for r in rows]
        return rate(battles, bootstrap, seed)
    if not all({"instruction", "output"} <= set(r) for r in rows):
        raise EmberError("Each line needs {model_a, model_b, winner} (battles) or {instruction, output} (outputs).")
    if judge is None:
        raise EmberError("These files hold outputs, not battles; pass --judge MODEL_DIR|URL to judge them pairwise.")
    if len(per_file) < 2:
        raise EmberError("Judging needs the outputs of at least two systems (one file each).")
    lm = open_lm(endpoint=judge) if judge.startswith(("http://", "https://")) else open_lm(model=judge)
    return rate(judge_outputs(per_file, lm_judge(lm)), bootstrap, seed)


def _winner(w: Any) -> str:
    w = str(w).lower()
    if w in ("a", "model_a", "1"):
        return "a"
    if w in ("b", "model_b", "2"):
        return "b"
    if w in ("tie", "draw", "tie (bothbad)", "0.5", "1.5"):
        return "tie"
    raise EmberError(f"Unknown winner '{w}'; use a, b or tie.")


def alpaca_eval_win_rate(annotations: str | Path) -> dict[str, Any]:
    """Recompute a model's AlpacaEval win rate vs the baseline from stored annotations.

    `preference` is 1 (baseline `output_1` preferred), 2 (the model's `output_2`), 1.5 a
    draw, or a soft value in [1, 2]; the model's score is preference − 1. Lengths are in
    characters, as AlpacaEval counts them.
    """
    try:
        rows = json.loads(Path(annotations).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmberError(f"Cannot read AlpacaEval annotations {annotations}: {e}.") from None
    rows = [r for r in rows if r.get("preference") not in (None, "")]
    prefs = [float(r["preference"]) - 1.0 for r in rows]
    out = win_rate(prefs)
    out.update(length_controlled_win_rate(prefs, [len(r["output_2"]) for r in rows],
                                          [len(r["output_1"]) for r in rows]))
    out["model"] = rows[0].get("generator_2") if rows else None
    out["baseline"] = rows[0].get("generator_1") if rows else None
    out["n_wins"] = sum(p == 1.0 for p in prefs)
    out["n_wins_base"] = sum(p == 0.0 for p in prefs)
    out["n_draws"] = len(prefs) - out["n_wins"] - out["n_wins_base"]
    return out
