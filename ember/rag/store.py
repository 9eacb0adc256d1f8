"""The embedded store: one SQLite file holding documents, chunks, metadata and vectors.

- WAL mode: readers never block the writer and always see a committed state.
- Every change is a transaction, and `Index.add` makes a whole `ember rag index` run one: readers
  keep serving the previous index until the new one commits, and a run killed midway leaves the
  previous, whole index behind (SQLite discards the uncommitted part of the log when next opened).
- `sources` keeps a content hash per file (or per record), so re-indexing skips what is
  unchanged and replaces what changed; `remove` and `prune` drop deleted files.
- `meta` records the embedding model that wrote the vectors; vectors from any other
  model are refused, because cosine between two models' spaces means nothing.
- `generation` grows with every write; a reader's in-memory snapshot (BM25 postings,
  vector index) is rebuilt only when it changes.
- Checksums: every chunk row carries the SHA-256 of what a search reads of it (`checksums`), and
  `meta` the number of chunks, both written in the transaction that writes the chunks. A snapshot
  checks them, so a bit flip or a truncation of the file ends in an error naming the file rather
  than in silently wrong text. (A JSON manifest of the file's bytes could not be kept true: SQLite
  rewrites the file when it checkpoints its write-ahead log, outside any commit.) Rows written
  before checksums existed are read unchecked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ember.errors import EmberError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sources(source TEXT PRIMARY KEY, hash TEXT NOT NULL, indexed_at REAL);
CREATE TABLE IF NOT EXISTS documents(
    id INTEGER PRIMARY KEY, doc_id TEXT UNIQUE NOT NULL, source TEXT NOT NULL, title TEXT, metadata TEXT);
CREATE INDEX IF NOT EXISTS documents_source ON documents(source);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, doc INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER, text TEXT NOT NULL, start INTEGER, end INTEGER, location TEXT, metadata TEXT, terms TEXT);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc);
CREATE TABLE IF NOT EXISTS vectors(chunk INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE, vec BLOB);
CREATE TABLE IF NOT EXISTS checksums(chunk INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL);
"""
FORMAT = "ember-rag-v1"


def row_sha256(doc_id: str, source: str, title: str | None, text: str, start: int, end: int,
               location: str | None, metadata: str | None, terms: str | None, vec: bytes | None) -> str:
    """The checksum of one chunk as stored: every column a snapshot reads, and its vector's bytes."""
    fields = json.dumps([doc_id, source, title, text, start, end, location, metadata, terms], ensure_ascii=False)
    return hashlib.sha256(fields.encode("utf-8") + b"\0" + (vec or b"")).hexdigest()


@dataclass
class ChunkRow:
    """One chunk as written: its text, offsets in the document, location and terms for BM25."""
    text: str
    start: int
    end: int
    location: str
    metadata: dict[str, Any]
    terms: list[str]
    vector: np.ndarray | None = None


@dataclass
class Snapshot:
    """Everything a search needs, read in one transaction (so always self-consistent)."""
    generation: int
    chunk_ids: np.ndarray
    doc_ids: list[str]
    sources: list[str]
    titles: list[str]
    texts: list[str]
    starts: list[int]
    ends: list[int]
    locations: list[str]
    metadata: list[dict[str, Any]]
    terms: list[list[str]]
    vectors: np.ndarray | None  # [n, d] aligned with chunk_ids, or None when the index has none

    def __len__(self) -> int:
        return len(self.chunk_ids)


