"""Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath §4.1).

For each prompt, G replies are sampled from the current policy and scored (rule rewards
such as a checked answer or a format, a reward model, or a weighted sum of several). A
reply's advantage is its reward standardised within its group,

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)          (scale_rewards="group")

(std with Bessel's correction; "batch" divides by the std of the whole step instead, "none"
does not divide, as Dr. GRPO recommends), and every reply token gets its reply's advantage:
there is no value model. With rho_t = pi(y_t | ...) / pi_old(y_t | ...) the per-token loss is

    -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta * k3_t,
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

(Schulman's k3 estimator of KL(pi || ref), always >= 0). It is aggregated over the reply
tokens as `loss_type` says: "grpo" (the paper: mean over each reply's tokens, then over
replies), "bnpo" (over the micro-batch's tokens), "dapo" (over the whole step's tokens) or
"dr_grpo" (sum over tokens / (replies x max_new_tokens)); these are TRL's names and
definitions. The same batch of replies serves `num_iterations` (mu) optimizer steps; pi_old
is the policy that sampled them (its log-probs are kept from sampling time), so with mu = 1
the ratio is 1 and only its gradient matters. Log-probs are of the sampling distribution
(logits / temperature), as TRL computes them.

Replies come from `ember.LLM` built once over the policy object (as PPO's rollouts do): the
engine reads the live weights, so it always samples from the current policy. Training runs
on the shared loop (`ember.train.loop.train`): a step's batch is a group of replies, its
micro-batches are the loop's gradient accumulation, and the loop brings the optimizer,
schedule, clipping, metrics.jsonl, checkpoints and exact resume. The replies of the current
batch (and their old and reference log-probs) are saved beside each checkpoint, so a run
resumed in the middle of its mu updates continues on the same replies.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ember.checkpoint import save_pretrained
from ember.device import pick_device
from ember.engine import LLM
from ember.errors import EmberError
from ember.files import read_jsonl, write_json
from ember.load import load_model, load_tokenizer
from ember.plot import plot_rl_curves, read_metrics
from ember.train.dpo import batch_indices, split_pairs
from ember.train.examples import end_of_turn_id
from ember.train.loop import TrainConfig, find_checkpoint, train
from ember.train.ppo import (Rollout, encode_prompt, entropy_from_logits, load_prompts, penalize_unfinished,
                             reward_model_fn, rollout, rule_reward)
from ember.train.preference import token_logps
from ember.train.reward import load_reward_model

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's constant in the advantage's denominator (a group with equal rewards gets A = 0)
ROLLOUT_FILE = "grpo_rollout.safetensors"  # the current batch of replies, beside each checkpoint
EVAL_START = "eval_start.json"  # the held-out evaluation before the first step


@dataclass
class GRPOConfig:
    num_generations: int = field(default=8, metadata={
        "help": "replies sampled per prompt (G); a step's replies (--batch-size x --grad-accum) must be a "
                "multiple of it"})
    max_new_tokens: int = field(default=32, metadata={"help": "reply tokens per sample at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the replies"})
    beta: float = field(default=0.04, metadata={
        "help": "weight of the per-token KL penalty to the starting policy (k3 estimator); DeepSeekMath uses "
                "0.04, TRL defaults to 0 (no reference model)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip the probability ratio to [1 - epsilon, ...]"})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28; default: epsilon)"})
    num_iterations: int = field(default=1, metadata={
        "help": "optimizer steps on each batch of replies (mu); above 1 the ratio to the sampling policy "
                "moves and clipping bites"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={
        "help": "advantage = (reward - group mean) divided by the group's std (group: the paper, TRL's "
                "default), the whole step's std (batch), or not divided (none: Dr. GRPO)"})
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = field(default="grpo", metadata={
        "help": "token aggregation: grpo = mean per reply then over replies (the paper); bnpo = mean over "
                "the micro-batch's tokens; dapo = over the step's tokens (TRL's default); dr_grpo = "
                "sum / (replies x max_new_tokens)"})
    kl_importance_weight: bool = field(default=False, metadata={
        "help": "multiply the KL term by the ratio pi/pi_old (DeepSeek-V3.2's unbiased KL gradient; TRL's "
                "use_bias_correction_kl, on by default there; off in the GRPO paper)"})
    missing_eos_penalty: float = field(default=0.0, metadata={
        "help": "subtract this from the reward of a reply cut off at --max-new-tokens"})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "leave replies cut off at --max-new-tokens out of the loss (DAPO)"})
    reward_weights: list[float] = field(default_factory=list, metadata={
        "help": "weight of each reward, in the order given (rules, then the reward model); default 1 each",
        "flag": "--reward-weight", "metavar": "W"})

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise EmberError("num_generations must be at least 2: advantages compare replies within a group.")
        for name in ("max_new_tokens", "num_iterations"):
            if getattr(self, name) < 1:
                raise EmberError(f"{name} must be at least 1.")
        if self.temperature <= 0:
            raise EmberError("temperature must be positive (GRPO needs varied samples).")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise EmberError("beta must be >= 0, and epsilon and epsilon_high positive.")
        if self.loss_type not in LOSS_TYPES:
            raise EmberError(f"Unknown GRPO loss '{self.loss_type}'; choose one of {', '.join(LOSS_TYPES)}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise EmberError(f"Unknown reward scaling '{self.scale_rewards}'; choose one of {', '.join(SCALE_REWARDS)}.")
        if self.missing_eos_penalty < 0:
            raise EmberError("missing_eos_penalty must be >= 0 (it is subtracted from the reward).")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# --- the math ------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> Tensor:
    """Advantages [N] of rewards [N] laid out as consecutive groups of `group_size` replies."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1) if scale == "group" else rewards.std()
    return centred / (std + STD_EPS)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """exp(ref - logp) - (ref - logp) - 1 per token: an unbiased, non-negative estimate of KL(pi || ref)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def per_token_loss(logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, advantages: Tensor,
                   cfg: GRPOConfig) -> tuple[Tensor, Tensor | None, Tensor]:
    """The clipped objective plus beta * KL per token [B, T], the KL term [B, T] (None when beta is 0;
    times the ratio with `kl_importance_weight`), and where clipping zeroes the gradient (the ratio
    past the clip on the side the advantage pushes it)."""
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.clip_high)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    kl = None
    if cfg.beta != 0:
        kl = k3_kl(logps, ref_logps)
        if cfg.kl_importance_weight:  # the replies came from pi_old: reweighted, k3 estimates KL(pi || ref)
            kl = kl * ratio
        loss = loss + cfg.beta * kl
    clipped = ((ratio < 1 - cfg.epsilon) & (adv < 0)) | ((ratio > 1 + cfg.clip_high) & (adv > 0))
    return loss, kl, clipped


def denominator(mask: Tensor, loss_type: str, max_new_tokens: int) -> int:
    """What the loop divides a step's summed loss by, for one micro-batch (summed over the step)."""
    if loss_type == "grpo":
        return mask.shape[0]  # replies
    if loss_type == "bnpo":
        return 1  # each micro-batch is already a mean over its tokens
    if loss_type == "dapo":
        return int(mask.sum())  # reply tokens
    if loss_type == "dr_grpo":
        return mask.shape[0] * max_new_tokens
    raise EmberError(f"Unknown GRPO loss '{loss_type}'; choose one of {', '.join(LOSS_TYPES)}.")


