"""LoRA: low-rank adapters on a frozen model (Hu et al., 2021), saved in PEFT's file format.

A targeted linear layer y = W x becomes y = W x + (alpha / r) * B A dropout(x), with A
[r, in] drawn kaiming-uniform and B [out, r] zero, so the adapted model starts equal to
its base. Only A and B train. `merge_lora` folds B A into W for adapter-free inference;
`unmerge_lora` takes it out again.

Ember's modules carry Hugging Face Llama names, so an adapter is PEFT's own layout:
`adapter_config.json` plus `adapter_model.safetensors` with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. `peft` opens Ember's
adapters on the same base loaded by `transformers`, and Ember opens `peft`'s.

A few rows of the token table can train beside the adapters (`trainable_token_indices`, PEFT's
TrainableTokens): chat-template tokens a base never saw in pretraining need their own rows.

QLoRA (Dettmers et al., 2023) is the same adapters over a base stored in NF4:
`quantize_base` swaps every frozen weight for its 4-bit form (see `ember.quant.nf4`).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ember.errors import EmberError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key for trainable token rows


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names (a module matches when its path ends with ".name"), "all-linear"
    # (every linear layer but the LM head), or a regex matched against the full path.
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    # Rows of the token table that train too (PEFT's `trainable_token_indices`), e.g. chat-template
    # tokens the base never saw; with tied embeddings the LM head reads the same rows.
    trainable_token_indices: list[int] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise EmberError(f"LoRA rank r must be at least 1, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise EmberError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise EmberError("Give at least one LoRA target module.")
            self.target_modules = list(self.target_modules)
        if self.trainable_token_indices is not None:
            self.trainable_token_indices = sorted({int(i) for i in self.trainable_token_indices}) or None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen linear layer (`base_layer`, as PEFT names it) plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, cfg: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling = cfg.r, cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # Adapters train in float32 even over a bf16 or NF4 base ("higher precision" in QLoRA).
        device = _weight_device(base_layer)
        self.lora_A = nn.Linear(self.in_features, cfg.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(cfg.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: A random, B zero
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> Tensor:
        """The update B A * scaling, [out, in], in float32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        a = self.lora_A.weight
        h = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), self.lora_B.weight)
        return out + (h * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class TrainableTokens(nn.Module):
    """A few rows of the frozen token table that train (PEFT's TrainableTokens, which LoRA's
    `trainable_token_indices` uses). Adapters on the linear layers cannot move a token's
    embedding, and chat-template tokens such as `<|im_end|>` never occur in pretraining text: the
    base leaves them untrained and, with a tied head, pushed below every other logit, so a LoRA
    model learns to answer but not to end its turn. `trainable_tokens_delta` [n, hidden] starts
    as a copy of those rows and replaces them (PEFT's name: the new values, not a difference)."""

    def __init__(self, base_layer: nn.Embedding, indices: list[int]) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise EmberError("Trainable token rows wrap a plain embedding table; add them before quantizing the base.")
        vocab = base_layer.weight.shape[0]
        bad = [i for i in indices if not 0 <= i < vocab]
        if bad:
            raise EmberError(f"Trainable token index {bad[0]} is outside the vocabulary (0..{vocab - 1}).")
        self.base_layer = base_layer
        rows = base_layer.weight.detach()[indices].float()
        self.register_buffer("token_indices", torch.tensor(indices, device=rows.device), persistent=False)
        self.register_buffer("original", rows.clone(), persistent=False)  # what unmerging puts back
        self.trainable_tokens_delta = nn.Parameter(rows.clone())  # float32, like LoRA's A and B
        self.merged = False
        self.disabled = False

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base_layer(ids)
        if self.merged or self.disabled:
            return out
        hit = ids.unsqueeze(-1) == self.token_indices  # [..., n]: which listed token each id is
        new = hit.to(self.trainable_tokens_delta.dtype) @ self.trainable_tokens_delta
        return torch.where(hit.any(-1, keepdim=True), new.to(out.dtype), out)

    def write_rows(self, rows: Tensor) -> None:
        w = self.base_layer.weight
        w.data.index_copy_(0, self.token_indices, rows.to(w.dtype))


class TiedTokensHead(nn.Module):
    """The LM head of a tied model with trainable token rows: those tokens' logits come from the
    new rows, as the embedding's inputs do."""

    def __init__(self, base_layer: nn.Module, tokens: TrainableTokens) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tokens = [tokens]  # a list: not a second submodule, so the rows are stored once

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        t = self._tokens[0]
        if t.merged or t.disabled:
            return out
        new = F.linear(x.to(t.trainable_tokens_delta.dtype), t.trainable_tokens_delta)
        return out.index_copy(-1, t.token_indices, new.to(out.dtype))


def token_layers(model: nn.Module) -> list[TrainableTokens]:
    return [m for m in model.modules() if isinstance(m, TrainableTokens)]


def _weight_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "dequantize") and hasattr(module, "in_features")  # ember.quant layers


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_quantized(module)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def target_names(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Paths of the linear layers `targets` selects, with PEFT's matching rules."""
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or isinstance(module, LoraLinear) or ".lora_" in name:
            continue
        if targets == ALL_LINEAR:
            hit = name != "lm_head"
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            names.append(name)
    if not names:
        raise EmberError(f"No linear layer of the model matches the LoRA targets {targets!r} "
                         "(Ember uses Llama names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze `model` and wrap the targeted linear layers in place; returns the same model."""
    if lora_layers(model):
        raise EmberError("This model already has LoRA adapters.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in target_names(model, cfg.target_modules):
        _set_module(model, name, LoraLinear(model.get_submodule(name), cfg))
    if cfg.trainable_token_indices:
        tokens = TrainableTokens(model.model.embed_tokens, cfg.trainable_token_indices)
        model.model.embed_tokens = tokens
        if getattr(model.config, "tie_word_embeddings", False):
            model.lm_head = TiedTokensHead(model.lm_head, tokens)
    model.lora_config = cfg  # what save_adapter writes
    return model


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once, NF4 weights by element."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():  # quantized weights are buffers, not parameters
        if _is_quantized(m):
            total += m.in_features * m.out_features
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = trainable_summary(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


# --- merge, unmerge, disable ---------------------------------------------------------------
def _base_weight(layer: LoraLinear) -> Tensor:
    if _is_quantized(layer.base_layer):
        raise EmberError("Cannot merge LoRA into a quantized (e.g. NF4) base; dequantize it first.")
    return layer.base_layer.weight


def _untied_weight(model: nn.Module, layer: LoraLinear) -> Tensor:
    """The base weight to merge into. A tied LM head shares it with the token embeddings, so
    merging would move the embeddings too: the head gets its own copy first, and the model
    is untied from then on."""
    w = _base_weight(layer)
    if any(isinstance(m, nn.Embedding) and m.weight is w for m in model.modules()):
        layer.base_layer.weight = w = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        if hasattr(getattr(model, "config", None), "tie_word_embeddings"):
            model.config.tie_word_embeddings = False  # saved checkpoints then keep both matrices
    return w


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling B A), computed in float32."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            w = _untied_weight(model, layer)
            w.copy_((w.float() + layer.delta_weight()).to(w.dtype))
            layer.merged = True
    for tokens in token_layers(model):
        if not tokens.merged:
            if not isinstance(tokens.base_layer, nn.Embedding):
                raise EmberError("Cannot merge trainable token rows into a quantized (e.g. NF4) table; dequantize it first.")
            tokens.write_rows(tokens.trainable_tokens_delta)
            tokens.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (W -= scaling B A), restoring the base up to float rounding."""
    for layer in lora_layers(model).values():
        if layer.merged:
            w = _base_weight(layer)
            w.copy_((w.float() - layer.delta_weight()).to(w.dtype))
            layer.merged = False
    for tokens in token_layers(model):
        if tokens.merged:
            tokens.write_rows(tokens.original)
            tokens.merged = False
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base layers back: an ordinary model with the adapter baked in."""
    merge_lora(model)
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.base_layer)
    if token_layers(model):
        model.lm_head, model.model.embed_tokens = _head(model), _table(model)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (e.g. the DPO reference policy)."""
    tokens = token_layers(model)
    merged_tokens = [t for t in tokens if t.merged]
    with torch.no_grad():
        for t in merged_tokens:
            t.write_rows(t.original)
            t.merged = False
    layers = list(lora_layers(model).values()) + tokens
    merged = [layer for layer in layers if layer.merged]  # adapters only: the rows were unmerged above
    for layer in merged:
        w = _base_weight(layer)
        with torch.no_grad():
            w.copy_((w.float() - layer.delta_weight()).to(w.dtype))
        layer.merged = False
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
        for layer in merged:
            w = _base_weight(layer)
            with torch.no_grad():
                w.copy_((w.float() + layer.delta_weight()).to(w.dtype))
            layer.merged = True
        with torch.no_grad():
            for t in merged_tokens:
                t.write_rows(t.trainable_tokens_delta)
                t.merged = True


# --- the PEFT file format -----------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A and B of every adapter under PEFT's key names."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().cpu().contiguous()
    for name, m in model.named_modules():
        if isinstance(m, TrainableTokens):
            out[f"{PEFT_PREFIX}{name}.{TOKEN_KEY}"] = m.trainable_tokens_delta.detach().cpu().contiguous()
    return out


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    cfg: LoraConfig = getattr(model, "lora_config", None)
    if cfg is None:
        raise EmberError("This model has no LoRA adapters to save.")
    # The short names of the adapted layers: PEFT matches them as path suffixes.
    short = sorted({name.rsplit(".", 1)[-1] for name in lora_layers(model)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": short if not isinstance(cfg.target_modules, str) or cfg.target_modules == ALL_LINEAR
        else cfg.target_modules,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
        "revision": None, "auto_mapping": None, "trainable_token_indices": cfg.trainable_token_indices,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT layout) atomically."""
    from ember.checkpoint import atomic_dir, write_json

    if getattr(getattr(model, "config", None), "model_type", None) == "gpt2":
        raise EmberError("PEFT-format adapters are written for Llama-family models only; GPT-2's fused "
                         "c_attn layout differs from Ember's split q/k/v projections.")
    config = adapter_config(model, base_model)
    weights = adapter_state_dict(model)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / CONFIG_NAME, config)
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(out_dir)


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, Tensor]]:
    """The config and tensors (keys without the PEFT prefix) of a PEFT LoRA directory."""
    from ember.checkpoint import read_json

    path = Path(path)
    if not path.is_dir():
        raise EmberError(f"Adapter directory {path} does not exist.")
    raw = read_json(path / CONFIG_NAME, "Adapter config")
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise EmberError(f"{path / CONFIG_NAME} is not a LoRA adapter (peft_type {raw.get('peft_type')!r}).")
    unsupported = {"use_dora": raw.get("use_dora"), "rank_pattern": raw.get("rank_pattern"),
                   "alpha_pattern": raw.get("alpha_pattern"), "modules_to_save": raw.get("modules_to_save"),
                   "layers_to_transform": raw.get("layers_to_transform"),
                   "fan_in_fan_out": raw.get("fan_in_fan_out"), "lora_bias": raw.get("lora_bias")}
    used = [k for k, v in unsupported.items() if v]
    if raw.get("bias", "none") != "none":
        used.append(f"bias={raw['bias']}")
    if used:
        raise EmberError(f"The adapter in {path} uses {', '.join(used)}, which Ember does not support.")
    if not (path / WEIGHTS_NAME).is_file():
        raise EmberError(f"Adapter directory {path} has no {WEIGHTS_NAME} (pickled adapter_model.bin is not read).")
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except SafetensorError as e:
        raise EmberError(f"The adapter weights in {path} are corrupt ({e}).") from None
    state = {}
    indices = raw.get("trainable_token_indices")
    if isinstance(indices, dict):  # {"embed_tokens": [...]}: the input embedding is the one Ember trains
        if set(indices) - {"embed_tokens"}:
            raise EmberError(f"The adapter in {path} trains token rows of {sorted(indices)}; Ember trains embed_tokens only.")
        indices = indices.get("embed_tokens")
    for k, v in tensors.items():
        if k.endswith("." + TOKEN_KEY) or k.endswith("." + TOKEN_KEY + ".default"):
            if indices is None or tuple(v.shape[:1]) != (len(indices),):
                raise EmberError(f"The adapter in {path} has trainable token rows {tuple(v.shape)} that its "
                                 "config's trainable_token_indices do not describe.")
            state[TOKEN_KEY] = v
            continue
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])(?:\.default)?\.weight", k)
        if m is None:
            raise EmberError(f"Adapter weight '{k}' in {path} is not a LoRA A/B matrix Ember understands.")
        state[f"{m.group(1)}.{m.group(2)}.weight"] = v
    if indices and TOKEN_KEY not in state:
        raise EmberError(f"The adapter in {path} lists trainable_token_indices but holds no token rows.")
    modules = sorted({k.rsplit(".", 2)[0] for k in state if k != TOKEN_KEY})
    cfg = LoraConfig(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                     dropout=float(raw.get("lora_dropout", 0.0)), target_modules=modules or ["none"],
                     use_rslora=bool(raw.get("use_rslora", False)), trainable_token_indices=indices)
    return cfg, state


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the PEFT-format adapter in `path` to `model` (in place); refuses a different base."""
    cfg, state = read_adapter(path)
    linear = {name for name, m in model.named_modules() if _is_linear(m)}
    missing = [m for m in cfg.target_modules if m not in linear]
    if missing:
        raise EmberError(f"The adapter in {path} was made for a different base model: it adapts "
                         f"{missing[0]}, which this model does not have ({len(missing)} such layers).")
    apply_lora(model, LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=
                                 "|".join(re.escape(m) for m in cfg.target_modules), use_rslora=cfg.use_rslora,
                                 trainable_token_indices=cfg.trainable_token_indices))
    model.lora_config = cfg
    own = {f"{name}.{part}.weight": getattr(layer, part).weight
           for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}
    own.update({TOKEN_KEY: t.trainable_tokens_delta for t in token_layers(model)})
    absent = sorted(own.keys() - state.keys())
    if absent:
        raise EmberError(f"The adapter in {path} lacks {absent[0]} ({len(absent)} tensors missing).")
    with torch.no_grad():
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise EmberError(f"The adapter in {path} was made for a different base model: {k} has shape "
                                 f"{tuple(v.shape)}, this model needs {tuple(own[k].shape)}.")
            own[k].copy_(v.to(own[k].dtype))
    return model


# --- QLoRA: the frozen base in NF4 ----------------------------------------------------------
class NF4Embedding(nn.Module):
    """An embedding table stored in NF4 (rows are [out=vocab, in=hidden] of an NF4Linear)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        from ember.quant.nf4 import NF4Linear

        super().__init__()
        vocab, hidden = embedding.weight.shape
        shell = nn.Linear(hidden, vocab, bias=False, device="meta")
        shell.weight = embedding.weight  # from_linear reads only .weight and the shapes
        self.table = NF4Linear.from_linear(shell)

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.table.dequantize(self.table.compute_dtype))


