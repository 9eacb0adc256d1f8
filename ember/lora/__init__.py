"""LoRA: low-rank adapters on a frozen model (Hu et al., 2021), saved in PEFT's file format.

    from ember.lora import LoraConfig, apply_lora, merge_and_unload, save_adapter
    model = apply_lora(model, LoraConfig(r=8, target_modules="all-linear"))

The package, one concept a module:
- `config`: LoraConfig (rank, scaling, targets, trainable token rows); no torch.
- `layers`: LoraLinear and `apply_lora`, which wraps the targeted linear layers of a frozen model.
- `tokens`: trainable rows of the token table (PEFT's TrainableTokens) and a tied head reading them.
- `merge`: one fold that merges, unmerges and disables every adapter and token row.
- `peft_format`: adapter_config.json + adapter_model.safetensors, as `peft` writes and reads them.
- `qlora`: the frozen base in NF4 (QLoRA, Dettmers et al., 2023) and back.
- `batched`: many adapters served unmerged over one base, mixed in one batch (S-LoRA / Punica).

Names resolve on first use, so the command line can read LoraConfig without importing torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ALL_LINEAR": "ember.lora.config", "LoraConfig": "ember.lora.config",
    "LoraLinear": "ember.lora.layers", "apply_lora": "ember.lora.layers", "lora_layers": "ember.lora.layers",
    "target_names": "ember.lora.layers", "trainable_summary": "ember.lora.layers",
    "describe_trainable": "ember.lora.layers",
    "TrainableTokens": "ember.lora.tokens", "TiedTokensHead": "ember.lora.tokens", "token_layers": "ember.lora.tokens",
    "fold": "ember.lora.merge", "merge_lora": "ember.lora.merge", "unmerge_lora": "ember.lora.merge",
    "disable_adapters": "ember.lora.merge", "merge_and_unload": "ember.lora.merge",
    "CONFIG_NAME": "ember.lora.peft_format", "WEIGHTS_NAME": "ember.lora.peft_format",
    "PEFT_PREFIX": "ember.lora.peft_format", "TOKEN_KEY": "ember.lora.peft_format",
    "adapter_state_dict": "ember.lora.peft_format", "adapter_config": "ember.lora.peft_format",
    "save_adapter": "ember.lora.peft_format", "read_adapter": "ember.lora.peft_format",
    "load_adapter": "ember.lora.peft_format",
    "NF4Embedding": "ember.lora.qlora", "TiedNF4Head": "ember.lora.qlora", "quantize_base": "ember.lora.qlora",
    "dequantize_base": "ember.lora.qlora", "base_weight_bytes": "ember.lora.qlora",
    "BatchedLoraLinear": "ember.lora.batched", "LoraSlots": "ember.lora.batched",
    "attach_lora_slots": "ember.lora.batched", "UnknownAdapter": "ember.lora.batched",
    "AdapterInUse": "ember.lora.batched",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ember.lora' has no attribute {name!r}")
