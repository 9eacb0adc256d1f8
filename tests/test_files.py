"""ember/files.py: atomic directories and files, and JSON errors a person can act on."""

import os
import stat

import pytest

from ember.errors import EmberError
from ember.files import atomic_dir, atomic_write_text, read_json, read_jsonl, write_json


def test_atomic_dir_replaces_the_target_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a.txt").write_text("two")
            raise RuntimeError("killed halfway")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or .old directory left
    with atomic_dir(target) as d:
        (d / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged


def test_atomic_write_text_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_json(path, {"step": 1})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OSError):
        atomic_write_text(path, "{}")
    assert read_json(path, "Run file") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), (b"{", "is not valid JSON"), (b"\xff\xfe", "is not UTF-8")])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EmberError, match=f"Model config .*config.json {message}"):
        read_json(path, "Model config")


def test_read_jsonl_numbers_rows_and_names_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(EmberError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    with pytest.raises(EmberError, match="is not UTF-8"):
        read_jsonl(path)


def test_atomic_writes_get_the_modes_a_plain_mkdir_and_open_give(tmp_path):
    # Temp files and dirs are created private (0600 / 0700); the results must not stay so.
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as d:
            (d / "f.txt").write_text("x")
        atomic_write_text(tmp_path / "t.txt", "y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o644
