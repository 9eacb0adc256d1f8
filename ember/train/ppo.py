"""RLHF with PPO (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022).

Each iteration: sample replies to a batch of prompts with the engine, score them (a reward
model or a rule), turn the score into per-token rewards with a KL penalty to the frozen
reference (-kl_coef * (log pi - log ref) on every reply token, the score added on the last),
estimate advantages with GAE (gamma, lambda), then take several PPO epochs over
minibatches with the clipped policy objective and the clipped value objective. The value
head shares the policy's trunk (one forward gives logits and values). With `target_kl`
the KL coefficient adapts (Ziegler et al.'s proportional controller) so the KL to the
reference stays near the bound.

Rollouts use `ember.LLM` built once over the policy object itself: the engine reads the
live weights on every step, so the optimizer's in-place updates are what it samples from;
prefix caching is off because cached KV blocks would hold keys from older weights.
This loop is rollout -> update, not the shared loop's batch -> step, so it lives here but
reuses the shared optimizer, learning-rate schedule and checkpoint helpers.

The tensor math is in pure functions below (`gae`, `policy_loss`, `value_loss`, ...),
over arrays aligned with next-token predictions: index t of a row is the prediction of
token t+1, and `mask` marks the positions that predict reply tokens.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ember.errors import EmberError
from ember.files import read_jsonl
from ember.model import CausalLM
from ember.sampling import SamplingParams

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class PPOConfig:
    iterations: int = field(default=100, metadata={"help": "rollout + update rounds"})
    rollout_batch: int = field(default=16, metadata={"help": "prompts per rollout"})
    minibatch: int = field(default=8, metadata={"help": "sequences per gradient step"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    max_new_tokens: int = field(default=32, metadata={"help": "reply tokens per rollout at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate"})
    kl_coef: float = field(default=0.05, metadata={"help": "initial per-token KL penalty to the starting policy"})
    target_kl: float | None = field(default=None, metadata={
        "help": "adapt the KL penalty to keep the per-reply KL near this (default: none, a fixed penalty)"})
    kl_horizon: int = field(default=10_000, metadata={"help": "rollouts over which the adaptive KL penalty moves"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages within a rollout"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    # A reward model never saw cut-off replies, so without this the policy can learn to ramble
    # into the cut (TRL's `missing_eos_penalty`).
    missing_eos_penalty: float = field(default=0.0, metadata={
        "help": "subtract this from the score of a reply cut off at --max-new-tokens without ending its turn "
                "(1.0 is a common choice with a reward model)"})
    save_every: int = field(default=0, metadata={"help": "iterations between checkpoints (0 = only at the end)"})
    eval_every: int = field(default=0, metadata={
        "help": "iterations between held-out evaluations (0 = start and end only)"})
    seed: int = field(default=1337, metadata={"help": "seed for rollouts, minibatch order and the prompt split"})

    def __post_init__(self) -> None:
        for name in ("iterations", "rollout_batch", "minibatch", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise EmberError(f"{name} must be at least 1.")
        if self.kl_coef < 0 or self.lr <= 0 or self.temperature <= 0:
            raise EmberError("kl_coef must be >= 0, and lr and temperature positive.")
        if self.target_kl is not None and self.target_kl <= 0:
            raise EmberError("target_kl must be positive.")
        if self.missing_eos_penalty < 0:
            raise EmberError("missing_eos_penalty must be >= 0 (it is subtracted from the score).")


# --- pure functions ------------------------------------------------------------------------
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + 1e-8)) * mask


def kl_penalized_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards [B, T] (-kl_coef * KL estimate, plus the score on each row's last
    masked position) and the per-token KL estimate log pi - log ref."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over masked positions.

    A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, with
    V and A beyond a row's last masked position taken as 0 (the episode ends there).
    Returns advantages and the value targets A + V, both 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * next_mask * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate, max(-A r, -A clip(r, 1-eps, 1+eps)), its clip fraction, approx KL."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float) -> tuple[Tensor, Tensor]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), and how often the clipped term wins."""
    clipped_v = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    a, b = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask), masked_mean((b > a).float(), mask).detach()


