"""Pretraining data: corpora in, memory-mapped token shards out, batches as pure functions.

- A corpus is any mix of text files, directories, JSONL (a `text` field, optionally
  gzipped), Parquet (a `text` column), or `stdlib`: the Python standard library of the
  running interpreter, the default corpus that needs no download.
- `prepare_shards` tokenizes each document, appends EOS, and routes it to train or
  validation by a hash of its content, so the split never changes when files are added.
  Shards are flat uint16/uint32 arrays (nanoGPT's `.bin` format) plus `meta.json`, and
  the tokenizer is saved beside them.
- `TokenShards.get_batch` draws windows from a generator seeded by (seed, split, step,
  micro-step): a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ember.errors import EmberError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".html", ".htm", ".c", ".h", ".json", ".csv", ".tex"}
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__",
               "turtledemo", "ensurepip", "tkinter"}
META = "meta.json"
TOKENIZER_DIR = "tokenizer"


# --- corpora -----------------------------------------------------------------------------
def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The `.py` files of this interpreter's standard library (no tests), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1]))
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        chosen.append(f)
        total += f.stat().st_size
    return chosen


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old corpora (e.g. some Gutenberg files) are Latin-1


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(4096)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EmberError(f"{path} line {n} is not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EmberError(f"{path} line {n} has no string field 'text'.")
            yield f"{path}:{n}", record["text"]


def _iter_parquet(path: Path) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmberError(f"Reading {path} needs pyarrow: pip install 'ember[parquet]'.") from None
    try:
        table = pq.read_table(path, columns=["text"])
    except KeyError:
        raise EmberError(f"{path} has no 'text' column.") from None
    except Exception as e:  # pyarrow raises several types for corrupt files
        if "text" in str(e) and "column" in str(e).lower():
            raise EmberError(f"{path} has no 'text' column.") from None
        raise EmberError(f"{path} is not a readable Parquet file ({e}).") from None
    for i, text in enumerate(table.column("text").to_pylist()):
        if isinstance(text, str):
            yield f"{path}:{i}", text


def _iter_path(path: Path) -> Iterator[tuple[str, str]]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif not _looks_binary(path):
        yield str(path), read_text(path)


def iter_documents(inputs: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    """(source, text) for every document in the inputs; `stdlib` names the default corpus."""
    found = False
    for item in inputs:
        if str(item) == "stdlib":
            paths = stdlib_files()
        else:
            path = Path(item)
            if not path.exists():
                raise EmberError(f"Input {path} does not exist.")
            if path.is_dir():
                paths = sorted(p for p in path.rglob("*") if p.is_file() and (
                    p.suffix in TEXT_SUFFIXES or p.name.endswith((".jsonl", ".jsonl.gz", ".parquet"))))
            else:
                paths = [path]
        for p in paths:
            for source, text in _iter_path(Path(p)):
                if text.strip():
                    found = True
                    yield source, text
    if not found:
        raise EmberError(f"No text found in {', '.join(map(str, inputs))}.")


# --- shards ------------------------------------------------------------------------------
def is_validation(text: str, val_fraction: float) -> bool:
    """A stable coin flip per document (sha256, not Python's salted hash)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _batched(items: Iterator[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        arr = np.concatenate(self.buffer)
        arr.tofile(self.out / name)
        self.shards.append({"file": name, "tokens": int(arr.size)})
        self.buffer, self.buffered = [], 0


def prepare_shards(inputs: list[str], tokenizer: Any, out_dir: str | Path, val_fraction: float = 0.005,
                   shard_tokens: int = 100_000_000, progress: bool = True) -> dict[str, Any]:
    """Tokenize `inputs` into `out_dir` (written atomically) and return its meta."""
    from tqdm.auto import tqdm

    from ember.checkpoint import atomic_dir

    if not 0 <= val_fraction < 1:
        raise EmberError("--val-fraction must be in [0, 1).")
    eos = tokenizer.eos_id
    if eos is None:
        raise EmberError("The tokenizer has no end-of-text token to separate documents.")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        docs = {"train": 0, "val": 0}
        held_back: list[int] | None = None  # the last train document, in case val ends up empty
        bar = tqdm(unit="doc", desc="tokenizing", disable=not progress)
        encode = getattr(tokenizer, "encode_batch", None)
        for batch in _batched(iter_documents(inputs), 256):
            texts = [t for _, t in batch]
            all_ids = encode(texts) if encode else [tokenizer.encode(t) for t in texts]
            for text, ids in zip(texts, all_ids):
                split = "val" if is_validation(text, val_fraction) else "train"
                if split == "train":
                    if held_back is not None:
                        writers["train"].add(held_back)
                        docs["train"] += 1
                    held_back = list(ids) + [eos]
                else:
                    writers["val"].add(list(ids) + [eos])
                    docs["val"] += 1
            bar.update(len(batch))
        bar.close()
        if held_back is not None:
            # A tiny corpus may hash no document into validation: then the last one goes there.
            target = "val" if (docs["val"] == 0 and val_fraction > 0 and docs["train"] > 0) else "train"
            writers[target].add(held_back)
            docs[target] += 1
        for w in writers.values():
            w.flush()
        tokenizer.save(tmp / TOKENIZER_DIR)
        meta = {
            "format": "ember-token-shards-v1", "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": eos, "val_fraction": val_fraction,
            "shards": {s: w.shards for s, w in writers.items()},
            "num_tokens": {s: sum(x["tokens"] for x in w.shards) for s, w in writers.items()},
            "num_documents": docs,
            "inputs": [str(i) for i in inputs],
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --- reading -----------------------------------------------------------------------------
class TokenShards:
    """A prepared data directory: memory-mapped shards and deterministic batches."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise EmberError(f"Data directory {self.path} does not exist; create it with 'ember data prepare'.")
        meta_path = self.path / META
        if not meta_path.is_file():
            raise EmberError(f"{self.path} has no {META}; create it with 'ember data prepare'.")
        try:
            self.meta = json.loads(meta_path.read_text())
            dtype = np.dtype(self.meta["dtype"])
            self.shards = {
                split: [np.memmap(self.path / s["file"], dtype=dtype, mode="r") for s in self.meta["shards"][split]
                        if s["tokens"] > 0]
                for split in ("train", "val")
            }
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EmberError(f"{meta_path} is malformed ({e}); prepare the data again.") from None
        except FileNotFoundError as e:
            raise EmberError(f"A shard listed in {meta_path} is missing ({e.filename}).") from None

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def num_tokens(self, split: str) -> int:
        return sum(len(s) for s in self.shards[split])

    def _windows(self, split: str, block_size: int) -> tuple[list[np.memmap], np.ndarray]:
        shards = [s for s in self.shards[split] if len(s) > block_size]
        if not shards:
            raise EmberError(f"The {split} split has fewer than {block_size + 1} tokens in any shard; use a larger "
                             "corpus or a smaller --block-size.")
        starts = np.array([len(s) - block_size for s in shards], dtype=np.int64)  # valid starts per shard
        return shards, starts

    def check_split(self, split: str, block_size: int) -> None:
        """Raise a clear error if `split` cannot give windows of `block_size` + 1 tokens."""
        self._windows(split, block_size)

    def _gather(self, shards, picks: list[tuple[int, int]], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(shards[i][o:o + block_size + 1], dtype=np.int64) for i, o in picks])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def get_batch(self, split: str, batch_size: int, block_size: int, step: int, micro_step: int = 0,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [B, T] (y = x shifted by one); a pure function of its arguments."""
        shards, starts = self._windows(split, block_size)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, step, micro_step])
        # Pick a shard in proportion to its size, then an offset inside it.
        cum = np.cumsum(starts)
        flat = rng.integers(0, cum[-1], size=batch_size)
        idx = np.searchsorted(cum, flat, side="right")
        offsets = flat - np.concatenate(([0], cum[:-1]))[idx]
        return self._gather(shards, list(zip(idx.tolist(), offsets.tolist())), block_size)

    def iter_eval_batches(self, split: str, batch_size: int, block_size: int,
                          max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same evenly spaced windows every call, so validation losses are comparable."""
        shards, starts = self._windows(split, block_size)
        picks = []
        for i, s in enumerate(shards):
            picks += [(i, o) for o in range(0, len(s) - block_size, block_size)]
        if len(picks) > batch_size * max_batches:  # spread the chosen windows over the whole split
            stride = len(picks) / (batch_size * max_batches)
            picks = [picks[int(k * stride)] for k in range(batch_size * max_batches)]
        for b in range(0, len(picks), batch_size):
            yield self._gather(shards, picks[b:b + batch_size], block_size)
