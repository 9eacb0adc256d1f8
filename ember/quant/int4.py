"""int4 weight-only, group-wise asymmetric (gpt-fast / tinygemm convention).

Each row of W [out, in] is cut into groups of `group_size` (32, 64, 128 or 256) input columns.
A group with range [lo, hi] gets scale s = (hi - lo) / 15 and values q = round((w - lo) / s)
in 0..15; the zero point is stored as z = lo + 8 s, so w ≈ (q - 8) s + z, which is the
formula PyTorch's int4 kernels evaluate.

Stored (checkpoint, portable): `qweight` uint8 [out, in/2] (column 2j in the low nibble,
2j+1 in the high one) and `scales_and_zeros` bf16 [in/group, out, 2] (fp16 or fp32 for the
blocks of a GGUF file, whose scales are kept exactly: llama.cpp's Q4_0 is s = d, z = 0 and its
Q4_1 s = d, z = m + 8 d; see `ember.gguf.model`). On the CPU, where
PyTorch's `aten._weight_int4pack_mm_for_cpu` runs, the weight is repacked in memory into that
kernel's layout (which depends on the CPU's vector width; unpacked again when a state dict is
taken) and the kernel runs with bf16 activations even for an fp32 model (its fp32 path is the
slow one; the int4 weight error dwarfs bf16 rounding of the activations). Elsewhere (GPU,
autograd) the forward dequantizes into the activation dtype and matmuls. A model prepared for
CPU inference (`ember.cpu_inference`) swaps these layers for ones that run Ember's own int4
kernel straight from the portable layout.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.errors import EmberError
from ember.quant.base import QuantLinear
from ember.quant.kernels import kernel_works

GROUP_SIZES = (32, 64, 128, 256)


def check_group_size(in_features: int, group_size: int, padding: bool = True) -> None:
    if group_size not in GROUP_SIZES:
        raise EmberError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}.")
    if in_features % group_size and not padding:
        raise EmberError(f"int4 group size {group_size} does not divide in_features {in_features}; pick a group "
                         "size that divides every layer's input width, or allow zero padding.")


def quantize_groupwise(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q int32 [out, in] in 0..15, scales fp32 [out, groups], zeros fp32 [out, groups])."""
    out, inp = w.shape
    g = w.detach().float().reshape(out, inp // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out, inp), scale, lo + 8 * scale


def pack_nibbles(q: Tensor) -> Tensor:
    """int [out, in] in 0..15 -> uint8 [out, in/2]; even columns in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(p: Tensor) -> Tensor:
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _cpu_nibble_order(n: int, k: int) -> Tensor:
    """For the CPU kernel's packed layout of an [n, k] weight: the row-major source index of every
    nibble (bytes in order, low nibble first). Found by packing the index itself, 4 bits at a time,
    so it holds for whichever layout this CPU's build uses."""
    idx = torch.arange(n * k)
    order = torch.zeros(n * k, dtype=torch.int64)
    shift = 0
    while (n * k - 1) >> shift:
        digit = ((idx >> shift) & 0xF).to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1).reshape(-1)
        order |= torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).long() << shift
        shift += 4
    if not torch.equal(order.sort().values, idx):
        raise RuntimeError("the CPU int4 layout is not a permutation of nibbles")
    return order


class Int4Linear(QuantLinear):
    method = "int4"
    keep_dtype = ("scales_and_zeros",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device: torch.device | str | None = None, scale_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(in_features, out_features, bias, device)
        check_group_size(in_features, group_size)
        self.group_size = group_size
        # Widths that are no multiple of the group (e.g. 688) get zero columns; the input is padded to match.
        self.in_padded = -(-in_features // group_size) * group_size
        self.cpu_layout = False  # True: qweight holds the CPU kernel's layout, not the portable one
        self.register_buffer("qweight", torch.zeros(out_features, self.in_padded // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(self.in_padded // group_size, out_features, 2,
                                                             dtype=scale_dtype, device=device))
        self._sz_cache: tuple[torch.dtype, Tensor] | None = None
        self._register_state_dict_hook(Int4Linear._portable_state)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4Linear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                  device=linear.weight.device)
        w = F.pad(linear.weight.detach().float(), (0, mod.in_padded - mod.in_features))
        q, scale, zero = quantize_groupwise(w, group_size)
        mod.qweight.copy_(pack_nibbles(q))
        mod.scales_and_zeros.copy_(torch.stack([scale.t(), zero.t()], dim=-1))
        mod._copy_bias(linear)
        return mod

    # --- layouts ---------------------------------------------------------------------
    def _portable_qweight(self) -> Tensor:
        if not self.cpu_layout:
            return self.qweight
        nibbles = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1).reshape(-1)
        flat = torch.empty_like(nibbles)
        flat[_cpu_nibble_order(self.out_features, self.in_padded).to(nibbles.device)] = nibbles
        return pack_nibbles(flat.view(self.out_features, self.in_padded).to(torch.int32))

    @staticmethod
    def _portable_state(module: "Int4Linear", state: dict, prefix: str, local_metadata: dict) -> None:
        if module.cpu_layout:
            state[prefix + "qweight"] = module._portable_qweight()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.cpu_layout = False  # what arrives is portable
        self._sz_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def _use_layout_for(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Repack for the CPU kernel when it runs here (once); True if it does."""
        ok = device.type == "cpu" and kernel_works("int4pack_cpu", device, dtype)
        if ok != self.cpu_layout:
            if ok:
                try:
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.qweight), 1)
                except RuntimeError:  # shape the kernel does not take
                    return False
                self.qweight = packed.view(self.qweight.shape)
            else:
                self.qweight = self._portable_qweight()
            self.cpu_layout = ok
        return ok

    # --- compute ---------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = unpack_nibbles(self._portable_qweight()).float()
        sz = self.scales_and_zeros.float()
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        zero = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        return ((q - 8) * scale + zero)[:, :self.in_features].to(dtype)

    def _sz(self, dtype: torch.dtype) -> Tensor:
        if self._sz_cache is None or self._sz_cache[0] != dtype or self._sz_cache[1].device != self.qweight.device:
            self._sz_cache = (dtype, self.scales_and_zeros.to(dtype).contiguous())
        return self._sz_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.in_padded != self.in_features:
            x2 = F.pad(x2, (0, self.in_padded - self.in_features))
        # The CPU kernel's fp32-activation path is the slow one (benchmarks/quant.py), so fp32
        # inputs run in bf16 and come back as fp32 where the scales are bf16 anyway. The kernel
        # takes the scales in the activations' dtype: it serves only where they convert exactly.
        sz_dtype = self.scales_and_zeros.dtype
        bf16_scales = sz_dtype == torch.bfloat16 and x.device.type == "cpu"
        act = torch.bfloat16 if x.dtype == torch.float32 and bf16_scales else x.dtype
        needs_grad = torch.is_grad_enabled() and x.requires_grad  # PyTorch's int4 kernel has no backward
        if not needs_grad and act in (torch.float32, sz_dtype) and self._use_layout_for(x.device, act):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(act).contiguous(), self.qweight, self.group_size,
                                                           self._sz(act)).to(x.dtype)
        else:
            y = F.linear(x2[:, :self.in_features], self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
