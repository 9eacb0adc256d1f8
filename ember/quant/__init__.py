"""Quantization: int8 and int4 weight-only, NF4 (QLoRA), SmoothQuant W8A8.

    from ember.quant import quantize_model
    model = quantize_model(model, "int4", group_size=64)

Names resolve on first use, so `ember --help` (which imports ember.quant.commands) stays fast.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "quantize_model": "ember.quant.api", "METHODS": "ember.quant.api", "weight_bytes": "ember.quant.api",
    "save_quantized": "ember.quant.io", "quantize_nf4": "ember.quant.nf4", "NF4Weight": "ember.quant.nf4",
    "NF4Linear": "ember.quant.nf4",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ember.quant' has no attribute {name!r}")
