"""Which of PyTorch's low-bit kernels run here: probed once per (kernel, device, dtype).

The ops are private (`torch.ops.aten._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`,
`torch._int_mm`) and their device/dtype support differs between builds, so instead of
guessing from the version we call each once on a tiny input and remember the answer.
A kernel that does not run means the caller's dequantize-then-matmul fallback.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ember import gemv

_disabled = False
_cache: dict[tuple[str, str, torch.dtype], bool] = {}


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> None:
    n, k = 64, 128
    x = torch.randn(2, k, device=device).to(dtype)
    if name == "int8pack":
        w = torch.ones(n, k, dtype=torch.int8, device=device)
        torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(n, device=device, dtype=dtype))
    elif name == "int4pack_cpu":
        if device.type != "cpu":
            raise RuntimeError("CPU kernel")
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.ones(n, k, dtype=torch.int32), 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 32, torch.ones(k // 32, n, 2, dtype=dtype))
    elif name == "int_mm":
        a = torch.ones(32, k, dtype=torch.int8, device=device)
        torch._int_mm(a, torch.ones(k, n, dtype=torch.int8, device=device))
    else:
        raise ValueError(name)


def kernel_works(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    if _disabled:
        return False
    key = (name, device.type, dtype)
    if key not in _cache:
        try:
            _probe(name, device, dtype)
            _cache[key] = True
        except (RuntimeError, NotImplementedError, AttributeError):
            # A build without the op (AttributeError) or without it for this device and dtype
            # (the others): the layer falls back to dequantize-then-matmul.
            _cache[key] = False
    return _cache[key]


@contextlib.contextmanager
def fallback_only() -> Iterator[None]:
    """Run without the fused kernels, Ember's one-row GEMV included (dequantize-then-matmul
    everywhere): for tests and benchmarks."""
    global _disabled
    old, _disabled = _disabled, True
    try:
        with gemv.disabled():
            yield
    finally:
        _disabled = old
