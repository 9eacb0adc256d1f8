"""Direct Preference Optimization (Rafailov et al., 2023) and its IPO and hinge variants.

With h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)] for a pair of a
chosen y_w and a rejected y_l, the per-pair losses are

    sigmoid (DPO):   -log sigmoid(beta * h)
    hinge (SLiC):    max(0, 1 - beta * h)
    ipo (Azar et al., 2023, eq. 17):  (h' - 1 / (2 beta))^2, with h' built from log-ratios
                     averaged per reply token, as TRL does (the IPO authors' normalisation)

and beta * (log-ratio) is each reply's implicit reward. The reference is the policy before
training: its log-probs are computed once and cached in the run directory, or computed
live each step from a frozen copy or, for a LoRA policy, from the same model with its
adapters disabled (no copy at all). Training runs on `ember.train.loop.train`, so DPO has
the loop's schedule, accumulation, checkpoints, exact resume and metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from ember.checkpoint import save_pretrained
from ember.device import pick_device
from ember.errors import EmberError
from ember.load import load_model, load_tokenizer
from ember.lora import apply_lora, describe_trainable, disable_adapters, lora_layers, save_adapter
from ember.train.loop import train
from ember.train.preference import RenderedPair, collate_pairs, load_preferences, render_pairs, sequence_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REF_MODES = ("precompute", "live")
REF_CACHE = "reference_logps.safetensors"


@dataclass
class DPOConfig:
    beta: float = field(default=0.1, metadata={"help": "strength of the pull toward the reference model"})
    loss_type: Literal["sigmoid", "ipo", "hinge"] = field(default="sigmoid", metadata={
        "help": "preference loss: DPO's sigmoid, IPO's squared margin or a hinge", "flag": "--loss"})
    max_length: int = field(default=512, metadata={"help": "tokens per prompt + reply; longer pairs are cut"})
    reference: Literal["precompute", "live"] = field(default="precompute", metadata={
        "help": "reference log-probs computed once and cached, or each step (a frozen copy, or the "
                "adapter-disabled base with LoRA)"})

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise EmberError(f"Unknown DPO loss '{self.loss_type}'; choose one of {', '.join(LOSS_TYPES)}.")
        if self.reference not in REF_MODES:
            raise EmberError(f"Unknown reference mode '{self.reference}'; choose one of {', '.join(REF_MODES)}.")
        if self.beta <= 0:
            raise EmberError("beta must be positive.")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, loss_type: str = "sigmoid", chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and the implicit rewards of chosen and rejected ([B], [B], detached).

    Inputs are summed reply log-probs [B]; IPO also needs each reply's token count.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("IPO needs the reply token counts")
        h_avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h_avg - 1 / (2 * beta)) ** 2
    else:
        raise EmberError(f"Unknown DPO loss '{loss_type}'; choose one of {', '.join(LOSS_TYPES)}.")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# --- reference log-probs ---------------------------------------------------------------------
def _split(logps: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B = logps.shape[0] // 2
    return logps[:B], logps[B:], counts[:B], counts[B:]


@torch.no_grad()
def pair_logps(model: nn.Module, pairs: Sequence[RenderedPair], pad_id: int, batch_size: int,
               device: torch.device) -> Tensor:
    """[N, 4]: chosen logp, rejected logp, chosen tokens, rejected tokens of every pair."""
    was_training = model.training
    model.eval()
    rows = []
    for i in range(0, len(pairs), batch_size):
        b = collate_pairs(pairs[i:i + batch_size], pad_id)
        lp, n = sequence_logps(model, b["input_ids"].to(device), b["loss_mask"].to(device))
        rows.append(torch.stack(_split(lp.float(), n.float()), dim=1).cpu())
    model.train(was_training)
    return torch.cat(rows)


def reference_context(model: nn.Module):
    """The reference is the adapter-free base when LoRA is applied, else the model as it is now."""
    return disable_adapters(model) if lora_layers(model) else contextlib.nullcontext(model)


def _fingerprint(parts: Sequence[Sequence[RenderedPair]], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for pairs in parts:
        for p in pairs:
            h.update(repr((p.chosen_ids, p.chosen_mask, p.rejected_ids, p.rejected_mask)).encode())
    return h.hexdigest()


def cached_reference_logps(model: nn.Module, splits: dict[str, Sequence[RenderedPair]], pad_id: int,
                           batch_size: int, device: torch.device, cache: Path | None, key: str) -> dict[str, Tensor]:
    """Reference log-probs of each split, computed once and kept in `cache` (safetensors).

    A cache whose fingerprint (data + reference model + settings) differs is recomputed.
    """
    fp = _fingerprint(list(splits.values()), key)
    if cache is not None and cache.is_file():
        with safe_open(str(cache), "pt") as f:
            same = (f.metadata() or {}).get("fingerprint") == fp
        if same:
            return load_file(str(cache))
    with reference_context(model):
        out = {name: pair_logps(model, pairs, pad_id, batch_size, device) for name, pairs in splits.items() if pairs}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file(out, str(tmp), metadata={"fingerprint": fp})
        tmp.replace(cache)
    return out


# --- the recipe pieces -------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, index: int, seed: int) -> list[int]:
    """Pairs of the `index`-th batch of an endless stream of seeded epoch shuffles (pure, for resume)."""
    out = []
    for k in range(index * batch_size, (index + 1) * batch_size):
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


def make_loss_fn(cfg: DPOConfig, ref_model: nn.Module | None) -> Callable[[nn.Module, dict], tuple[Tensor, int, dict]]:
    """The loop's loss: summed pair losses, the pair count, and the DPO metrics.

    `batch["ref"]` holds precomputed reference log-probs; without it the reference is
    computed now, from `ref_model` (a frozen copy) or, when that is None, the adapter-free policy.
    """
    def loss_fn(model: nn.Module, batch: dict) -> tuple[Tensor, int, dict]:
        ids, mask = batch["input_ids"], batch["loss_mask"]
        pc, pr, nc, nr = _split(*sequence_logps(model, ids, mask))
        if "ref" in batch:
            rc, rr = batch["ref"][:, 0], batch["ref"][:, 1]
        else:
            with torch.no_grad():
                if ref_model is not None:
                    rc, rr, _, _ = _split(*sequence_logps(ref_model, ids, mask))
                else:
                    with reference_context(model):
                        rc, rr, _, _ = _split(*sequence_logps(model, ids, mask))
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, nc, nr)
        metrics = {
            "rewards/chosen": float(chosen_r.mean()), "rewards/rejected": float(rejected_r.mean()),
            "rewards/accuracy": float((chosen_r > rejected_r).float().mean()),
            "rewards/margin": float((chosen_r - rejected_r).mean()),
            "logps/chosen": float(pc.detach().mean()), "logps/rejected": float(pr.detach().mean()),
        }
        return losses.sum(), len(losses), metrics
    return loss_fn


@torch.no_grad()
def preference_accuracy(model: nn.Module, pairs: Sequence[RenderedPair], ref: Tensor, pad_id: int, beta: float,
                        batch_size: int, device: torch.device) -> dict[str, float]:
    """Share of held-out pairs whose implicit reward ranks chosen above rejected, and the mean margin."""
    pol = pair_logps(model, pairs, pad_id, batch_size, device)
    margin = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    return {"eval/accuracy": float((margin > 0).float().mean()), "eval/margin": float(margin.mean())}


def dpo_train(model: nn.Module, tokenizer: Any, train_pairs: Sequence[RenderedPair],
              eval_pairs: Sequence[RenderedPair], out_dir: str | Path, train_cfg: Any, cfg: DPOConfig,
              resume: bool = False, progress: bool = True, model_key: str = "",
              save_extra: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run DPO on already-rendered pairs; `model` may carry LoRA adapters. Returns the last metrics."""
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    bs = train_cfg.batch_size
    ref_model = None
    refs: dict[str, Tensor] = {}
    if cfg.reference == "precompute" or eval_pairs:
        # Even live runs precompute the held-out side: evaluation needs the reference too.
        splits = {"train": train_pairs if cfg.reference == "precompute" else [], "eval": list(eval_pairs)}
        # The cache is valid for this data and these starting weights only (a cheap digest of them).
        with torch.no_grad():
            digest = [round(float(p.double().sum()), 6) for n, p in model.named_parameters() if "lora_" not in n]
        key = f"{model_key}|{cfg.max_length}|{next(model.parameters()).dtype}|{digest}"
        refs = cached_reference_logps(model, splits, pad_id, bs, device, out_dir / REF_CACHE, key)
    if cfg.reference == "live":
        if not lora_layers(model):  # a full-model policy needs a frozen copy; LoRA disables its adapters instead
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    def get_batch(step: int, micro: int) -> dict:
        idx = batch_indices(len(train_pairs), bs, step * train_cfg.grad_accum + micro, train_cfg.seed)
        batch = {k: v.to(device) for k, v in collate_pairs([train_pairs[i] for i in idx], pad_id).items()}
        if "train" in refs:
            batch["ref"] = refs["train"][idx].to(device)
        batch["n"] = len(idx)
        return batch

    def evaluate(m: nn.Module) -> dict[str, float]:
        return preference_accuracy(m, eval_pairs, refs["eval"], pad_id, cfg.beta, bs, device)

    return train(model, train_cfg, get_batch, make_loss_fn(cfg, ref_model), out_dir,
                 evaluate=evaluate if eval_pairs else None,
                 resume=resume, save_extra=save_extra, progress=progress,
                 extra_state={"dpo_config": asdict(cfg), "train_pairs": len(train_pairs),
                              "eval_pairs": len(eval_pairs)},
                 count_targets=lambda b: b["n"])


