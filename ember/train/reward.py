"""Reward model: an Ember transformer with a scalar head, trained with the Bradley–Terry loss.

The head (`score`, as `transformers`' *ForSequenceClassification names it) reads the final
hidden state of each sequence's last real token, so a reward is one number per prompt +
reply. Bradley–Terry says P(chosen > rejected) = sigmoid(r_chosen - r_rejected); the loss
is its negative log-likelihood, -log sigmoid(r_c - r_r), and held-out pair accuracy is the
share of pairs it ranks the right way round. A trained model is a directory: the
backbone's `config.json` and `model.safetensors` (with `score.weight` beside it), the
tokenizer, and `reward_config.json`; `load_reward_model` opens it again, and so does
`transformers.AutoModelForSequenceClassification` (same names, one label).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.checkpoint import load_config, read_weights, write_model_files
from ember.config import ModelConfig
from ember.device import pick_device, pick_dtype
from ember.errors import EmberError
from ember.files import atomic_dir, read_json, write_json
from ember.load import load_model, load_tokenizer
from ember.model import CausalLM
from ember.train.dpo import batch_indices, split_pairs
from ember.train.loop import train
from ember.train.preference import RenderedPair, collate_pairs, load_preferences, render_pairs

REWARD_CONFIG = "reward_config.json"


class RewardModel(nn.Module):
    """Decoder (HF names `model.*`) + `score` [1, hidden]; `forward(ids, last_index)` -> rewards [B]."""

    hidden_states = CausalLM.hidden_states  # the same decoder forward, minus the LM head

    def __init__(self, cfg: ModelConfig, backbone: CausalLM | None = None) -> None:
        super().__init__()
        if cfg.model_type in ("gpt2", "bloom"):
            # The training loop's checkpoints translate GPT-2's and BLOOM's names and know no extra head.
            raise EmberError("Reward models are built on Llama-family bases (llama, mistral, qwen2, mixtral); "
                             f"{cfg.model_type} is not supported yet.")
        backbone = backbone if backbone is not None else CausalLM(cfg)
        self.config = cfg
        self.model = backbone.model
        self.register_buffer("rope_inv_freq", backbone.rope_inv_freq, persistent=False)
        self.register_buffer("alibi_slopes", backbone.alibi_slopes, persistent=False)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False, device=backbone.device, dtype=backbone.dtype)
        nn.init.normal_(self.score.weight, std=cfg.initializer_range)

    def forward(self, input_ids: Tensor, last_index: Tensor | None = None) -> Tensor:
        h = self.hidden_states(input_ids)
        if last_index is None:
            last_index = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        last = h[torch.arange(h.shape[0], device=h.device), last_index.to(h.device)]
        return self.score(last).squeeze(-1).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected) per pair."""
    return -F.logsigmoid(chosen - rejected)


def pair_rewards(model: RewardModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    r = model(batch["input_ids"], batch["last_index"])
    B = r.shape[0] // 2
    return r[:B], r[B:]


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs: Sequence[RenderedPair], pad_id: int, batch_size: int,
                  device: torch.device) -> dict[str, float]:
    """Held-out share of pairs ranked chosen > rejected, and the mean Bradley–Terry loss."""
    was = model.training
    model.eval()
    right, loss, n = 0, 0.0, 0
    for i in range(0, len(pairs), batch_size):
        b = {k: v.to(device) for k, v in collate_pairs(pairs[i:i + batch_size], pad_id).items()}
        c, r = pair_rewards(model, b)
        right += int((c > r).sum())
        loss += float(bradley_terry_loss(c, r).sum())
        n += len(c)
    model.train(was)
    return {"eval/accuracy": right / max(1, n), "eval/loss": loss / max(1, n)}


