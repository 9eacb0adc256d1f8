"""Adapters on disk in PEFT's file format.

Ember's modules carry Hugging Face Llama names, so an adapter is PEFT's own layout:
`adapter_config.json` plus `adapter_model.safetensors` with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. `peft` opens Ember's adapters on
the same base loaded by `transformers`, and Ember opens `peft`'s.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ember.errors import EmberError
from ember.files import atomic_dir, read_json, write_json
from ember.lora.config import ALL_LINEAR, LoraConfig
from ember.lora.layers import apply_lora, is_linear, lora_layers
from ember.lora.tokens import TrainableTokens, token_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key for trainable token rows


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A and B of every adapter, and any trainable token rows, under PEFT's key names."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().cpu().contiguous()
    for name, m in model.named_modules():
        if isinstance(m, TrainableTokens):
            out[f"{PEFT_PREFIX}{name}.{TOKEN_KEY}"] = m.trainable_tokens_delta.detach().cpu().contiguous()
    return out


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    """The `adapter_config.json` PEFT reads for the adapters on `model`."""
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
    linear = {name for name, m in model.named_modules() if is_linear(m)}
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
