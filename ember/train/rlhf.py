"""The PPO loop: rollout -> score -> advantages -> PPO epochs, with logs, plots and resume.

The math lives in `ember.train.ppo`; this file holds the state (policy + value head,
frozen reference, optimizer, KL controller) and the run directory: `metrics.jsonl` (one
line per iteration: mean reward, KL, entropy, clip fraction, losses), `ppo.png`,
`checkpoint/` (the shared loop's format plus `value_head.safetensors`) and, at the end,
`model/` (the policy, HF layout) with `value_head.safetensors` beside it.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ember.checkpoint import save_pretrained
from ember.device import pick_device
from ember.engine import LLM
from ember.errors import EmberError
from ember.load import load_model, load_tokenizer
from ember.model import CausalLM
from ember.plot import plot_rl_curves, read_metrics
from ember.train.dpo import batch_indices, split_pairs
from ember.train.examples import end_of_turn_id
from ember.train.loop import (TrainConfig, find_checkpoint, learning_rate, load_checkpoint, make_optimizer,
                              save_checkpoint)
from ember.train.ppo import (AdaptiveKL, PolicyWithValue, PPOConfig, RewardFn, encode_prompt, entropy_from_logits,
                             gae, kl_penalized_rewards, load_prompts, masked_mean, masked_whiten, penalize_unfinished,
                             policy_loss, reward_model_fn, rollout, rule_reward, value_loss)
from ember.train.preference import token_logps
from ember.train.reward import load_reward_model

VALUE_HEAD = "value_head.safetensors"
Scorer = Callable[[Any, Tensor, Tensor], Tensor]  # (rollout, ids, last_index) -> scores [B]


def _train_config(cfg: PPOConfig) -> Any:
    # Constant lr after no warmup; no weight decay (PPO fine-tunes from a good policy).
    return TrainConfig(max_steps=cfg.iterations, lr=cfg.lr, warmup_steps=0, schedule="constant",
                       weight_decay=0.0, beta2=0.999, grad_clip=cfg.grad_clip, seed=cfg.seed)


def text_scorer(fn: RewardFn, prompts_text: Sequence[str]) -> Scorer:
    def score(ro: Any, ids: Tensor, last_index: Tensor) -> Tensor:
        return torch.tensor(fn(list(prompts_text), ro.replies), dtype=torch.float32)
    return score


@torch.no_grad()
def _score_rollout(model: PolicyWithValue, ref: CausalLM, ro: Any, scores: Tensor, kl_coef: float,
                   cfg: PPOConfig) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    ids, mask = ro.input_ids.to(device), ro.mask.to(device)
    model.eval()
    logits, values = model(ids)
    logprobs = token_logps(logits, ids)
    ref_logprobs = token_logps(ref(ids), ids)
    values = values[:, :-1] * mask
    rewards, kl = kl_penalized_rewards(scores.to(device), logprobs, ref_logprobs, mask, kl_coef)
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    entropy = masked_mean(entropy_from_logits(logits[:, :-1]), mask)
    return {"ids": ids, "mask": mask, "logprobs": logprobs, "values": values, "adv": adv, "returns": returns,
            "kl": kl.sum(-1), "entropy": entropy}


def ppo_update(model: PolicyWithValue, optimizer: torch.optim.Optimizer, data: dict[str, Tensor], cfg: PPOConfig,
               generator: torch.Generator) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled minibatches; returns the means of the update statistics."""
    model.train()
    B = data["ids"].shape[0]
    stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "vf_clipfrac": [],
                                     "approx_kl": []}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator).tolist()
        for i in range(0, B, cfg.minibatch):
            idx = torch.tensor(order[i:i + cfg.minibatch], device=data["ids"].device)
            mb = {k: v[idx] for k, v in data.items() if v.dim() > 0 and v.shape[0] == B}
            logits, values = model(mb["ids"])
            logprobs = token_logps(logits, mb["ids"])
            pg, clipfrac, approx_kl = policy_loss(logprobs, mb["logprobs"], mb["adv"], mb["mask"], cfg.cliprange)
            vf, vf_clip = value_loss(values[:, :-1], mb["values"], mb["returns"], mb["mask"], cfg.cliprange_value)
            loss = pg + cfg.vf_coef * vf
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            for k, v in (("pg_loss", pg), ("vf_loss", vf), ("clipfrac", clipfrac), ("vf_clipfrac", vf_clip),
                         ("approx_kl", approx_kl)):
                stats[k].append(float(v.detach()))
    model.eval()
    return {k: sum(v) / len(v) for k, v in stats.items()}