class Store:
    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise EmberError(f"No index at {self.path}; build one with `ember rag index PATH... --db {self.path}`.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = threading.RLock()  # one connection, many threads: one transaction at a time
            self.db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if not self._has_schema():  # a new index (or one from before checksums): the one write at opening
                with self.transaction(write=True):
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            self.db.execute(statement)
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
        except sqlite3.DatabaseError as e:
            if _corrupt(e):
                raise EmberError(f"The RAG index {self.path} is corrupt or not an Ember RAG index ({e}); rebuild "
                                 "it with `ember rag index`.") from None
            raise EmberError(f"Could not open the RAG index {self.path} ({e}).") from None
        fmt = self.get_meta("format")
        if fmt != FORMAT:
            raise EmberError(f"{self.path} has index format {fmt!r}; this Ember reads {FORMAT!r}.")

    def _has_schema(self) -> bool:
        """Whether every table exists: then opening only reads, and never waits for a writer's lock (an
        `ember rag index` run holds it until it commits)."""
        with self.transaction():
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return {"meta", "sources", "documents", "chunks", "vectors", "checksums"} <= tables

    def close(self) -> None:
        self.db.close()

    # --- transactions and meta -------------------------------------------------------------
    def transaction(self, write: bool = False) -> _Txn:
        return _Txn(self.db, write, self.lock)

    @contextlib.contextmanager
    def reading(self):
        """SQLite's errors on a damaged file as one sentence naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if _corrupt(e):
                raise EmberError(f"The RAG index {self.path} is corrupt ({e}); rebuild it with "
                                 "`ember rag index`.") from None
            if getattr(e, "sqlite_errorname", "") == "SQLITE_BUSY":
                raise EmberError(f"The RAG index {self.path} stayed locked by another writer (an `ember rag index` "
                                 "still running?); try again once it finishes.") from None
            raise

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    def check_embedder(self, name: str | None, dim: int | None, writing: bool) -> None:
        """Refuse vectors from a model other than the one that built the index."""
        stored = self.get_meta("embedder")
        if stored is None or name is None:
            if writing and name is not None and stored is None:
                self._set_meta("embedder", name)
                self._set_meta("dim", str(dim))
            return
        if stored != name:
            raise EmberError(f"This index was built with the embedding model {stored!r}, not {name!r}; "
                             "query it with the same model or rebuild it.")

    # --- writes (callers wrap them in a transaction) -------------------------------------------
    def source_hash(self, source: str) -> str | None:
        row = self.db.execute("SELECT hash FROM sources WHERE source=?", (source,)).fetchone()
        return row[0] if row else None

    def delete_source(self, source: str) -> int:
        n = self.db.execute("DELETE FROM documents WHERE source=?", (source,)).rowcount
        self.db.execute("DELETE FROM sources WHERE source=?", (source,))
        self._bump()
        return n

    def set_source(self, source: str, digest: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?)", (source, digest, time.time()))
        self._bump()

    def put_document(self, doc_id: str, source: str, title: str, metadata: dict[str, Any],
                     chunks: Sequence[ChunkRow]) -> None:
        self.db.execute("DELETE FROM documents WHERE doc_id=?", (doc_id,))  # cascades to chunks, vectors
        cur = self.db.execute("INSERT INTO documents(doc_id, source, title, metadata) VALUES (?, ?, ?, ?)",
                              (doc_id, source, title, json.dumps(metadata, default=str)))
        doc = cur.lastrowid
        for i, c in enumerate(chunks):
            cid = self.db.execute(
                "INSERT INTO chunks(doc, ord, text, start, end, location, metadata, terms) VALUES (?,?,?,?,?,?,?,?)",
                (doc, i, c.text, c.start, c.end, c.location, json.dumps(c.metadata, default=str),
                 " ".join(c.terms))).lastrowid
            vec = None if c.vector is None else np.ascontiguousarray(c.vector, dtype=np.float32).tobytes()
            if vec is not None:
                self.db.execute("INSERT INTO vectors VALUES (?, ?)", (cid, vec))
            meta, terms = json.dumps(c.metadata, default=str), " ".join(c.terms)
            self.db.execute("INSERT INTO checksums VALUES (?, ?)", (cid, row_sha256(
                doc_id, source, title, c.text, c.start, c.end, c.location, meta, terms, vec)))
        self._bump()

    # --- reads -----------------------------------------------------------------------------
    def sources(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT source FROM sources ORDER BY source")]

    def counts(self) -> dict[str, int]:
        q = "SELECT (SELECT COUNT(*) FROM documents), (SELECT COUNT(*) FROM chunks), (SELECT COUNT(*) FROM vectors)"
        d, c, v = self.db.execute(q).fetchone()
        return {"documents": d, "chunks": c, "vectors": v}

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def snapshot(self) -> Snapshot:
        """All chunks (and vectors) as of one committed generation, checked against their checksums."""
        with self.reading(), self.transaction():  # a read transaction in WAL mode sees one consistent state
            gen = self.generation()
            rows = self.db.execute(
                "SELECT c.id, d.doc_id, d.source, d.title, c.text, c.start, c.end, c.location, c.metadata, c.terms,"
                " v.vec, k.sha256 FROM chunks c JOIN documents d ON d.id = c.doc LEFT JOIN vectors v ON v.chunk = c.id"
                " LEFT JOIN checksums k ON k.chunk = c.id ORDER BY c.id").fetchall()
            expected = self.get_meta("chunks")
            dim = self.get_meta("dim")
        self._verify(rows, expected)
        vecs = None
        if rows and dim is not None and all(r[10] is not None for r in rows):
            try:
                vecs = np.frombuffer(b"".join(r[10] for r in rows), dtype=np.float32).reshape(len(rows), int(dim))
            except ValueError:
                raise EmberError(f"The RAG index {self.path} is corrupt: its vectors do not have the {dim!r} "
                                 "dimensions it records; rebuild it with `ember rag index`.") from None
        return Snapshot(gen, np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows],
                        [r[2] for r in rows], [r[3] or "" for r in rows], [r[4] for r in rows],
                        [r[5] for r in rows], [r[6] for r in rows], [r[7] or "" for r in rows],
                        [json.loads(r[8] or "{}") for r in rows], [(r[9] or "").split() for r in rows], vecs)


    def _verify(self, rows: list[tuple], expected: str | None) -> None:
        if expected is not None and int(expected) != len(rows):
            raise EmberError(f"The RAG index {self.path} is corrupt: it should hold {expected} chunks and {len(rows)} "
                             "are readable; rebuild it with `ember rag index`.")
        for r in rows:
            if r[11] is not None and row_sha256(*r[1:11]) != r[11]:
                raise EmberError(f"The RAG index {self.path} is corrupt: chunk {r[0]} of {r[1]!r} does not match "
                                 "its SHA-256 checksum; rebuild it with `ember rag index`.")


def _corrupt(e: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file itself is damaged (not, say, locked)."""
    return getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or \
        type(e) is sqlite3.DatabaseError


class _Txn:
    """BEGIN ... COMMIT, or ROLLBACK on any error (nested use joins the outer one).

    Writers take the write lock up front (IMMEDIATE), so two writers queue instead of
    failing halfway when one tries to upgrade a read lock."""

    def __init__(self, db: sqlite3.Connection, write: bool, lock: threading.RLock) -> None:
        self.db, self.lock = db, lock
        self.write = write
        self.outer = False
        self.changes = 0

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.outer = not self.db.in_transaction
        if self.outer:
            try:
                self.db.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
                self.changes = self.db.total_changes
            except BaseException:
                self.lock.release()
                raise
        return self.db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self.outer:
                if not exc_type and self.write and self.db.total_changes != self.changes:
                    # The chunk count a snapshot checks, committed with the chunks themselves.
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('chunks', (SELECT COUNT(*) FROM chunks))")
                self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def matches(meta: dict[str, Any], where: dict[str, Any] | None) -> bool:
    """Metadata filter: every key equal to its value (compared as text, so CLI strings work)."""
    if not where:
        return True
    return all(k in meta and str(meta[k]) == str(v) for k, v in where.items())


def iter_where(values: Iterable[str]) -> dict[str, str]:
    """CLI `--where key=value` flags -> a filter dict."""
    out = {}
    for v in values:
        if "=" not in v:
            raise EmberError(f"--where expects key=value, got {v!r}.")
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out
