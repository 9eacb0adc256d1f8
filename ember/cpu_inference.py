"""The CPU fast path, swapped in once when a model is prepared for inference (gpt-fast's
`replace_linear_*`): `prepare_for_inference(model)` replaces layers with inference layers in place.

Contract (other modules rely on it): call it once on a model that will only run inference (the
engine's own model, the generator's); it returns the same model; it is a no-op off the CPU and where
neither Ember's kernels nor oneDNN's packed weights are available; calling it twice is harmless.
Nothing else in Ember switches a linear layer's kernel; attention's decode kernels live in the
KV-cache backends (`ember.kv_cache`, `ember.engine.paged_cache`), which route ALiBi models (whose
scores carry a bias the C++ decode kernels do not add) to SDPA at every step, prepared or not.

What it does to a `CausalLM` on the CPU:
- q, k and v (and gate and up in a gated MLP) become one layer over their stacked weights,
  installed as the block's `qkv_proj` (`gate_up_proj`); its output is split back into the three
  (two). One kernel call then reads the shared input once for all of them.
- Every linear layer of the model's own blocks and its head becomes an inference layer:
  float weights -> `CPULinear` (up to `gemv.MAX_ROWS` rows through `ember.gemv`, more rows of
  fp32 through a oneDNN-packed copy of the weight, the rest through `F.linear`); int8 and int4
  weight-only layers -> `Int8KernelLinear` and `Int4KernelLinear` (Ember's integer kernels),
  among them a GGUF file's kept blocks (`ember.gguf.blocks`), whose q/k/v (gate/up) fuse where
  their GGUF types agree, and a tied int8 head that reads the `Int8Embedding` table in place.
  Layers inside other wrappers (LoRA adapters, trainable token rows) keep their own forward.

A prepared model is for inference: its state dict names the fused layers (`qkv_proj.layer.weight`),
not the checkpoint's q_proj/k_proj/v_proj, and the fused weights are new tensors that do not
require a gradient. The inference layers themselves stay correct under autograd (they hand
products that need a gradient to PyTorch's kernels), and a packed copy is made again when its
weight is replaced or changed in place as PyTorch counts changes (the tensor's version).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember import gemv
from ember.model import MLP, Attention, CausalLM, Expert, MoE
from ember.modules import replace_modules, set_module
from ember.quant.f16 import F16Linear
from ember.quant.int4 import Int4Linear
from ember.quant.int8 import Int8Linear

# Modules whose linear layers are the model's own (not an adapter's or a wrapper's).
_OWNERS = (CausalLM, Attention, MLP, Expert, MoE)


@functools.cache
def onednn_packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's pre-packed linear weights."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedWeight:
    """A weight reordered into oneDNN's blocked layout, and which version of which tensor it
    copies. Slotted: a compiled step's fingerprint (`ember.generation.structure_key`) sees only
    its type, not the pointer and version inside."""

    __slots__ = ("source", "packed")

    def __init__(self, source: tuple[int, int], packed: Tensor) -> None:
        self.source, self.packed = source, packed


class CPULinear(nn.Linear):
    """`nn.Linear` for inference on the CPU, over the same weight and bias tensors:
    - up to `gemv.MAX_ROWS` rows, no gradient: `ember.gemv.gemv`, which reads each weight row once
      for all rows, straight from the live weight;
    - more rows of fp32, no gradient: oneDNN's GEMM over a packed copy of the weight, made at the
      first such call and again whenever the weight tensor is replaced or changed in place
      (a second copy of the weight in memory, kept out of `state_dict` and `deepcopy`);
    - anything else (autograd, another device or dtype): `F.linear`."""

    _packed: PackedWeight | None = None
    CACHES = ("_packed",)  # filled at first use; no compiled graph depends on it (see structure_key)

    @classmethod
    def of(cls, linear: nn.Linear) -> "CPULinear":
        """The inference layer over `linear`'s own parameters (a tied head stays tied)."""
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def _packed_weight(self) -> Tensor:
        w = self.weight
        # An inference-mode tensor has no version counter; it cannot be changed in place outside
        # inference mode, so its data pointer alone names it.
        source = (w.data_ptr(), 0 if w.is_inference() else w._version)
        if self._packed is None or self._packed.source != source:
            self._packed = PackedWeight(source, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
        return self._packed.packed

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if gemv.applies(x, w):
            return gemv.gemv(x, w, bias=self.bias)
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if (rows >= 2 and not needs_grad and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.device.type == "cpu" and w.device.type == "cpu" and onednn_packing_available()):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), self._packed_weight(),
                                                   self.bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, w, self.bias)

    def __getstate__(self) -> dict:
        # The packed copy is an opaque oneDNN tensor that cannot be copied; a copy packs its own.
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