def entropy_from_logits(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKL:
    """kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al.)."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.coef *= 1 + error * n_steps / self.horizon


# --- models ----------------------------------------------------------------------------------
class PolicyWithValue(nn.Module):
    """The policy LM and a scalar value head on its final hidden states."""

    def __init__(self, policy: CausalLM) -> None:
        super().__init__()
        self.policy = policy
        w = policy.lm_head.weight
        self.value_head = nn.Linear(policy.config.hidden_size, 1, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        h = self.policy.hidden_states(input_ids)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()


# --- rewards ---------------------------------------------------------------------------------
def rule_reward(spec: str) -> RewardFn:
    """A rule reward by name: `char=SET` (share of reply characters in SET), `contains=TEXT`
    (1 if the reply contains TEXT), `concise` (1 / (1 + words)), or `python=module:function`
    (your callable taking lists of prompts and replies)."""
    name, _, arg = spec.partition("=")
    if name == "char" and arg:
        chars = set(arg)
        return lambda prompts, replies: [sum(c in chars for c in r) / max(1, len(r)) for r in replies]
    if name == "contains" and arg:
        return lambda prompts, replies: [float(arg in r) for r in replies]
    if name == "concise":
        return lambda prompts, replies: [1.0 / (1 + len(r.split())) for r in replies]
    if name == "python" and ":" in arg:
        module, _, fn = arg.partition(":")
        try:
            return getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise EmberError(f"Cannot load reward function {arg}: {e}.") from None
    raise EmberError(f"Unknown reward rule '{spec}'; use char=SET, contains=TEXT, concise or python=module:function.")


def reward_model_fn(rm: nn.Module, policy_tok: Any, rm_tok: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """Scores from a reward model over the policy's own token ids (so tokenizers must agree)."""
    if policy_tok.engine.get_vocab() != rm_tok.engine.get_vocab():
        raise EmberError("The reward model's tokenizer differs from the policy's; train the reward model on "
                         "the same base.")

    device = next(rm.parameters()).device

    @torch.no_grad()
    def score(ids: Tensor, last_index: Tensor) -> Tensor:
        return rm(ids.to(device), last_index.to(device)).float().cpu()
    return score


# --- rollouts ---------------------------------------------------------------------------------
def encode_prompt(tok: Any, prompt: str | list[dict], chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt, str):
        raise EmberError("Message-list prompts need the chat template; drop --raw-prompts.")
    return tok.encode(prompt, add_bos=bool(getattr(tok, "add_bos_token", False)))


def load_prompts(path: str | Path) -> list[str | list[dict]]:
    """JSONL rows with a 'prompt' (string or messages), or plain text with one prompt a line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        if not path.is_file():
            raise EmberError(f"Prompt file {path} does not exist.")
        out: list[str | list[dict]] = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        out = []
        for n, row in read_jsonl(path, "Prompt file"):
            if not isinstance(row, dict) or "prompt" not in row:
                raise EmberError(f"{path} line {n} has no 'prompt' field.")
            if not isinstance(row["prompt"], (str, list)):
                raise EmberError(f"{path} line {n}: field 'prompt' must be a string or a list of messages.")
            out.append(row["prompt"])
    if not out:
        raise EmberError(f"Prompt file {path} has no prompts.")
    return out


@dataclass
class Rollout:
    input_ids: Tensor  # [B, L] prompt + reply, right-padded
    mask: Tensor  # [B, L-1] True where position t predicts a reply token
    last_index: Tensor  # [B] index of each row's last real token
    replies: list[str]
    ended: Tensor  # [B] True where the reply ended its turn (EOS or a stop token) before max_new_tokens


def penalize_unfinished(scores: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """Scores minus `penalty` for each reply that was cut off instead of ending."""
    return scores - penalty * (~ended).to(scores.dtype) if penalty else scores


def rollout(llm: Any, tok: Any, prompt_ids: Sequence[list[int]], cfg: PPOConfig, seed: int,
            stop_id: int | None = None) -> Rollout:
    """Sample one reply per prompt; a reply that ended keeps its stop token (the policy learns to stop).

    `stop_id` is the token that ends a reply: the chat template's end-of-turn for chat prompts
    (then EOS alone does not stop), EOS by default."""
    eos = tok.eos_id if tok.eos_id is not None else llm.model.config.eos_token_id
    stop = eos if stop_id is None else stop_id
    params = [SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, seed=seed + i,
                             stop_token_ids=[] if stop is None else [stop], ignore_eos=stop_id is not None)
              for i in range(len(prompt_ids))]
    outs = llm.generate(list(prompt_ids), params)
    seqs, starts, replies, ended = [], [], [], []
    for p, out in zip(prompt_ids, outs):
        c = out.outputs[0]
        ended.append(c.finish_reason == "stop")
        reply = list(c.token_ids) + ([stop] if c.finish_reason == "stop" and stop is not None else [])
        if not reply:  # an empty reply still needs one scored position
            reply = [stop if stop is not None else 0]
        seqs.append(list(p) + reply)
        starts.append(len(p))
        replies.append(tok.decode(c.token_ids))
    L = max(len(s) for s in seqs)
    pad = tok.pad_id if tok.pad_id is not None else 0
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L - 1), dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, st - 1:len(s) - 1] = True
    return Rollout(ids, mask, torch.tensor([len(s) - 1 for s in seqs]), replies, torch.tensor(ended))
