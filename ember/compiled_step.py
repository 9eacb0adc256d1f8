"""The compiled one-token decode step over a static KV cache (gpt-fast's way), shared by the
simple generator (`ember.generation`) and the engine's draft model (`ember.engine.speculative`).

`compiled_decode_step(device_type)` is `decode_step` under `torch.compile`; `structure_key(model)`
fingerprints what a compiled graph assumes about a model, standing in for dynamo's guards on it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ember.kv_cache import StaticKVCache
from ember.model import CausalLM


def decode_step(model: CausalLM, cache: StaticKVCache, token: Tensor, pos: Tensor, structure: int = 0) -> Tensor:
    """Logits [1, V] of one token at position `pos` (a [1] tensor): static shapes throughout.
    `structure` (`structure_key(model)`) only tells compiled graphs of different models apart:
    dynamo guards a value only where the code reads it, hence the read below."""
    cache.structure = structure
    cache.decode_at(pos)
    return model(token, cache=cache, last_only=True)[:, -1]


def _layout(value: Any, depth: int = 0) -> Any:
    """What a compiled graph depends on in one attribute: a tensor's dtype, shape and device,
    a plain value itself, a plain object's (a config's) fields, anything else its type."""
    if isinstance(value, Tensor):
        return (value.dtype, tuple(value.shape), value.device.type)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_layout(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3:
        return tuple((k, _layout(v, depth + 1)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    if hasattr(value, "__dict__") and not isinstance(value, nn.Module) and not callable(value) and depth < 3:
        return (type(value).__qualname__, _layout(vars(value), depth + 1))
    return type(value).__qualname__


def structure_key(model: nn.Module) -> int:
    """A fingerprint of what a compiled step assumes about a model: every module's type, mode
    and attributes (the config's values among them), every weight's dtype, shape and device and
    which weights are one tensor (a tied head), but not the values, which the graph reads at
    each call, nor the caches a module names in `CACHES` (filled at first use, read by no graph). Taken once a generation, it stands in for dynamo's guards on the modules, which
    `compiled_decode_step` drops: checking thousands of guards each step would cost more than a small model's step saves.
    Models of one structure share a graph (dynamo keeps at most 8 per function)."""
    first_seen: dict[int, int] = {}  # a tensor's identity -> the index it was first seen at
    parts = []
    for name, module in model.named_modules():
        caches = getattr(module, "CACHES", ())
        attrs = tuple((k, _layout(v)) for k, v in sorted(module.__dict__.items())
                      if k not in ("_parameters", "_buffers", "_modules") and not k.endswith("_hooks")
                      and k not in caches)
        tensors = []
        for k, t in [*module._parameters.items(), *module._buffers.items()]:
            alias = first_seen.setdefault(id(t), len(first_seen)) if t is not None else None
            tensors.append((k, _layout(t), alias))
        parts.append((name, type(module).__qualname__, attrs, tuple(tensors)))
    return hash(tuple(parts))


def _skip_guards_under_model(entries: list) -> list[bool]:
    """Keep every guard but those reached through `decode_step`'s `model` argument. Frames
    that resume after a graph break (a mixture of experts' routing) keep all of theirs: there
    the module is a local of its own, and its guards tell one layer from another."""
    return [not (e.name == "model" or e.name.startswith(("model.", "model["))) for e in entries]


@functools.cache
def compiled_decode_step(device_type: str = "cpu"):
    """`decode_step` under `torch.compile` (one per process and device type; it compiles once per
    model structure and cache size). Not fullgraph: a mixture of experts routes by data (`nonzero`) and
    breaks the graph there. On the CPU the graph's wrapper is generated C++ (`cpp_wrapper`), not
    Python: a step launches many small kernels, and calling each from Python is per-token overhead. Dynamo's guards on the model are
    dropped (callers pass `structure_key(model)` instead, which dynamo guards as one int); the
    guards on the cache, token and position stay."""
    options: dict[str, Any] = {}
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # guard filters: torch >= 2.8
        options["guard_filter_fn"] = _skip_guards_under_model
    if device_type == "cpu":
        options["cpp_wrapper"] = True
    return torch.compile(decode_step, dynamic=False, options=options)