class Int8KernelLinear(Int8Linear):
    """`Int8Linear` whose products of up to `gemv.MAX_ROWS` rows without a gradient run in
    `ember.gemv.gemv` (each activation row rounded once to int16, integer multiply-adds);
    the rest take `Int8Linear`'s own path. With a scale per group of columns (a GGUF file's
    Q8_0), products of up to `gemv.DEQUANTIZE_ROWS` rows run in the kernel and larger ones in
    PyTorch's float GEMM over the weight decoded once. Same tensors, same state dict."""

    @classmethod
    def of(cls, layer: Int8Linear) -> "Int8KernelLinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta",
                  group_size=layer.group_size, scale_dtype=layer.scales.dtype)
        new.load_state_dict(layer.state_dict(keep_vars=True), assign=True)
        new.compute_dtype = layer.compute_dtype
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.group_size is not None:
            # Group-wise scales: any number of rows (each weight row is read once for all of them);
            # the alternative, Int8Linear's own path, dequantizes the whole matrix.
            if (gemv.serves(x, frozen_weights=True) and self.qweight.device.type == "cpu"
                    and x.shape[-1] == self.in_features and x.numel()):
                if x.numel() // x.shape[-1] > gemv.DEQUANTIZE_ROWS:  # a matrix product: float GEMM
                    weight = gemv.dequantize_int8(self.qweight, self.scales).to(x.dtype)
                    return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
                return gemv.gemv(x, self.qweight, self.scales, self.bias)
        elif gemv.applies(x, self.qweight):
            return gemv.gemv(x, self.qweight, self.scales, self.bias)
        return super().forward(x)


class F16KernelLinear(F16Linear):
    """`F16Linear` whose products of up to `gemv.MAX_ROWS` rows run in `ember.gemv.gemv` straight from
    the fp16 weights (widened in registers: the same values as the decoded fp32 weights, half the
    bytes read); the rest take `F16Linear`'s own path. Same tensors, same state dict."""

    @classmethod
    def of(cls, layer: F16Linear) -> "F16KernelLinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        new.load_state_dict(layer.state_dict(keep_vars=True), assign=True)
        new.compute_dtype = layer.compute_dtype
        return new

    def forward(self, x: Tensor) -> Tensor:
        if gemv.applies(x, self.qweight):
            return gemv.gemv(x, self.qweight, None, self.bias)
        return super().forward(x)


