"""Loading a model for use: checkpoint (or GGUF file) → adapter → quantization, composed in that order.

    model = load_model("runs/sft/model")                               # the weights as saved
    model = load_model("base", adapter="runs/lora/adapter")             # a LoRA adapter merged in
    model = load_model("base", quantization="int4")                     # quantized on load
    model = load_model("base", quantization="smoothquant", calibration=texts)

Each step is one module's job: `ember.checkpoint` reads the plain HF-layout directory, `ember.lora`
merges the adapter into full-precision weights, `ember.quant` quantizes (or `ember.quant.io` rebuilds a
directory that was saved quantized). A `.gguf` file (llama.cpp's format) loads through `ember.gguf`: as it
is, its Q4_0, Q4_1 and Q8_0 matrices stay in their blocks as Ember's int4 / int8 layers and the other types
are decoded to float; with an adapter or a quantization every tensor is decoded to float32 first. Import
`load_model` and `load_tokenizer` from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ember.checkpoint import load_config, load_pretrained
from ember.device import pick_device, pick_dtype
from ember.errors import EmberError
from ember.files import read_json
from ember.gguf import gguf_tokenizer, load_gguf, open_gguf
from ember.lora import load_adapter, merge_and_unload
from ember.model import CausalLM
from ember.quant.api import check_method, quantize_model
from ember.quant.calibration import stdlib_calibration
from ember.quant.io import load_quantized
from ember.tokenizer import Tokenizer
from ember.tokenizer import load_tokenizer as load_tokenizer_dir

Calibration = Tensor | Sequence[Sequence[int]] | Sequence[str]


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               adapter: str | Path | None = None, quantization: str | None = None,
               calibration: Calibration | None = None, keep_blocks: bool | None = None) -> CausalLM:
    """Load an Ember- or transformers-saved directory, or a GGUF file, into a `CausalLM` in eval mode.

    `adapter`: a LoRA adapter directory (PEFT format) merged into the base weights, so the result runs at
    the base's speed everywhere (generation, engine, server). `quantization` (int8, int4, nf4, smoothquant,
    w8a8) quantizes on load with that method's defaults (see `ember.quant`), after any adapter is merged; a
    directory saved quantized (config.json holds a `quantization_config`) loads quantized without it.
    `calibration`: SmoothQuant's sample (token ids [n, T], lists of ids, or texts, which the directory's
    tokenizer encodes); without it SmoothQuant calibrates on the standard-library corpus.
    `keep_blocks` (GGUF files only): keep the file's Q4_0, Q4_1 and Q8_0 blocks as Ember's int4 / int8
    layers (`ember.gguf.load_gguf`); default: kept when neither an adapter nor a quantization is asked
    for. Training passes False: it needs every weight as a float parameter."""
    path = Path(path)
    device = pick_device(device if device is None or isinstance(device, str) else str(device))
    dtype = pick_dtype(device, dtype)
    if quantization is not None:
        check_method(quantization)
    if calibration is not None and quantization != "smoothquant":
        raise EmberError("calibration= is SmoothQuant's sample; pass it with quantization='smoothquant'.")
    if is_gguf(path):
        plain = adapter is None and quantization is None
        if keep_blocks and not plain:
            raise EmberError("keep_blocks=True loads a GGUF file as it is; an adapter or a quantization needs its "
                             "weights decoded to float first.")
        # As it is, the file's 4- and 8-bit blocks stay as they are; to merge or quantize, decoded first.
        model = load_gguf(open_gguf(path), device, dtype if plain else torch.float32,
                          keep_blocks=plain if keep_blocks is None else keep_blocks)
        return model if plain else _adapt_and_quantize(model, path, adapter, quantization, calibration, dtype)
    qcfg = read_json(path / "config.json", "Model config").get("quantization_config")
    if qcfg is not None:
        cfg = load_config(path)
        if adapter is not None:
            raise EmberError(f"{path} is saved quantized; an adapter merges into full-precision weights, so load "
                             "the unquantized base with adapter= (and quantization= if wanted).")
        model = load_quantized(path, cfg, qcfg, device, dtype)
        if quantization not in (None, model.quantization_config["method"]):
            raise EmberError(f"{path} is already quantized with {model.quantization_config['method']}; "
                             f"load it without quantization={quantization!r}, or quantize the original model.")
        return model
    if adapter is None and quantization is None:
        return load_pretrained(path, device, dtype)
    # Merging and quantizing both start from float32 weights; the result is cast to `dtype` at the end.
    return _adapt_and_quantize(load_pretrained(path, device, torch.float32), path, adapter, quantization,
                               calibration, dtype)


def _adapt_and_quantize(model: CausalLM, path: Path, adapter: str | Path | None, quantization: str | None,
                        calibration: Calibration | None, dtype: torch.dtype) -> CausalLM:
    """The steps after the weights: merge the adapter, quantize, cast to `dtype`."""
    if adapter is not None:
        model = merge_and_unload(load_adapter(model, adapter)).eval()
    if quantization is not None:
        tokenizer = None
        if quantization == "smoothquant" and (calibration is None or _holds_text(calibration)):
            tokenizer = load_tokenizer(path)
            if calibration is None:
                calibration = stdlib_calibration(tokenizer)
        model = quantize_model(model, quantization, calibration=calibration, tokenizer=tokenizer)
    return model.to(dtype)


def _holds_text(calibration: Calibration) -> bool:
    return not isinstance(calibration, Tensor) and len(calibration) > 0 and isinstance(calibration[0], str)


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (a `.gguf` name, or the magic number whatever the name) rather
    than a directory; a missing or malformed `.gguf` file then gets the GGUF reader's own error."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (`tokenizer.json` + `tokenizer_config.json`) or of a GGUF file
    (its `tokenizer.ggml.*` fields and chat template)."""
    return gguf_tokenizer(open_gguf(path)) if is_gguf(path) else load_tokenizer_dir(path)
