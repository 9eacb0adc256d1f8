"""Files on disk: atomic directories and files, JSON and JSON Lines. A leaf: no torch, no Ember imports
but `ember.errors`.

Every directory Ember writes (checkpoints, adapters, token shards, reports) is built in a temporary
directory beside its target and renamed into place, so a process killed mid-write leaves the previous
version whole and never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ember.errors import EmberError


def _permissions(full: int) -> int:
    """`full` less the process's umask: the mode a plain mkdir or open would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir; on success it replaces `path` whole, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, _permissions(0o777))  # mkdtemp's 0700 would make the result private
    try:
        yield tmp
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _permissions(0o666))  # mkstemp's 0600 would make the result private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented UTF-8 JSON (inside an `atomic_dir`, or a file of its own written atomically)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; `what` names it in the error a user sees ("Model config", "Adapter config")."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{what} {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EmberError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except UnicodeDecodeError:
        raise EmberError(f"{what} {path} is not UTF-8 text.") from None


def read_jsonl(path: str | Path, what: str = "Data file") -> list[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; bad JSON names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{what} {path} does not exist.")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):  # decoding happens here, line by line
                if not line.strip():
                    continue
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise EmberError(f"{path} line {n} is not valid JSON ({e.msg}).") from None
    except UnicodeDecodeError:
        raise EmberError(f"{what} {path} is not UTF-8 text.") from None
    return rows