class Int4KernelLinear(Int4Linear):
    """`Int4Linear` whose products of up to `gemv.DEQUANTIZE_ROWS` rows run in `ember.gemv.gemv_int4`
    (each weight row read once for all of them) straight from the portable layout, and larger ones
    in PyTorch's float GEMM over the weight decoded once by `gemv.dequantize_int4`, wherever no
    gradient has to flow through the input (the weights are frozen buffers) and the group size is
    one the kernel takes; the rest take `Int4Linear`'s own path. Same tensors, same state dict."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - Int4Linear's
        super().__init__(*args, **kwargs)
        self._kernel_sz: tuple[Tensor, Tensor] | None = None  # [out, groups]: s and z - 8s (kernel_scales)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._kernel_sz = None
        super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def of(cls, layer: Int4Linear) -> "Int4KernelLinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.group_size, device="meta",
                  scale_dtype=layer.scales_and_zeros.dtype)
        new.load_state_dict(layer.state_dict(keep_vars=True), assign=True)  # the portable layout
        new.compute_dtype = layer.compute_dtype
        return new

    def kernel_applies(self, x: Tensor) -> bool:
        """Ember's int4 kernel serves this input: CPU, built, no gradient to carry, a group it handles."""
        return (gemv.serves(x, frozen_weights=True) and self.qweight.device.type == "cpu" and self.in_padded % 64 == 0
                and (self.group_size == 32 or self.group_size % 64 == 0))

    def kernel_scales(self) -> tuple[Tensor, Tensor]:
        """[out, groups] scale s and offset z - 8 s, as the kernel takes them (made once): fp16 where
        every value is exact in fp16 (a GGUF file's Q4_0 d and -8 d, Q4_1 d and m), so the kernel reads
        the block scales at the file's own 4 bytes a group; fp32 otherwise."""
        if self._kernel_sz is None or self._kernel_sz[0].device != self.qweight.device:
            sz = self.scales_and_zeros.float()
            scale, offset = sz[..., 0].t().contiguous(), (sz[..., 1] - 8 * sz[..., 0]).t().contiguous()
            half = scale.half(), offset.half()
            if all(torch.equal(h.float(), f) for h, f in zip(half, (scale, offset))):
                scale, offset = half
            self._kernel_sz = (scale, offset)
        return self._kernel_sz

    def forward(self, x: Tensor) -> Tensor:
        if not self.kernel_applies(x):  # before padding: Int4Linear's own path pads for itself
            return super().forward(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.in_padded != self.in_features:
            x2 = F.pad(x2, (0, self.in_padded - self.in_features))
        if self.cpu_layout:  # back from PyTorch's layout, where its kernel ran in between
            self.qweight, self.cpu_layout = self._portable_qweight(), False
        scale, offset = self.kernel_scales()
        if x2.shape[0] > gemv.DEQUANTIZE_ROWS:  # a matrix product: the float GEMM over the decoded weight
            weight = gemv.dequantize_int4(self.qweight, scale, offset, self.group_size).to(x2.dtype)
            y = F.linear(x2, weight, None if self.bias is None else self.bias.to(x2.dtype))
        else:
            y = gemv.gemv_int4(x2, self.qweight, scale, offset, self.group_size, self.bias)
        return y.view(*shape[:-1], self.out_features)


class FusedProjection(nn.Module):
    """Several linear layers that read the same input (q, k, v; gate, up) as one inference layer
    over their weights stacked by rows: one call returns each layer's output (views, side by side)."""

    def __init__(self, layer: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.layer, self.sizes = layer, sizes

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.layer(x).split(self.sizes, dim=-1)


def _on_cpu(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def _inference_layer(module: nn.Module) -> nn.Module | None:
    """The inference layer for one of the model's linear layers, or None where no faster path
    serves it here. Exact types only: a subclass is somebody else's layer (or already swapped)."""
    if not _on_cpu(module):
        return None
    kernels = gemv.available()
    if type(module) is nn.Linear and module.weight.is_floating_point():
        fp32_packs = module.weight.dtype == torch.float32 and onednn_packing_available()
        return CPULinear.of(module) if kernels or fp32_packs else None
    if type(module) is Int8Linear and kernels:
        return Int8KernelLinear.of(module)
    if type(module) is Int4Linear and kernels:
        return Int4KernelLinear.of(module)
    if type(module) is F16Linear and kernels:
        return F16KernelLinear.of(module)
    return None


def _stack(layers: list[nn.Module]) -> nn.Module | None:
    """One layer of the same kind over `layers`' weights stacked by output rows (their biases
    too, zeros for a layer without one), or None where they are not of one fusable kind."""
    first = layers[0]
    kind = type(first)
    if kind not in (nn.Linear, Int8Linear, Int4Linear, F16Linear) or any(type(m) is not kind for m in layers):
        return None
    if not all(_on_cpu(m) for m in layers) or len({m.in_features for m in layers}) != 1:
        return None
    if kind is nn.Linear and len({m.weight.dtype for m in layers}) != 1:
        return None
    if kind is not nn.Linear and len({m.compute_dtype for m in layers}) != 1:
        return None
    if kind is Int4Linear and len({(m.group_size, m.scales_and_zeros.dtype) for m in layers}) != 1:
        return None  # a GGUF file's layers may differ in scale dtype (Q4_0: fp16, Q4_1: fp32)
    if kind is Int8Linear and len({(m.group_size, m.scales.dtype) for m in layers}) != 1:
        return None
    states = [m.state_dict() for m in layers]
    with_bias = any(m.bias is not None for m in layers)
    if with_bias:
        bias_dtype = next(m.bias.dtype for m in layers if m.bias is not None)
        for m, state in zip(layers, states):
            if m.bias is None:
                state["bias"] = torch.zeros(m.out_features, dtype=bias_dtype)
    # int4's scales and zeros are [groups, out, 2]: stacked along their second dimension.
    stacked = {key: torch.cat([s[key] for s in states], dim=1 if key == "scales_and_zeros" else 0)
               for key in states[0]}
    out_features = sum(m.out_features for m in layers)
    if kind is nn.Linear:
        fused: nn.Module = nn.Linear(first.in_features, out_features, bias=with_bias, device="meta")
    elif kind is F16Linear:
        fused = F16Linear(first.in_features, out_features, bias=with_bias, device="meta")
    elif kind is Int8Linear:
        fused = Int8Linear(first.in_features, out_features, bias=with_bias, device="meta",
                           group_size=first.group_size, scale_dtype=first.scales.dtype)
    else:
        fused = Int4Linear(first.in_features, out_features, bias=with_bias, group_size=first.group_size,
                           device="meta", scale_dtype=first.scales_and_zeros.dtype)
    fused.load_state_dict(stacked, assign=True)
    if kind is nn.Linear:
        fused.weight.requires_grad_(False)
        if fused.bias is not None:
            fused.bias.requires_grad_(False)
    else:
        fused.compute_dtype = first.compute_dtype
    return fused


def _fuse(model: nn.Module, owner_type: type, fused_name: str, parts: Callable[[nn.Module], tuple[str, ...]]) -> None:
    """Install `fused_name` on every `owner_type` module whose layers `parts(owner)` stack into one
    inference layer, and remove those layers."""
    for name, owner in list(model.named_modules()):
        if not isinstance(owner, owner_type) or getattr(owner, fused_name) is not None:
            continue
        names = parts(owner)
        layers = [getattr(owner, n, None) for n in names]
        if not names or any(m is None for m in layers):
            continue
        stacked = _stack(layers)
        layer = _inference_layer(stacked) if stacked is not None else None
        if layer is None:
            continue
        set_module(model, f"{name}.{fused_name}" if name else fused_name,
                   FusedProjection(layer, [m.out_features for m in layers]))
        for n in names:
            delattr(owner, n)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Swap the model's layers for the CPU inference layers, in place; returns `model`."""
    if not (gemv.available() or onednn_packing_available()):
        return model
    _fuse(model, Attention, "qkv_proj", lambda a: ("q_proj", "k_proj", "v_proj"))
    _fuse(model, MLP, "gate_up_proj", lambda m: ("gate_proj", "up_proj") if m.gated else ())

    def make(name: str, module: nn.Module) -> nn.Module | None:
        parent = model.get_submodule(name.rpartition(".")[0])
        return _inference_layer(module) if isinstance(parent, _OWNERS) else None

    replace_modules(model, make)
    return model
