"""Calibration text for SmoothQuant: token windows cut from a corpus with the model's tokenizer.

SmoothQuant measures each layer's activation ranges on sample text before it quantizes; these functions
produce that sample (lists of token ids) from the default corpus or from anything `ember.data` reads.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

from ember.data import is_validation, iter_documents


def stdlib_calibration(tokenizer: Any, samples: int = 32, seq_len: int = 512) -> list[list[int]]:
    """`samples` token windows from the default corpus (its training side, never the held-out split)."""
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
    ids: list[int] = []
    for _, text in iter_documents([str(path)]):
        ids += tokenizer.encode(text)
        if len(ids) >= samples * seq_len:
            break
    return [ids[i:i + seq_len] for i in range(0, min(len(ids), samples * seq_len), seq_len)]
