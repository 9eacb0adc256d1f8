"""Opening a GGUF file: the checks that turn a bad file into one sentence, and typed metadata access.

GGUF (llama.cpp's format) is a header of typed key/value metadata, a table of tensor infos and
the tensor blocks. Parsing is `gguf.GGUFReader`'s (llama.cpp's own reader, memory-mapped, so
opening reads no tensor data); this module names what is wrong when it fails, and reads each
metadata value as the Python type its key must hold.
"""

from __future__ import annotations

import functools

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ember.errors import EmberError

MAGIC = b"GGUF"

_UNKNOWN_TYPE = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> Python value) and `tensors` (name -> gguf ReaderTensor)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EmberError(f"GGUF file {self.path} does not exist.")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(4)
        if len(head) < 4:
            raise EmberError(f"{self.path} is truncated: {size} bytes is shorter than the GGUF magic number.")
        if head != MAGIC:
            raise EmberError(f"{self.path} is not a GGUF file: its magic number is {head!r}, expected {MAGIC!r}.")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except ValueError as e:
            m = _UNKNOWN_TYPE.search(str(e))
            if m:
                raise EmberError(f"{self.path} holds a tensor of type {m.group(1)}, which is not a GGML tensor "
                                 "type (field: tensor info type).") from None
            raise EmberError(f"{self.path} is truncated or corrupt (the GGUF header does not parse: {e}).") from None
        except (IndexError, OverflowError, KeyError, UnicodeDecodeError, MemoryError) as e:
            raise EmberError(f"{self.path} is truncated or corrupt (the GGUF header does not parse: "
                             f"{type(e).__name__}: {e}).") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != t.n_bytes:
                raise EmberError(f"{self.path} is truncated: tensor {t.name} ends at byte {end} but the file has "
                                 f"{size} bytes.")
        self.metadata: dict[str, Any] = {}
        for name, field in self.reader.fields.items():
            try:
                self.metadata[name] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise EmberError(f"{self.path} has an unreadable metadata value for {name} ({e}).") from None

    # --- metadata -----------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.metadata

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        """The value of `key` as `kind` (int, float, bool, str, list), or `default` when absent."""
        if key not in self.metadata:
            return default
        return self._typed(key, kind)

    def require(self, key: str, kind: type) -> Any:
        if key not in self.metadata:
            raise EmberError(f"{self.path} lacks the required metadata key {key}.")
        return self._typed(key, kind)

    def _typed(self, key: str, kind: type) -> Any:
        value = self.metadata[key]
        ok = {
            int: isinstance(value, (int, np.integer)) and not isinstance(value, bool),
            float: isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool),
            bool: isinstance(value, (bool, np.bool_)),
            str: isinstance(value, str),
            list: isinstance(value, list),
        }[kind]
        if not ok:
            raise EmberError(f"{self.path} has metadata key {key} of the wrong type: "
                             f"{type(value).__name__}, expected {kind.__name__}.")
        return kind(value)

    # --- tensors ------------------------------------------------------------------------
    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in PyTorch's dimension order ([out, in] for a matrix)."""
        t = self.tensors[name]
        kind = t.tensor_type
        try:
            values = gguf.quants.dequantize(t.data, kind)
        except NotImplementedError:  # the gguf package's word for a type it has no decoder for
            raise EmberError(f"Tensor {name} in {self.path} has type {kind.name}, which the gguf package "
                             "cannot decode.") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-moving dimension first
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        return values if values.flags.writeable else values.copy()  # F32 comes back as a view of the mapped file


@functools.lru_cache(maxsize=2)
def _opened(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def forget_parsed_files() -> None:
    """Drop the parsed files `open_gguf` keeps (their mapped tensors and the vocabulary's strings):
    a process that has loaded its model and tokenizer from a file needs neither again."""
    _opened.cache_clear()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """A parsed GGUF file, parsed once while it is unchanged: the model and its tokenizer are read from
    one file, and parsing a header of ~100k vocabulary strings takes seconds."""
    p = Path(path).resolve()
    if not p.is_file():
        raise EmberError(f"GGUF file {p} does not exist.")
    st = p.stat()
    return _opened(str(p), st.st_mtime_ns, st.st_size)
