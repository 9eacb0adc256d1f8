"""Quantized checkpoints: the HF directory layout plus `quantization_config` in config.json.

config.json["quantization_config"] = {"quant_method": "ember", "method": "int4",
"group_size": 128, "modules": [...], "input_scaled": [...], "tensor_names": "ember", ...}.
`model.safetensors` holds the quantized tensors in portable layouts (int4 nibbles packed
row-major, not any CPU kernel's tiling) under Ember's module names, so the files load on
any device; `ember.load_model` sees the config and rebuilds the quantized modules.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ember.checkpoint import WEIGHTS_NAME, atomic_dir, generation_config, read_state_dict, write_json
from ember.errors import EmberError
from ember.model import CausalLM
from ember.quant.api import build_empty, quantized_state_dict

FORMAT_VERSION = 1


def save_quantized(model: nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """Save a model returned by `quantize_model` (+ tokenizer) as a directory, atomically."""
    qcfg = getattr(model, "quantization_config", None)
    if not qcfg:
        raise EmberError("The model is not quantized; use ember.save_pretrained for plain models.")
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


def load_quantized(path: Path, cfg: Any, qcfg: dict[str, Any], device: torch.device,
                   dtype: torch.dtype) -> CausalLM:
    """Rebuild the quantized modules `qcfg` names and load their tensors (the other weights in `dtype`)."""
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


def stdlib_calibration(tokenizer: Any, samples: int = 32, seq_len: int = 512) -> list[list[int]]:
    """`samples` token windows from the default corpus (its training side, never the held-out split)."""
    from ember.data import is_validation, iter_documents

    rows: list[list[int]] = []
    for _, text in iter_documents(["stdlib"]):
        if is_validation(text, 0.005):
            continue
        ids = tokenizer.encode(text)
        rows += [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len // 4, seq_len)]
        if len(rows) >= samples:
            break
    return list(islice(rows, samples))


def file_calibration(path: str | Path, tokenizer: Any, samples: int = 32, seq_len: int = 512) -> list[list[int]]:
    """Token windows from a text file, JSONL, Parquet or directory (anything `ember.data` reads)."""
    from ember.data import iter_documents

    ids: list[int] = []
    for _, text in iter_documents([str(path)]):
        ids += tokenizer.encode(text)
        if len(ids) >= samples * seq_len:
            break
    return [ids[i:i + seq_len] for i in range(0, min(len(ids), samples * seq_len), seq_len)]


def load_or_quantize(path: Path, cfg: Any, qcfg: Any, quantization: str | None, device: torch.device,
                     dtype: torch.dtype) -> CausalLM:
    """`ember.load_model`'s quantized branch: load a quantized directory, or quantize a plain one on load."""
    from ember.checkpoint import load_model
    from ember.quant.api import check_method, quantize_model

    if quantization is not None:
        check_method(quantization)
    if qcfg is not None:
        if not isinstance(qcfg, dict):
            raise EmberError(f"quantization_config in {path / 'config.json'} must be a JSON object.")
        model = load_quantized(path, cfg, qcfg, device, dtype)
        if quantization not in (None, model.quantization_config["method"]):
            raise EmberError(f"{path} is already quantized with {model.quantization_config['method']}; "
                             f"load it without quantization={quantization!r}, or quantize the original model.")
        return model
    return quantize_loaded(path, load_model(path, device, torch.float32), quantization, dtype)


def quantize_loaded(path: Path, model: CausalLM, quantization: str, dtype: torch.dtype) -> CausalLM:
    """Quantize a full-precision model loaded from `path` (its tokenizer calibrates SmoothQuant), then cast."""
    from ember.quant.api import check_method, quantize_model

    check_method(quantization)
    calibration, tokenizer = None, None
    if quantization == "smoothquant":
        from ember.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
        calibration = stdlib_calibration(tokenizer)
    return quantize_model(model, quantization, calibration=calibration, tokenizer=tokenizer).to(dtype)
