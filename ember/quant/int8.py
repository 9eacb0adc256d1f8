"""int8 weight-only: per-output-channel symmetric, as in gpt-fast's `WeightOnlyInt8Linear`.

Each row of W [out, in] gets scale s = max|row| / 127 and int8 values round(W / s), so
W ≈ q * s[:, None]. The matmul keeps activations in float: y = (x @ qᵀ) * s. On CPU that is
PyTorch's fused `aten._weight_int8pack_mm` (reads 1 byte/weight instead of 2 or 4), fed
bf16 activations even in an fp32 model (its fp32 path is the slow one); elsewhere the weight
is dequantized into the activation dtype first. A model prepared for CPU inference
(`ember.cpu_inference`) swaps these layers for ones whose products of a few rows run in
`ember.gemv` (each row rounded once to int16, for integer multiply-adds).

With `group_size` (a power of two from 32) the scales are per group of that many input columns
instead, [out, in / group] fp32 or fp16: llama.cpp's Q8_0 (an fp16 scale per 32 values), kept as
the file has it when a GGUF model is loaded (`ember.gguf.model`). PyTorch's int8 kernel takes one
scale a row, so without Ember's kernel such a layer dequantizes and multiplies in float.
`Int8Embedding` is a token table in the same form: a lookup dequantizes only the rows it gathers,
and a tied LM head (`Int8Embedding.head`) is an `Int8Linear` over the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.errors import EmberError
from ember.quant.base import KeepsScaleDtype, QuantLinear
from ember.quant.kernels import kernel_works


def quantize_per_channel(w: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization: (int8 [out, in], fp32 scales [out])."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / qmax
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def check_int8_group(in_features: int, group_size: int) -> None:
    if group_size < 32 or group_size & (group_size - 1) or in_features % group_size:
        raise EmberError(f"int8 group size must be a power of two from 32 that divides in_features {in_features}, "
                         f"got {group_size}.")


def dequantize_rows(qweight: Tensor, scales: Tensor, group_size: int | None) -> Tensor:
    """fp32 rows q * s from int8 rows [..., in] and their scales ([...] a row, or [..., in / group])."""
    q = qweight.float()
    if group_size is None:
        return q * scales.float()[..., None]
    grouped = q.unflatten(-1, (-1, group_size)) * scales.float()[..., None]
    return grouped.flatten(-2)


class Int8Linear(QuantLinear):
    method = "int8"
    keep_dtype = ("scales",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, group_size: int | None = None,
                 scale_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, device)
        if group_size is not None:
            check_int8_group(in_features, group_size)
        self.group_size = group_size  # None: one scale a row
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(scale_shape, dtype=scale_dtype, device=device))
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
        return dequantize_rows(self.qweight, self.scales, self.group_size).to(dtype)

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

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        return f"{super().extra_repr()}{group}"

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # The CPU kernel's fp32-activation path is the slow one (benchmarks/quant.py), so fp32
        # inputs run in bf16 and come back as fp32.
        act = torch.bfloat16 if x.dtype == torch.float32 and x.device.type == "cpu" else x.dtype
        needs_grad = torch.is_grad_enabled() and x.requires_grad  # PyTorch's int8 kernel has no backward
        if self.group_size is not None:  # PyTorch's kernel takes a scale a row
            y = F.linear(x2, self.dequantize(x.dtype))
        elif not needs_grad and kernel_works("int8pack", x2.device, act):
            y = torch.ops.aten._weight_int8pack_mm(x2.to(act).contiguous(), self.qweight,
                                                   self._scales(act)).to(x.dtype)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)


class Int8Embedding(KeepsScaleDtype):
    """A token embedding over an int8 table [vocab, hidden] with a scale per group of columns: a
    lookup gathers the rows' int8 values and scales and dequantizes those rows only, into
    `compute_dtype` (the dtype a float table would have; `model.to(dtype)` sets it and keeps the
    int8 values and scales as they are)."""

    keep_dtype = ("scales",)

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32,
                 scale_dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_int8_group(embedding_dim, group_size)
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, embedding_dim // group_size, dtype=scale_dtype,
                                                  device=device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole table [vocab, hidden] reconstructed in `dtype` (a copy)."""
        return dequantize_rows(self.qweight, self.scales, self.group_size).to(dtype)

    @property
    def weight(self) -> Tensor:
        """The whole table dequantized (a copy), for callers that read a table's `.weight`."""
        return self.dequantize(self.compute_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return dequantize_rows(self.qweight[ids], self.scales[ids], self.group_size).to(self.compute_dtype)

    def head(self) -> Int8Linear:
        """The tied LM head: an `Int8Linear` [vocab, hidden] over this table's own tensors (no copy)."""
        head = Int8Linear(self.embedding_dim, self.num_embeddings, bias=False, device="meta",
                          group_size=self.group_size, scale_dtype=self.scales.dtype)
        head.qweight, head.scales = self.qweight, self.scales
        head.compute_dtype = self.compute_dtype
        return head

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"
