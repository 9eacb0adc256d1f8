"""`ember scaling sweep` and `ember scaling fit` (argparse only at import time)."""

from __future__ import annotations

import argparse
import json

from ember.settings import add_command

SWEEP_DESCRIPTION = """\
Train a grid of model sizes x token counts on prepared shards, one `ember pretrain` run each,
every run's cosine schedule ending at its own token count (as Chinchilla did). Each finished
run adds one line to OUT/RUNS.jsonl: name, params, non_embedding_params, tokens, flops (6ND) and
loss (the final validation loss), which `ember scaling fit` reads. Runs already there are
skipped, an interrupted run continues from its checkpoint, so the same command resumes a sweep.

  ember scaling sweep --data data --sizes 64x2 128x2 128x4 --tokens 200k 400k 800k --out sweep
  ember scaling fit sweep/RUNS.jsonl --plot sweep/fit.png

Sizes are presets (tiny, small, ...) or WIDTHxLAYERS (Llama-style, heads of 32, tied embeddings).
"""

FIT_DESCRIPTION = """\
Fit L(N, D) = E + A / N^alpha + B / D^beta to runs (one JSON object a line: params, tokens, loss;
optionally non_embedding_params, flops and name) by Chinchilla's approach 3: a Huber loss
(delta 1e-3) on log-loss residuals, minimised by L-BFGS from a grid of initialisations, with 95%
intervals from refits on bootstrap resamples of the runs. Then the compute-optimal parameters
and tokens for a FLOPs budget (C = 6ND) and the tokens-per-parameter ratio, and approach 1 (the
runs with the lowest loss per compute, with power laws N_opt ~ C^a, D_opt ~ C^b) beside it,
saying where the two disagree. Five constants need at least 5 runs; a grid of at least 3 sizes x
3 token counts gives them something to separate.
"""


def add_commands(sub: argparse._SubParsersAction) -> dict:
    p = sub.add_parser("scaling", help="scaling laws: sweep model sizes x tokens, fit L(N, D)")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    add_command(actions, "sweep", _sweep_flags, help="train a grid of model sizes x token counts",
                description=SWEEP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_command(actions, "fit", _fit_flags, help="fit Chinchilla's L(N, D) to runs, with the compute-optimal split",
                description=FIT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return {("scaling", "sweep"): cmd_sweep, ("scaling", "fit"): cmd_fit}


# Shared by every run of a sweep; each run's steps and warmup come from its token count.
SWEEP_TRAINING_DEFAULTS = {"eval_every": 0, "save_every": 200, "log_every": 10}
SWEEP_EXCLUDED = ("max_steps", "warmup_steps", "time_budget_s", "schedule_by_time")


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    from ember.train.commands import add_training_flags

    p.add_argument("--data", required=True, help="directory written by 'ember data prepare'")
    p.add_argument("--sizes", nargs="+", required=True, metavar="SIZE",
                   help="model sizes: preset names or WIDTHxLAYERS, e.g. 64x2 128x4")
    p.add_argument("--tokens", nargs="+", required=True, metavar="N",
                   help="training tokens per run, e.g. 200k 1M (rounded up to whole steps)")
    p.add_argument("--out", required=True, help="sweep directory: RUNS.jsonl, sweep.json and runs/<name>")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="MINUTES",
                   help="start no run after this many minutes (the one in progress finishes; rerun to continue) "
                        "(default: none)")
    p.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="share of each run's steps spent warming up (default: 0.05)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches for the final loss (default: 20)")
    add_training_flags(p, defaults=SWEEP_TRAINING_DEFAULTS, exclude=SWEEP_EXCLUDED)
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="RUNS.jsonl: one run a line (what `ember scaling sweep` writes)")
    p.add_argument("--json", action="store_true", help="print the fit as JSON (E, A, B, alpha, beta as "
                   "{value, low, high}, the compute-optimal split, approach 1)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write loss-vs-compute and iso-loss plots here")
    p.add_argument("--budget", type=float, default=None, metavar="FLOPS",
                   help="FLOPs budget for the compute-optimal split, e.g. 1e18 (default: the largest run's)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (default: 200)")
    p.add_argument("--non-embedding", action="store_true",
                   help="fit N = non_embedding_params (Kaplan et al.'s choice) instead of all parameters")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")


def cmd_sweep(a: argparse.Namespace) -> None:
    from ember.errors import EmberError
    from ember.scaling.sweep import RUNS_FILE, SweepOptions, parse_tokens, sweep
    from ember.settings import values
    from ember.train.loop import TrainConfig

    if a.budget_minutes is not None and a.budget_minutes <= 0:
        raise EmberError("--budget-minutes must be positive.")
    options = SweepOptions(warmup_fraction=a.warmup_fraction, eval_batches=a.eval_batches,
                           budget_minutes=a.budget_minutes)
    records = sweep(a.data, a.out, a.sizes, [parse_tokens(t) for t in a.tokens], values(TrainConfig, a),
                    options=options, device=a.device, progress=not a.no_progress)
    print(f"{len(records)} runs in {a.out}/{RUNS_FILE}; fit them with: ember scaling fit {a.out}/{RUNS_FILE}")


def cmd_fit(a: argparse.Namespace) -> None:
    from ember.errors import EmberError
    from ember.scaling.law import describe_fit, fit_runs, read_runs

    if a.bootstrap < 0:
        raise EmberError("--bootstrap must be 0 or more.")
    runs = read_runs(a.runs)
    fit = fit_runs(runs, budget=a.budget, bootstrap=a.bootstrap, seed=a.seed, use_non_embedding=a.non_embedding,
                   progress=not a.json)
    if a.plot:
        from ember.scaling.plot import plot_fit

        plot_fit(fit, runs, a.plot)
    if a.json:
        print(json.dumps(fit.to_json(), indent=2))
    else:
        print(describe_fit(fit))
        if a.plot:
            print(f"Plot: {a.plot}")
