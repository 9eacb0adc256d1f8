"""Loading a model for use: checkpoint → adapter → quantization, composed (to be filled in; today it
forwards to `ember.checkpoint.load_model`). Import `load_model` from here, not from `ember.checkpoint`."""

from __future__ import annotations

from ember.checkpoint import load_model  # noqa: F401

__all__ = ["load_model"]
