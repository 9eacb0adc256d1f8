"""Faster CPU matmuls for inference: pre-packed weights for many rows, a GEMV kernel for up to 16.

PyTorch's `nn.Linear` on the CPU multiplies through MKL with the weight in its plain
row-major layout. oneDNN can first reorder a weight into its own blocked layout, once,
and then multiply a few rows at a time faster: on a 2-core AVX2 machine, with a whole
model's weights cold in cache as in a real step, 1.7x for 8 rows, 1.4x for 32 and 1.1x
for 512. That is the engine's decode step: one row per running sequence (the engine
benchmark's `pack_weights=False` row shows about 1.1x end to end). A single row (batch-1
decoding) goes instead through `ember.gemv`, which streams the plain weight at the memory's
read bandwidth, and so do 2 to 16 rows (a speculative step's verification, a small batch), each
weight read once for all of them; it reads the live weight, so it needs no copy and never goes stale.

`packed_linears(model)` switches a model's plain `nn.Linear` layers to these paths inside
a `with` block only, so training, copying and saving the model never see them.
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

from ember import gemv

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
    return type(module) is nn.Linear and w is not None and w.device.type == "cpu" and w.is_floating_point()


def _weight(module: nn.Linear) -> Tensor:
    w = module.weight
    key = (w.data_ptr(), w._version)
    entry = _packed.get(module)
    if entry is None or entry[0] != key:
        entry = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
        _packed[module] = entry
    return entry[1]


def _fast_forward(module: nn.Linear, pack: bool, few_rows: bool, x: Tensor) -> Tensor:
    w = module.weight
    if few_rows and gemv.applies(x, w):
        return gemv.gemv(x, w, bias=module.bias)
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if not pack or rows < 2 or x.dtype != torch.float32 or w.dtype != torch.float32 or not _eligible(module):
        return F.linear(x, w, module.bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), _weight(module),
                                             module.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def _gemv_operand(module: nn.Linear, x: Tensor) -> gemv.Operand | None:
    """The layer's part in a shared `ember.gemv.many` call (see `_fast_forward`)."""
    return gemv.Operand("rows", module.weight, bias=module.bias) if gemv.applies(x, module.weight) else None


# model -> {(pack, few_rows): its eligible layers with their forwards}, found once: scanning the
# module tree and binding closures every step costs more than the dictionary writes below.
_layers: weakref.WeakKeyDictionary[nn.Module, dict[tuple[bool, bool], list[tuple[nn.Linear, functools.partial]]]] = (
    weakref.WeakKeyDictionary())


@contextmanager
def packed_linears(model: nn.Module, pack: bool = True, few_rows: bool = True) -> Iterator[None]:
    """Within the block, the model's CPU `nn.Linear` layers take the faster paths: fp32 ones
    multiply many rows through packed weights (`pack`), and fp32/bf16/fp16 ones up to
    `ember.gemv.MAX_ROWS` rows through `ember.gemv` (`few_rows`).

    Use it around inference only: the packed path has no backward, and the one-row path
    steps aside whenever autograd is on. Does nothing off the CPU or where neither path is
    available. Layers are found on the first call; a layer swapped in later (quantization,
    adapters) keeps its own forward, and one moved off the CPU falls back to the plain path."""
    pack, few_rows = pack and available(), few_rows and gemv.available()
    if not (pack or few_rows):
        yield
        return
    by_mode = _layers.setdefault(model, {})
    layers = by_mode.get((pack, few_rows))
    if layers is None:
        layers = by_mode[pack, few_rows] = [(m, functools.partial(_fast_forward, m, pack, few_rows))
                                           for m in model.modules() if _eligible(m)]
    for layer, forward in layers:
        layer.__dict__["forward"] = forward  # an instance attribute shadows nn.Linear.forward
        if few_rows:  # and joins ember.gemv.many's shared calls (q, k, v; gate, up)
            layer.__dict__["gemv_operand"] = functools.partial(_gemv_operand, layer)
    try:
        yield
    finally:
        for layer, _ in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("gemv_operand", None)

