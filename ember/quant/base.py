"""What every quantized linear layer shares: it stands in for `nn.Linear` inside a CausalLM.

Its tensors are buffers (so `.to(device)` moves them and `state_dict()` saves them), its
bias a frozen parameter. Scales keep their dtype when the model is cast to bf16 (casting them
would throw away precision the format paid for); the cast only sets `compute_dtype`. That rule
(`KeepsScaleDtype`) serves quantized embedding tables too (`ember.quant.int8.Int8Embedding`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KeepsScaleDtype(nn.Module):
    """A module over quantized tensors: `model.to(dtype)` sets `compute_dtype` (the dtype its float
    outputs take) and leaves the buffers named in `keep_dtype` in their own dtype."""

    keep_dtype: tuple[str, ...] = ()  # buffers (scales) that keep their own dtype under model.to(dtype)

    def __init__(self) -> None:
        super().__init__()
        self.compute_dtype = torch.float32  # dtype of the weight it replaced = dtype of `.weight`

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        before = {name: self._buffers[name] for name in self.keep_dtype if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        probe = fn(torch.zeros(0, dtype=self.compute_dtype))  # what a float weight would have become
        self.compute_dtype = probe.dtype
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class QuantLinear(KeepsScaleDtype):
    method: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out, in] reconstructed from the quantized tensors (each method defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define dequantize()")

    @property
    def weight(self) -> Tensor:
        """A dequantized copy, for callers that read `.weight.device` / `.dtype` (the engine does)."""
        return self.dequantize(self.compute_dtype)

    def nbytes(self) -> int:
        """Bytes of the weight's quantized tensors and the bias."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _copy_bias(self, linear: nn.Linear) -> None:
        self.compute_dtype = linear.weight.dtype
        if linear.bias is not None:
            self.bias.data = linear.bias.detach().clone()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
