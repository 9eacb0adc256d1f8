"""The training loop every recipe shares: pretraining, SFT, DPO, reward modelling.

A recipe supplies three things: `get_batch(step, micro_step)` (a pure function of the step,
so a resumed run sees exactly the batches an uninterrupted one would), `loss_fn(model,
batch) -> (summed loss, number of target tokens, metrics)` and optionally `evaluate(model)`.
The loop does the rest: AdamW (fused where available), warmup then cosine / constant /
warmup-stable-decay learning rates, gradient accumulation with the loss normalised by the
target tokens of the whole step, mixed precision where the device is fast at it, clipping,
periodic validation, a progress bar, `metrics.jsonl`, and atomic checkpoints from which
`resume=True` continues bit-for-bit.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ember.checkpoint import read_weights, write_failed, write_model_files
from ember.device import autocast_dtype
from ember.errors import EmberError
from ember.files import (atomic_dir, atomic_write_text, complete_version, read_json, remove_leftovers,
                         write_json)
from ember.manifest import write_manifest

SCHEDULES = ("cosine", "constant", "wsd")


def minutes(text: str) -> float | None:
    """A command-line duration in minutes, as seconds; 0 means no limit (as 0 turns off the other limits)."""
    value = float(text) * 60
    return value if value > 0 else None


@dataclass
class TrainConfig:
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to train for"})
    batch_size: int = field(default=16, metadata={"help": "sequences (or pairs) per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    block_size: int = field(default=256, metadata={"help": "tokens per sequence; longer examples are cut"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a share of the peak"})
    warmup_steps: int = field(default=100, metadata={"help": "steps of linear warmup to the peak learning rate"})
    schedule: Literal["cosine", "constant", "wsd"] = field(
        default="cosine", metadata={"help": "learning-rate shape after warmup (wsd: warmup-stable-decay)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: share of the steps spent decaying at the end"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices and embeddings"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW first-moment decay"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW second-moment decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    eval_every: int = field(default=200, metadata={"help": "steps between validations (0 = only at the end)"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    log_every: int = field(default=10, metadata={"help": "steps between lines in metrics.jsonl"})
    seed: int = field(default=1337, metadata={"help": "seed for initial weights, data order and dropout"})
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "autocast dtype (auto: bf16/fp16 where the device is fast at it)"})
    time_budget_s: float | None = field(default=None, metadata={
        "help": "stop (and save) after this many minutes; 0 = no limit (default: none)", "flag": "--time-budget",
        "parse": minutes, "metavar": "MINUTES"})
    schedule_by_time: bool = field(default=False, metadata={
        "help": "decay the learning rate by the elapsed share of --time-budget, not by steps (no exact resume)"})

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise EmberError(f"Unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}.")
        for name in ("max_steps", "batch_size", "grad_accum", "block_size"):
            if getattr(self, name) < 1:
                raise EmberError(f"{name} must be at least 1.")
        if self.lr <= 0:
            raise EmberError("The learning rate must be positive.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def learning_rate(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup, then the chosen shape down to lr * min_lr_ratio at max_steps.

    `progress` (0..1) overrides the step-based position, for time-budgeted runs.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if progress is None:
        progress = step / cfg.max_steps
    progress = min(1.0, progress)
    if cfg.schedule == "wsd":
        decay_start = 1 - cfg.decay_fraction
        if progress < decay_start:
            return peak
        return peak + (floor - peak) * min(1.0, (progress - decay_start) / cfg.decay_fraction)
    warm = cfg.warmup_steps / cfg.max_steps
    frac = max(0.0, (progress - warm) / max(1e-9, 1 - warm))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))


def lm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy and the number of targets (-100 marks ignored ones)."""
    # At least float32 (bf16 logits lose the loss's small differences); float64 stays float64.
    logits = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings only, never on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    device = params[0].device.type
    if device in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


