"""Supervised fine-tuning recipe: full, LoRA or QLoRA, on the shared training loop.

The recipe renders every example with the model's chat template (`ember.train.examples`),
optionally packs short examples into full rows, and hands the loop a pure `get_batch`
(an epoch-seeded shuffle, so resume sees the same batches) and a masked next-token loss.
A finished run leaves `OUT/model` (full: an HF-layout directory with the tokenizer) or
`OUT/adapter` (LoRA/QLoRA: PEFT format), plus `run.json` and `metrics.jsonl`.

Adapter runs checkpoint only what trains: the loop receives an `AdapterView` whose state
is the LoRA tensors, so a checkpoint is small and resume restores exactly those.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ember.checkpoint import save_pretrained
from ember.device import pick_device
from ember.errors import EmberError
from ember.files import read_json, write_json
from ember.load import load_model, load_tokenizer
from ember.lora import (LoraConfig, apply_lora, base_weight_bytes, dequantize_base, describe_trainable, load_adapter,
                        quantize_base, save_adapter)
from ember.train.examples import (Row, block_diagonal_mask, collate, example_row, load_sft_examples,
                                  pack_examples, render_messages)
from ember.train.loop import RUN_FILE, TrainConfig, lm_loss, read_run, train

METHODS = ("full", "lora", "qlora")


@dataclass
class SFTOptions:
    """The recipe's own choices, as `sft()` takes them (`sft(..., **asdict(options))`)."""

    method: Literal["full", "lora", "qlora"] = field(default="full", metadata={
        "help": "what trains: every weight, LoRA adapters, or LoRA adapters over an NF4-quantized base"})
    pack: bool = field(default=False, metadata={"help": "pack short examples into full rows (block-diagonal mask)"})
    train_on_prompt: bool = field(default=False, metadata={"help": "also train on prompt tokens"})


