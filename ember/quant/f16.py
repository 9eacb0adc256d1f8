"""fp16 weights kept as they are inside a float32 (or bf16) model: a GGUF file's F16 matrices.

Every fp16 value is exactly an fp32 value, so a product over the fp16 weights widened in registers
is the product over the decoded fp32 weights, at half the bytes read. `F16Linear` stands in for
`nn.Linear` (its weight a buffer that `model.to(dtype)` leaves in fp16), `F16Embedding` for the
token table, and a tied head reads that table's own tensor (`F16Embedding.head`). A model prepared
for CPU inference (`ember.cpu_inference`) multiplies a few rows in `ember.gemv` straight from fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ember.quant.base import KeepsScaleDtype, QuantLinear


class F16Linear(QuantLinear):
    method = "f16"
    keep_dtype = ("qweight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float16, device=device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.qweight.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.qweight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class F16Embedding(KeepsScaleDtype):
    """A token embedding over an fp16 table [vocab, hidden]: a lookup widens the rows it gathers
    into `compute_dtype` (the dtype a float table would have)."""

    keep_dtype = ("qweight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.float16,
                                                    device=device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole table [vocab, hidden] in `dtype` (a copy)."""
        return self.qweight.to(dtype)

    @property
    def weight(self) -> Tensor:
        """The whole table widened (a copy), for callers that read a table's `.weight`."""
        return self.dequantize(self.compute_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight).to(self.compute_dtype)

    def head(self) -> F16Linear:
        """The tied LM head: an `F16Linear` [vocab, hidden] over this table's own tensor (no copy)."""
        head = F16Linear(self.embedding_dim, self.num_embeddings, bias=False, device="meta")
        head.qweight = self.qweight
        head.compute_dtype = self.compute_dtype
        return head

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fp16"