# --- checkpoints -------------------------------------------------------------------------
CHECKPOINT = "checkpoint"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig, extra_state: dict[str, Any], save_extra: Callable[[Path], None] | None) -> None:
    """Model (HF layout) + optimizer + RNG + step + checksum manifest, replacing the previous
    checkpoint atomically (see `ember.files.atomic_dir` for how a kill at any instant is survived)."""
    target = out_dir / CHECKPOINT
    try:
        with atomic_dir(target) as tmp:
            write_model_files(model, tmp)
            if save_extra is not None:
                save_extra(tmp)  # tokenizer, adapters, ...
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / OPTIMIZER)
            write_json(tmp / STATE, {"step": step, "train_config": asdict(cfg), **extra_state})
            write_manifest(tmp)
    except OSError as e:
        raise write_failed(target, e) from None


def find_checkpoint(out_dir: str | Path) -> Path:
    """The run's complete checkpoint: `checkpoint`, or `.checkpoint.old` when a kill fell between the two
    renames that commit one. Temp dirs of killed checkpoint writes are removed on the way."""
    out_dir = Path(out_dir)
    remove_leftovers(out_dir / CHECKPOINT)
    ckpt = complete_version(out_dir / CHECKPOINT)
    if ckpt is None:
        raise EmberError(f"No checkpoint to resume from in {out_dir} (expected {out_dir / CHECKPOINT}).")
    return ckpt