def split_pairs(pairs: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split (at least one pair on each side when there are two or more)."""
    n = len(pairs)
    n_eval = min(n - 1, max(1, math.floor(n * eval_fraction))) if eval_fraction > 0 and n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def run_dpo(model_dir: str | Path, data: str | Path, out_dir: str | Path, train_cfg: Any, cfg: DPOConfig,
            lora_cfg: Any = None, eval_data: str | Path | None = None, eval_fraction: float = 0.1,
            device: str | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """`ember dpo`: load a model and preference JSONL, train, write OUT/model (or OUT/adapter)."""
    out_dir = Path(out_dir)
    dev = pick_device(device)
    tok = load_tokenizer(model_dir)
    torch.manual_seed(train_cfg.seed)
    model = load_model(model_dir, device=str(dev), dtype=torch.float32, keep_blocks=False)
    if cfg.max_length > model.config.max_position_embeddings:
        cfg.max_length = model.config.max_position_embeddings
    loaded = load_preferences(data)
    pairs, too_long = render_pairs(tok, loaded.pairs, cfg.max_length)
    if eval_data is not None:
        held = load_preferences(eval_data)
        eval_pairs, _ = render_pairs(tok, held.pairs, cfg.max_length)
        train_pairs = pairs
    else:
        train_pairs, eval_pairs = split_pairs(pairs, eval_fraction, train_cfg.seed)
    print(f"DPO ({cfg.loss_type}, beta {cfg.beta}): {len(train_pairs)} training pairs, {len(eval_pairs)} held out; "
          f"skipped {loaded.skipped_identical} with identical chosen and rejected, {too_long} too long.")
    save_extra = tok.save
    if lora_cfg is not None:
        apply_lora(model, lora_cfg)
        print(describe_trainable(model))
        save_extra = lambda d: (tok.save(d), save_adapter(model, d / "adapter", base_model=str(model_dir)))  # noqa: E731
    last = dpo_train(model, tok, train_pairs, eval_pairs, out_dir, train_cfg, cfg, resume=resume, progress=progress,
                     model_key=str(Path(model_dir).resolve()), save_extra=save_extra)
    if lora_cfg is not None:
        save_adapter(model, out_dir / "adapter", base_model=str(Path(model_dir).resolve()))
    else:
        save_pretrained(model, tok, out_dir / "model")
    last["skipped_identical"] = loaded.skipped_identical
    return last
