"""int8 weight-only: per-output-channel symmetric, as in gpt-fast's `WeightOnlyInt8Linear`.

Each row of W [out, in] gets scale s = max|row| / 127 and int8 values round(W / s), so
W ≈ q * s[:, None]. The matmul keeps activations in float: y = (x @ qᵀ) * s. On CPU that is
PyTorch's fused `aten._weight_int8pack_mm` (reads 1 byte/weight instead of 2 or 4), fed
bf16 activations even in an fp32 model (its fp32 path is the slow one); elsewhere the weight
is dequantized into the activation dtype first. A model prepared for CPU inference
(`ember.cpu_inference`) swaps these layers for ones whose products of a few rows run in
`ember.gemv` (each row rounded once to int16, for integer multiply-adds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.quant.base import QuantLinear
from ember.quant.kernels import kernel_works


def quantize_per_channel(w: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization: (int8 [out, in], fp32 scales [out])."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / qmax
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


class Int8Linear(QuantLinear):
    method = "int8"
    keep_dtype = ("scales",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))
        self._scales_cache: Tensor | None = None  # `scales` in the activation dtype, see `_scales`

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        q, s = quantize_per_channel(linear.weight)
        mod.qweight.copy_(q)
        mod.scales.copy_(s)
        mod._copy_bias(linear)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def _scales(self, dtype: torch.dtype) -> Tensor:
        """The scales in `dtype`, made once: a compiled step then finds them made (the compiler
        cannot feed PyTorch's int8 kernel a cast made inside its graph)."""
        cached = self._scales_cache
        if cached is None or cached.dtype != dtype or cached.device != self.scales.device:
            self._scales_cache = cached = self.scales.to(dtype)
        return cached

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._scales_cache = None  # new scales arrive
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # The CPU kernel's fp32-activation path is the slow one (benchmarks/quant.py), so fp32
        # inputs run in bf16 and come back as fp32.
        act = torch.bfloat16 if x.dtype == torch.float32 and x.device.type == "cpu" else x.dtype
        needs_grad = torch.is_grad_enabled() and x.requires_grad  # PyTorch's int8 kernel has no backward
        if not needs_grad and kernel_works("int8pack", x2.device, act):
            y = torch.ops.aten._weight_int8pack_mm(x2.to(act).contiguous(), self.qweight,
                                                   self._scales(act)).to(x.dtype)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)
