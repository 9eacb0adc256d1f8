"""Checksum manifests: `manifest.json` in every checkpoint and model directory Ember writes.

The manifest lists each file of the directory with its size and SHA-256. Loading checks a file
against it before reading it, so a truncated or bit-flipped file ends in an `EmberError` that
names the file instead of a parser's traceback or, worse, a model with silently wrong weights.
A directory without a manifest (a model downloaded from the Hub, one saved by transformers) loads
as before, unchecked. Files are hashed in 1 MiB chunks, so checking never holds a whole file in
memory. A leaf: no torch, no Ember imports but `ember.errors` and `ember.files`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from ember.errors import EmberError
from ember.files import read_json, write_json

MANIFEST = "manifest.json"
FORMAT = "ember-manifest-v1"
CHUNK = 1 << 20
# Files nobody edits by hand: any difference from the manifest is damage.
STRICT_SUFFIXES = (".safetensors", ".pt")
STRICT_NAMES = ("trainer_state.json", "model.safetensors.index.json")


def editable(name: str) -> bool:
    """Config, tokenizer and template files, which people do edit in a saved model."""
    return not (name.endswith(STRICT_SUFFIXES) or Path(name).name in STRICT_NAMES)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Record size and SHA-256 of every file under `folder` (call it last, inside `atomic_dir`)."""
    folder = Path(folder)
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    write_json(folder / MANIFEST, {"format": FORMAT, "algorithm": "sha256", "files": files})
    return folder / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, dict] | None:
    """The manifest's file table, or None when `folder` has no manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path, "Checksum manifest")
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("format") != FORMAT:
        raise EmberError(f"Checksum manifest {path} is not an {FORMAT} manifest; the directory may be damaged.")
    return files


def verify_files(folder: str | Path, names: Iterable[str] | None = None) -> bool:
    """Check files of `folder` (those named, or every one the manifest lists) against its manifest.

    Returns False when there is no manifest (nothing to check); raises an EmberError naming the first
    file that is missing, of the wrong size or with the wrong SHA-256. A named file the manifest does
    not list (added to the directory later) is not checked, and neither is an `editable` file saved
    after the manifest: a person changed it on purpose (a flipped bit or a cut on disk leaves the
    modification time alone, or leaves JSON that no longer parses)."""
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        return False
    written = (folder / MANIFEST).stat().st_mtime_ns
    for name in (sorted(files) if names is None else names):
        path = folder / name
        entry = files.get(name)
        if entry is None:
            continue
        if not path.is_file():
            raise EmberError(f"{path} is missing (listed in {folder / MANIFEST}).")
        stat = path.stat()
        if editable(name) and stat.st_mtime_ns > written:
            continue
        size = stat.st_size
        if size != entry.get("bytes"):
            raise EmberError(f"{path} is truncated or damaged: {size} bytes, {entry.get('bytes')} when written.")
        if file_sha256(path) != entry.get("sha256"):
            raise EmberError(f"{path} is corrupt: its SHA-256 differs from the one recorded when it was written "
                             f"({folder / MANIFEST}).")
    return True

