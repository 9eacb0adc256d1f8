"""Swapping modules inside a model by name: the one helper that quantization, LoRA and the CPU
inference layers use to put their layers in place of `nn.Linear` (gpt-fast's `replace_linear_*`)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the dotted `name` ("model.layers.0.mlp.up_proj") points inside `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def replace_modules(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> list[str]:
    """Call `make(name, module)` on every submodule (the tree as it was before any swap) and put each
    non-None result in that module's place; returns the names replaced. A replaced module's own
    children are not visited."""
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(r + ".") for r in replaced):
            continue
        new = make(name, module)
        if new is not None and new is not module:
            set_module(model, name, new)
            replaced.append(name)
    return replaced
