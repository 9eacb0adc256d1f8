"""LoRA adapter layers (Hu et al., 2021) and putting them on a frozen model.

A targeted linear layer y = W x becomes y = W x + (alpha / r) * B A dropout(x), with A [r, in]
drawn kaiming-uniform and B [out, r] zero, so the adapted model starts equal to its base. Only A
and B (and any trainable token rows) train.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.errors import EmberError
from ember.lora.config import ALL_LINEAR, LoraConfig
from ember.lora.tokens import add_trainable_tokens
from ember.modules import replace_modules


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


def _weight_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def is_quantized(module: nn.Module) -> bool:
    """An `ember.quant` layer: its weight lives in buffers and is decoded by `dequantize`."""
    return hasattr(module, "dequantize") and hasattr(module, "in_features")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_quantized(module)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def target_names(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Paths of the linear layers `targets` selects, with PEFT's matching rules."""
    names = []
    for name, module in model.named_modules():
        if not is_linear(module) or isinstance(module, LoraLinear) or ".lora_" in name:
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


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze `model` and wrap the targeted linear layers in place; returns the same model."""
    if lora_layers(model):
        raise EmberError("This model already has LoRA adapters.")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(target_names(model, cfg.target_modules))
    replace_modules(model, lambda name, module: LoraLinear(module, cfg) if name in targets else None)
    if cfg.trainable_token_indices:
        add_trainable_tokens(model, cfg.trainable_token_indices)
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
        if is_quantized(m):
            total += m.in_features * m.out_features
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = trainable_summary(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
