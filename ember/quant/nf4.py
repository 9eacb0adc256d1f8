"""NF4: QLoRA's 4-bit NormalFloat weights, with double quantization of the block scales.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), section 3:
- The weight is flattened (row-major) and cut into blocks of 64. Each block is scaled by
  its absolute maximum into [-1, 1] and every value is replaced by the nearest of 16
  code values: quantiles of N(0, 1), asymmetric so that 0 is exactly representable
  (8 positive, 7 negative, and 0), normalised to [-1, 1]. Two 4-bit indices share a byte,
  the first element of each pair in the high nibble (bitsandbytes' layout).
- Double quantization: the fp32 absmax constants (one per 64 weights, 0.5 bit/param)
  are themselves quantized to 8 bits in blocks of 256, after subtracting their mean
  (they are all positive), with the signed 8-bit dynamic-tree code; this leaves
  8/64 + 32/(64*256) ≈ 0.127 bit/param for the scales.

`NF4Linear` keeps only these tensors and dequantizes in its forward, so autograd flows
to the input (LoRA adapters on top train) while the frozen 4-bit weight has no grad.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.errors import EmberError
from ember.quant.base import QuantLinear

# The 16 NF4 values as published in the QLoRA paper (appendix E) and bitsandbytes.
# `nf4_code_from_definition` derives them from the normal quantiles; a test checks both agree.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

DOUBLE_QUANT_BLOCK = 256  # the paper's block size for the second-level (8-bit) quantization


def nf4_code_from_definition(offset: float = 0.9677083) -> Tensor:
    """The NF4 code from its definition: N(0,1) quantiles at evenly spaced probabilities
    between `offset` and 1/2 (8 positive, 7 negative), plus an exact zero, scaled to [-1, 1]."""
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return (values / values.abs().max()).sort().values.float()


@functools.lru_cache(maxsize=4)
def dynamic_code(exponent_bits: int = 7) -> Tensor:
    """Signed 8-bit dynamic-tree code (Dettmers 2016, used by bitsandbytes for 8-bit states):
    for each decade 10^(i-6), i < 7, 2^i linearly spaced fractions in (0.1, 1], both signs;
    plus 0 and 1. 127 + 127 + 2 = 256 sorted values."""
    values = [0.0, 1.0]
    for i in range(exponent_bits):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * 10.0 ** (i - (exponent_bits - 1))
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _pair_table(device: torch.device) -> Tensor:
    """byte -> (code[high nibble], code[low nibble]): one gather dequantizes two weights."""
    return torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1).to(device)


def _nearest(values: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest code value (code sorted ascending), via the midpoints between codes."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values, mids.to(values.device)).to(torch.uint8)


def _blocks(flat: Tensor, block: int) -> Tensor:
    """[n] -> [ceil(n / block), block], zero-padded."""
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def blockwise_quantize(x: Tensor, code: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Absmax-scaled nearest-code quantization of flat `x` in blocks: (indices uint8, absmax fp32)."""
    b = _blocks(x.float().reshape(-1), block)
    absmax = b.abs().amax(dim=1)
    scaled = b / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return _nearest(scaled, code).reshape(-1)[: x.numel()], absmax


def blockwise_dequantize(idx: Tensor, absmax: Tensor, code: Tensor, block: int) -> Tensor:
    values = code.to(absmax.device)[idx.long()]
    return (_blocks(values, block) * absmax[:, None]).reshape(-1)[: idx.numel()]


@dataclass
class NF4Weight:
    """A weight in NF4. Tensors (all on one device):
    packed   uint8 [ceil(n/2)]  two 4-bit code indices per byte, first in the high nibble
    absmax   fp32 [blocks]      (double_quant=False) per-block scale
             uint8 [blocks]     (double_quant=True) index into the 8-bit dynamic code, with
    absmax_scale  fp32 [ceil(blocks/256)]  and  absmax_offset fp32 []  (the subtracted mean)
    """

    packed: Tensor
    absmax: Tensor
    shape: tuple[int, ...]
    block_size: int = 64
    absmax_scale: Tensor | None = None
    absmax_offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def block_scales(self) -> Tensor:
        """The fp32 per-block absmax, undoing the double quantization if any."""
        if not self.double_quant:
            return self.absmax.float()
        return blockwise_dequantize(self.absmax, self.absmax_scale, dynamic_code(),
                                    DOUBLE_QUANT_BLOCK) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        n = math.prod(self.shape)
        values = _pair_table(self.packed.device)[self.packed.long()].reshape(-1)[:n]
        w = (_blocks(values, self.block_size) * self.block_scales()[:, None]).reshape(-1)[:n]
        return w.view(self.shape).to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> "NF4Weight":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4Weight(shape=self.shape, block_size=self.block_size, **moved)


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize any-shaped `weight` to NF4 in blocks of `block_size` over its flattened values."""
    if block_size < 2 or block_size % 2:
        raise EmberError(f"NF4 block size must be an even number ≥ 2, got {block_size}.")
    w = weight.detach()
    idx, absmax = blockwise_quantize(w, NF4_CODE.to(w.device), block_size)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = (idx[0::2] << 4) | idx[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(w.shape), block_size)
    offset = absmax.mean()
    q, scale = blockwise_quantize(absmax - offset, dynamic_code().to(w.device), DOUBLE_QUANT_BLOCK)
    return NF4Weight(packed, q, tuple(w.shape), block_size, absmax_scale=scale, absmax_offset=offset)


class NF4Linear(QuantLinear):
    """A frozen linear layer whose weight is NF4; forward = dequantize, then matmul.

    Gradients reach the input (so LoRA adapters on top train), never the 4-bit weight.
    """

    method = "nf4"
    keep_dtype = ("absmax", "absmax_scale", "absmax_offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.block_size, self.double_quant = block_size, double_quant
        n = in_features * out_features
        blocks = -(-n // block_size)
        self.register_buffer("packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-blocks // DOUBLE_QUANT_BLOCK), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, double_quant,
                  device=w.device)
        for name, t in quantize_nf4(w, block_size, double_quant).tensors().items():
            getattr(mod, name).copy_(t)
        mod._copy_bias(linear)
        return mod

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.block_size,
                         getattr(self, "absmax_scale", None), getattr(self, "absmax_offset", None))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.nf4.dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, double_quant={self.double_quant}"
