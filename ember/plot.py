"""Loss curves of a run directory as a PNG (train loss, validation loss, learning rate)."""

from __future__ import annotations

import json
from pathlib import Path

from ember.errors import EmberError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EmberError(f"{run_dir} has no metrics.jsonl; is it a training run directory?")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise EmberError(f"{path} line {n} is not valid JSON.") from None
    if not records:
        raise EmberError(f"{path} is empty; the run logged nothing yet.")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `loss.png` (or `out`) for a run and return its path."""
    # Imported here: matplotlib takes a second to import, and the Agg backend must be chosen before pyplot.
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if any("lr" in r for r in records):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r.get("lr", float("nan")) for r in train], color="gray",
                 alpha=0.5, lw=1, label="learning rate")
        ax2.set_ylabel("learning rate", color="gray")
        lines, labels = ax.get_legend_handles_labels()
        l2, lab2 = ax2.get_legend_handles_labels()
        ax.legend(lines + l2, labels + lab2, loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.set_title(f"{Path(run_dir).resolve().name}: training curves")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_rl_curves(records: list[dict], held_out: list[dict], panels: list[tuple[str, str]], xlabel: str,
                   out: str | Path) -> Path:
    """A 2 x 2 grid of reinforcement-learning curves (PPO, GRPO): each panel one metric per step of
    `records`; the reward panel also shows the held-out reward (`eval/reward` of `held_out`)."""
    import matplotlib  # as in plot_run: slow to import, and Agg must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), dpi=110)
    for ax, (key, label) in zip(axes.flat, panels):
        shown = [r for r in records if key in r]
        ax.plot([r["step"] for r in shown], [r[key] for r in shown], lw=1.2, label="training batches")
        if key == "reward":
            if held_out:
                ax.plot([r["step"] for r in held_out], [r["eval/reward"] for r in held_out], "o-", label="held-out")
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
