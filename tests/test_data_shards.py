"""Corpora and token shards: ingestion of every format, a stable split, pure batches."""

import gzip
import json

import numpy as np
import pytest
import torch

from ember.data import TokenShards, iter_documents, prepare_shards, stdlib_files
from ember.errors import EmberError


class ByteTokenizer:
    """ids = UTF-8 bytes, EOS = 256: enough to check what the shards hold."""
    eos_id, vocab_size = 256, 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def save(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text("{}")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_stdlib_corpus_is_deterministic_and_skips_tests():
    a, b = stdlib_files(), stdlib_files()
    assert a == b and len(a) > 100
    assert not any("test" in p.parts[:-1] or "site-packages" in p.parts for p in a)
    capped = stdlib_files(max_bytes=100_000)
    assert capped == a[:len(capped)] and sum(p.stat().st_size for p in capped[:-1]) < 100_000


def test_every_input_format_is_read(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow reads Parquet (test extra)")
    import pyarrow as pa

    write(tmp_path, "d/a.txt", "plain text")
    write(tmp_path, "d/sub/b.md", "# markdown")
    write(tmp_path, "c.jsonl", json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet", "row two"]}), tmp_path / "p.parquet")
    (tmp_path / "d" / "blob.txt").write_bytes(b"\x00\x01binary")
    texts = [t for _, t in iter_documents([tmp_path / "d", tmp_path / "c.jsonl", tmp_path / "g.jsonl.gz",
                                           tmp_path / "p.parquet"])]
    assert texts == ["plain text", "# markdown", "from jsonl", "second", "gzipped", "from parquet", "row two"]


def test_bad_inputs_are_named(tmp_path):
    write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(EmberError, match=r"bad.jsonl line 2"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    write(tmp_path, "nofield.jsonl", '{"body": "x"}\n')
    with pytest.raises(EmberError, match=r"line 1 has no string field 'text'"):
        list(iter_documents([tmp_path / "nofield.jsonl"]))
    with pytest.raises(EmberError, match="does not exist"):
        list(iter_documents([tmp_path / "missing.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmberError, match="No text"):
        list(iter_documents([tmp_path / "empty"]))


def test_shards_hold_each_document_then_eos_and_split_is_stable(tmp_path):
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(200)]
    for i, d in enumerate(docs):
        write(tmp_path, f"c/{i:03d}.txt", d)
    meta = prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s", val_fraction=0.1, progress=False)
    data = TokenShards(tmp_path / "s")
    train = np.concatenate([np.asarray(s) for s in data.shards["train"]])
    val = np.concatenate([np.asarray(s) for s in data.shards["val"]])
    assert meta["num_documents"]["train"] + meta["num_documents"]["val"] == 200
    assert 5 <= meta["num_documents"]["val"] <= 40
    # Reassemble: every document appears exactly once, in order within its split, followed by EOS.
    decoded = sorted(bytes(p[:-1].tolist()).decode() for arr in (train, val)
                     for p in np.split(arr, np.where(arr == 256)[0] + 1) if len(p))
    assert decoded == sorted(docs)
    # Adding a file never moves an existing document to the other split.
    write(tmp_path, "c/zzz.txt", "a brand new document")
    prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s2", val_fraction=0.1, progress=False)
    val2 = np.concatenate([np.asarray(s) for s in TokenShards(tmp_path / "s2").shards["val"]])
    old_val = {bytes(p[:-1].tolist()) for p in np.split(val, np.where(val == 256)[0] + 1) if len(p)}
    new_val = {bytes(p[:-1].tolist()) for p in np.split(val2, np.where(val2 == 256)[0] + 1) if len(p)}
    assert old_val <= new_val


def test_batches_are_a_pure_function_of_seed_split_step(tmp_path):
    for i in range(10):
        write(tmp_path, f"c/{i}.txt", f"{i} abcdefghij" * 50)
    prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s", val_fraction=0.5, progress=False)
    data = TokenShards(tmp_path / "s")
    x1, y1 = data.get_batch("train", 4, 16, step=3, micro_step=1, seed=7)
    x2, y2 = TokenShards(tmp_path / "s").get_batch("train", 4, 16, step=3, micro_step=1, seed=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    x3, _ = data.get_batch("train", 4, 16, step=4, micro_step=1, seed=7)
    assert not torch.equal(x1, x3)
    evals = [x for x, _ in data.iter_eval_batches("val", 2, 16, max_batches=3)]
    assert all(torch.equal(a, b) for a, b in zip(evals, [x for x, _ in data.iter_eval_batches("val", 2, 16, 3)]))
    with pytest.raises(EmberError, match="block-size"):
        data.get_batch("train", 1, 100_000, step=0)


def test_killed_preparation_leaves_no_data_dir(tmp_path, monkeypatch):
    write(tmp_path, "a.txt", "some text")

    class Dying(ByteTokenizer):
        def save(self, path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_shards([str(tmp_path / "a.txt")], Dying(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_missing_or_malformed_data_dir(tmp_path):
    with pytest.raises(EmberError, match="does not exist"):
        TokenShards(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text("{")
    with pytest.raises(EmberError, match="malformed"):
        TokenShards(tmp_path / "d")