def save_reward_model(model: RewardModel, tokenizer: Any, path: str | Path) -> Path:
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp)  # decoder + score in one safetensors file
        # transformers' *ForSequenceClassification holds the same `model.*` + `score.weight`, so
        # AutoModelForSequenceClassification opens this directory as a one-label reward model.
        cfg = read_json(tmp / "config.json", "Model config")
        cfg["architectures"] = [cfg["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
        cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        write_json(tmp / "config.json", cfg)
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_json(tmp / REWARD_CONFIG, {"kind": "ember-reward-model", "head": "score", "num_labels": 1,
                                         "reads": "last non-pad token"})
    return Path(path)


def load_reward_model(path: str | Path, device: str | None = None, dtype: Any = None) -> RewardModel:
    """Open a directory written by `save_reward_model`."""
    path = Path(path)
    cfg = load_config(path)
    if not (path / REWARD_CONFIG).is_file():
        raise EmberError(f"{path} is not a reward model (no {REWARD_CONFIG}); train one with `ember reward-model`.")
    dev = pick_device(device)
    model = RewardModel(cfg)
    model.load_state_dict(read_weights(path, model), strict=False)
    return model.to(dev, pick_dtype(dev, dtype)).eval()


def reward_train(model: RewardModel, tokenizer: Any, train_pairs: Sequence[RenderedPair],
                 eval_pairs: Sequence[RenderedPair], out_dir: str | Path, train_cfg: Any, resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Bradley–Terry training on the shared loop; returns the last metrics (with held-out accuracy)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    bs = train_cfg.batch_size

    def get_batch(step: int, micro: int) -> dict:
        idx = batch_indices(len(train_pairs), bs, step * train_cfg.grad_accum + micro, train_cfg.seed)
        batch = {k: v.to(device) for k, v in collate_pairs([train_pairs[i] for i in idx], pad_id).items()}
        batch["n"] = len(idx)
        return batch

    def loss_fn(m: RewardModel, batch: dict) -> tuple[Tensor, int, dict]:
        c, r = pair_rewards(m, batch)
        losses = bradley_terry_loss(c, r)
        return losses.sum(), len(losses), {"accuracy": float((c > r).float().mean()),
                                           "margin": float((c - r).detach().mean())}

    def evaluate(m: RewardModel) -> dict[str, float]:
        return pair_accuracy(m, eval_pairs, pad_id, bs, device)

    return train(model, train_cfg, get_batch, loss_fn, out_dir, evaluate=evaluate if eval_pairs else None,
                 resume=resume,
                 save_extra=tokenizer.save, progress=progress, count_targets=lambda b: b["n"],
                 extra_state={"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)})


def run_reward_model(model_dir: str | Path, data: str | Path, out_dir: str | Path, train_cfg: Any,
                     max_length: int = 512, eval_data: str | Path | None = None, eval_fraction: float = 0.1,
                     device: str | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """`ember reward-model`: base model + preference JSONL -> OUT/model (a reward model directory)."""
    dev = pick_device(device)
    tok = load_tokenizer(model_dir)
    torch.manual_seed(train_cfg.seed)
    base = load_model(model_dir, device=str(dev), dtype=torch.float32, keep_blocks=False)
    model = RewardModel(base.config, backbone=base)
    max_length = min(max_length, base.config.max_position_embeddings)
    loaded = load_preferences(data)
    pairs, too_long = render_pairs(tok, loaded.pairs, max_length)
    if eval_data is not None:
        train_pairs, (eval_pairs, _) = pairs, render_pairs(tok, load_preferences(eval_data).pairs, max_length)
    else:
        train_pairs, eval_pairs = split_pairs(pairs, eval_fraction, train_cfg.seed)
    print(f"Reward model: {len(train_pairs)} training pairs, {len(eval_pairs)} held out; skipped "
          f"{loaded.skipped_identical} with identical chosen and rejected, {too_long} too long.")
    last = reward_train(model, tok, train_pairs, eval_pairs, out_dir, train_cfg, resume=resume, progress=progress)
    save_reward_model(model, tok, Path(out_dir) / "model")
    if "eval/accuracy" in last:
        print(f"Held-out pair accuracy: {last['eval/accuracy']:.1%} ({len(eval_pairs)} pairs).")
    return last
