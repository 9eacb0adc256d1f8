"""Pretraining data: corpora in, memory-mapped token shards out, batches as pure functions.

- A corpus is any mix of text files, directories, JSONL (a `text` field, optionally
  gzipped), Parquet (a `text` column), or `stdlib`: the Python standard library of the
  running interpreter, the default corpus that needs no download.
- `prepare_shards` tokenizes each document and appends EOS. A corpus of many documents is
  split by document: a hash of each document's content routes it to train or validation, so
  the split never changes when files are added. A corpus of few documents (one book, a few
  large files) cannot be split that way, since one document more or less swings the share,
  so it is split by tokens: each document's last `val_fraction` of tokens go to validation.
  Shards are flat uint16/uint32 arrays (nanoGPT's `.bin` format) plus `meta.json`, which
  records how the corpus was split and the validation share, and the tokenizer is saved
  beside them. The directory appears whole or not at all.
- `TokenShards.get_batch` draws windows from a generator seeded by (seed, split, step,
  micro-step): a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import torch

from ember.errors import EmberError
from ember.files import atomic_dir, write_json

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".html", ".htm", ".c", ".h", ".json", ".csv", ".tex"}
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
# Tests, test data, demos and installed third-party packages are not "the standard library".
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
               "__pycache__", "turtledemo", "ensurepip"}
META = "meta.json"
FORMAT = "ember-token-shards-v1"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
ENCODE_BATCH = 256  # documents per tokenizer call: amortizes the call, bounds memory
# The hash split is used once the corpus is expected to put at least this many documents in
# validation (documents x val_fraction): with fewer, the share it gives is mostly luck (none at
# all in about e^-4 = 2% of corpora), so the corpus is split by tokens instead.
MIN_VAL_DOCUMENTS = 4
# A corpus this long is split by document whatever val_fraction is: the documents whose split
# is still undecided are held in memory, and this bounds them.
MANY_DOCUMENTS = 100_000
BY_DOCUMENT, BY_TOKENS = "documents", "tokens"


# --- corpora -----------------------------------------------------------------------------
def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The `.py` files of this interpreter's standard library (no tests), in a fixed order.

    With `max_bytes`, the shortest prefix of that order holding at least `max_bytes` bytes
    (or everything, if the library is smaller).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]  # prune: site-packages is huge
        files += [Path(dirpath, f) for f in filenames
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]  # build-specific config
    files.sort()
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        chosen.append(f)
        total += f.stat().st_size
    return chosen


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old corpora (e.g. some Gutenberg files) are Latin-1; never fails


def read_text(path: Path) -> str:
    return decode_text(Path(path).read_bytes())


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):  # bytes, so a bad encoding is reported with its line
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    raise EmberError(f"{path} line {n} is not valid UTF-8.") from None
                except json.JSONDecodeError as e:
                    raise EmberError(f"{path} line {n} is not valid JSON ({e.msg}).") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise EmberError(f"{path} line {n} has no string field 'text'.")
                yield f"{path}:{n}", record["text"]
    except (OSError, EOFError) as e:  # gzip raises these for truncated or non-gzip files
        raise EmberError(f"{path} could not be read after line {n} ({e}).") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmberError(f"Reading {path} needs pyarrow: pip install 'ember[parquet]'.") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise EmberError(f"{path} is not a readable Parquet file ({e}).") from None
    if "text" not in pf.schema_arrow.names:
        raise EmberError(f"{path} has no 'text' column (it has {', '.join(pf.schema_arrow.names)}).")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):  # streamed: files may be large
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield f"{path}:{row}", text
            row += 1


def _iter_file(path: Path) -> Iterator[tuple[str, str]]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path)
    elif path.name.endswith(".parquet"):
        yield from _iter_parquet(path)
    else:
        data = path.read_bytes()
        if b"\x00" not in data[:4096]:  # a NUL byte near the start means a binary file: skip it
            yield str(path), decode_text(data)


def _dir_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]  # .git etc.
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".") and (
            Path(f).suffix.lower() in TEXT_SUFFIXES or f.lower().endswith(DATA_SUFFIXES))]
    return sorted(files)


def _iter_input(item: str | Path) -> Iterator[tuple[str, str]]:
    """The non-blank documents of one input (a file, a directory, or `stdlib`)."""
    if str(item) == "stdlib":
        paths = stdlib_files()
    else:
        path = Path(item)
        if not path.exists():
            raise EmberError(f"Input {path} does not exist.")
        paths = _dir_files(path) if path.is_dir() else [path]
    for p in paths:
        for source, text in _iter_file(p):
            if text.strip():
                yield source, text


def _describe(inputs: list[str | Path]) -> str:
    names = [str(i) for i in inputs]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def iter_documents(inputs: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    """(source, text) for every document in the inputs; `stdlib` names the default corpus."""
    inputs = list(inputs)
    found = False
    for item in inputs:
        for doc in _iter_input(item):
            found = True
            yield doc
    if not found:
        raise EmberError(f"No text found in {_describe(inputs)}.")


# --- shards ------------------------------------------------------------------------------
def is_validation(text: str, val_fraction: float, seed: int = 0) -> bool:
    """A coin flip per document that is the same on every run and machine (sha256 of the
    content, not Python's salted hash()), so adding files never moves existing documents."""
    digest = hashlib.sha256(f"{seed}\n".encode() + text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


class _ShardWriter:
    """Appends documents to `{split}_00000.bin`, starting a new file once one holds `shard_tokens`.
    A document never straddles two shards, so every shard starts at a document boundary."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.file: BinaryIO | None = None
        self.tokens = 0  # in the open shard

    def add(self, ids: np.ndarray) -> None:
        if self.file is None:
            self.file = open(self.out / f"{self.split}_{len(self.shards):05d}.bin", "wb")
        ids.tofile(self.file)
        self.tokens += len(ids)
        if self.tokens >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.shards.append({"file": Path(self.file.name).name, "tokens": self.tokens})
            self.file, self.tokens = None, 0


def _fingerprint(tokenizer_dir: Path) -> str | None:
    f = tokenizer_dir / "tokenizer.json"
    return "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def split_by(documents: int, val_fraction: float) -> str:
    """How a corpus of `documents` documents is split: BY_DOCUMENT once the hash split can be
    trusted to come near `val_fraction` (or when no validation is wanted), else BY_TOKENS."""
    if val_fraction == 0 or documents >= MANY_DOCUMENTS or documents * val_fraction >= MIN_VAL_DOCUMENTS:
        return BY_DOCUMENT
    return BY_TOKENS


def validation_start(length: int, val_fraction: float) -> int:
    """Where a document of `length` tokens (EOS not counted) is cut when its corpus is split by
    tokens: the tokens from here on go to validation (the share rounded to the nearest token)."""
    return length - int(val_fraction * length + 0.5)


class _Splitter:
    """Routes tokenized documents (ids + EOS) to the train and validation writers.

    Documents are held until the corpus is known to be split by document, then routed by hash
    as they come; if the corpus ends first, each held document is split by tokens, both pieces
    ending in EOS like a document. Either way a tiny corpus still gets validation: when nothing
    landed there, the last document moves there whole (by document, train lags one document
    behind for this), provided train keeps one. A single document stays in train: training
    needs it more than validation does.
    """

    def __init__(self, writers: dict[str, _ShardWriter], val_fraction: float) -> None:
        self.writers, self.val_fraction = writers, val_fraction
        self.by: str | None = None  # undecided
        self.pending: list[tuple[np.ndarray, bool]] = []  # (ids + EOS, hashed into validation)
        self.held_back: np.ndarray | None = None  # by document: the last train document
        self.docs = {s: 0 for s in SPLITS}  # pieces, when split by tokens

    def add(self, row: np.ndarray, to_val: bool) -> None:
        if self.by == BY_DOCUMENT:
            self._route(row, to_val)
            return
        self.pending.append((row, to_val))
        if split_by(len(self.pending), self.val_fraction) == BY_DOCUMENT:
            self.by = BY_DOCUMENT
            for held, held_to_val in self.pending:
                self._route(held, held_to_val)
            self.pending = []

    def finish(self) -> str:
        """Write what is held back; returns how the corpus was split."""
        if self.by is None:  # still undecided: too few documents to split by document
            self.by = BY_TOKENS
            self._split_tokens()
        elif self.held_back is not None:
            moves = self.val_fraction > 0 and self.docs["val"] == 0 and self.docs["train"] > 0
            self._write("val" if moves else "train", self.held_back)
        for w in self.writers.values():
            w.close()
        return self.by

    def _write(self, split: str, row: np.ndarray) -> None:
        self.writers[split].add(row)
        self.docs[split] += 1

    def _route(self, row: np.ndarray, to_val: bool) -> None:
        if to_val:
            self._write("val", row)
            return
        if self.held_back is not None:
            self._write("train", self.held_back)
        self.held_back = row

    def _split_tokens(self) -> None:
        cuts = [validation_start(len(row) - 1, self.val_fraction) for row, _ in self.pending]
        if len(cuts) > 1 and all(c == len(row) - 1 for c, (row, _) in zip(cuts, self.pending)):
            cuts[-1] = 0  # every share rounded to nothing
        for (row, _), cut in zip(self.pending, cuts):
            if cut == 0:
                self._write("val", row)
            elif cut == len(row) - 1:
                self._write("train", row)
            else:
                self._write("train", np.concatenate((row[:cut], row[-1:])))
                self._write("val", row[cut:])


def prepare_shards(inputs: list[str], tokenizer: Any, out_dir: str | Path, val_fraction: float = 0.005,
                   shard_tokens: int = 100_000_000, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Tokenize `inputs` into shards in `out_dir` (written atomically) and return its meta.

    `tokenizer` needs `encode_batch(texts)` or `encode(text)`, `eos_id`, `vocab_size` and
    `save(dir)`. `seed` salts the train/validation hash: another seed, another split. The meta's
    `split` says whether the corpus was split by document or by tokens, and the validation share.
    """
    from tqdm.auto import tqdm

    if not 0 <= val_fraction < 1:
        raise EmberError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if shard_tokens < 1:
        raise EmberError(f"shard_tokens must be positive, got {shard_tokens}.")
    eos = tokenizer.eos_id
    if eos is None:
        raise EmberError("The tokenizer has no end-of-text token to separate documents.")
    inputs = [str(i) for i in inputs]
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        # atomic_dir replaces out_dir whole: never do that to a directory we did not write
        raise EmberError(f"{out_dir} exists and is not an Ember data directory; choose another --out.")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 - 1 else np.uint32)
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])

    def documents() -> Iterator[tuple[int, str]]:
        for k, item in enumerate(inputs):
            for _, text in _iter_input(item):
                yield k, text

    with atomic_dir(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        splitter = _Splitter(writers, val_fraction)
        per_input = [0] * len(inputs)
        bar = tqdm(unit="char", unit_scale=True, desc="tokenizing", disable=not progress)
        docs_iter = documents()
        while batch := list(itertools.islice(docs_iter, ENCODE_BATCH)):
            texts = [t for _, t in batch]
            for text, ids in zip(texts, encode_batch(texts)):
                splitter.add(_with_eos(ids, eos, dtype), is_validation(text, val_fraction, seed))
            for k, _ in batch:
                per_input[k] += 1
            bar.update(sum(len(t) for t in texts))
            bar.set_postfix(docs=sum(per_input), refresh=False)
        bar.close()
        if sum(per_input) == 0:
            raise EmberError(f"No text found in {_describe(inputs)}.")
        by = splitter.finish()
        tokenizer.save(tmp / TOKENIZER_DIR)
        num_tokens = {s: sum(x["tokens"] for x in w.shards) for s, w in writers.items()}
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(eos),
            "val_fraction": val_fraction,
            "seed": seed,
            "split": {"by": by, "val_share": num_tokens["val"] / sum(num_tokens.values())},
            "shards": {s: w.shards for s, w in writers.items()},
            "num_tokens": num_tokens,
            "num_documents": splitter.docs,
            "sources": [{"input": i, "documents": n} for i, n in zip(inputs, per_input)],
            "tokenizer": {"dir": TOKENIZER_DIR, "fingerprint": _fingerprint(tmp / TOKENIZER_DIR)},
        }
        write_json(tmp / META, meta)
    return meta


