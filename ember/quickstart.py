"""`ember quickstart`: the whole pipeline, start to finish, within a time budget.

corpus (this interpreter's standard library) -> BPE tokenizer -> token shards ->
pretraining (the step count fitted to the time left) -> loss, perplexity, samples ->
an HF-layout checkpoint, and the commands to try next.

A short budget on a slow or busy machine never refuses to start: it trains a smaller run
(fewer sequences per step, then shorter ones) and says so.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.config import preset
from ember.data import TokenShards, prepare_shards, read_text, stdlib_files
from ember.device import pick_device
from ember.errors import EmberError
from ember.generation import generate
from ember.load import load_model
from ember.model import CausalLM
from ember.plot import plot_run
from ember.sampling import SamplingParams
from ember.tokenizer import load_tokenizer, train_tokenizer
from ember.train.loop import TrainConfig, lm_loss, make_optimizer
from ember.train.pretrain import model_config_for, pretrain

SAMPLE_PROMPTS = ["def ", "import os\n\n\nclass ", "    for i in range("]
MIN_STEPS = 10  # fewer, and a run is mostly warm-up: below this the run is made smaller
SMALLEST_BLOCK = 64  # tokens per sequence a smaller run keeps (shorter sequences teach little)
EVAL_BATCHES = 10  # validation batches per evaluation


def _say(msg: str) -> None:
    print(msg, flush=True)


def measure_step_time(model: CausalLM, cfg: TrainConfig, data: TokenShards, device: torch.device) -> float:
    """Seconds per optimizer step, from two timed steps after a warm-up (on a throwaway copy)."""
    probe = copy.deepcopy(model).train()
    opt = make_optimizer(probe, cfg)
    times = []
    for i in range(3):
        t = time.perf_counter()
        for micro in range(cfg.grad_accum):
            x, y = data.get_batch("train", cfg.batch_size, cfg.block_size, step=i, micro_step=micro, seed=cfg.seed)
            loss, n = lm_loss(probe(x.to(device)), y.to(device))
            (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    del probe, opt
    return sum(times[1:]) / 2


@dataclass(frozen=True)
class Plan:
    """The shape and length of the pretraining run that fits the time left."""
    batch_size: int
    block_size: int
    steps: int  # estimated: the lr schedule follows the clock, so the run ends on time regardless
    step_time: float  # estimated seconds per step at this shape
    requested_steps: int  # the steps the requested shape would have had


def plan_training(step_time: float, train_time: float, batch_size: int, block_size: int, evals: int) -> Plan:
    """The run that fits `train_time` seconds, given `step_time` measured at `batch_size` x `block_size`.

    The requested shape if it leaves MIN_STEPS steps; else a smaller one, halving the batch first (down
    to one sequence), then the block (down to SMALLEST_BLOCK), taking a step's time to scale with its
    tokens; at the smallest shape, the steps that fit, and never fewer than one.
    """
    def steps_at(b: int, t: int) -> tuple[int, float]:
        st = step_time * (b * t) / (batch_size * block_size)
        eval_cost = 0.35 * st * EVAL_BATCHES  # an evaluation batch runs forward only
        return int((train_time - evals * eval_cost) / (st * 1.05)), st  # 5% for logging and checkpoints

    b, t = batch_size, block_size
    requested, st = steps_at(b, t)
    steps = requested
    while steps < MIN_STEPS and (b > 1 or t > SMALLEST_BLOCK):
        if b > 1:
            b = max(1, b // 2)
        else:
            t = max(SMALLEST_BLOCK, t // 2)
        steps, st = steps_at(b, t)
    return Plan(batch_size=b, block_size=t, steps=max(1, steps), step_time=st, requested_steps=max(0, requested))


def quickstart(minutes: float = 10.0, out: str | Path = "runs/quickstart", preset_name: str = "small",
               vocab_size: int = 4096, corpus_mb: float = 12.0, device: str | None = None,
               seed: int = 1337, batch_size: int = 8, block_size: int = 256, lr: float = 2e-3) -> dict:
    if minutes <= 0:
        raise EmberError("--minutes must be positive.")
    t0 = time.time()
    budget = minutes * 60
    out = Path(out)
    dev = pick_device(device)
    threads = torch.get_num_threads()
    _say(f"Ember quickstart: {minutes:g} min budget on {dev} ({threads} threads), torch {torch.__version__}, "
         f"Python {platform.python_version()}; writing to {out}")

    # 1. corpus
    files = stdlib_files(max_bytes=int(corpus_mb * 1e6))
    mb = sum(f.stat().st_size for f in files) / 1e6
    _say(f"[1/5] corpus: {len(files)} files, {mb:.1f} MB of Python from the standard library")

    # 2. tokenizer
    t = time.time()
    tok = train_tokenizer((read_text(f) for f in files), vocab_size=vocab_size, pattern="llama3")
    tok.save(out / "tokenizer")
    sample = "def __init__(self, name):\n    self.name = name"
    n = len(tok.encode(sample))
    _say(f"[2/5] tokenizer: {tok.vocab_size} tokens trained in {time.time() - t:.0f}s "
         f"({len(sample) / n:.2f} chars/token on {sample!r})")

    # 3. shards
    t = time.time()
    meta = prepare_shards([str(f) for f in files], tok, out / "data", val_fraction=0.02, progress=False)
    _say(f"[3/5] data: {meta['num_tokens']['train']:,} train / {meta['num_tokens']['val']:,} validation "
         f"tokens in {time.time() - t:.0f}s")

    # 4. pretraining, with the number of steps fitted to the time left
    data = TokenShards(out / "data")
    torch.manual_seed(seed)
    cfg = TrainConfig(batch_size=batch_size, block_size=block_size, lr=lr, seed=seed, warmup_steps=1)
    model_cfg = model_config_for(preset(preset_name), tok, block_size)
    model = CausalLM(model_cfg).to(dev)
    step_time = measure_step_time(model, cfg, data, dev)
    reserve = 12 + 0.02 * budget  # final evaluation, checkpoint and samples
    train_time = budget - (time.time() - t0) - reserve
    evals = 5 if budget >= 300 else 2
    plan = plan_training(step_time, train_time, batch_size, block_size, evals)
    steps = plan.steps
    train_time = max(train_time, steps * plan.step_time)  # a spent budget still trains the planned steps
    # The lr schedule follows the clock, so the run ends on time with a fully decayed learning rate
    # even when the machine is slower than measured.
    cfg = TrainConfig(max_steps=int(steps * 1.5), batch_size=plan.batch_size, block_size=plan.block_size,
                      lr=lr, seed=seed, warmup_steps=max(1, min(5, steps // 2), steps // 20),
                      eval_every=max(1, steps // evals), save_every=max(1, steps // 4),
                      log_every=max(1, steps // 100), time_budget_s=train_time, schedule_by_time=True)
    _say(f"[4/5] pretraining a {model.num_parameters() / 1e6:.1f}M-parameter {model_cfg.model_type} "
         f"({model_cfg.num_hidden_layers} layers, width {model_cfg.hidden_size}) for {train_time / 60:.1f} min, "
         f"about {steps} steps of {plan.batch_size}x{plan.block_size} tokens ({plan.step_time:.2f}s/step)")
    if (plan.batch_size, plan.block_size) != (batch_size, block_size):
        _say(f"      at {step_time:.2f}s per step of {batch_size}x{block_size} tokens, {minutes:g} minutes leave time "
             f"for only {plan.requested_steps} steps on this machine now: training a smaller run of "
             f"{plan.batch_size}x{plan.block_size} tokens per step instead")
    if steps < MIN_STEPS:
        _say(f"      only about {steps} step{'s' if steps > 1 else ''} fit: expect a rough model; "
             "a larger --minutes trains a better one")
    del model
    last = pretrain(out / "data", out, model_cfg, cfg, device=str(dev), eval_batches=EVAL_BATCHES)

    # 5. results and samples
    png = plot_run(out)
    val = last.get("val_loss", float("nan"))
    _say(f"[5/5] done in {(time.time() - t0) / 60:.1f} min: train loss {last['loss']:.3f}, "
         f"validation loss {val:.3f} (perplexity {math.exp(val):.1f}, "
         f"{val / math.log(2):.2f} bits/token); curves in {png}")
    model = load_model(out / "model", device=str(dev))
    tok = load_tokenizer(out / "model")
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        text = generate(model, tok, prompt, SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, seed=seed + i))
        _say(f"\n--- sample {i + 1} " + "-" * 50 + f"\n{prompt}{text}")
    m = out / "model"
    _say("\nNext:\n"
         f"  ember generate --model {m} --prompt 'def fibonacci(n):' --temperature 0.7\n"
         f"  ember tokens --tokenizer {m} 'for i in range(10):'\n"
         f"  ember plot {out}\n"
         f"  ember pretrain --preset {preset_name} --data {out / 'data'} --out {out}-long --max-steps 5000\n"
         f"  python -c \"import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('{m}')\"")
    return last
