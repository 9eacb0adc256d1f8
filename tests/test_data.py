"""ember.data: corpora of every format, a stable split, exact shards, pure batches, atomic writes.

The tokenizer is a byte-level stand-in (ids = UTF-8 bytes, EOS = 256), so what a shard
should hold can be written down by hand.
"""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ember.data as data_mod
from ember.data import TokenShards, is_validation, iter_documents, prepare_shards, stdlib_files
from ember.errors import EmberError
from ember.tokenizer import train_tokenizer

from conftest import need_module

EOS = 256


class ByteTokenizer:
    eos_id, vocab_size = EOS, 257

    def __init__(self):
        self.batches = 0

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        self.batches += 1
        return [self.encode(t) for t in texts]

    def save(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text('{"model": "bytes"}')


class EncodeOnlyTokenizer:
    """No encode_batch, no tokenizer.json: prepare_shards must fall back to encode()."""
    eos_id, vocab_size = EOS, 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def save(self, path):
        path.mkdir(parents=True, exist_ok=True)


def write(root, name, text):
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def ids(text):
    return list(text.encode("utf-8")) + [EOS]


def split_tokens(data, split):
    return np.concatenate([np.asarray(s) for s in data.shards[split]]) if data.shards[split] else np.array([])


def docs_of(tokens):
    """The documents (as text) in a flat token array, in order."""
    ends = np.where(tokens == EOS)[0]
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [bytes(tokens[a:b].astype(np.uint8)).decode() for a, b in zip(starts, ends)]


def corpus(root, n=60):
    texts = [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(n)]
    for i, t in enumerate(texts):
        write(root, f"c/{i:03d}.txt", t)
    return texts


# --- corpora -----------------------------------------------------------------------------
def test_stdlib_corpus_is_nonempty_deterministic_and_has_no_tests():
    files = stdlib_files()
    assert files == stdlib_files() and files == sorted(files) and len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    for skipped in ("test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"):
        assert not any(skipped in f.parts for f in files), skipped
    assert any(f.name == "os.py" for f in files)


def test_stdlib_byte_cap_takes_a_prefix_that_just_reaches_the_cap():
    files = stdlib_files()
    capped = stdlib_files(max_bytes=200_000)
    assert capped == files[:len(capped)]
    sizes = [f.stat().st_size for f in capped]
    assert sum(sizes) >= 200_000 > sum(sizes[:-1])


def test_stdlib_input_reads_the_default_corpus():
    first = next(iter_documents(["stdlib"]))
    assert first[0] == str(stdlib_files()[0]) and first[1].strip()


def test_files_and_directories_are_read_recursively_in_sorted_order(tmp_path):
    write(tmp_path, "d/b.md", "# markdown")
    write(tmp_path, "d/a.txt", "plain text")
    write(tmp_path, "d/sub/c.py", "print('hi')")
    write(tmp_path, "d/blank.txt", "  \n\n")  # blank documents are dropped
    write(tmp_path, "d/.git/config.txt", "hidden: skipped")
    write(tmp_path, "d/image.png", "not a text suffix")
    (tmp_path / "d" / "blob.txt").write_bytes(b"\x00\x01\x02binary")  # NUL byte: a binary file
    (tmp_path / "d" / "old.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: Latin-1
    single = write(tmp_path, "notes.rst", "a single file")
    docs = list(iter_documents([tmp_path / "d", str(single)]))
    assert [t for _, t in docs] == ["plain text", "# markdown", "café", "print('hi')", "a single file"]
    assert docs[0][0] == str(tmp_path / "d" / "a.txt")


def test_jsonl_gzipped_jsonl_and_parquet_are_read(tmp_path):
    pq = need_module("pyarrow.parquet", "what Ember reads Parquet corpora with (the extra 'parquet')")
    pa = need_module("pyarrow", "what Ember reads Parquet corpora with (the extra 'parquet')")

    write(tmp_path, "c.jsonl", json.dumps({"text": "from jsonl", "id": 1}) + "\n\n" + json.dumps({"text": "second"}))
    with gzip.open(tmp_path / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gzipped ✓"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet", None, "row three"], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    docs = list(iter_documents([tmp_path / "c.jsonl", tmp_path / "g.jsonl.gz", tmp_path / "p.parquet"]))
    assert [t for _, t in docs] == ["from jsonl", "second", "gzipped ✓", "from parquet", "row three"]
    assert [s for s, _ in docs][:2] == [f"{tmp_path / 'c.jsonl'}:1", f"{tmp_path / 'c.jsonl'}:3"]
    # inside a directory too
    write(tmp_path, "dir/x.jsonl", json.dumps({"text": "nested"}) + "\n")
    assert [t for _, t in iter_documents([tmp_path / "dir"])] == ["nested"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    write(tmp_path, "bad.jsonl", '{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(EmberError, match=r"bad\.jsonl line 3 is not valid JSON"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    write(tmp_path, "nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(EmberError, match=r"nofield\.jsonl line 2 has no string field 'text'"):
        list(iter_documents([tmp_path / "nofield.jsonl"]))
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(EmberError, match=r"latin\.jsonl line 2 is not valid UTF-8"):
        list(iter_documents([tmp_path / "latin.jsonl"]))
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(EmberError, match=r"fake\.jsonl\.gz could not be read"):
        list(iter_documents([tmp_path / "fake.jsonl.gz"]))


def test_parquet_without_text_column_or_without_pyarrow(tmp_path, monkeypatch):
    pq = need_module("pyarrow.parquet", "what Ember reads Parquet corpora with (the extra 'parquet')")
    pa = need_module("pyarrow", "what Ember reads Parquet corpora with (the extra 'parquet')")

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(EmberError, match="has no 'text' column"):
        list(iter_documents([tmp_path / "p.parquet"]))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(EmberError, match="needs pyarrow"):
        list(iter_documents([tmp_path / "p.parquet"]))


def test_missing_path_and_empty_corpus_raise(tmp_path):
    with pytest.raises(EmberError, match="does not exist"):
        list(iter_documents([tmp_path / "missing.txt"]))
    write(tmp_path, "empty/blank.txt", "\n")
    with pytest.raises(EmberError, match="No text found in"):
        list(iter_documents([tmp_path / "empty"]))
    with pytest.raises(EmberError, match="No text found in"):
        prepare_shards([str(tmp_path / "empty")], ByteTokenizer(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- the split ---------------------------------------------------------------------------
def test_split_hash_is_pinned_across_runs_and_machines():
    # sha256-based: these values must never change (Python's hash() would, per process).
    flips = "".join("v" if is_validation(f"doc {i}", 0.3) else "t" for i in range(24))
    assert flips == PINNED_FLIPS
    assert not is_validation("anything", 0.0) and is_validation("anything", 0.999999)


PINNED_FLIPS = "tttttvttvvtvtttttttttttt"


def test_split_is_stable_when_files_are_added_and_changes_with_seed(tmp_path):
    texts = corpus(tmp_path, 80)
    meta = prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s1", val_fraction=0.2, progress=False)
    again = prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s1b", val_fraction=0.2,
                           progress=False)
    assert meta == again
    val1 = set(docs_of(split_tokens(TokenShards(tmp_path / "s1"), "val")))
    assert 4 <= len(val1) <= 32 and val1 <= set(texts)

    for i in range(40):
        write(tmp_path, f"c/new{i:02d}.txt", f"a brand new document {i}")
    prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s2", val_fraction=0.2, progress=False)
    val2 = set(docs_of(split_tokens(TokenShards(tmp_path / "s2"), "val")))
    assert val2 & set(texts) == val1  # old documents stay where they were; new ones land anywhere

    prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s3", val_fraction=0.2, seed=1,
                   progress=False)
    assert set(docs_of(split_tokens(TokenShards(tmp_path / "s3"), "val"))) != val2


def test_tiny_corpus_still_gets_a_validation_document(tmp_path):
    write(tmp_path, "c/a.txt", "first document")
    write(tmp_path, "c/b.txt", "second document")
    meta = prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s", val_fraction=1e-12, progress=False)
    assert meta["num_documents"] == {"train": 1, "val": 1}
    data = TokenShards(tmp_path / "s")
    assert docs_of(split_tokens(data, "val")) == ["second document"]  # the last one, deterministically
    # A single document stays in train: training needs it more than validation does.
    meta = prepare_shards([str(tmp_path / "c" / "a.txt")], ByteTokenizer(), tmp_path / "one", progress=False)
    assert meta["num_documents"] == {"train": 1, "val": 0}


# --- shards ------------------------------------------------------------------------------
def test_shards_hold_every_document_then_eos_in_order(tmp_path):
    texts = corpus(tmp_path, 60)
    tok = ByteTokenizer()
    meta = prepare_shards([str(tmp_path / "c")], tok, tmp_path / "s", val_fraction=0.2, shard_tokens=300,
                          progress=False)
    assert tok.batches == 1  # batched, not one call per document
    data = TokenShards(tmp_path / "s")
    val = [t for t in texts if is_validation(t, 0.2)]
    train = [t for t in texts if not is_validation(t, 0.2)]
    assert split_tokens(data, "train").tolist() == [i for t in train for i in ids(t)]
    assert split_tokens(data, "val").tolist() == [i for t in val for i in ids(t)]

    assert len(meta["shards"]["train"]) > 3  # shard_tokens=300 forces several
    for split in ("train", "val"):
        for s, mm in zip(meta["shards"][split], data.shards[split]):
            assert mm[-1] == EOS and len(mm) == s["tokens"]  # every shard ends on a document boundary
            assert (tmp_path / "s" / s["file"]).stat().st_size == 2 * s["tokens"]  # raw uint16, no header
    assert [s["file"] for s in meta["shards"]["train"]][:2] == ["train_00000.bin", "train_00001.bin"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["eos_id"] == EOS
    assert meta["num_tokens"] == {s: data.num_tokens(s) for s in ("train", "val")}
    assert meta["num_documents"] == {"train": len(train), "val": len(val)}
    assert meta["sources"] == [{"input": str(tmp_path / "c"), "documents": 60}]
    assert meta["tokenizer"]["fingerprint"].startswith("sha256:")
    assert json.loads((tmp_path / "s" / "meta.json").read_text()) == meta
    assert (data.tokenizer_dir / "tokenizer.json").is_file()


def test_encode_fallback_and_wide_vocabularies_use_uint32(tmp_path):
    write(tmp_path, "a.txt", "héllo")
    meta = prepare_shards([str(tmp_path / "a.txt")], EncodeOnlyTokenizer(), tmp_path / "s", progress=False)
    assert TokenShards(tmp_path / "s").shards["train"][0].tolist() == ids("héllo")
    assert meta["tokenizer"]["fingerprint"] is None

    class Wide(ByteTokenizer):
        eos_id, vocab_size = 70_000, 70_001

    meta = prepare_shards([str(tmp_path / "a.txt")], Wide(), tmp_path / "w", progress=False)
    assert meta["dtype"] == "uint32"
    assert TokenShards(tmp_path / "w").shards["train"][0].tolist() == list("héllo".encode()) + [70_000]


def test_failed_preparation_leaves_out_dir_untouched(tmp_path, monkeypatch):
    corpus(tmp_path, 30)
    out = tmp_path / "s"
    prepare_shards([str(tmp_path / "c")], ByteTokenizer(), out, val_fraction=0.2, shard_tokens=100, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    calls = []

    def dying_add(self, row):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")  # mid-write: some shards already on disk
        original_add(self, row)

    original_add = data_mod._ShardWriter.add
    monkeypatch.setattr(data_mod._ShardWriter, "add", dying_add)
    write(tmp_path, "c/new.txt", "a new document")
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_shards([str(tmp_path / "c")], ByteTokenizer(), out, val_fraction=0.2, shard_tokens=100,
                       progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "s"]  # no temp dirs left behind

    with pytest.raises(RuntimeError, match="disk full"):
        calls.clear()
        prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "fresh", shard_tokens=100, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    write(tmp_path, "a.txt", "text")
    write(tmp_path, "mine/notes.txt", "precious")
    with pytest.raises(EmberError, match="not an Ember data directory"):
        prepare_shards([str(tmp_path / "a.txt")], ByteTokenizer(), tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_bad_data_dirs_raise(tmp_path):
    with pytest.raises(EmberError, match="does not exist"):
        TokenShards(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(EmberError, match="has no meta.json"):
        TokenShards(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{")
    with pytest.raises(EmberError, match="malformed"):
        TokenShards(tmp_path / "d")
    corpus(tmp_path, 10)
    prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s", progress=False)
    shard = tmp_path / "s" / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(EmberError, match="holds .* tokens, not"):
        TokenShards(tmp_path / "s")
    shard.unlink()
    with pytest.raises(EmberError, match="is missing"):
        TokenShards(tmp_path / "s")


# --- batches -----------------------------------------------------------------------------
@pytest.fixture
def shards(tmp_path):
    """Each document is one repeated letter and gets its own shard, so a window that crossed
    a shard boundary would hold two letters."""
    for i in range(12):
        write(tmp_path, f"c/{i:02d}.txt", chr(ord("A") + i) * (40 + 7 * i))
    prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s", val_fraction=0.3, shard_tokens=1,
                   progress=False)
    return TokenShards(tmp_path / "s")


def test_get_batch_is_a_pure_function_of_seed_split_step_micro_step(shards, tmp_path):
    x, y = shards.get_batch("train", 8, 16, step=5, micro_step=1, seed=3)
    x2, y2 = TokenShards(tmp_path / "s").get_batch("train", 8, 16, step=5, micro_step=1, seed=3)  # a "resumed" run
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    others = [shards.get_batch("train", 8, 16, step=6, micro_step=1, seed=3),
              shards.get_batch("train", 8, 16, step=5, micro_step=0, seed=3),
              shards.get_batch("train", 8, 16, step=5, micro_step=1, seed=4)]
    assert all(not torch.equal(x, o[0]) for o in others)
    # Interleaving other calls changes nothing: there is no hidden sampler state.
    assert torch.equal(shards.get_batch("train", 8, 16, step=5, micro_step=1, seed=3)[0], x)


def test_windows_never_cross_shard_boundaries(shards):
    assert len(shards.shards["train"]) > 3
    for step in range(20):
        x, y = shards.get_batch("train", 8, 30, step=step)
        rows = torch.cat([x, y[:, -1:]], dim=1)
        for row in rows.tolist():
            assert len(set(row) - {EOS}) == 1, row


def test_too_small_split_and_unknown_split_raise(shards):
    with pytest.raises(EmberError, match="too small for this block size"):
        shards.get_batch("val", 1, 10_000, step=0)
    with pytest.raises(EmberError, match="Unknown split"):
        shards.get_batch("test", 1, 8, step=0)


def test_eval_batches_are_the_same_fixed_windows_every_call(shards):
    first = [x for x, _ in shards.iter_eval_batches("val", 3, 8, max_batches=4)]
    second = [x for x, _ in shards.iter_eval_batches("val", 3, 8, max_batches=4)]
    assert 1 <= len(first) <= 4 and all(torch.equal(a, b) for a, b in zip(first, second))
    for x, y in shards.iter_eval_batches("val", 3, 8, max_batches=4):
        assert x.shape[1] == 8 and torch.equal(x[:, 1:], y[:, :-1])
    assert len(list(shards.iter_eval_batches("train", 2, 8, max_batches=2))) == 2


# --- corpora of few documents: split by tokens -------------------------------------------
def one_book(n_bytes, seed=0):
    """A single long ASCII document of exactly `n_bytes` bytes (so `n_bytes` byte tokens)."""
    rng = np.random.default_rng(seed)
    words = ["thou", "art", "the", "king", "of", "night", "and", "my", "lord", "speak", "ROMEO:", "JULIET:\n"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), size=n_bytes // 3))
    return text[:n_bytes]


def test_a_single_document_is_split_by_tokens(tmp_path):
    text = one_book(20_000)
    write(tmp_path, "input.txt", text)
    meta = prepare_shards([str(tmp_path / "input.txt")], ByteTokenizer(), tmp_path / "s", val_fraction=0.05,
                          progress=False)
    data = TokenShards(tmp_path / "s")
    # 5% of 20,000 tokens: the last 1,000 are validation, each piece ends in EOS like a document.
    assert split_tokens(data, "train").tolist() == ids(text[:19_000])
    assert split_tokens(data, "val").tolist() == ids(text[19_000:])
    assert meta["split"] == {"by": "tokens", "val_share": 1_001 / 20_002}
    assert meta["num_documents"] == {"train": 1, "val": 1}
    again = prepare_shards([str(tmp_path / "input.txt")], ByteTokenizer(), tmp_path / "s2", val_fraction=0.05,
                           progress=False)
    assert again == meta  # deterministic


def test_few_large_documents_each_give_their_tail_to_validation(tmp_path):
    books = [one_book(10_000, seed=k) for k in range(3)]
    for k, b in enumerate(books):
        write(tmp_path, f"books/{k}.txt", b)
    meta = prepare_shards([str(tmp_path / "books")], ByteTokenizer(), tmp_path / "s", val_fraction=0.1,
                          progress=False)
    data = TokenShards(tmp_path / "s")
    # 3 documents x 0.1 is far below the 4 expected validation documents a hash split needs.
    assert meta["split"]["by"] == "tokens"
    assert docs_of(split_tokens(data, "train")) == [b[:9_000] for b in books]
    assert docs_of(split_tokens(data, "val")) == [b[9_000:] for b in books]
    assert meta["split"]["val_share"] == pytest.approx(3_003 / 30_006, rel=0)  # exact: integer counts


def test_many_documents_keep_the_hash_split_and_say_so(tmp_path):
    texts = corpus(tmp_path, 40)  # 40 x 0.1 = 4 expected validation documents: just enough
    meta = prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s", val_fraction=0.1, progress=False)
    val = [t for t in texts if is_validation(t, 0.1)]
    assert meta["split"]["by"] == "documents"
    assert docs_of(split_tokens(TokenShards(tmp_path / "s"), "val")) == val
    n = meta["num_tokens"]
    assert meta["split"]["val_share"] == n["val"] / (n["train"] + n["val"])
    text = data_mod.describe_split(meta)
    assert f"{n['val']:,} validation tokens" in text and "hash" in text and "--val-fraction" not in text


def test_a_split_too_small_to_validate_names_the_flag_that_fixes_it(tmp_path):
    write(tmp_path, "input.txt", one_book(2_000))
    meta = prepare_shards([str(tmp_path / "input.txt")], ByteTokenizer(), tmp_path / "s", val_fraction=0.01,
                          progress=False)
    assert meta["num_tokens"]["val"] == 21  # 1% of 2,000 tokens, then EOS
    assert "(1.05% validation, asked for 1.00%" in data_mod.describe_split(meta)
    with pytest.raises(EmberError, match=r"holds 21 tokens \(1\.05% of the corpus\).*larger --val-fraction"):
        TokenShards(tmp_path / "s").check_split("val", 256)
    tiny = prepare_shards([str(tmp_path / "input.txt")], ByteTokenizer(), tmp_path / "t", val_fraction=1e-4,
                          progress=False)
    assert tiny["num_tokens"]["val"] == 0  # 0.2 of a token rounds to none, and one document stays in train
    assert "Validation is empty: prepare the data again with a larger --val-fraction" in \
        data_mod.describe_split(tiny)
    with pytest.raises(EmberError, match=r"holds 0 tokens .*larger --val-fraction"):
        TokenShards(tmp_path / "t").check_split("val", 8)


def test_one_file_corpus_prepares_and_pretrains_from_the_command_line(tmp_path):
    """The README's path on nanoGPT's first corpus (one file): prepare with the default split, then pretrain."""
    text = one_book(60_000)
    write(tmp_path, "input.txt", text)
    train_tokenizer([text], vocab_size=300).save(tmp_path / "tok")
    cli = [sys.executable, "-m", "ember.cli"]
    r = subprocess.run(cli + ["data", "prepare", "--input", str(tmp_path / "input.txt"), "--tokenizer",
                              str(tmp_path / "tok"), "--out", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["split"]["by"] == "tokens" and meta["num_tokens"]["val"] > 33  # a window of 32 + 1 fits
    assert "each document's last tokens went to validation" in r.stdout
    r = subprocess.run(cli + ["pretrain", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out",
                              str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--block-size", "32",
                              "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "1", "--save-every", "0",
                              "--log-every", "1", "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in row for row in rows)


def test_val_fraction_zero_keeps_every_document_in_train(tmp_path):
    """No validation asked for: the rule that rescues a tiny corpus's validation split must not apply."""
    corpus(tmp_path, 5)
    meta = prepare_shards([str(tmp_path / "c")], ByteTokenizer(), tmp_path / "s", val_fraction=0.0, progress=False)
    assert meta["num_documents"] == {"train": 5, "val": 0}