@torch.no_grad()
def evaluate_policy(model: PolicyWithValue, ref: CausalLM, llm: Any, tok: Any, prompt_ids: Sequence[list[int]],
                    scorer_for: Callable[[Sequence[int]], Scorer], cfg: PPOConfig, seed: int,
                    stop_id: int | None = None) -> dict[str, float]:
    """Mean score and KL to the reference of sampled replies to held-out prompts (fixed seeds)."""
    idx = list(range(len(prompt_ids)))
    ro = rollout(llm, tok, [prompt_ids[i] for i in idx], cfg, seed, stop_id)
    scores = scorer_for(idx)(ro, ro.input_ids, ro.last_index)
    device = next(model.parameters()).device
    ids, mask = ro.input_ids.to(device), ro.mask.to(device)
    kl = ((token_logps(model.policy(ids), ids) - token_logps(ref(ids), ids)) * mask).sum(-1)
    return {"eval/reward": float(scores.mean()), "eval/kl": float(kl.mean()),
            "eval/ended": float(ro.ended.float().mean())}


def plot_ppo(out_dir: str | Path) -> Path:
    """reward, KL, entropy and clip fraction per iteration, as `ppo.png`."""
    everything = read_metrics(out_dir)
    records = [r for r in everything if "reward" in r]
    held_out = [r for r in everything if "eval/reward" in r]  # includes the step-0 evaluation
    panels = [("reward", "mean reward (rollouts)"), ("kl", "KL to reference (per reply)"),
              ("entropy", "entropy (nats/token)"), ("clipfrac", "clip fraction")]
    return plot_rl_curves(records, held_out, panels, "iteration", Path(out_dir) / "ppo.png")