def aggregate(token_loss: Tensor, mask: Tensor, loss_type: str, max_new_tokens: int) -> tuple[Tensor, int]:
    """(numerator, denominator) of a micro-batch's loss; the loop divides the step's summed
    numerators by its summed denominators, which gives each loss type's definition under
    gradient accumulation (TRL's, with its steps_per_generation equal to grad_accum)."""
    m = mask.to(token_loss.dtype)
    summed = (token_loss * m).sum(-1)  # per reply
    den = denominator(mask, loss_type, max_new_tokens)
    if loss_type == "grpo":
        return (summed / m.sum(-1).clamp(min=1)).sum(), den
    if loss_type == "bnpo":
        return summed.sum() / m.sum().clamp(min=1), den
    return summed.sum(), den


def grpo_loss(logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor,
              cfg: GRPOConfig) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of one batch ([B, T] log-probs of the reply tokens, advantages [B], mask [B, T]),
    with the KL (mean per reply token) and the clip fraction; `old_logps=None` means on-policy."""
    old = logps.detach() if old_logps is None else old_logps
    token_loss, kl, clipped = per_token_loss(logps, old, ref_logps, advantages, cfg)
    num, den = aggregate(token_loss, mask, cfg.loss_type, cfg.max_new_tokens)
    m = mask.to(logps.dtype)
    n = m.sum().clamp(min=1)
    stats = {"clipfrac": float((clipped * m).sum() / n)}
    if kl is not None:
        stats["kl"] = float((kl.detach() * m).sum() / n)
    return num / den, stats


def policy_logps(model: nn.Module, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log pi(token t+1 | tokens <= t) of the sampling distribution [B, T-1] (float32), and the logits."""
    logits = model(ids)
    scaled = logits if temperature == 1.0 else logits / temperature
    return token_logps(scaled, ids), scaled


