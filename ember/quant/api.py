"""`quantize_model`: swap a CausalLM's nn.Linear layers for quantized ones, in place.

Which layers: every linear inside the decoder blocks (attention q/k/v/o, MLP gate/up/down,
MoE experts). Kept in full precision: embeddings, norms, the MoE router (tiny, and routing
decisions are sensitive), and the LM head unless `include_lm_head=True` (it is skipped
anyway when tied to the embeddings). The head is the layer whose error costs most quality,
and on a small model with a large vocabulary it is a third of the weights a decode step
reads: under the 4-bit methods it gets int8 (`HEAD_METHOD`), as llama.cpp keeps its output
matrix at 6 bits under Q4_0; the other methods give it their own format. `lm_head_method`
chooses either (e.g. int4 everywhere: the fewest bytes a token, at some quality).

Methods: int8 (weight-only, per channel), int4 (weight-only, group-wise), nf4 (QLoRA),
smoothquant (W8A8 after SmoothQuant's migration, needs calibration data) and w8a8 (the
same W8A8 without smoothing: the naive baseline SmoothQuant is measured against).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ember.errors import EmberError
from ember.modules import set_module
from ember.quant.base import QuantLinear
from ember.quant.int4 import Int4Linear, check_group_size
from ember.quant.int8 import Int8Linear
from ember.quant.nf4 import NF4Linear
from ember.quant.smoothquant import W8A8Linear, activation_absmax, smooth_model

METHODS = ("int8", "int4", "nf4", "smoothquant", "w8a8")
CLASSES: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear,
                                         "smoothquant": W8A8Linear, "w8a8": W8A8Linear}
DEFAULTS: dict[str, dict[str, Any]] = {"int8": {}, "int4": {"group_size": 128, "padding": True},
                                       "nf4": {"block_size": 64, "double_quant": True},
                                       "smoothquant": {"alpha": 0.5}, "w8a8": {}}


HEAD_METHOD = {"int4": "int8", "nf4": "int8"}  # the LM head's format where it differs from the blocks'


def check_method(method: str) -> None:
    if method not in METHODS:
        raise EmberError(f"Unknown quantization method {method!r}; choose one of {', '.join(METHODS)}.")


def target_linears(model: nn.Module, include_lm_head: bool = False) -> list[str]:
    """Names of the nn.Linear modules `quantize_model` replaces."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.startswith("model.layers.") and not n.endswith("block_sparse_moe.gate")]
    if include_lm_head and not model.config.tie_word_embeddings:
        names.append("lm_head")
    return names


