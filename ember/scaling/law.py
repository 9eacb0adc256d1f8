"""Scaling laws fitted to your own runs: Chinchilla's L(N, D) = E + A / N^alpha + B / D^beta.

N is the number of parameters, D the number of training tokens, L the final validation loss of
a run whose learning-rate schedule ended at D (Hoffmann et al. 2022, "Training Compute-Optimal
Large Language Models"). Two of the paper's three ways to read runs are here:

Approach 3 (its Appendix D.2): fit the parametric law directly. With a = log A, b = log B,
e = log E the predicted log-loss is LSE(a - alpha log N, b - beta log D, e) (log-sum-exp, the
law itself in log space), and the fit minimises sum_i Huber_delta(predicted_i - log L_i) with
delta = 1e-3, by L-BFGS started from a grid of initialisations (alpha, beta in {0, 0.5, .., 2},
e in {-1, -0.5, .., 1}, a, b in {0, 5, .., 25}), keeping the best. Here the objective is
evaluated on the whole grid at once, and L-BFGS runs (vectorised, all starts together) from the
grid points where it is lowest. Intervals come
from the bootstrap: refit on runs resampled with replacement, take the 2.5th and 97.5th
percentiles (Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", did the same
and found the paper's intervals too narrow).

Compute-optimal split, for a budget of C = 6 N D FLOPs: minimising L(N, C / 6N) over N gives

    N_opt = G (C/6)^(beta / (alpha + beta)),  D_opt = G^-1 (C/6)^(alpha / (alpha + beta)),
    G = (alpha A / (beta B))^(1 / (alpha + beta)),

and tokens per parameter D_opt / N_opt = G^-2 (C/6)^((alpha - beta) / (alpha + beta)).

Approach 1: for each compute budget, the run with the lowest loss. Here that is the lower
envelope of loss against compute (each run that beats every run that used less compute), and
power laws N_opt proportional to C^a and D_opt proportional to C^b fitted to it by least squares in log
space. Approach 3 predicts a = beta / (alpha + beta) and b = alpha / (alpha + beta); where the two
disagree is reported.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ember.errors import EmberError

HUBER_DELTA = 1e-3  # Hoffmann et al., App. D.2
# Chinchilla's initialisation grid (App. D.2), in the order (a, b, e, alpha, beta).
INIT_GRID = {"a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
             "e": [-1.0, -0.5, 0.0, 0.5, 1.0], "alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "beta": [0.0, 0.5, 1.0, 1.5, 2.0]}
# L-BFGS runs from this many of the grid's points, those where the objective starts lowest: on
# synthetic and real sweeps they reach the same optimum as all 4500, in a fraction of the time.
DEFAULT_STARTS = 100
DEGENERATE = ("The fit runs off to an infinite constant: these runs do not pin the law down. Add model sizes "
              "or token counts spanning a wider range.")
MAX_LOG_CONSTANT = 700.0  # exp(700) is near float64's largest value
LAW_FIELDS = ("E", "A", "B", "alpha", "beta")
REQUIRED_FIELDS = ("params", "tokens", "loss")
OPTIONAL_FIELDS = ("non_embedding_params", "flops")


# --- runs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One training run: parameters, training tokens, final validation loss, and its FLOPs."""

    params: float
    tokens: float
    loss: float
    flops: float
    non_embedding_params: float | None = None
    name: str | None = None

    def size(self, use_non_embedding: bool) -> float:
        if use_non_embedding:
            if self.non_embedding_params is None:
                raise EmberError(f"Run {self.name or ''} has no non_embedding_params to fit on.".replace("  ", " "))
            return self.non_embedding_params
        return self.params


