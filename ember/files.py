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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporary directories that killed writes of `path` left beside it.

    A temp dir's name carries the id of the process writing it (`.NAME.tmp-<pid>-<random suffix>`); only those of
    processes no longer alive (or of this one, which is not writing `path` now) are removed, so a
    concurrent writer's work in progress is never touched. Returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{path.name}.tmp-").split("-", 1)[0]
        if tmp.is_dir() and (not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def previous_version(path: str | Path) -> Path:
    """Where `atomic_dir` keeps the previous version of `path` while it commits a new one."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def complete_version(path: str | Path) -> Path | None:
    """`path` if it exists, else the previous version a commit killed between its renames left, else None."""
    path = Path(path)
    if path.exists():
        return path
    old = previous_version(path)
    return old if old.exists() else None


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (a crash of the machine, not only of the process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir; on success it replaces `path` whole, on error it vanishes.

    The commit survives a kill at any instant, any number of times in a row. It moves the current
    version aside to `.NAME.old`, renames the new one into place, then deletes `.NAME.old`; the
    previous version is deleted only while a complete `path` exists. So at every moment `path` or
    `.NAME.old` is a complete version (`complete_version` finds it), and a kill between the two
    renames followed by a kill at the same point of the next commit still leaves `.NAME.old` whole.
    Temp dirs of earlier killed writes are removed first (`remove_leftovers`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, _permissions(0o777))  # mkdtemp's 0700 would make the result private
    try:
        yield tmp
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = previous_version(path)
        if path.exists():
            if old.exists():  # left by a kill after the last commit's second rename: redundant
                shutil.rmtree(old)
            path.rename(old)
        # Here `path` is missing and `old` holds the only complete version: never delete it yet.
        tmp.rename(path)
        _fsync_dir(path.parent)
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
