"""Pre-packed weights for fp32 matmuls on the CPU.

PyTorch's `nn.Linear` on the CPU multiplies through MKL with the weight in its plain
row-major layout. oneDNN can first reorder a weight into its own blocked layout, once,
and then multiply a few rows at a time faster: on a 2-core AVX2 machine, with a whole
model's weights cold in cache as in a real step, 1.7x for 8 rows, 1.4x for 32 and 1.1x
for 512. That is the engine's decode step: one row per running sequence (the engine
benchmark's `pack_weights=False` row shows about 1.1x end to end). For a single row MKL's
matrix-vector product stays faster, so single rows keep the plain path.

`packed_linears(model)` switches a model's plain `nn.Linear` layers to packed weights
inside a `with` block only, so training, copying and saving the model never see them.
A packed copy costs a second copy of the linear weights in memory. It is rebuilt when its
weight is replaced or changed in place as PyTorch counts changes (the tensor's version),
but a fused optimizer step changes weights without counting: the engine therefore packs
only models it loaded itself (`pack_weights` in `ember.engine.EngineConfig`).
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# layer -> ((its weight's data pointer, version), packed weight); entries go with their layer.
_packed: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[int, int], Tensor]] = weakref.WeakKeyDictionary()


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def _eligible(module: nn.Module) -> bool:
    # Exactly nn.Linear: quantized and LoRA layers replace it with their own modules.
    w = getattr(module, "weight", None)
    return type(module) is nn.Linear and w is not None and w.device.type == "cpu" and w.dtype == torch.float32


def _weight(module: nn.Linear) -> Tensor:
    w = module.weight
    key = (w.data_ptr(), w._version)
    entry = _packed.get(module)
    if entry is None or entry[0] != key:
        entry = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
        _packed[module] = entry
    return entry[1]


def _packed_forward(module: nn.Linear, x: Tensor) -> Tensor:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if rows < 2 or x.dtype != torch.float32 or not _eligible(module):
        return F.linear(x, module.weight, module.bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), _weight(module),
                                             module.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


# model -> its eligible layers with their packed forwards, found once: scanning the module
# tree and binding closures every step costs more than the dictionary writes below.
_layers: weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Linear, functools.partial]]] = weakref.WeakKeyDictionary()


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, the model's fp32 CPU `nn.Linear` layers multiply through packed weights.

    Use it around inference only (under `torch.inference_mode()`): the packed path has no
    backward. Does nothing when disabled, when oneDNN is missing or off the CPU. Layers
    are found on the first call; a layer swapped in later (quantization, adapters) keeps
    its own forward, and one moved off fp32 CPU falls back to the plain path."""
    if not (enabled and available()):
        yield
        return
    layers = _layers.get(model)
    if layers is None:
        layers = _layers[model] = [(m, functools.partial(_packed_forward, m)) for m in model.modules()
                                   if _eligible(m)]
    for layer, forward in layers:
        layer.__dict__["forward"] = forward  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        for layer, _ in layers:
            layer.__dict__.pop("forward", None)