def read_runs(path: str | Path) -> list[Run]:
    """Runs from a JSONL file, one object a line: `params`, `tokens`, `loss`, optionally
    `non_embedding_params`, `flops` (default 6 * params * tokens) and `name`."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"No runs file at {path}.")
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EmberError(f"{where} is not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict):
            raise EmberError(f"{where} must be a JSON object with params, tokens and loss.")
        values = {}
        for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            if name not in record or record[name] is None:
                if name in REQUIRED_FIELDS:
                    raise EmberError(f"{where} has no field '{name}'.")
                continue
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise EmberError(f"{where}: field '{name}' must be a positive number, not {value!r}.")
            values[name] = float(value)
        values.setdefault("flops", 6.0 * values["params"] * values["tokens"])
        runs.append(Run(name=str(record["name"]) if "name" in record else None, **values))
    if not runs:
        raise EmberError(f"{path} holds no runs.")
    return runs


# --- the law -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: Any, tokens: Any) -> Any:
        with np.errstate(over="ignore"):  # a loosely pinned fit may overflow far from its runs: inf is the answer
            return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    def compute_optimal(self, flops: Any) -> tuple[Any, Any]:
        """(N_opt, D_opt) minimising the loss at C = 6 N D FLOPs (closed form; see the module doc)."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        c6 = np.asarray(flops, dtype=float) / 6.0
        return g * c6 ** (self.beta / s), c6 ** (self.alpha / s) / g