class AdapterView(nn.Module):
    """The model as the loop's checkpoints see it: its state is the trainable tensors only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.inner(*args, **kwargs)

    def aux_loss(self) -> Tensor | None:
        return self.inner.aux_loss()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # noqa: D102
        return {n: p.detach() for n, p in self.inner.named_parameters() if p.requires_grad}

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        own = {n: p for n, p in self.inner.named_parameters() if p.requires_grad}
        if own.keys() != state_dict.keys():
            raise EmberError("The checkpoint's adapter tensors do not match this run's LoRA settings.")
        with torch.no_grad():
            for k, v in state_dict.items():
                own[k].copy_(v)


def rows_for(tok: Any, examples: list, block_size: int, pack: bool, train_on_prompt: bool) -> tuple[list[Row], int]:
    """Rendered rows (packed or one example each) and how many examples were truncated."""
    rendered = [render_messages(tok, m, train_on_prompt=train_on_prompt) for m in examples]
    truncated = sum(len(ids) > block_size for ids, _ in rendered)
    if pack:
        return pack_examples(rendered, block_size), truncated
    return [example_row(ids[:block_size], mask[:block_size]) for ids, mask in rendered], truncated


def batch_inputs(batch: dict[str, Tensor], packed: bool) -> dict[str, Tensor]:
    """Forward kwargs: packed rows need per-document positions and a block-diagonal mask."""
    if not packed:  # right padding after each example: the plain causal path is exact
        return {}
    return {"positions": batch["positions"], "attn_mask": block_diagonal_mask(batch["doc_ids"])}


def make_get_batch(rows: list[Row], cfg: TrainConfig, pad_id: int, packed: bool, device: torch.device):
    """Batch `micro` of step `step`: a pure function of (seed, step, micro), epochs reshuffled."""
    per_step = cfg.batch_size * cfg.grad_accum
    cache: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:
        if epoch not in cache:
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            cache.clear()
            cache[epoch] = torch.randperm(len(rows), generator=g).tolist()
        return cache[epoch]

    def get_batch(step: int, micro: int) -> dict[str, Tensor]:
        start = step * per_step + micro * cfg.batch_size
        picked = []
        for i in range(start, start + cfg.batch_size):
            picked.append(rows[order(i // len(rows))[i % len(rows)]])
        batch = collate(picked, pad_id, cfg.block_size if packed else None)
        return {k: v.to(device) for k, v in batch.items()}

    return get_batch


def make_loss_fn(packed: bool):
    def loss_fn(model: nn.Module, batch: dict[str, Tensor]):
        logits = model(batch["input_ids"], **batch_inputs(batch, packed))
        loss, n = lm_loss(logits, batch["labels"])
        return loss, n, {}
    return loss_fn


def _load(model_dir: Path, method: str, lora: LoraConfig | None, device: torch.device,
          log: Any) -> nn.Module:
    model = load_model(model_dir, device=str(device), dtype=torch.float32, keep_blocks=False)
    if method == "full":
        log(f"full fine-tuning: {model.num_parameters():,} parameters train")
        return model
    if model.config.model_type == "gpt2":
        raise EmberError("LoRA fine-tuning writes PEFT adapters for Llama-family models; this base is GPT-2.")
    apply_lora(model, lora or LoraConfig())
    if method == "qlora":
        before = base_weight_bytes(model)[1]
        quantize_base(model)
        now, _ = base_weight_bytes(model)
        log(f"QLoRA base weights: {now / 2**20:.2f} MiB in NF4 vs {before / 2**20:.2f} MiB in bf16 "
            f"({100 * now / before:.1f}%)")
    log(describe_trainable(model))
    return model


def template_token_ids(tok: Any) -> list[int]:
    """The special tokens a chat renders with (e.g. `<|im_start|>`, `<|im_end|>`): pretraining on
    plain text never trains their rows, and LoRA adapters cannot move them."""
    if not getattr(tok, "chat_template", None):
        return []
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    special = set(tok.special_tokens.values())
    return sorted({i for i in tok.apply_chat_template(chat, tokenize=True) if i in special})


def sft(model_dir: str | Path, data_file: str | Path, out_dir: str | Path, method: str = "full",
        lora: LoraConfig | None = None, train_config: TrainConfig | None = None, pack: bool = False,
        train_on_prompt: bool = False, val_file: str | Path | None = None, device: str | None = None,
        resume: bool = False, progress: bool = True, log: Any = print,
        train_template_tokens: bool = True) -> dict[str, Any]:
    """Fine-tune `model_dir` on SFT JSONL `data_file`; returns the final metrics. LoRA and QLoRA
    also train the chat template's special-token rows (`template_token_ids`) unless `lora` names
    its own `trainable_token_indices` or `train_template_tokens` is False."""
    out_dir = Path(out_dir)
    run_file = out_dir / RUN_FILE
    if resume:
        run, train_config = read_run(out_dir, train_config)
        method, pack = run["method"], run["pack"]
        train_on_prompt, model_dir, data_file = run["train_on_prompt"], run["model"], run["data"]
        lora = LoraConfig(**run["lora"]) if run.get("lora") else None
        val_file = run.get("val")
    if method not in METHODS:
        raise EmberError(f"Unknown fine-tuning method '{method}'; choose one of {', '.join(METHODS)}.")
    cfg = train_config or TrainConfig()
    model_dir = Path(model_dir)
    dev = pick_device(device)
    tok = load_tokenizer(model_dir)
    if tok.pad_id is None and tok.eos_id is None:
        raise EmberError("The tokenizer has neither a PAD nor an EOS token to pad batches with.")
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id

    examples = load_sft_examples(data_file)
    rows, truncated = rows_for(tok, examples, cfg.block_size, pack, train_on_prompt)
    if truncated:
        log(f"warning: {truncated} of {len(examples)} examples exceed block_size {cfg.block_size} and were cut")
    targets = sum(sum(t != -100 for t in r.labels) for r in rows)
    if targets == 0:
        raise EmberError(f"No trainable tokens in {data_file} at block_size {cfg.block_size}.")
    log(f"{len(examples)} examples -> {len(rows)} rows ({'packed' if pack else 'one example each'}), "
        f"{targets:,} target tokens")

    if method != "full" and not resume:
        lora = lora or LoraConfig()
        token_rows = template_token_ids(tok) if lora.trainable_token_indices is None and train_template_tokens else []
        if token_rows:
            lora = replace(lora, trainable_token_indices=token_rows)
            names = {i: t for t, i in tok.special_tokens.items()}
            log("trainable token rows: " + ", ".join(names.get(i, str(i)) for i in lora.trainable_token_indices))
    if not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_file, {"method": method, "model": str(model_dir.resolve()), "data": str(Path(data_file).resolve()),
                              "val": str(Path(val_file).resolve()) if val_file else None, "pack": pack,
                              "train_on_prompt": train_on_prompt, "lora": asdict(lora or LoraConfig())
                              if method != "full" else None, "train_config": asdict(cfg),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    torch.manual_seed(cfg.seed)
    model = _load(model_dir, method, lora, dev, log)
    trained = model if method == "full" else AdapterView(model)

    evaluate = None
    if val_file:
        val_rows, _ = rows_for(tok, load_sft_examples(val_file), cfg.block_size, pack, train_on_prompt)

        def evaluate(m: nn.Module) -> dict[str, float]:
            total, count = 0.0, 0
            for i in range(0, len(val_rows), cfg.batch_size):
                batch = {k: v.to(dev) for k, v in collate(val_rows[i:i + cfg.batch_size], pad_id,
                                                            cfg.block_size if pack else None).items()}
                loss, n = lm_loss(m(batch["input_ids"], **batch_inputs(batch, pack)), batch["labels"])
                total, count = total + float(loss), count + n
            return {"val_loss": total / max(1, count)}

    save_extra = tok.save if method == "full" else None
    last = train(trained, cfg, make_get_batch(rows, cfg, pad_id, pack, dev), make_loss_fn(pack), out_dir,
                 evaluate=evaluate, resume=resume, save_extra=save_extra, progress=progress,
                 extra_state={"method": method})
    if method == "full":
        save_pretrained(model, tok, out_dir / "model")
    else:
        save_adapter(model, out_dir / "adapter", base_model=str(model_dir.resolve()))
    last["num_rows"], last["truncated"], last["method"] = len(rows), truncated, method
    return last


def load_finetuned(out_dir: str | Path, device: str | None = None) -> tuple[nn.Module, Any]:
    """The model a finished run produced (base + adapter for LoRA/QLoRA) and its tokenizer."""
    out_dir = Path(out_dir)
    run = read_json(out_dir / RUN_FILE, "Run file")
    if run["method"] == "full":
        return load_model(out_dir / "model", device=device, dtype=torch.float32), load_tokenizer(out_dir / "model")
    model = load_model(run["model"], device=device, dtype=torch.float32, keep_blocks=False)  # adapters need floats
    load_adapter(model, out_dir / "adapter")
    if run["method"] == "qlora":  # evaluate what was trained: the adapter over the NF4 base's values,
        dequantize_base(quantize_base(model))  # decoded once rather than at every forward
    return model.eval(), load_tokenizer(run["model"])
