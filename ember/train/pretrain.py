"""Pretraining recipe: next-token prediction on memory-mapped token shards.

Everything generic (optimizer, schedule, accumulation, checkpoints, logs) is in
`ember.train.loop`; this file only says where batches come from, what the loss is, how
validation is measured, and what a finished run leaves behind (`OUT/model`, an HF-layout
directory with the tokenizer).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint import load_config, save_pretrained
from ember.config import ModelConfig
from ember.data import TokenShards
from ember.device import pick_device
from ember.errors import EmberError
from ember.files import complete_version, write_json
from ember.load import load_model
from ember.model import CausalLM
from ember.tokenizer import load_tokenizer
from ember.train.loop import CHECKPOINT, RUN_FILE, TrainConfig, find_checkpoint, lm_loss, read_run, train



def round_vocab(n: int, multiple: int = 64) -> int:
    """Pad the embedding table to a multiple of 64 rows: matmuls like aligned shapes."""
    return ((n + multiple - 1) // multiple) * multiple


def model_config_for(base: ModelConfig, tokenizer: Any, block_size: int) -> ModelConfig:
    """Fit a preset to the tokenizer (vocabulary, special ids) and the training context."""
    return base.replace(
        vocab_size=round_vocab(tokenizer.vocab_size),
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        max_position_embeddings=max(base.max_position_embeddings, block_size),
    )


def val_loss_fn(data: TokenShards, batch_size: int, block_size: int, max_batches: int, device: torch.device):
    def evaluate(model: CausalLM) -> dict[str, float]:
        total, count = 0.0, 0
        for x, y in data.iter_eval_batches("val", batch_size, block_size, max_batches):
            loss, n = lm_loss(model(x.to(device)), y.to(device))
            total, count = total + float(loss), count + n
        val = total / max(1, count)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50))}
    return evaluate


def pretrain(data_dir: str | Path, out_dir: str | Path, model_config: ModelConfig | None,
             train_config: TrainConfig | dict[str, Any] | None, device: str | None = None, resume: bool = False,
             eval_batches: int = 20, progress: bool = True, init_from: str | Path | None = None) -> dict[str, Any]:
    """Train a model on prepared shards; returns the last logged metrics (with val_loss).

    With `resume`, the run continues with the settings in OUT/run.json; `train_config` may then be None,
    or name changes that `ember.train.loop.read_run` allows (the step budget, how often to log and save)."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    data = TokenShards(data_dir)
    tokenizer = load_tokenizer(data.tokenizer_dir)
    dev = pick_device(device)

    run_file = out_dir / RUN_FILE
    if resume:
        run, train_config = read_run(out_dir, train_config)
        has_checkpoint = complete_version(out_dir / CHECKPOINT) is not None
        saved = load_config(find_checkpoint(out_dir)) if has_checkpoint else ModelConfig.from_hf(run["model_config"])
        if model_config is not None and model_config_for(model_config, tokenizer, train_config.block_size) != saved:
            raise EmberError(f"The model given (--preset or --config) is not the one the run in {out_dir} trains; "
                             "leave it out to resume.")
        model_config = saved
        if not has_checkpoint:  # killed before its first checkpoint: the same run from step 0 is where it was
            print(f"No checkpoint in {out_dir} yet: the run starts over from step 0 with its saved settings.",
                  file=sys.stderr)
            resume, init_from = False, run.get("init_from")
    else:
        if model_config is None:
            raise EmberError("Give a model preset or config to pretrain.")
        if not isinstance(train_config, TrainConfig):
            raise EmberError("Give a TrainConfig to start a run (a dict of changes is for resume=True).")
        model_config = model_config_for(model_config, tokenizer, train_config.block_size)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_file, {"model_config": model_config.to_hf(), "train_config": asdict(train_config),
                              "init_from": str(Path(init_from).resolve()) if init_from is not None else None,
                              "data": str(data_dir.resolve()), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    if model_config.vocab_size < tokenizer.vocab_size:
        raise EmberError(f"The model's vocabulary ({model_config.vocab_size}) is smaller than the "
                         f"tokenizer's ({tokenizer.vocab_size}).")
    if train_config.block_size > model_config.max_position_embeddings:
        raise EmberError(f"block_size {train_config.block_size} exceeds the model's context "
                         f"{model_config.max_position_embeddings}.")

    for split in ("train", "val"):  # fail now, not after an hour of training
        data.check_split(split, train_config.block_size)
    torch.manual_seed(train_config.seed)
    if init_from is not None and not resume:
        model = load_model(init_from, device=str(dev), dtype=torch.float32, keep_blocks=False)
    else:
        model = CausalLM(model_config).to(dev)
    cfg = train_config

    def get_batch(step: int, micro: int):
        x, y = data.get_batch("train", cfg.batch_size, cfg.block_size, step=step, micro_step=micro, seed=cfg.seed)
        return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def loss_fn(m: CausalLM, batch):
        x, y = batch
        loss, n = lm_loss(m(x), y)
        return loss, n, {}

    evaluate = val_loss_fn(data, cfg.batch_size, cfg.block_size, eval_batches, dev)
    last = train(model, cfg, get_batch, loss_fn, out_dir, evaluate=evaluate, resume=resume,
                 save_extra=tokenizer.save, progress=progress,
                 extra_state={"num_parameters": model.num_parameters()})
    save_pretrained(model, tokenizer, out_dir / "model")
    return last


def describe_run(out_dir: str | Path) -> str:
    """One paragraph about a run directory, for logs and the quickstart summary."""
    out_dir = Path(out_dir)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r for r in lines if "val_loss" in r]
    last = lines[-1]
    text = f"step {last['step']}: train loss {last['loss']:.3f}"
    if vals:
        text += f", val loss {vals[-1]['val_loss']:.3f} (perplexity {vals[-1]['val_ppl']:.1f})"
    return text