class Objective:
    """Chinchilla's fit objective and its gradient, for many parameter rows at once.

    Rows theta = (a, b, e, alpha, beta); for run i the predicted log-loss is
    p_i = LSE(a - alpha log N_i, b - beta log D_i, e), and the objective is
    sum_i w_i Huber_delta(p_i - log L_i). With s_k the softmax weights of the three terms and
    h' = clip(p - log L, -delta, delta) the Huber derivative, the gradient is
    d/da = sum w h' s_1, d/dalpha = -sum w h' s_1 log N, d/db = sum w h' s_2,
    d/dbeta = -sum w h' s_2 log D, d/de = sum w h' s_3.
    `weight` is [n] or one row per parameter row ([S, n]: bootstrap multiplicities).
    """

    def __init__(self, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, weight: np.ndarray,
                 delta: float = HUBER_DELTA) -> None:
        self.log_n, self.log_d, self.log_l, self.weight, self.delta = log_n, log_d, log_l, weight, delta

    def terms(self, theta: np.ndarray) -> np.ndarray:
        """[S, n, 3]: a - alpha log N, b - beta log D, e."""
        a, b, e, alpha, beta = (theta[:, k:k + 1] for k in range(5))
        return np.stack([a - alpha * self.log_n, b - beta * self.log_d, np.broadcast_to(e, a.shape[:1] + self.log_n.shape)],
                        axis=-1)

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        t = self.terms(theta)
        top = t.max(axis=-1, keepdims=True)
        return (top[..., 0] + np.log(np.exp(t - top).sum(-1))) - self.log_l

    def huber(self, r: np.ndarray) -> np.ndarray:
        small = np.abs(r) <= self.delta
        return np.where(small, 0.5 * r * r, self.delta * (np.abs(r) - 0.5 * self.delta))

    def value(self, theta: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """The objective of each row of theta; `rows` picks the matching rows of a per-row weight."""
        weight = self.weight if rows is None or self.weight.ndim == 1 else self.weight[rows]
        with np.errstate(over="ignore", invalid="ignore"):
            return (weight * self.huber(self.residuals(theta))).sum(-1)

    def value_and_grad(self, theta: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        weight = self.weight if rows is None or self.weight.ndim == 1 else self.weight[rows]
        with np.errstate(over="ignore", invalid="ignore"):
            t = self.terms(theta)
            top = t.max(axis=-1, keepdims=True)
            ex = np.exp(t - top)
            total = ex.sum(-1)
            r = top[..., 0] + np.log(total) - self.log_l
            soft = ex / total[..., None]  # [S, n, 3]
            wh = weight * np.clip(r, -self.delta, self.delta)  # w_i h'(r_i)
            grad = np.stack([(wh * soft[..., 0]).sum(-1), (wh * soft[..., 1]).sum(-1), (wh * soft[..., 2]).sum(-1),
                             -(wh * soft[..., 0] * self.log_n).sum(-1), -(wh * soft[..., 1] * self.log_d).sum(-1)],
                            axis=-1)
            return (weight * self.huber(r)).sum(-1), grad


def _grid() -> np.ndarray:
    return np.array(list(itertools.product(*(INIT_GRID[k] for k in ("a", "b", "e", "alpha", "beta")))), dtype=float)


def lbfgs_rows(value_and_grad: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
               value: Callable[[np.ndarray, np.ndarray], np.ndarray], starts: np.ndarray, *, iterations: int = 500,
               history: int = 10, tolerance: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Minimise a function of rows ([S, P] -> [S]) from every row of `starts` at once: S
    independent L-BFGS runs (two-loop recursion, Armijo backtracking line search), vectorised
    over the rows still running. `value(x, rows)` and `value_and_grad(x, rows)` evaluate the
    rows of x, which are rows `rows` (indices among the S) of the problem.
    Returns the final rows and their values."""
    every = np.arange(len(starts))
    x = starts.astype(float).copy()
    fx, g = value_and_grad(x, every)
    s_hist = np.zeros((history,) + x.shape)  # the last `history` steps s and gradient changes y, per row
    y_hist = np.zeros((history,) + x.shape)
    rho_hist = np.zeros((history, len(x)))  # 0 marks an empty or skipped pair
    gamma = 1e-2 / np.maximum(np.linalg.norm(g, axis=-1), 1e-12)  # first step: a small one along -g
    active = np.isfinite(fx) & np.isfinite(g).all(-1)
    fx = np.where(active, fx, np.inf)
    for _ in range(iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xi, gi, fi = x[idx], g[idx], fx[idx]
        # Two-loop recursion: d = -H g, H the inverse-Hessian estimate from the stored pairs.
        q, alphas = gi.copy(), []
        for k in range(history - 1, -1, -1):  # newest first
            s, y, rho = s_hist[k, idx], y_hist[k, idx], rho_hist[k, idx]
            a = rho * (s * q).sum(-1)
            q -= a[:, None] * y
            alphas.append(a)
        r = gamma[idx, None] * q
        for k, a in zip(range(history), reversed(alphas)):  # oldest first
            s, y, rho = s_hist[k, idx], y_hist[k, idx], rho_hist[k, idx]
            r += s * (a - rho * (y * r).sum(-1))[:, None]
        d = -r
        uphill = ~((d * gi).sum(-1) < 0)  # a stale estimate can point uphill: steepest descent instead
        d[uphill] = -gi[uphill] * gamma[idx[uphill], None]
        slope = (d * gi).sum(-1)
        # Backtracking: halve each row's step until f(x + t d) <= f(x) + 1e-4 t g.d (Armijo).
        t = np.ones(idx.size)
        accepted = np.zeros(idx.size, dtype=bool)
        x_new = xi.copy()
        for _ in range(50):
            pending = np.flatnonzero(~accepted)
            trial = xi[pending] + t[pending, None] * d[pending]
            f_trial = value(trial, idx[pending])
            ok = np.isfinite(f_trial) & (f_trial <= fi[pending] + 1e-4 * t[pending] * slope[pending])
            x_new[pending[ok]] = trial[ok]
            accepted[pending[ok]] = True
            t[pending[~ok]] /= 2
            if accepted.all():
                break
        f_next, g_next = value_and_grad(x_new, idx)
        s_new, y_new = x_new - xi, g_next - gi
        sy, yy = (s_new * y_new).sum(-1), (y_new * y_new).sum(-1)
        keep = accepted & (sy > 1e-20)  # only pairs with positive curvature update the estimate
        s_hist[:, idx] = np.roll(s_hist[:, idx], -1, axis=0)
        y_hist[:, idx] = np.roll(y_hist[:, idx], -1, axis=0)
        rho_hist[:, idx] = np.roll(rho_hist[:, idx], -1, axis=0)
        s_hist[-1, idx], y_hist[-1, idx] = s_new, y_new
        rho_hist[-1, idx] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
        gamma[idx] = np.where(keep, sy / np.where(keep, yy, 1.0), gamma[idx])
        converged = np.abs(fi - f_next) <= tolerance * (1 + np.abs(fi))
        moved = accepted & np.isfinite(f_next)
        x[idx] = np.where(moved[:, None], x_new, xi)
        g[idx] = np.where(moved[:, None], g_next, gi)
        fx[idx] = np.where(moved, f_next, fi)
        active[idx] = moved & ~converged
    return x, fx


def _fit_theta(objective: Objective, grid: np.ndarray, starts: int | None) -> np.ndarray:
    """The best of L-BFGS runs from the `starts` grid points where the objective is lowest (all
    of them with None)."""
    if starts is not None and starts < len(grid):
        grid = grid[np.argsort(np.nan_to_num(objective.value(grid), nan=np.inf))[:starts]]
    theta, values = lbfgs_rows(objective.value_and_grad, objective.value, grid)
    values = np.where(np.isfinite(values), values, np.inf)
    if not np.isfinite(values).any():
        raise EmberError("The scaling-law fit diverged from every initialisation.")
    return theta[int(values.argmin())]


def _law(theta: np.ndarray) -> Law | None:
    """The law of a row (a, b, e, alpha, beta); None when a constant runs past float range (a
    degenerate fit: e.g. alpha -> 0 with A -> infinity describes the same flat losses)."""
    a, b, e, alpha, beta = (float(x) for x in theta)
    if max(a, b, e) > MAX_LOG_CONSTANT:
        return None
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def fit_law(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
            delta: float = HUBER_DELTA, starts: int | None = DEFAULT_STARTS) -> Law:
    """Approach 3: the Huber fit of LSE(a - alpha log N, b - beta log D, e) to log L by L-BFGS
    from the `starts` best points of Chinchilla's initialisation grid (None: all 4500), keeping
    the best result."""
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (params, tokens, losses))
    law = _law(_fit_theta(Objective(log_n, log_d, log_l, np.ones_like(log_l), delta), _grid(), starts))
    if law is None:
        raise EmberError(DEGENERATE)
    return law


# --- the full analysis ---------------------------------------------------------------------
def interval(samples: Sequence[float], value: float, level: float = 0.95) -> dict[str, float]:
    """{"value", "low", "high"}: the estimate and the bootstrap percentile interval."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(samples, dtype=float), [tail, 100 - tail])
    return {"value": float(value), "low": float(low), "high": float(high)}


@dataclass
class ScalingFit:
    """What `fit_runs` finds: the law with intervals, the compute-optimal split, approach 1."""

    law: Law
    intervals: dict[str, dict[str, float]]
    budget: float
    compute_optimal: dict[str, Any] | None  # None when alpha or beta is not positive
    approach1: dict[str, Any] | None
    disagreements: list[str]  # where approaches 1 and 3 disagree
    warnings: list[str]  # what limits the fit (degenerate refits, no optimum)
    runs: int
    bootstrap: int
    size_field: str
    bootstrap_laws: list[Law] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {**self.intervals, "compute_optimal": self.compute_optimal, "approach1": self.approach1,
                "disagreements": self.disagreements, "warnings": self.warnings, "runs": self.runs,
                "bootstrap": self.bootstrap,
                "params_field": self.size_field, "huber_delta": HUBER_DELTA}


def _approach1(runs: Sequence[Run], sizes: np.ndarray) -> dict[str, Any] | None:
    """The lower envelope of loss over compute, and N_opt, D_opt power laws fitted to it."""
    order = sorted(range(len(runs)), key=lambda i: (runs[i].flops, runs[i].loss))
    frontier, best = [], math.inf
    for i in order:
        if runs[i].loss < best:
            frontier.append(i)
            best = runs[i].loss
    c = np.log([runs[i].flops for i in frontier])
    if len(frontier) < 2 or np.ptp(c) == 0:
        return None
    n_slope, n_icpt = np.polyfit(c, np.log(sizes[frontier]), 1)
    d_slope, d_icpt = np.polyfit(c, np.log([runs[i].tokens for i in frontier]), 1)
    return {"frontier": [{"name": runs[i].name, "params": float(sizes[i]), "tokens": runs[i].tokens,
                          "flops": runs[i].flops, "loss": runs[i].loss} for i in frontier],
            "params_exponent": float(n_slope), "tokens_exponent": float(d_slope),
            "params_coefficient": float(math.exp(n_icpt)), "tokens_coefficient": float(math.exp(d_icpt))}


def _bootstrap(theta: np.ndarray, grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               resamples: int, rng: np.random.Generator, progress: bool, chunk: int = 50) -> list[Law | None]:
    """Refits on runs resampled with replacement (as multiplicity weights), each L-BFGS started
    from the full-data optimum and the two best grid points of its resample; `chunk` resamples
    optimise together as rows of one batch."""
    n = log_l.shape[0]
    full = Objective(log_n, log_d, log_l, np.ones(n))
    with np.errstate(over="ignore", invalid="ignore"):  # each grid point's Huber terms, once
        grid_terms = full.huber(full.residuals(grid))  # [G, n]: a resample's grid objective is a weighted sum
    grid_terms = np.where(np.isfinite(grid_terms), grid_terms, np.inf)
    laws: list[Law] = []
    bar = tqdm(total=resamples, desc="bootstrap", disable=not progress, unit="fit")
    for first in range(0, resamples, chunk):
        m = min(chunk, resamples - first)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(m)]).astype(float)
        with np.errstate(invalid="ignore"):
            best_grid = np.argsort(counts @ grid_terms.T, axis=1)[:, :2]  # [m, 2]
        starts = np.concatenate([np.broadcast_to(theta, (m, 1, 5)), grid[best_grid]], axis=1).reshape(-1, 5)
        objective = Objective(log_n, log_d, log_l, np.repeat(counts, 3, axis=0))
        found, values = lbfgs_rows(objective.value_and_grad, objective.value, starts)
        values = np.where(np.isfinite(values), values, np.inf).reshape(m, 3)
        best = found.reshape(m, 3, 5)[np.arange(m), values.argmin(axis=1)]
        laws += [_law(row) for row in best]
        bar.update(m)
    bar.close()
    return laws  # None for a degenerate refit


def _compute_optimal(law: Law, laws: list[Law], budget: float) -> dict[str, Any] | None:
    """N_opt, D_opt, tokens per parameter at `budget` and the exponents of N_opt and D_opt in C,
    with intervals over the refits whose exponents are positive (None if the fit's are not)."""
    if law.alpha <= 0 or law.beta <= 0:
        return None
    n_opt, d_opt = law.compute_optimal(budget)
    usable = [x for x in laws if x.alpha > 0 and x.beta > 0] or [law]
    boot_opt = [x.compute_optimal(budget) for x in usable]
    exp_n = law.beta / (law.alpha + law.beta)
    boot_exp_n = [x.beta / (x.alpha + x.beta) for x in usable]
    return {
        "flops": budget,
        "params": interval([float(n) for n, _ in boot_opt], float(n_opt)),
        "tokens": interval([float(d) for _, d in boot_opt], float(d_opt)),
        "tokens_per_param": interval([float(d / n) for n, d in boot_opt], float(d_opt / n_opt)),
        "loss": float(law.loss(n_opt, d_opt)),
        "params_exponent": interval(boot_exp_n, exp_n),
        "tokens_exponent": interval([1 - x for x in boot_exp_n], 1 - exp_n),
    }


def fit_runs(runs: Sequence[Run], *, budget: float | None = None, bootstrap: int = 200, seed: int = 0,
             use_non_embedding: bool = False, starts: int | None = DEFAULT_STARTS,
             progress: bool = False) -> ScalingFit:
    """Approach 3 with bootstrap intervals, the compute-optimal split at `budget` FLOPs (default:
    the largest run's), and approach 1 beside it."""
    if len(runs) < 5:
        raise EmberError(f"A fit of five constants needs at least 5 runs; got {len(runs)}.")
    sizes = np.array([r.size(use_non_embedding) for r in runs])
    tokens = np.array([r.tokens for r in runs])
    losses = np.array([r.loss for r in runs])
    if len(set(sizes)) < 2 or len(set(tokens)) < 2:
        raise EmberError("The runs need at least two model sizes and two token counts to separate N from D.")
    budget = float(budget if budget is not None else max(r.flops for r in runs))
    if budget <= 0:
        raise EmberError("The FLOPs budget must be positive.")

    log_n, log_d, log_l = (np.log(x) for x in (sizes, tokens, losses))
    grid = _grid()
    theta = _fit_theta(Objective(log_n, log_d, log_l, np.ones_like(log_l)), grid, starts)
    law = _law(theta)
    if law is None:
        raise EmberError(DEGENERATE)
    refits = _bootstrap(theta, grid, log_n, log_d, log_l, bootstrap, np.random.default_rng(seed), progress)
    laws = [x for x in refits if x is not None]
    samples = {name: [getattr(x, name) for x in laws] or [getattr(law, name)] for name in LAW_FIELDS}
    intervals = {name: interval(samples[name], getattr(law, name)) for name in LAW_FIELDS}

    compute_optimal = _compute_optimal(law, laws, budget)
    a1 = _approach1(runs, sizes)
    disagreements, warnings = [], []
    if len(laws) < len(refits):
        warnings.append(f"{len(refits) - len(laws)} of {len(refits)} bootstrap refits ran off to an infinite "
                             "constant and are left out of the intervals: the runs pin the law down only loosely.")
    if compute_optimal is None:
        warnings.append(f"The fit has alpha = {law.alpha:.3g} and beta = {law.beta:.3g}: without both positive "
                             "there is no compute-optimal split.")
    if a1 is None:
        disagreements.append("Approach 1 needs at least two runs on the loss-compute frontier; it was not fitted.")
    elif compute_optimal is not None:
        e3 = compute_optimal["params_exponent"]
        if not e3["low"] <= a1["params_exponent"] <= e3["high"]:
            disagreements.append(
                f"Approach 1 finds N_opt proportional to C^{a1['params_exponent']:.2f}, outside approach 3's 95% interval "
                f"C^{e3['low']:.2f}..C^{e3['high']:.2f} (beta / (alpha + beta) = {e3['value']:.2f}).")
        n1 = a1["params_coefficient"] * budget ** a1["params_exponent"]
        co = compute_optimal["params"]
        if not co["low"] <= n1 <= co["high"]:
            disagreements.append(
                f"At {budget:.3g} FLOPs approach 1 puts N_opt at {n1:.3g} parameters, outside approach 3's "
                f"95% interval {co['low']:.3g}..{co['high']:.3g}.")
    return ScalingFit(law=law, intervals=intervals, budget=budget, compute_optimal=compute_optimal, approach1=a1,
                      disagreements=disagreements, warnings=warnings, runs=len(runs), bootstrap=len(laws),
                      size_field="non_embedding_params" if use_non_embedding else "params", bootstrap_laws=laws)


def describe_fit(fit: ScalingFit) -> str:
    """The fit as a few lines of text for a terminal."""
    iv = fit.intervals
    lines = [f"L(N, D) = E + A / N^alpha + B / D^beta   ({fit.runs} runs, N = {fit.size_field}, "
             f"{fit.bootstrap} bootstrap refits, 95% intervals)"]
    for name in LAW_FIELDS:
        x = iv[name]
        lines.append(f"  {name:<5} = {x['value']:.4g}   [{x['low']:.4g}, {x['high']:.4g}]")
    co = fit.compute_optimal
    if co is not None:
        lines.append(f"Compute-optimal at C = {co['flops']:.3g} FLOPs (C = 6ND): N = {co['params']['value']:.3g} "
                     f"[{co['params']['low']:.3g}, {co['params']['high']:.3g}], D = {co['tokens']['value']:.3g} "
                     f"[{co['tokens']['low']:.3g}, {co['tokens']['high']:.3g}], "
                     f"{co['tokens_per_param']['value']:.3g} tokens per parameter, loss {co['loss']:.4g}")
        lines.append(f"  approach 3: N_opt ~ C^{co['params_exponent']['value']:.2f}, "
                     f"D_opt ~ C^{co['tokens_exponent']['value']:.2f}")
    if fit.approach1 is not None:
        a1 = fit.approach1
        lines.append(f"  approach 1 ({len(a1['frontier'])} frontier runs): N_opt ~ C^{a1['params_exponent']:.2f}, "
                     f"D_opt ~ C^{a1['tokens_exponent']:.2f}")
    if fit.approach1 is not None and co is not None:
        lines += [f"  disagree: {d}" for d in fit.disagreements] or ["  approaches 1 and 3 agree within the intervals"]
    lines += [f"  note: {w}" for w in fit.warnings]
    return "\n".join(lines)
