"""W8A8 (int8 weights and activations) and SmoothQuant (Xiao et al., 2023).

W8A8Linear: weights int8 per output channel (symmetric), activations int8 per token,
quantized on the fly from each row's absmax; the product is an int8 x int8 -> int32
matmul (`torch._int_mm` where it runs, else the same integers multiplied exactly in
float64), rescaled by (token scale x channel scale).

Per-token int8 fails when a few input channels carry outliers ~100x the rest: every
token's scale is set by the outlier and the ordinary channels round to a handful of
levels. SmoothQuant divides each input channel j by s_j = max|X_j|^α / max|W_j|^(1-α)
and multiplies the weight's column j by s_j — the product is unchanged, the outliers
move into the weight, which per-channel quantization absorbs. The division is folded
into the RMSNorm/LayerNorm weight in front of q/k/v and gate/up (free at run time) and
into up_proj's rows in front of down_proj (gated MLPs); where nothing can absorb it
(o_proj) the layer keeps an explicit `input_scale` vector it multiplies by.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ember.quant.base import QuantLinear
from ember.quant.int8 import quantize_per_channel
from ember.quant.kernels import kernel_works


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of x [M, K]: (int8 [M, K], fp32 scales [M])."""
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-8) / 127
    return torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """int8 a [M, K] x int8 b_t [N, K] -> exact int32-valued [M, N] (as int32, or as float64)."""
    if kernel_works("int_mm", a.device) and (a.device.type == "cpu" or a.shape[0] > 16):
        return torch._int_mm(a, b_t.t())
    return a.double() @ b_t.double().t()  # exact: |sums| < 2^53


class W8A8Linear(QuantLinear):
    method = "w8a8"
    keep_dtype = ("scales", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_scale: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))
        # 1/s for an input whose smoothing could not be folded upstream
        self.register_buffer("input_scale", torch.ones(in_features, device=device) if input_scale else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_scale: Tensor | None = None) -> "W8A8Linear":
        """`input_scale`: multiply inputs by it (the linear's weight already carries the inverse)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, input_scale is not None,
                  device=linear.weight.device)
        q, s = quantize_per_channel(linear.weight)
        mod.qweight.copy_(q)
        mod.scales.copy_(s)
        if input_scale is not None:
            mod.input_scale.copy_(input_scale)
        mod._copy_bias(linear)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = self.qweight.float() * self.scales[:, None]
        if self.input_scale is not None:
            w = w * self.input_scale  # the weight as seen by the unscaled input
        return w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.input_scale is not None:
            x2 = x2 * self.input_scale
        xq, xs = quantize_per_token(x2)
        acc = int8_matmul(xq, self.qweight)
        y = (acc.float() * xs[:, None] * self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)


# --- calibration and smoothing ---------------------------------------------------------------
@torch.no_grad()
def activation_absmax(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Per-input-channel max|x| seen by every nn.Linear over the calibration batches."""
    stats: dict[str, Tensor] = {}
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
        return record

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return stats


def smoothing_factors(act_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α), with max|W_j| over every weight reading channel j."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@torch.no_grad()
def _fold(norm: nn.Module, consumers: list[nn.Linear], s: Tensor) -> None:
    """x -> x / s in the norm's affine weight (and bias); the consumers' columns x s."""
    s = s.to(norm.weight.device)
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in consumers:
        lin.weight.mul_(s.to(lin.weight.dtype))


@torch.no_grad()
def smooth_model(model: nn.Module, act_max: dict[str, Tensor], alpha: float = 0.5) -> dict[str, Tensor]:
    """Apply SmoothQuant's migration to every block of an Ember CausalLM, in place.

    Returns {linear name: input multiplier} for the linears whose smoothing could not be
    folded upstream (they must scale their input at run time)."""
    explicit: dict[str, Tensor] = {}
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attn = block.self_attn
        # o_proj: nothing linear sits between attention's output and it (GQA shares v heads) -> explicit.
        s = smoothing_factors(act_max[p + "self_attn.o_proj"], [attn.o_proj.weight], alpha)
        attn.o_proj.weight.mul_(s.to(attn.o_proj.weight.dtype))
        explicit[p + "self_attn.o_proj"] = 1 / s
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        s = smoothing_factors(act_max[p + "self_attn.q_proj"], [m.weight for m in qkv], alpha)
        _fold(block.input_layernorm, qkv, s)
        if hasattr(block, "mlp"):
            mlp = block.mlp
            s = smoothing_factors(act_max[p + "mlp.down_proj"], [mlp.down_proj.weight], alpha)
            mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype))
            if mlp.gated:  # down(act(gate) * up): scaling up's rows scales down's input linearly
                mlp.up_proj.weight.div_(s[:, None].to(mlp.up_proj.weight.dtype))
                if mlp.up_proj.bias is not None:
                    mlp.up_proj.bias.div_(s.to(mlp.up_proj.bias.dtype))
            else:
                explicit[p + "mlp.down_proj"] = 1 / s
            readers = [mlp.gate_proj, mlp.up_proj] if mlp.gated else [mlp.up_proj]
            key = p + ("mlp.gate_proj" if mlp.gated else "mlp.up_proj")
        else:  # mixture of experts: the router reads the same normalised input
            moe = block.block_sparse_moe
            for e, ex in enumerate(moe.experts):
                name = p + f"block_sparse_moe.experts.{e}.w2"
                if name in act_max:
                    s = smoothing_factors(act_max[name], [ex.w2.weight], alpha)
                    ex.w2.weight.mul_(s)
                    ex.w3.weight.div_(s[:, None])
            readers = [moe.gate] + [m for ex in moe.experts for m in (ex.w1, ex.w3)]
            key = p + "block_sparse_moe.gate"
        s = smoothing_factors(act_max[key], [m.weight for m in readers], alpha)
        _fold(block.post_attention_layernorm, readers, s)
    return explicit
