"""The picture of a scaling fit: loss against compute, and iso-loss contours over compute x size."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ember.scaling.law import Run, ScalingFit


def plot_fit(fit: ScalingFit, runs: Sequence[Run], path: str | Path) -> Path:
    """Left: every run's loss against its FLOPs, each size's fitted curve L(N, C / 6N), the
    compute-optimal frontier of the fit and approach 1's frontier runs. Right: contours of the
    fitted loss over FLOPs x parameters, the efficient frontier N_opt(C) of approach 3 and
    approach 1's power law."""
    import matplotlib  # imported here: the Agg backend must be chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law, use_ne = fit.law, fit.size_field == "non_embedding_params"
    sizes = np.array([r.size(use_ne) for r in runs])
    flops = np.array([r.flops for r in runs])
    losses = np.array([r.loss for r in runs])
    c = np.logspace(np.log10(flops.min()) - 0.3, np.log10(max(flops.max(), fit.budget)) + 0.3, 200)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("viridis")
    shades = (np.log(sizes) - np.log(sizes).min()) / max(np.ptp(np.log(sizes)), 1e-9)

    for n in sorted(set(sizes)):
        shade = cmap(float((np.log(n) - np.log(sizes).min()) / max(np.ptp(np.log(sizes)), 1e-9)))
        left.plot(c, law.loss(n, c / (6 * n)), color=shade, alpha=0.5, lw=1)
    left.scatter(flops, losses, c=shades, cmap=cmap, edgecolor="k", zorder=3, label="runs (colour: size)")
    optimum = fit.compute_optimal is not None  # alpha and beta both positive
    if optimum:
        n_opt, d_opt = law.compute_optimal(c)
        left.plot(c, law.loss(n_opt, d_opt), "k--", lw=2, label="compute-optimal frontier (approach 3)")
    if fit.approach1 is not None:
        front = fit.approach1["frontier"]
        left.plot([f["flops"] for f in front], [f["loss"] for f in front], "rs", mfc="none", ms=11,
                  label="lowest loss per compute (approach 1)")
    left.set_xscale("log")
    left.set_xlabel("training FLOPs (6 N D)")
    left.set_ylabel("validation loss")
    left.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)

    n_axis = np.logspace(np.log10(sizes.min()) - 0.5, np.log10(sizes.max()) + 0.5, 200)
    cc, nn = np.meshgrid(c, n_axis)
    field = law.loss(nn, cc / (6 * nn))
    levels = np.quantile(field, np.linspace(0.02, 0.9, 14))
    contours = right.contour(cc, nn, field, levels=np.unique(levels), cmap="magma", linewidths=0.8)
    right.clabel(contours, fmt="%.2f", fontsize=7)
    if optimum:
        right.plot(c, n_opt, "k--", lw=2, label="efficient frontier N_opt(C) (approach 3)")
    if fit.approach1 is not None:
        a1 = fit.approach1
        right.plot(c, a1["params_coefficient"] * c ** a1["params_exponent"], "r:", lw=2,
                   label=f"approach 1: N_opt ~ C^{a1['params_exponent']:.2f}")
    right.scatter(flops, sizes, c=losses, cmap="magma", edgecolor="k", zorder=3, label="runs (colour: loss)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_ylim(n_axis[0], n_axis[-1])
    right.set_xlabel("training FLOPs (6 N D)")
    right.set_ylabel("parameters" + (" (without embeddings)" if use_ne else ""))
    right.set_title("iso-loss contours of the fit")
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