def calibration_batches(calibration: Tensor | Sequence[Sequence[int]] | Sequence[str], tokenizer: Any = None,
                        seq_len: int = 512, max_samples: int = 64) -> list[Tensor]:
    """Token-id batches [1, ≤seq_len] from ids (a 2-D tensor or lists) or texts (with a tokenizer)."""
    if isinstance(calibration, Tensor):
        rows = [r for r in (calibration if calibration.dim() == 2 else calibration[None])]
        return [r[None].long() for r in rows[:max_samples]]
    if calibration and isinstance(calibration[0], str):
        if tokenizer is None:
            raise EmberError("Calibration texts need a tokenizer; pass tokenizer= or token ids.")
        ids = [i for text in calibration for i in tokenizer.encode(text)]
        rows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    else:
        rows = [list(r) for r in calibration]
    rows = [r for r in rows if len(r) > 1][:max_samples]
    if not rows:
        raise EmberError("The calibration data holds no tokens.")
    return [torch.tensor([r]) for r in rows]


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, *, group_size: int | None = None, block_size: int | None = None,
                   double_quant: bool | None = None, alpha: float | None = None, padding: bool | None = None,
                   calibration: Tensor | Sequence | None = None, tokenizer: Any = None,
                   include_lm_head: bool = False, lm_head_method: str | None = None) -> nn.Module:
    """Quantize `model` in place with `method` and return it; records `model.quantization_config`.

    Options (others raise): int4 `group_size` (32/64/128/256, default 128) and `padding` (default
    True: a layer whose width is no multiple of the group gets zero columns; False: that is an
    error); nf4 `block_size` (64) and `double_quant` (True); smoothquant `alpha` (0.5) and
    `calibration` (token ids [n, T], lists of ids, or texts with `tokenizer`). `lm_head_method`:
    the included head's format, int8 or the method itself (default `HEAD_METHOD`'s choice)."""
    check_method(method)
    head_method = lm_head_method or HEAD_METHOD.get(method, method)
    if head_method not in ("int8", method):
        raise EmberError(f"The LM head can be int8 or {method} under {method}, not {head_method!r}.")
    if getattr(model, "quantization_config", None):
        raise EmberError(f"The model is already quantized ({model.quantization_config['method']}).")
    opts = dict(DEFAULTS[method])
    for key, value in (("group_size", group_size), ("block_size", block_size),
                       ("double_quant", double_quant), ("alpha", alpha), ("padding", padding)):
        if value is not None:
            if key not in opts:
                raise EmberError(f"Option {key} does not apply to {method}; it takes "
                                 f"{', '.join(opts) or 'no options'}.")
            opts[key] = value
    names = target_linears(model, include_lm_head)
    if method == "int4":
        for n in names:
            if n != "lm_head" or head_method == "int4":
                check_group_size(model.get_submodule(n).in_features, opts["group_size"], opts["padding"])
    explicit: dict[str, Tensor] = {}
    if method == "smoothquant":
        if calibration is None:
            raise EmberError("SmoothQuant needs calibration data (token ids or texts with a tokenizer).")
        if not 0.0 <= opts["alpha"] <= 1.0:
            raise EmberError(f"SmoothQuant alpha must be in [0, 1], got {opts['alpha']}.")
        device = next(model.parameters()).device
        batches = [b.to(device) for b in calibration_batches(calibration, tokenizer)]
        explicit = smooth_model(model, activation_absmax(model, batches), opts["alpha"])
    for n in names:
        lin = model.get_submodule(n)
        kind = head_method if n == "lm_head" else method
        if kind == "int8":
            new = Int8Linear.from_linear(lin)
        elif kind == "int4":
            new = Int4Linear.from_linear(lin, opts["group_size"])
        elif kind == "nf4":
            new = NF4Linear.from_linear(lin, opts["block_size"], opts["double_quant"])
        else:
            new = W8A8Linear.from_linear(lin, explicit.get(n))
        set_module(model, n, new)
    model.quantization_config = {"method": method, **opts, "modules": names,
                                 "input_scaled": sorted(k for k in explicit if k in names)}
    if "lm_head" in names:
        model.quantization_config["lm_head_method"] = head_method
    return model


def build_empty(model: nn.Module, qcfg: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Swap in empty quantized modules as `qcfg` (a saved quantization_config) describes, for loading."""
    method = qcfg.get("method")
    check_method(method)
    scaled = set(qcfg.get("input_scaled", []))
    for n in qcfg.get("modules", []):
        try:
            lin = model.get_submodule(n)
        except AttributeError:
            raise EmberError(f"quantization_config names a module {n!r} the model does not have.") from None
        args = (lin.in_features, lin.out_features, lin.bias is not None)
        kind = qcfg.get("lm_head_method", method) if n == "lm_head" else method
        check_method(kind)
        if kind == "int8":
            new = Int8Linear(*args, device=device)
        elif kind == "int4":
            new = Int4Linear(*args, group_size=qcfg.get("group_size", 128), device=device)
        elif kind == "nf4":
            new = NF4Linear(*args, qcfg.get("block_size", 64), qcfg.get("double_quant", True), device=device)
        else:
            new = W8A8Linear(*args, input_scale=n in scaled, device=device)
        set_module(model, n, new)
    model.quantization_config = dict(qcfg)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model saves (parameters and persistent buffers), shared ones once."""
    seen, total = set(), 0
    for m in model.modules():
        tensors = list(m._parameters.values()) + [b for n, b in m._buffers.items()
                                                  if n not in m._non_persistent_buffers_set]
        for t in tensors:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # shared with the embeddings; safetensors stores a tensor once
    return sd


def iter_quant_modules(model: nn.Module) -> Iterable[tuple[str, QuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))