def _with_eos(ids: Any, eos: int, dtype: np.dtype) -> np.ndarray:
    if isinstance(ids, np.ndarray):
        return np.append(ids.astype(dtype), np.array([eos], dtype=dtype))
    # fromiter is the fastest list -> array path, and raises if an id overflows dtype
    return np.fromiter(itertools.chain(ids, (eos,)), dtype=dtype, count=len(ids) + 1)


def describe_split(meta: dict[str, Any]) -> str:
    """One sentence on a prepared directory's split, naming the flag that fixes an empty validation split."""
    n, split = meta["num_tokens"], meta["split"]
    how = ("each document's last tokens went to validation" if split["by"] == BY_TOKENS
           else "whole documents went to validation by a hash of their text")
    text = (f"{n['train']:,} train and {n['val']:,} validation tokens ({split['val_share']:.2%} validation, "
            f"asked for {meta['val_fraction']:.2%}; {how}).")
    if n["val"] == 0:
        text += " Validation is empty: prepare the data again with a larger --val-fraction."
    return text


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
            self.dtype = np.dtype(self.meta["dtype"])
            self.vocab_size, self.eos_id = int(self.meta["vocab_size"]), int(self.meta["eos_id"])
            self.shards: dict[str, list[np.memmap]] = {split: [] for split in SPLITS}
            for split in SPLITS:
                for s in self.meta["shards"][split]:
                    if s["tokens"] == 0:  # np.memmap cannot map an empty file
                        continue
                    mm = np.memmap(self.path / s["file"], dtype=self.dtype, mode="r")
                    if len(mm) != s["tokens"]:
                        raise EmberError(f"Shard {self.path / s['file']} holds {len(mm)} tokens, not the "
                                         f"{s['tokens']} that {META} lists; prepare the data again.")
                    self.shards[split].append(mm)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EmberError(f"{meta_path} is malformed ({e}); prepare the data again.") from None
        except FileNotFoundError as e:
            raise EmberError(f"A shard listed in {meta_path} is missing ({e.filename}).") from None

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def num_tokens(self, split: str) -> int:
        return sum(len(s) for s in self._split(split))

    def _split(self, split: str) -> list[np.memmap]:
        if split not in self.shards:
            raise EmberError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
        return self.shards[split]

    def _windows(self, split: str, block_size: int) -> tuple[list[np.memmap], np.ndarray]:
        """The shards that fit a window of block_size + 1 tokens, and how many starts each has."""
        if block_size < 1:
            raise EmberError(f"block_size must be positive, got {block_size}.")
        shards = [s for s in self._split(split) if len(s) > block_size]
        if not shards:
            held = self.num_tokens(split)
            if split == "val":
                share = held / max(1, held + self.num_tokens("train"))
                fix = (f"it holds {held:,} tokens ({share:.2%} of the corpus): prepare the data again with a larger "
                       f"--val-fraction, or use a smaller --block-size")
            else:
                fix = f"it holds {held:,} tokens: use a larger corpus or a smaller --block-size"
            raise EmberError(f"The {split} split has fewer than {block_size + 1} tokens in any shard, too small for "
                             f"this block size; {fix}.")
        return shards, np.array([len(s) - block_size for s in shards], dtype=np.int64)

    def check_split(self, split: str, block_size: int) -> None:
        """Raise a clear error if `split` cannot give windows of `block_size` + 1 tokens."""
        self._windows(split, block_size)

    @staticmethod
    def _gather(shards: list[np.memmap], picks: list[tuple[int, int]],
                block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(shards[i][o:o + block_size + 1], dtype=np.int64) for i, o in picks])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def get_batch(self, split: str, batch_size: int, block_size: int, step: int, micro_step: int = 0,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 [B, T] (y = x shifted by one), a pure function of the arguments and the
        data: no sampler state, so a run resumed at `step` sees the batches it would have seen."""
        shards, starts = self._windows(split, block_size)
        mask = 2**64 - 1  # the seed sequence wants non-negative integers
        rng = np.random.default_rng([seed & mask, SPLITS.index(split), step & mask, micro_step & mask])
        # Uniform over all valid windows: a shard's share is its number of starts. No window
        # crosses a shard boundary.
        cum = np.cumsum(starts)
        flat = rng.integers(0, cum[-1], size=batch_size)
        idx = np.searchsorted(cum, flat, side="right")
        offsets = flat - np.concatenate(([0], cum[:-1]))[idx]
        return self._gather(shards, list(zip(idx.tolist(), offsets.tolist())), block_size)

    def iter_eval_batches(self, split: str, batch_size: int, block_size: int,
                          max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same non-overlapping windows, spread evenly over the split, on every call, so
        validation losses are comparable across steps and runs. The last batch may be short."""
        shards, _ = self._windows(split, block_size)
        picks = [(i, o) for i, s in enumerate(shards) for o in range(0, len(s) - block_size, block_size)]
        want = batch_size * max_batches
        if len(picks) > want:
            stride = len(picks) / want
            picks = [picks[int(k * stride)] for k in range(want)]
        for b in range(0, len(picks), batch_size):
            yield self._gather(shards, picks[b:b + batch_size], block_size)
