"""Quantized checkpoints: the HF directory layout plus `quantization_config` in config.json.

config.json["quantization_config"] = {"quant_method": "ember", "method": "int4",
"group_size": 128, "modules": [...], "input_scaled": [...], "tensor_names": "ember", ...}.
`model.safetensors` holds the quantized tensors in portable layouts (int4 nibbles packed
row-major, not any CPU kernel's tiling) under Ember's module names, so the files load on
any device; `ember.load_model` sees the config and rebuilds the quantized modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ember.checkpoint import WEIGHTS_NAME, generation_config, read_state_dict
from ember.config import ModelConfig
from ember.errors import EmberError
from ember.files import atomic_dir, write_json
from ember.model import CausalLM
from ember.quant.api import build_empty, quantized_state_dict

FORMAT_VERSION = 1


def save_quantized(model: nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """Save a model returned by `quantize_model` (+ tokenizer) as a directory, atomically."""
    qcfg = getattr(model, "quantization_config", None)
    if not qcfg:
        raise EmberError("The model is not quantized; use ember.save_pretrained for plain models.")
    if qcfg.get("method") == "gguf":
        raise EmberError("The model keeps a GGUF file's quantized blocks, which Ember does not save as a quantized "
                         "checkpoint; load the file with an explicit quantization= (it is then decoded and "
                         "quantized by Ember), or write it out with `ember convert` and quantize that directory.")
    path = Path(path)
    sd = quantized_state_dict(model)
    hf = model.config.to_hf()
    dtype = model.model.embed_tokens.weight.dtype
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    hf["quantization_config"] = {"quant_method": "ember", "format_version": FORMAT_VERSION,
                                 "tensor_names": "ember", **qcfg}
    with atomic_dir(path) as tmp:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf)
        write_json(tmp / "generation_config.json", generation_config(model.config))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def load_quantized(path: Path, cfg: ModelConfig, qcfg: Any, device: torch.device,
                   dtype: torch.dtype) -> CausalLM:
    """Rebuild the quantized modules `qcfg` (config.json's `quantization_config`, as read) names and load their
    tensors (the other weights in `dtype`)."""
    if not isinstance(qcfg, dict):
        raise EmberError(f"quantization_config in {path / 'config.json'} must be a JSON object.")
    if qcfg.get("quant_method") != "ember":
        raise EmberError(f"{path} was quantized by another tool (quant_method "
                         f"{qcfg.get('quant_method')!r}); Ember loads its own quantized checkpoints only.")
    if qcfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise EmberError(f"{path} uses quantized format {qcfg['format_version']}; this Ember reads up to "
                         f"{FORMAT_VERSION}. Upgrade Ember.")
    with torch.device("meta"):
        model = CausalLM(cfg)
    build_empty(model, {k: v for k, v in qcfg.items()
                        if k not in ("quant_method", "format_version", "tensor_names")})
    sd = read_state_dict(path)
    own = model.state_dict()
    expected = set(own) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise EmberError(f"Quantized weights in {path} do not match its config.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise EmberError(f"Weight {k} in {path} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}.")
    model.to_empty(device=device)
    model.to(dtype)  # float weights to `dtype`; quantized modules keep their stored dtypes
    model.load_state_dict(sd, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model.eval()
