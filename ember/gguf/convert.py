"""`ember convert`: a GGUF file to an HF-layout checkpoint directory, and a directory to a GGUF file.

    gguf_to_checkpoint("model.gguf", "model_dir")              # every block decoded to float
    checkpoint_to_gguf("model_dir", "model.gguf", "q8_0")       # quantized as llama.cpp would

A GGUF file becomes config.json, model.safetensors, tokenizer.json and tokenizer_config.json (with the
chat template), which `transformers` opens. A directory becomes a file llama.cpp runs (see
`ember.gguf.writer` for the layout and which tensors get which type). Both write atomically: on any
failure nothing is left at the target.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ember.checkpoint import load_pretrained, save_pretrained
from ember.errors import EmberError
from ember.files import read_json
from ember.gguf.model import load_gguf
from ember.gguf.reader import open_gguf
from ember.gguf.tokenizer import gguf_tokenizer
from ember.gguf.writer import FILE_TYPES, write_gguf
from ember.load import is_gguf
from ember.tokenizer import load_tokenizer

CHECKPOINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = ("hf", "gguf")


def gguf_to_checkpoint(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """The GGUF file `src` as an HF-layout directory `out`, its weights decoded to `dtype`."""
    if dtype not in CHECKPOINT_DTYPES:
        raise EmberError(f"Unknown --dtype {dtype!r}; choose one of {', '.join(CHECKPOINT_DTYPES)}.")
    f = open_gguf(src)
    model = load_gguf(f, "cpu", CHECKPOINT_DTYPES[dtype], keep_blocks=False)
    tokenizer = gguf_tokenizer(f)
    return save_pretrained(model, tokenizer, out)


def checkpoint_to_gguf(src: str | Path, out: str | Path, file_type: str = "f16") -> Path:
    """The HF-layout directory `src` (model and tokenizer) as the GGUF file `out` of `file_type`."""
    if file_type not in FILE_TYPES:
        raise EmberError(f"Unknown --type {file_type!r}; choose one of {', '.join(FILE_TYPES)}.")
    src = Path(src)
    if not src.is_dir():
        raise EmberError(f"Model directory {src} does not exist." if not src.exists() else
                         f"{src} is neither a GGUF file nor a model directory.")
    if read_json(src / "config.json", "Model config").get("quantization_config") is not None:
        raise EmberError(f"{src} is saved quantized by Ember; convert its unquantized original to GGUF instead.")
    if not (src / "tokenizer.json").is_file():
        raise EmberError(f"{src} has no tokenizer.json; a GGUF file carries its tokenizer, so convert needs one.")
    tokenizer = load_tokenizer(src)
    model = load_pretrained(src, "cpu", torch.float32)
    return write_gguf(model, tokenizer, out, file_type, name=src.resolve().name)


def convert(src: str | Path, out: str | Path, to: str | None = None, file_type: str | None = None,
            dtype: str | None = None) -> Path:
    """Convert `src` (a GGUF file or a model directory) to `to` ("hf" or "gguf"; default: the other one).
    `file_type` (default f16) applies to GGUF output, `dtype` (default float32) to a directory."""
    src, out = Path(src), Path(out)
    if to is not None and to not in FORMATS:
        raise EmberError(f"Unknown --to {to!r}; choose hf or gguf.")
    if not src.exists():
        raise EmberError(f"{src} does not exist; give a .gguf file or a model directory.")
    if out.resolve() == src.resolve():
        raise EmberError(f"--out {out} is the input itself; write the conversion somewhere else.")
    source_is_gguf = is_gguf(src)
    to = to or ("hf" if source_is_gguf else "gguf")
    if to == "hf":
        if not source_is_gguf:
            raise EmberError(f"{src} is already a model directory; --to hf converts a .gguf file.")
        if file_type is not None:
            raise EmberError("--type sets the weights of a GGUF file; a directory takes --dtype.")
        return gguf_to_checkpoint(src, out, dtype or "float32")
    if source_is_gguf:
        raise EmberError(f"{src} is already a GGUF file; convert it to a directory first (--to hf), then back "
                         "with the --type you want.")
    if dtype is not None:
        raise EmberError("--dtype sets the weights of a directory; a GGUF file takes --type.")
    return checkpoint_to_gguf(src, out, file_type or "f16")