class TiedNF4Head(nn.Module):
    """The LM head of a tied model: logits against the NF4 embedding table, stored once."""

    def __init__(self, embedding: NF4Embedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list: not a second submodule, so not stored twice

    @property
    def weight(self) -> Tensor:
        return self._embedding[0].weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._embedding[0].table.dequantize(x.dtype))


def quantize_base(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Store every frozen linear weight (and, with `embeddings`, the token table and a tied
    or untied LM head) in NF4 with double-quantized scales; LoRA A and B stay float32."""
    from ember.quant.nf4 import NF4Linear

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".lora_" not in name and not module.weight.requires_grad:
            if name in ("lm_head", "lm_head.base_layer") and (
                    not embeddings or getattr(model.config, "tie_word_embeddings", False)):
                continue
            _set_module(model, name, NF4Linear.from_linear(module))
    if embeddings:
        table = NF4Embedding(_table(model))
        _set_table(model, table)
        if getattr(model.config, "tie_word_embeddings", False):
            _set_head(model, TiedNF4Head(table))
    return model


def _table(model: nn.Module) -> nn.Module:
    """The token table, under trainable token rows if the model has them."""
    e = model.model.embed_tokens
    return e.base_layer if isinstance(e, TrainableTokens) else e


def _set_table(model: nn.Module, table: nn.Module) -> None:
    if isinstance(model.model.embed_tokens, TrainableTokens):
        model.model.embed_tokens.base_layer = table
    else:
        model.model.embed_tokens = table


def _head(model: nn.Module) -> nn.Module:
    return model.lm_head.base_layer if isinstance(model.lm_head, TiedTokensHead) else model.lm_head


def _set_head(model: nn.Module, head: nn.Module) -> None:
    if isinstance(model.lm_head, TiedTokensHead):
        model.lm_head.base_layer = head
    else:
        model.lm_head = head


def dequantize_base(model: nn.Module) -> nn.Module:
    """Undo `quantize_base` for inference: each NF4 weight becomes a plain float32 tensor holding
    exactly the values the NF4 forward multiplies by, so outputs stay the same (what QLoRA
    trained) while the weight is decoded once instead of at every forward; the adapters can then
    be merged too. Costs the float weights' memory again."""
    from ember.quant.nf4 import NF4Linear

    table = _table(model)
    if isinstance(table, NF4Embedding):
        plain = nn.Embedding.from_pretrained(table.table.dequantize(torch.float32), freeze=True)
        _set_table(model, plain)
        if isinstance(_head(model), TiedNF4Head):
            # a shell on the meta device (no weight allocated), then the table itself as its weight
            head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, device="meta")
            head.weight = plain.weight
            _set_head(model, head)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.dequantize(torch.float32), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            _set_module(model, name, linear)
    return model


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the frozen base occupies now, bytes it would occupy in bf16)."""
    now = bf16 = 0
    seen: set[int] = set()
    for m in model.modules():
        if _is_quantized(m):
            now += m.nbytes()
            bf16 += 2 * m.in_features * m.out_features + (2 * m.bias.numel() if m.bias is not None else 0)
            seen.update(id(t) for t in m.parameters())
    for p in model.parameters():
        if id(p) not in seen and not p.requires_grad:
            seen.add(id(p))
            now += p.numel() * p.element_size()
            bf16 += 2 * p.numel()
    return now, bf16