# --- prompts and rewards ------------------------------------------------------------------------
@dataclass
class PromptRow:
    prompt: str | list[dict]
    answer: str | None = None  # what a checked-answer reward compares against


def load_prompt_rows(path: str | Path) -> list[PromptRow]:
    """JSONL rows with a 'prompt' (string or messages) and an optional 'answer' (what `ember data
    synth --shape prompt` writes), or plain text with one prompt a line (no answers)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [PromptRow(p) for p in load_prompts(path)]
    rows = []
    for n, row in read_jsonl(path, "Prompt file"):
        if not isinstance(row, dict) or "prompt" not in row:
            raise EmberError(f"{path} line {n} has no 'prompt' field.")
        if not isinstance(row["prompt"], (str, list)):
            raise EmberError(f"{path} line {n}: field 'prompt' must be a string or a list of messages.")
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise EmberError(f"{path} line {n}: field 'answer' must be a string or a number.")
        rows.append(PromptRow(row["prompt"], None if answer is None else str(answer)))
    if not rows:
        raise EmberError(f"Prompt file {path} has no prompts.")
    return rows


@dataclass
class Reward:
    """A named reward: `score(prompts, replies, answers, rollout)` -> one float per reply."""
    name: str
    score: Callable[[list[str], list[str], list[str | None], Rollout], Sequence[float] | Tensor]


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answer_matches(reply: str, answer: str) -> bool:
    """A numeric answer matches the last number in the reply (GSM8K's convention); any other
    answer matches the whole reply, stripped of surrounding space and a final full stop."""
    target = _as_number(answer.strip())
    if target is not None:
        found = NUMBER.findall(reply)
        return bool(found) and _as_number(found[-1]) == target
    return reply.strip().removesuffix(".").strip() == answer.strip()


def answer_reward(prompts: list[str], replies: list[str], answers: list[str | None], ro: Any = None) -> list[float]:
    """1 for a reply whose answer checks out against the prompt row's 'answer', else 0."""
    if any(a is None for a in answers):
        raise EmberError("The 'answer' reward needs an 'answer' field on every prompt row "
                         "(`ember data synth --task arithmetic --shape prompt` writes one).")
    return [float(answer_matches(r, a)) for r, a in zip(replies, answers)]


def format_reward(pattern: str) -> Callable[..., list[float]]:
    """1 for a reply that, stripped of surrounding space, matches the regular expression entirely."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise EmberError(f"The format reward's pattern {pattern!r} is not a valid regular expression: {e}.") from None
    return lambda prompts, replies, answers, ro=None: [float(rx.fullmatch(r.strip()) is not None) for r in replies]


def rule(spec: str) -> Reward:
    """A rule reward by name: `answer` (the checked answer), `format=REGEX` (the reply's shape), or
    one of PPO's rules (`char=SET`, `contains=TEXT`, `concise`, `python=module:function`)."""
    spec = spec.removeprefix("rule:")
    name, _, arg = spec.partition("=")
    if name == "answer" and not arg:
        return Reward("answer", answer_reward)
    if name == "format":
        if not arg:
            raise EmberError("The format reward needs a pattern: format=REGEX (e.g. format=-?[0-9]+).")
        return Reward("format", format_reward(arg))
    fn = rule_reward(spec)
    return Reward(name, lambda prompts, replies, answers, ro=None: fn(prompts, replies))


def model_reward(rm: nn.Module, policy_tok: Any, rm_tok: Any) -> Reward:
    """Scores of a reward model (`ember reward-model`) on the sampled token ids."""
    score = reward_model_fn(rm, policy_tok, rm_tok)
    return Reward("reward_model", lambda prompts, replies, answers, ro: score(ro.input_ids, ro.last_index))


# --- the recipe -----------------------------------------------------------------------------------
@dataclass
class Generation:
    """One batch of replies: the tensors the loss needs (on the training device) and its statistics."""
    cycle: int
    tensors: dict[str, Tensor]
    stats: dict[str, float]


def _chunked_logps(model: nn.Module, ids: Tensor, temperature: float, chunk: int) -> Tensor:
    return torch.cat([policy_logps(model, ids[i:i + chunk], temperature)[0] for i in range(0, len(ids), chunk)])


def grpo_train(policy: nn.Module, tok: Any, prompts: Sequence[PromptRow], out_dir: str | Path,
               train_cfg: TrainConfig, cfg: GRPOConfig, rewards: Sequence[Reward],
               eval_prompts: Sequence[PromptRow] = (), chat: bool | None = None, resume: bool = False,
               progress: bool = True) -> dict[str, Any]:
    """Train `policy` (in place) with GRPO on the shared loop; returns the last logged metrics.

    A step takes `train_cfg.batch_size x train_cfg.grad_accum` replies: that many / G prompts,
    G replies each, in micro-batches of `batch_size`."""
    if not rewards:
        raise EmberError("Give at least one reward: a rule (--reward answer, --reward format=REGEX, ...) "
                         "or --reward-model DIR.")
    weights = list(cfg.reward_weights) or [1.0] * len(rewards)
    if len(weights) != len(rewards):
        raise EmberError(f"{len(weights)} reward weights for {len(rewards)} rewards; give one weight per reward.")
    per_step = train_cfg.batch_size * train_cfg.grad_accum
    G = cfg.num_generations
    if per_step % G:
        raise EmberError(f"A step's {per_step} replies (--batch-size {train_cfg.batch_size} x --grad-accum "
                         f"{train_cfg.grad_accum}) do not split into groups of --num-generations {G}.")
    if not prompts:
        raise EmberError("GRPO needs at least one training prompt.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(policy.parameters()).device
    chat = tok.chat_template is not None if chat is None else chat
    stop_id = end_of_turn_id(tok) if chat else None  # a chat reply ends at end-of-turn, not at EOS
    prompt_ids = [encode_prompt(tok, p.prompt, chat) for p in prompts]
    eval_ids = [encode_prompt(tok, p.prompt, chat) for p in eval_prompts]
    text = lambda p: p.prompt if isinstance(p.prompt, str) else json.dumps(p.prompt)  # noqa: E731
    mu, n_prompts = cfg.num_iterations, per_step // G
    weight_t = torch.tensor(weights, dtype=torch.float32)

    torch.manual_seed(train_cfg.seed)
    # The reference: the KL penalty needs it, and so does the held-out KL (even at beta 0).
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta != 0 or eval_ids else None
    longest = max(len(p) for p in prompt_ids + eval_ids) + cfg.max_new_tokens
    seqs = max(per_step, len(eval_ids), 1)
    llm = LLM(policy, tokenizer=tok, enable_prefix_caching=False, block_size=16,
              num_kv_blocks=seqs * (-(-longest // 16) + 1), max_num_seqs=seqs)

    def score(rows: Sequence[PromptRow], ro: Rollout) -> tuple[Tensor, Tensor]:
        texts, answers = [text(p) for p in rows], [p.answer for p in rows]
        per_fn = torch.stack([torch.as_tensor(r.score(texts, ro.replies, answers, ro), dtype=torch.float32).reshape(-1)
                              for r in rewards], dim=1)  # [N, rewards]
        total = penalize_unfinished((per_fn * weight_t).sum(1), ro.ended, cfg.missing_eos_penalty)
        return total, per_fn

    @torch.no_grad()
    def generate(cycle: int) -> Generation:
        was_training = policy.training
        policy.eval()
        idx = batch_indices(len(prompt_ids), n_prompts, cycle, train_cfg.seed)
        rows = [prompts[i] for i in idx for _ in range(G)]
        ro = rollout(llm, tok, [prompt_ids[i] for i in idx for _ in range(G)], cfg,
                     seed=train_cfg.seed * 7919 + cycle * per_step, stop_id=stop_id)
        total, per_fn = score(rows, ro)
        ids, mask = ro.input_ids.to(device), ro.mask.to(device)
        if cfg.mask_truncated_completions:
            mask = mask & ro.ended.to(device).unsqueeze(1)
        tensors = {"ids": ids, "mask": mask, "advantages": group_advantages(total, G, cfg.scale_rewards).to(device)}
        if mu > 1:  # pi_old: the policy that sampled these replies, before any of the mu updates
            tensors["old_logps"] = _chunked_logps(policy, ids, cfg.temperature, train_cfg.batch_size)
        if cfg.beta != 0:
            tensors["ref_logps"] = _chunked_logps(ref, ids, cfg.temperature, train_cfg.batch_size)
        grouped = total.view(-1, G)
        stats = {"reward": float(total.mean()), "reward_std": float(total.std()),
                 "frac_reward_zero_std": float((grouped.std(1) < 1e-6).float().mean()),
                 "ended": float(ro.ended.float().mean()), "reply_tokens": float(ro.mask.sum(-1).float().mean())}
        stats.update({f"reward/{r.name}": float(per_fn[:, j].mean()) for j, r in enumerate(rewards)})
        policy.train(was_training)
        return Generation(cycle, tensors, stats)

    current: dict[str, Generation] = {}
    rollout_path = find_checkpoint(out_dir) / ROLLOUT_FILE if resume else None
    if rollout_path is not None and rollout_path.is_file():  # the batch the interrupted run was updating on
        with safe_open(str(rollout_path), "pt", device=str(device)) as f:
            meta = f.metadata() or {}
            current["gen"] = Generation(int(meta["cycle"]), {k: f.get_tensor(k) for k in f.keys()},
                                        json.loads(meta["stats"]))

    def get_batch(step: int, micro: int) -> dict[str, Any]:
        cycle = step // mu
        gen = current.get("gen")
        if gen is None or gen.cycle != cycle:
            if step % mu:
                raise EmberError(f"Cannot resume at step {step}, inside a batch of --num-iterations {mu} updates: "
                                 f"the checkpoint has no {ROLLOUT_FILE} for it.")
            gen = current["gen"] = generate(cycle)
        rows = slice(micro * train_cfg.batch_size, (micro + 1) * train_cfg.batch_size)
        batch: dict[str, Any] = {k: v[rows] for k, v in gen.tensors.items()}
        batch.update(micro=micro, stats=gen.stats)
        return batch

    def count_targets(batch: dict[str, Any]) -> int:
        return denominator(batch["mask"], cfg.loss_type, cfg.max_new_tokens)

    window: dict[str, float] = {}

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, int, dict[str, float]]:
        logps, logits = policy_logps(model, batch["ids"], cfg.temperature)
        mask = batch["mask"]
        old = batch.get("old_logps", logps.detach())
        token_loss, kl, clipped = per_token_loss(logps, old, batch.get("ref_logps"), batch["advantages"], cfg)
        num, den = aggregate(token_loss, mask, cfg.loss_type, cfg.max_new_tokens)
        # Token-weighted statistics over the whole step's micro-batches.
        if batch["micro"] == 0:
            window.clear()
        with torch.no_grad():
            m = mask.float()
            sums = {"tokens": m.sum(), "clipfrac": (clipped * m).sum(),
                    "entropy": (entropy_from_logits(logits[:, :-1]) * m).sum(),
                    "ratio": (torch.exp(logps - old) * m).sum()}
            if kl is not None:
                sums["kl"] = (kl * m).sum()
            for k, v in sums.items():
                window[k] = window.get(k, 0.0) + float(v)
        n = max(1.0, window["tokens"])
        info = {**batch["stats"], **{k: window[k] / n for k in window if k != "tokens"}}
        return num, den, info

    def reply_kl_and_reward(model: nn.Module) -> dict[str, float]:
        """Held-out prompts, one sampled reply each (fixed seeds): mean reward, and the KL to the
        start per reply (sum over its tokens of log pi - log ref, as PPO's evaluation measures it)."""
        was_training = model.training
        model.eval()
        ro = rollout(llm, tok, eval_ids, cfg, seed=10 ** 9, stop_id=stop_id)
        total, _ = score(list(eval_prompts), ro)
        out = {"eval/reward": float(total.mean()), "eval/ended": float(ro.ended.float().mean())}
        ids, mask = ro.input_ids.to(device), ro.mask.to(device)
        kl = ((token_logps(model(ids), ids) - token_logps(ref(ids), ids)) * mask).sum(-1)
        out["eval/kl"] = float(kl.mean())
        model.train(was_training)
        return out

    evaluate = None
    if eval_ids:
        evaluate = torch.no_grad()(reply_kl_and_reward)
        if not resume:
            write_json(out_dir / EVAL_START, {"step": 0, **evaluate(policy)})

    def save_extra(d: Path) -> None:
        tok.save(d)
        gen = current.get("gen")
        if gen is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in gen.tensors.items()}, str(d / ROLLOUT_FILE),
                      metadata={"cycle": str(gen.cycle), "stats": json.dumps(gen.stats)})

    last = train(policy, train_cfg, get_batch, loss_fn, out_dir, evaluate=evaluate, resume=resume,
                 save_extra=save_extra, progress=progress, count_targets=count_targets,
                 extra_state={"grpo_config": asdict(cfg), "rewards": [r.name for r in rewards],
                              "train_prompts": len(prompts), "eval_prompts": len(eval_prompts)})
    plot_grpo(out_dir)
    return last


def plot_grpo(out_dir: str | Path) -> Path:
    """reward, KL, clip fraction and loss per step, as `grpo.png`."""
    out_dir = Path(out_dir)
    records = [r for r in read_metrics(out_dir) if "reward" in r]
    start = json.loads((out_dir / EVAL_START).read_text()) if (out_dir / EVAL_START).is_file() else None
    held_out = ([start] if start and "eval/reward" in start else []) + [r for r in records if "eval/reward" in r]
    panels = [("reward", "mean reward (sampled replies)"), ("kl", "KL to reference (k3, per reply token)"),
              ("clipfrac", "clip fraction"), ("loss", "GRPO loss")]
    return plot_rl_curves(records, held_out, panels, "step", out_dir / "grpo.png")


def run_grpo(model_path: str | Path, prompts_file: str | Path, out_dir: str | Path, train_cfg: TrainConfig,
             cfg: GRPOConfig, reward_rules: Sequence[str] = (), reward_model_dir: str | Path | None = None,
             eval_fraction: float = 0.1, chat: bool | None = None, device: str | None = None,
             resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """`ember grpo`: a model (directory or .gguf) + prompts + rewards -> OUT/model and curves."""
    dev = pick_device(device)
    if not reward_rules and reward_model_dir is None:
        raise EmberError("Give at least one reward: --reward answer, --reward format=REGEX, ... or --reward-model DIR.")
    rewards = [rule(spec) for spec in reward_rules]  # bad rules fail before the model loads
    prompts = load_prompt_rows(prompts_file)
    tok = load_tokenizer(model_path)
    policy = load_model(model_path, device=str(dev), dtype=torch.float32, keep_blocks=False)
    if reward_model_dir is not None:
        rm = load_reward_model(reward_model_dir, device=str(dev), dtype=torch.float32)
        rewards.append(model_reward(rm, tok, load_tokenizer(reward_model_dir)))
    train_p, eval_p = split_pairs(prompts, eval_fraction, train_cfg.seed)
    print(f"GRPO ({cfg.loss_type}): {len(train_p)} training prompts, {len(eval_p)} held out; "
          f"{cfg.num_generations} replies a prompt, {train_cfg.batch_size * train_cfg.grad_accum // cfg.num_generations}"
          f" prompts a step, beta {cfg.beta}; rewards: {', '.join(r.name for r in rewards) or 'none'}")
    last = grpo_train(policy, tok, train_p, out_dir, train_cfg, cfg, rewards, eval_prompts=eval_p, chat=chat,
                      resume=resume, progress=progress)
    save_pretrained(policy, tok, Path(out_dir) / "model")
    return last