def load_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG; return the saved trainer state (with `step`).

    Every file is checked against the checkpoint's manifest first (when it has one)."""
    ckpt = find_checkpoint(out_dir)
    weights = read_weights(ckpt, model)  # checks every file of the checkpoint against its manifest
    state = read_json(ckpt / STATE, "Trainer state")
    model.load_state_dict(weights, strict=False)  # strict=False: a tied head is not stored
    try:
        # weights_only=True: tensors and plain containers only, never arbitrary pickled objects.
        blob = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        rng = blob["rng"]
        torch.set_rng_state(rng["torch"])
    except FileNotFoundError:
        raise EmberError(f"Optimizer state {ckpt / OPTIMIZER} is missing.") from None
    except Exception as e:  # noqa: BLE001 - torch.load's errors on a damaged file have many types
        raise EmberError(f"Optimizer state {ckpt / OPTIMIZER} is corrupt or truncated "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# --- the loop ----------------------------------------------------------------------------
def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log reads as one clean run (and a line a
    kill cut short); rewritten atomically, so a kill here loses nothing."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


RUN_FILE = "run.json"  # what a recipe was started with, so --resume needs no flags again
# What a resumed run may change: when it stops and how often it reports and saves, never what it
# computes. A new max_steps (or time budget) stretches or cuts the schedule, as asked.
RESUME_OVERRIDES = ("max_steps", "time_budget_s", "eval_every", "save_every", "log_every")


def _flag(name: str) -> str:
    spelled = next(f.metadata.get("flag") for f in fields(TrainConfig) if f.name == name)
    return spelled or "--" + name.replace("_", "-")


def read_run(out_dir: Path, train_config: TrainConfig | dict[str, Any] | None = None
             ) -> tuple[dict[str, Any], TrainConfig]:
    """A run's saved settings for --resume: the run continues as it was configured.

    `train_config` says what to change: a dict of the settings a user gave (the command line passes only
    the flags typed), or a whole TrainConfig (library callers). Only `RESUME_OVERRIDES` may differ from
    the run's own values; any other difference is refused, since it would not be the same run."""
    run_file = out_dir / RUN_FILE
    if not run_file.is_file():
        raise EmberError(f"Nothing to resume in {out_dir}: it has no {RUN_FILE}.")
    run = read_json(run_file, "Run file")
    saved = TrainConfig.from_dict(run["train_config"])
    given = asdict(train_config) if isinstance(train_config, TrainConfig) else dict(train_config or {})
    changes = {}
    for name, value in given.items():
        if value == getattr(saved, name):
            continue
        if name not in RESUME_OVERRIDES or (name == "time_budget_s" and saved.schedule_by_time):
            raise EmberError(f"{_flag(name)} cannot change when resuming: the run in {out_dir} was started with "
                             f"{name}={getattr(saved, name)!r} ({run_file.name}). On --resume only "
                             f"{', '.join(_flag(n) for n in RESUME_OVERRIDES)} may change.")
        changes[name] = value
    return run, replace(saved, **changes)


def train(model: nn.Module, cfg: TrainConfig, get_batch: Callable[[int, int], Any],
          loss_fn: Callable[[nn.Module, Any], tuple[Tensor, int, dict[str, float]]], out_dir: str | Path,
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None, resume: bool = False,
          save_extra: Callable[[Path], None] | None = None, progress: bool = True,
          extra_state: dict[str, Any] | None = None,
          count_targets: Callable[[Any], int] | None = None) -> dict[str, Any]:
    """Run the loop to `cfg.max_steps` and return the final metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    torch.manual_seed(cfg.seed)

    step, elapsed_before = 0, 0.0
    if resume:
        state = load_checkpoint(out_dir, model, optimizer)
        step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        _truncate_log(metrics_path, step)
        if step >= cfg.max_steps:
            tqdm.write(f"Checkpoint is already at step {step} of {cfg.max_steps}; nothing to do.")
    elif metrics_path.exists():
        metrics_path.unlink()
    extra_state = dict(extra_state or {})
    count_targets = count_targets or _count_targets

    amp = {"auto": autocast_dtype(device), "off": None, "bf16": torch.bfloat16,
           "fp16": torch.float16}[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None

    # Ctrl-C or SIGTERM: finish the current step, save, and exit cleanly.
    stop_requested = {"flag": False}

    def request_stop(signum, frame):
        stop_requested["flag"] = True

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint() -> None:
        save_checkpoint(out_dir, model, optimizer, step, cfg,
                        {**extra_state, "elapsed_s": elapsed_before + time.time() - t_start}, save_extra)

    model.train()
    t_start = time.time()
    last = {"step": step}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    tokens_window, t_window = 0, time.time()
    try:
        while step < cfg.max_steps:
            progress = None
            if cfg.schedule_by_time and cfg.time_budget_s:
                elapsed = elapsed_before + time.time() - t_start
                progress = max(step / cfg.max_steps, elapsed / cfg.time_budget_s)
            lr = learning_rate(step, cfg, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [get_batch(step, micro) for micro in range(cfg.grad_accum)]
            # Normalise by the target tokens of the whole step, not per micro-batch, so k
            # micro-batches of b give the same update as one batch of k*b.
            total_targets = sum(count_targets(b) for b in batches)
            loss_sum, info = 0.0, {}
            for batch in batches:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss, n, info = loss_fn(model, batch)
                    scaled = loss / max(1, total_targets)
                    aux = model.aux_loss() if hasattr(model, "aux_loss") else None
                    if aux is not None:
                        scaled = scaled + model.config.router_aux_loss_coef * aux / len(batches)
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += float(loss.detach())
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                         if cfg.grad_clip > 0 else float("nan"))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_window += total_targets

            train_loss = loss_sum / max(1, total_targets)
            if not math.isfinite(train_loss):
                raise EmberError(f"The loss became {train_loss} at step {step}; lower the learning rate "
                                 "(--lr) or enable clipping.")
            last = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, **info}
            over_time = cfg.time_budget_s is not None and elapsed_before + time.time() - t_start > cfg.time_budget_s
            final = step == cfg.max_steps or over_time
            log_now = step % cfg.log_every == 0 or final
            if log_now:
                now = time.time()
                last["tokens_per_s"] = tokens_window / max(1e-9, now - t_window)
                last["elapsed_s"] = elapsed_before + now - t_start
                tokens_window, t_window = 0, now
            eval_now = evaluate is not None and (final or (cfg.eval_every and step % cfg.eval_every == 0))
            if eval_now:
                model.eval()
                with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    last.update(evaluate(model))
                model.train()
            if log_now or eval_now:
                _log(metrics_path, last)
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "val_loss", "lr", "tokens_per_s") if k in last})
            bar.update(1)

            if step < cfg.max_steps and not over_time and (
                    stop_requested["flag"] or (cfg.save_every and step % cfg.save_every == 0)):
                checkpoint()
            if stop_requested["flag"]:
                bar.close()
                raise EmberError(f"Training stopped at step {step}; the checkpoint in {out_dir / CHECKPOINT} "
                                 "is saved, continue with --resume.")
            if over_time:
                tqdm.write(f"Time budget reached at step {step}.")
                break
        checkpoint()
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    model.eval()
    return last


def _count_targets(batch: Any) -> int:
    targets = batch[1] if isinstance(batch, (tuple, list)) else batch["labels"]
    return int((targets != -100).sum())
