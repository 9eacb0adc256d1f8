"""A scaling sweep: a grid of model sizes x training tokens, one pretraining run each.

Each run is an ordinary `ember pretrain` run (`ember.train.pretrain.pretrain`, the one training
loop) whose cosine schedule ends at that run's own token count, as Chinchilla trained its grid:
a run stopped early on a longer schedule would still have a high learning rate and overstate
the loss. At the end of each run the final validation loss, the parameter count (with and
without embeddings), the tokens seen and the FLOPs go as one JSON line to OUT/RUNS.jsonl, the file
`ember scaling fit` reads.

FLOPs are Chinchilla's C = 6 N D (N all parameters, D tokens): 2 N per token forward, 4 N
backward, attention's own products left out (small at these context lengths).

Resumable: runs already in RUNS.jsonl are skipped; a run that was interrupted continues from its
checkpoint. OUT/sweep.json pins the settings every run shares, so a later invocation with
different training settings is refused rather than mixed into the same file.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ember.checkpoint import load_config
from ember.config import PRESETS, ModelConfig, preset
from ember.errors import EmberError
from ember.files import atomic_write_text, read_json, write_json
from ember.train.loop import CHECKPOINT, STATE, TrainConfig
from ember.train.pretrain import pretrain

RUNS_FILE = "RUNS.jsonl"
SWEEP_FILE = "sweep.json"
HEAD_DIM = 32  # WIDTHxLAYERS sizes: heads of 32 dimensions, as the `small` preset has
SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
TOKENS_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgGbB]?)$")
TOKEN_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


@dataclass
class SweepOptions:
    warmup_fraction: float = 0.05  # of each run's steps spent warming up
    eval_batches: int = 20
    budget_minutes: float | None = None


def model_for_size(size: str) -> ModelConfig:
    """A preset name (`tiny`, `small`, ...) or WIDTHxLAYERS: a Llama-style model with hidden size
    WIDTH, LAYERS blocks, heads of 32, a SwiGLU MLP of 8/3 WIDTH (rounded up to 16) and tied
    embeddings."""
    if size in PRESETS:
        return preset(size)
    m = SIZE_PATTERN.match(size)
    if m is None:
        raise EmberError(f"Unknown model size '{size}': give a preset ({', '.join(PRESETS)}) or WIDTHxLAYERS, "
                         "e.g. 128x4.")
    width, layers = int(m.group(1)), int(m.group(2))
    if width < HEAD_DIM or width % HEAD_DIM or layers < 1:
        raise EmberError(f"Size '{size}': the width must be a multiple of {HEAD_DIM} and the layers at least 1.")
    heads = width // HEAD_DIM
    return ModelConfig(model_type="llama", hidden_size=width, intermediate_size=16 * math.ceil(8 * width / 3 / 16),
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, tie_word_embeddings=True)


def parse_tokens(text: str) -> int:
    """A token count: 200000, 200k, 1.5M, 2G."""
    m = TOKENS_PATTERN.match(text.strip())
    if m is None:
        raise EmberError(f"Token count '{text}' is not a number like 200000, 200k or 1.5M.")
    value = int(float(m.group(1)) * TOKEN_UNITS[m.group(2).lower()])
    if value < 1:
        raise EmberError(f"Token count '{text}' must be at least 1.")
    return value


def run_name(size: str, tokens: int) -> str:
    return f"{size}-{tokens}"


def read_done(runs_file: Path) -> dict[str, dict[str, Any]]:
    """The runs RUNS.jsonl already holds, by name."""
    done = {}
    if runs_file.is_file():
        for number, line in enumerate(runs_file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    done[record["name"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EmberError(f"{runs_file}, line {number} is not a sweep record with a 'name'; "
                                     "fix or remove the line.") from None
    return done


def _pin_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SWEEP_FILE
    if path.is_file():
        before = read_json(path, "Sweep settings")
        changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if changed:
            k = changed[0]
            raise EmberError(f"{out} holds a sweep run with {k} = {before.get(k)!r}, not {settings.get(k)!r}; "
                             "use the same settings to continue it, or another --out.")
    else:
        write_json(path, settings)


def sweep(data_dir: str | Path, out_dir: str | Path, sizes: Sequence[str], tokens: Sequence[int],
          train_config: TrainConfig, options: SweepOptions | None = None, device: str | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Train every size x token count not yet in OUT/RUNS.jsonl, cheapest first; returns all records.

    `train_config` sets what runs share (batch, context, learning rate, ...); each run's
    `max_steps` is its token count over the tokens of a step, and its warmup
    `options.warmup_fraction` of that. With `options.budget_minutes` no run starts after that many
    minutes (the one in progress finishes); the same call later continues the grid.
    """
    options = options or SweepOptions()
    out, data_dir = Path(out_dir), Path(data_dir)
    if train_config.time_budget_s is not None or train_config.schedule_by_time:
        raise EmberError("A sweep's runs end at their token counts, not at a time; limit the sweep with "
                         "--budget-minutes instead.")
    if not sizes or not tokens:
        raise EmberError("A sweep needs at least one size and one token count.")
    models = {size: model_for_size(size) for size in sizes}
    if not 0 <= options.warmup_fraction < 1:
        raise EmberError("The warmup fraction must be at least 0 and below 1.")
    out.mkdir(parents=True, exist_ok=True)
    shared = {k: v for k, v in asdict(train_config).items() if k not in ("max_steps", "warmup_steps")}
    _pin_settings(out, {"data": str(data_dir.resolve()), "train_config": shared,
                        "warmup_fraction": options.warmup_fraction, "eval_batches": options.eval_batches})
    step_tokens = train_config.batch_size * train_config.block_size * train_config.grad_accum
    runs_file = out / RUNS_FILE
    done = read_done(runs_file)
    grid = sorted(((size, n) for size in sizes for n in tokens),
                  key=lambda sn: models[sn[0]].num_parameters() * sn[1])  # cheapest first
    start = time.time()
    bar = tqdm(total=len(grid), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for size, n in grid:
        name = run_name(size, n)
        if name in done:
            bar.update(1)
            continue
        if options.budget_minutes is not None and time.time() - start > options.budget_minutes * 60:
            tqdm.write(f"Sweep budget of {options.budget_minutes:g} minutes spent; {bar.total - bar.n} runs left. "
                       "Run the same command again to continue.")
            break
        bar.set_postfix_str(name)
        steps = max(1, math.ceil(n / step_tokens))
        cfg = replace(train_config, max_steps=steps, warmup_steps=max(1, round(steps * options.warmup_fraction)))
        run_dir = out / "runs" / name
        resume = (run_dir / CHECKPOINT / STATE).is_file()
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # started but never checkpointed: start it again
        t0 = time.time()
        last = pretrain(data_dir, run_dir, None if resume else models[size], cfg, device=device, resume=resume,
                        eval_batches=options.eval_batches, progress=progress)
        record = _record(name, size, run_dir, last, steps * step_tokens, n, time.time() - t0)
        done[name] = record
        atomic_write_text(runs_file, "".join(json.dumps(r) + "\n" for r in done.values()))
        bar.update(1)
    bar.close()
    return list(done.values())


def _record(name: str, size: str, run_dir: Path, last: dict[str, Any], tokens: int, requested: int,
            seconds: float) -> dict[str, Any]:
    if "val_loss" not in last:  # resumed after it had finished: its last evaluation is in the log
        logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        last = next((r for r in reversed(logged) if "val_loss" in r), None)
        if last is None:
            raise EmberError(f"Run {run_dir} ended without a validation loss.")
    config = load_config(run_dir / "model")
    state = read_json(run_dir / CHECKPOINT / STATE, "Trainer state")
    params = int(state["num_parameters"])  # the model's own count
    embedding = config.num_parameters(include_embeddings=True) - config.num_parameters(include_embeddings=False)
    return {"name": name, "size": size, "params": params, "non_embedding_params": params - embedding,
            "tokens": tokens, "tokens_requested": requested, "flops": 6 * params * tokens,
            "loss": float(last["val_loss"]), "train_loss": float(last["loss"]), "steps": int(last["step"]),
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "seconds": round(seconds, 2)}
