"""Folding adapters into the base and out again: merge, unmerge, disable.

One function, `fold`, moves every adapter (LoRA layers and trainable token rows) to merged or
unmerged: a LoRA layer adds or subtracts scaling * B A on its base weight, token rows write their
new values or the stored originals into the table. `merge_lora`, `unmerge_lora` and
`disable_adapters` are that fold in one direction or the other; `merge_and_unload` merges and then
puts the plain base layers back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ember.errors import EmberError
from ember.lora.layers import LoraLinear, is_quantized, lora_layers
from ember.lora.tokens import TrainableTokens, output_head, token_layers, token_table
from ember.modules import replace_modules

Adapter = LoraLinear | TrainableTokens


def adapters(model: nn.Module) -> list[Adapter]:
    """Every LoRA layer, then every set of token rows: the order the fold visits them in."""
    return [*lora_layers(model).values(), *token_layers(model)]


def _base_weight(layer: LoraLinear) -> Tensor:
    if is_quantized(layer.base_layer):
        raise EmberError("Cannot merge LoRA into a quantized (e.g. NF4) base; dequantize it first.")
    return layer.base_layer.weight


def _untie(model: nn.Module, layer: LoraLinear) -> None:
    """A tied LM head shares its weight with the token embeddings, so merging into it would move
    the embeddings too: the head gets its own copy first, and the model is untied from then on."""
    w = _base_weight(layer)
    if any(isinstance(m, nn.Embedding) and m.weight is w for m in model.modules()):
        layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        if hasattr(getattr(model, "config", None), "tie_word_embeddings"):
            model.config.tie_word_embeddings = False  # saved checkpoints then keep both matrices


@torch.no_grad()
def fold(model: nn.Module, merged: bool, only: Sequence[Adapter] | None = None) -> list[Adapter]:
    """Bring every adapter (or `only` these) to `merged`: W ± scaling B A for a LoRA layer, computed
    in float32 or the weight's own wider dtype; the new or the original rows for token rows. Returns
    the adapters that changed."""
    changed: list[Adapter] = []
    for adapter in adapters(model) if only is None else only:
        if adapter.merged == merged:
            continue
        if isinstance(adapter, LoraLinear):
            if merged:
                _untie(model, adapter)
            w = _base_weight(adapter)
            wide = torch.promote_types(w.dtype, torch.float32)
            delta = adapter.delta_weight().to(wide)
            w.copy_((w.to(wide) + delta if merged else w.to(wide) - delta).to(w.dtype))
        else:
            adapter.write_rows(adapter.trainable_tokens_delta if merged else adapter.original)
        adapter.merged = merged
        changed.append(adapter)
    return changed


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling B A) and the token rows into the table."""
    fold(model, merged=True)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: W -= scaling B A (the base up to float rounding), the original token rows."""
    fold(model, merged=False)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (e.g. the DPO reference policy); merged
    adapters are taken out for the block and put back after it."""
    unmerged = fold(model, merged=False)
    everything = adapters(model)
    previous = [a.disabled for a in everything]
    for a in everything:
        a.disabled = True
    try:
        yield model
    finally:
        for a, was in zip(everything, previous):
            a.disabled = was
        fold(model, merged=True, only=unmerged)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base layers back: an ordinary model with the adapter baked in."""
    merge_lora(model)
    replace_modules(model, lambda name, module: module.base_layer if isinstance(module, LoraLinear) else None)
    if token_layers(model):
        model.lm_head, model.model.embed_tokens = output_head(model), token_table(model)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