def ppo_train(policy: CausalLM, tok: Any, prompts: Sequence[str | list[dict]], out_dir: str | Path, cfg: PPOConfig,
              reward_fn: RewardFn | None = None, reward_model: Callable[[Tensor, Tensor], Tensor] | None = None,
              eval_prompts: Sequence = (), chat: bool | None = None, resume: bool = False,
              progress: bool = True, train_cfg: Any = None) -> dict[str, Any]:
    """Run PPO from `policy` (which is trained in place); returns the last iteration's metrics.
    `train_cfg` (a TrainConfig) sets the optimizer and learning-rate schedule; by default, one made from `cfg`."""
    if (reward_fn is None) == (reward_model is None):
        raise EmberError("Give exactly one reward: a reward model or a rule.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chat = tok.chat_template is not None if chat is None else chat
    stop_id = end_of_turn_id(tok) if chat else None  # a chat reply ends at end-of-turn, not at EOS
    prompt_ids = [encode_prompt(tok, p, chat) for p in prompts]
    eval_ids = [encode_prompt(tok, p, chat) for p in eval_prompts]
    texts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
    eval_texts = [p if isinstance(p, str) else json.dumps(p) for p in eval_prompts]

    def scorer_for(pool: Sequence[str]) -> Callable[[Sequence[int]], Scorer]:
        def make(idx: Sequence[int]) -> Scorer:
            if reward_fn is not None:
                base = text_scorer(reward_fn, [pool[i] for i in idx])
            else:
                base = lambda ro, ids, last: reward_model(ids, last)  # noqa: E731
            # Every score, training and held-out, pays the same penalty for a cut-off reply.
            return lambda ro, ids, last: penalize_unfinished(base(ro, ids, last), ro.ended, cfg.missing_eos_penalty)
        return make

    torch.manual_seed(cfg.seed)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    model = PolicyWithValue(policy)
    tcfg = train_cfg if train_cfg is not None else _train_config(cfg)
    optimizer = make_optimizer(model, tcfg)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    metrics_path = out_dir / "metrics.jsonl"
    start, elapsed_before = 0, 0.0
    if resume:
        state = load_checkpoint(out_dir, policy, optimizer)
        model.value_head.load_state_dict(load_file(str(find_checkpoint(out_dir) / VALUE_HEAD)))
        start, elapsed_before, kl_ctl.coef = state["step"], state.get("elapsed_s", 0.0), state["kl_coef"]
        if metrics_path.exists():
            keep = [x for x in metrics_path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= start]
            metrics_path.write_text("".join(x + "\n" for x in keep))
    elif metrics_path.exists():
        metrics_path.unlink()

    longest = max(len(p) for p in prompt_ids + eval_ids) + cfg.max_new_tokens
    llm = LLM(policy, tokenizer=tok, enable_prefix_caching=False, block_size=16,
              num_kv_blocks=max(cfg.rollout_batch, len(eval_ids)) * (-(-longest // 16) + 1),
              max_num_seqs=max(cfg.rollout_batch, len(eval_ids), 1))
    t0 = time.time()

    def checkpoint(step: int) -> None:
        def extra(d: Path) -> None:
            tok.save(d)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
                      str(d / VALUE_HEAD))
        save_checkpoint(out_dir, policy, optimizer, step, tcfg,
                        {"kl_coef": kl_ctl.coef, "ppo_config": asdict(cfg), "elapsed_s": elapsed_before + time.time() - t0},
                        extra)

    def log(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    record: dict[str, Any] = {"step": start}
    if eval_ids and start == 0:
        record.update(evaluate_policy(model, ref, llm, tok, eval_ids, scorer_for(eval_texts), cfg, seed=10 ** 9,
                                      stop_id=stop_id))
        log(record)
    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress, unit="it", dynamic_ncols=True)
    for it in range(start, cfg.iterations):
        lr = learning_rate(it, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(len(prompt_ids), cfg.rollout_batch, it, cfg.seed)
        ro = rollout(llm, tok, [prompt_ids[i] for i in idx], cfg, seed=cfg.seed * 7919 + it * cfg.rollout_batch,
                     stop_id=stop_id)
        scores = scorer_for(texts)(idx)(ro, ro.input_ids, ro.last_index)
        data = _score_rollout(model, ref, ro, scores, kl_ctl.coef, cfg)
        gen = torch.Generator().manual_seed(cfg.seed + it)
        stats = ppo_update(model, optimizer, {k: v for k, v in data.items() if k not in ("kl", "entropy")}, cfg, gen)
        kl = float(data["kl"].mean())
        record = {"step": it + 1, "reward": float(scores.mean()), "kl": kl, "entropy": float(data["entropy"]),
                  "ended": float(ro.ended.float().mean()),
                  "kl_coef": kl_ctl.coef, "reply_tokens": float(data["mask"].sum(-1).float().mean()), "lr": lr,
                  **stats, "elapsed_s": elapsed_before + time.time() - t0}
        kl_ctl.update(kl, cfg.rollout_batch)
        final = it + 1 == cfg.iterations
        if eval_ids and (final or (cfg.eval_every and (it + 1) % cfg.eval_every == 0)):
            record.update(evaluate_policy(model, ref, llm, tok, eval_ids, scorer_for(eval_texts), cfg, seed=10 ** 9,
                                      stop_id=stop_id))
        log(record)
        bar.set_postfix({k: f"{record[k]:.3g}" for k in ("reward", "kl", "clipfrac")})
        bar.update(1)
        if not final and cfg.save_every and (it + 1) % cfg.save_every == 0:
            checkpoint(it + 1)
    bar.close()
    checkpoint(cfg.iterations)
    plot_ppo(out_dir)
    return record


def run_ppo(policy_dir: str | Path, prompts_file: str | Path, out_dir: str | Path, cfg: PPOConfig,
            reward_model_dir: str | Path | None = None, reward_rule: str | None = None,
            eval_fraction: float = 0.1, chat: bool | None = None, device: str | None = None,
            resume: bool = False, progress: bool = True, train_cfg: Any = None) -> dict[str, Any]:
    """`ember ppo`: policy dir + prompts + (reward model | rule) -> OUT/model and curves."""
    dev = pick_device(device)
    tok = load_tokenizer(policy_dir)
    policy = load_model(policy_dir, device=str(dev), dtype=torch.float32, keep_blocks=False)
    prompts = load_prompts(prompts_file)
    train_p, eval_p = split_pairs(prompts, eval_fraction, cfg.seed)
    reward_fn, rm = None, None
    if reward_model_dir is not None:
        rm_model = load_reward_model(reward_model_dir, device=str(dev), dtype=torch.float32)
        rm = reward_model_fn(rm_model, tok, load_tokenizer(reward_model_dir))
    elif reward_rule is not None:
        reward_fn = rule_reward(reward_rule)
    else:
        raise EmberError("Give --reward-model DIR or --reward rule:NAME.")
    print(f"PPO: {len(train_p)} training prompts, {len(eval_p)} held out; kl_coef {cfg.kl_coef}"
          + (f", target KL {cfg.target_kl}" if cfg.target_kl else ""))
    last = ppo_train(policy, tok, train_p, out_dir, cfg, reward_fn=reward_fn, reward_model=rm, eval_prompts=eval_p,
                     chat=chat, resume=resume, progress=progress, train_cfg=train_cfg)
    save_pretrained(policy, tok, Path(out_dir) / "model")
    return last
