"""`Index`: the RAG library's front door — add documents, search them, ask about them.

    idx = Index("docs.db")                       # all-MiniLM-L6-v2 embeddings by default
    idx.add(["notes/", "paper.pdf"])             # files, directories or BEIR-shaped dicts
    hits = idx.search("how do I resume training?", k=5, mode="hybrid", where={"format": "md"})
    answer = idx.ask("how do I resume training?", endpoint="http://localhost:8000")

Adding is incremental: a file whose content hash is unchanged is skipped, a changed
one has its chunks replaced. One `add` is one transaction: until it commits, every reader
keeps the index as it was, and an `add` killed midway leaves it so. Searching reads one consistent snapshot
of the store and keeps it (with its BM25 postings and vector index) until the store's
generation moves on.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tokenizers import Tokenizer

from ember.errors import EmberError
from ember.rag.ask import ask as ask_with_citations
from ember.rag.bm25 import Analyzer, BM25Index, top_k
from ember.rag.chunk import chunk_text, line_span, regex_tokenize
from ember.rag.encoder import load_any_embedder, load_encoder
from ember.rag.ingest import Document, content_hash, expand_paths, read_file, record_document, stdlib_documents
from ember.rag.retrieve import llm_scores, mmr, rrf, score_average
from ember.rag.store import ChunkRow, Snapshot, Store, matches
from ember.rag.vectors import VectorIndex

MODES = ("bm25", "dense", "hybrid", "average")
FUSION_DEPTH = 100  # candidates each list contributes to a fusion
EMBED_GROUP = 256  # chunks embedded per call across documents (keeps batches full)


@dataclass
class Hit:
    doc_id: str
    chunk_id: int
    score: float
    text: str
    source: str
    location: str
    title: str = ""
    start: int = 0
    end: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # per-retriever scores behind `score`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AddReport:
    added: int = 0  # sources new to the index
    updated: int = 0  # sources whose content changed
    skipped: int = 0  # unchanged sources
    chunks: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source, why) for what could not be read


class Index:
    def __init__(self, db_path: str | Path, embedder: Any = "auto", chunking: str = "recursive",
                 chunk_size: int = 200, overlap: int = 32, create: bool = True) -> None:
        self.store = Store(db_path, create=create)
        self._embedder = embedder
        self.chunking, self.chunk_size, self.overlap = chunking, chunk_size, overlap
        self.analyzer = Analyzer()
        self._snap: Snapshot | None = None
        self._bm25: tuple[Snapshot, BM25Index] | None = None  # built lazily, for one snapshot
        self._vindex: tuple[Snapshot, VectorIndex] | None = None
        self._lock = threading.Lock()

    # --- embedder ------------------------------------------------------------------------
    @property
    def embedder(self) -> Any:
        if isinstance(self._embedder, str) and self._embedder == "auto":
            self._embedder = load_encoder()
        elif isinstance(self._embedder, (str, Path)) and str(self._embedder) != "none":
            self._embedder = load_any_embedder(self._embedder)
        return None if isinstance(self._embedder, str) else self._embedder

    def _tokenize(self):
        """Chunk sizes count the embedder's own tokens when it has a WordPiece tokenizer."""
        emb = self.embedder
        tok = getattr(emb, "tokenizer", None)
        if tok is None or not hasattr(tok, "to_str"):
            return regex_tokenize
        free = Tokenizer.from_str(tok.to_str())
        free.no_truncation()
        return lambda text: [o for o in free.encode(text, add_special_tokens=False).offsets]

    # --- adding ---------------------------------------------------------------------------
    def add(self, items: Iterable[str | Path | dict] | str | Path | None = None, progress: Any = None) -> AddReport:
        """Index files, directories, BEIR-shaped record dicts, or (None / "stdlib") the stdlib docs."""
        if items is None or isinstance(items, (str, Path, dict)):
            items = [items] if items is not None else ["stdlib"]
        report = AddReport()
        emb = self.embedder
        tokenize = self._tokenize()
        # One transaction for the whole call: readers (a server, another search) keep the index as it
        # was until every item is in, and a run killed midway leaves it exactly as it was.
        with self.store.reading(), self.store.transaction(write=True):
            if emb is not None:
                self.store.check_embedder(emb.name, emb.dim, writing=True)
            elif self.store.get_meta("embedder") is not None:
                raise EmberError(f"The index at {self.store.path} holds vectors from "
                                 f"{self.store.get_meta('embedder')!r}; open it with that embedder to add documents.")
            pending: list[tuple[str, str, list[tuple[Document, list[ChunkRow]]]]] = []
            for source, digest, load in self._units(items, report):
                if self.store.source_hash(source) == digest:
                    report.skipped += 1
                    continue
                try:
                    docs = load()
                except Exception as e:  # noqa: BLE001 - any unreadable file is reported, the rest indexed
                    report.errors.append((source, f"{type(e).__name__}: {e}"))
                    continue
                pending.append((source, digest, [(d, self._chunk(d, tokenize)) for d in docs]))
                if sum(len(c) for _, _, ds in pending for _, c in ds) >= EMBED_GROUP:
                    self._flush(pending, report, progress)
            self._flush(pending, report, progress)
        return report

    def _units(self, items: Iterable[Any], report: AddReport):
        """(source, content hash, loader) per unit of re-indexing: a file, a record, a stdlib module."""
        for item in items:
            if isinstance(item, dict):
                doc = record_document(item, "", f"record-{content_hash(repr(sorted(item.items())))[:12]}")
                doc.source = f"record:{doc.doc_id}"
                yield doc.source, content_hash(repr(sorted(item.items()))), (lambda d=doc: [d])
            elif str(item) == "stdlib":
                for doc in stdlib_documents():
                    yield doc.doc_id, content_hash(doc.text), (lambda d=doc: [d])
            else:
                if not Path(item).exists():
                    report.errors.append((str(item), "no such file or directory"))
                    continue
                for p in expand_paths([item]):
                    try:
                        digest = content_hash(p.read_bytes())
                    except OSError as e:
                        report.errors.append((str(p), f"{type(e).__name__}: {e}"))
                        continue
                    yield str(p), digest, (lambda p=p: read_file(p))

    def _chunk(self, doc: Document, tokenize: Any) -> list[ChunkRow]:
        method = self.chunking
        rows = []
        pages = doc.metadata.get("page_starts")
        for c in chunk_text(doc.text, doc.kind, self.chunk_size, self.overlap, method, tokenize):
            if pages:
                loc = f"page {int(np.searchsorted(pages, c.start, side='right'))}"
            elif doc.source.startswith("record:"):
                loc = f"chars {c.start}-{c.end}"
            else:
                loc = line_span(doc.text, c.start, c.end)
            meta = {**{k: v for k, v in doc.metadata.items() if k != "page_starts"}, **c.metadata}
            rows.append(ChunkRow(c.text, c.start, c.end, loc, meta, self.analyzer(self._view(doc.title, c.text))))
        return rows

    @staticmethod
    def _view(title: str, text: str) -> str:
        """What retrievers see: the title (context for every chunk) and the chunk."""
        return f"{title}\n{text}" if title and not text.startswith(title) else text

    def _flush(self, pending: list, report: AddReport, progress: Any) -> None:
        if not pending:
            return
        emb = self.embedder
        if emb is not None:
            views = [self._view(d.title, c.text) for _, _, ds in pending for d, cs in ds for c in cs]
            vecs = iter(emb.encode(views)) if views else iter(())
            for _, _, ds in pending:
                for _, cs in ds:
                    for c in cs:
                        c.vector = next(vecs)
        for source, digest, ds in pending:
            with self.store.transaction(write=True):  # one source: all of it or none of it
                existed = self.store.source_hash(source) is not None
                self.store.delete_source(source)
                for d, cs in ds:
                    self.store.put_document(d.doc_id, source, d.title, d.metadata if not d.metadata.get(
                        "page_starts") else {k: v for k, v in d.metadata.items() if k != "page_starts"}, cs)
                self.store.set_source(source, digest)
            report.updated += existed
            report.added += not existed
            report.chunks += sum(len(cs) for _, cs in ds)
            if progress:
                progress(source)
        pending.clear()

    def remove(self, source: str | Path) -> int:
        """Drop a source (file path or record:ID) and its chunks; returns the documents removed."""
        with self.store.transaction(write=True):
            return self.store.delete_source(str(source))

    def prune(self) -> list[str]:
        """Remove every indexed file that no longer exists on disk."""
        gone = [s for s in self.store.sources() if not s.startswith(("record:", "stdlib:")) and not Path(s).exists()]
        for s in gone:
            self.remove(s)
        return gone

    # --- searching -------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snap is None or self._snap.generation != self.store.generation():
                self._snap = self.store.snapshot()
            return self._snap

    def _need(self, snap: Snapshot) -> None:
        if len(snap) == 0:
            raise EmberError(f"The index at {self.store.path} is empty; add documents with "
                             f"`ember rag index PATH... --db {self.store.path}`.")

    def bm25(self, query: str, k: int, where: dict | None = None, snap: Snapshot | None = None
             ) -> list[tuple[int, float]]:
        """(row, score) best first; rows index `snap` (one snapshot per search, so rows never go stale)."""
        snap = snap or self.snapshot()
        self._need(snap)
        with self._lock:
            if self._bm25 is None or self._bm25[0] is not snap:
                self._bm25 = (snap, BM25Index(snap.terms))
            index = self._bm25[1]
        rows, scores = top_k(index.scores(self.analyzer(query)), k, self._mask(snap, where))
        return list(zip(rows.tolist(), scores.tolist()))

    def query_vector(self, query: str) -> np.ndarray:
        emb = self.embedder
        if emb is None:
            raise EmberError("Dense search needs an embedder; this Index was opened with embedder=None.")
        self.store.check_embedder(emb.name, emb.dim, writing=False)
        return np.asarray(emb.encode([query]), dtype=np.float32)[0]

    def dense(self, query: str | np.ndarray, k: int, where: dict | None = None, snap: Snapshot | None = None
              ) -> list[tuple[int, float]]:
        snap = snap or self.snapshot()
        self._need(snap)
        if snap.vectors is None:
            raise EmberError(f"The index at {self.store.path} holds no vectors; rebuild it with an embedder.")
        q = self.query_vector(query) if isinstance(query, str) else query
        with self._lock:
            if self._vindex is None or self._vindex[0] is not snap:
                self._vindex = (snap, VectorIndex(snap.vectors))
            vindex = self._vindex[1]
        scores, rows = vindex.search(q[None], k, self._mask(snap, where))
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]

    @staticmethod
    def _mask(snap: Snapshot, where: dict | None) -> np.ndarray | None:
        if not where:
            return None
        meta = [{**m, "source": s, "doc_id": d, "title": t}
                for m, s, d, t in zip(snap.metadata, snap.sources, snap.doc_ids, snap.titles)]
        return np.array([matches(m, where) for m in meta], dtype=bool)

    def search(self, query: str, k: int = 10, mode: str | None = None, where: dict | None = None,
               diversity: float | None = None, rerank: tuple[Any, Any] | None = None,
               rerank_method: str = "query_likelihood", rerank_depth: int = 20) -> list[Hit]:
        """Ranked chunks; mode bm25 | dense | hybrid (RRF, k=60) | average (min-max score mean).

        `diversity` (0..1) re-orders the fused candidates by MMR with lambda = 1 - diversity.
        `rerank=(causal_lm, tokenizer)` re-scores the top `rerank_depth` with the LM's
        log-likelihood of relevance (see `retrieve.llm_scores`).
        """
        snap = self.snapshot()
        self._need(snap)
        mode = mode or ("hybrid" if snap.vectors is not None and self._embedder != "none" and self._embedder
                        is not None else "bm25")
        if mode not in MODES:
            raise EmberError(f"Unknown search mode {mode!r}; choose one of {', '.join(MODES)}.")
        depth = max(k, FUSION_DEPTH) if mode in ("hybrid", "average") or diversity else k
        lists: dict[str, dict[int, float]] = {}
        qvec = None
        if mode in ("bm25", "hybrid", "average"):
            lists["bm25"] = dict(self.bm25(query, depth, where, snap))
        if mode in ("dense", "hybrid", "average"):
            qvec = self.query_vector(query)
            lists["dense"] = dict(self.dense(qvec, depth, where, snap))
        if mode == "hybrid":
            ranked = rrf([list(v) for v in lists.values()])
        elif mode == "average":
            ranked = score_average(list(lists.values()))
        else:
            ranked = sorted(next(iter(lists.values())).items(), key=lambda kv: -kv[1])
        if diversity and snap.vectors is not None:
            qvec = self.query_vector(query) if qvec is None else qvec
            rows = [r for r, _ in ranked]
            order = mmr(qvec, snap.vectors[rows], k, lam=1.0 - diversity)
            ranked = [ranked[i] for i in order]
        if rerank is not None:
            head = ranked[:max(k, rerank_depth)]
            lm_scores = llm_scores(rerank[0], rerank[1], query, [snap.texts[r] for r, _ in head], rerank_method)
            ranked = [(r, ls) for (r, _), ls in sorted(zip(head, lm_scores), key=lambda x: -x[1])]
        hits = []
        for r, s in ranked[:k]:
            scores = {n: v[r] for n, v in lists.items() if r in v}
            if qvec is not None and "dense" not in scores:  # fused in from BM25 alone: give its cosine too
                scores["dense"] = float(snap.vectors[r] @ qvec)
            hits.append(self._hit(snap, r, s, scores))
        return hits

    @staticmethod
    def _hit(snap: Snapshot, row: int, score: float, scores: dict[str, float]) -> Hit:
        return Hit(snap.doc_ids[row], int(snap.chunk_ids[row]), float(score), snap.texts[row], snap.sources[row],
                   snap.locations[row], snap.titles[row], snap.starts[row], snap.ends[row], snap.metadata[row],
                   scores)

    def ask(self, question: str, **kwargs: Any) -> Any:
        """Retrieve, prompt and answer with checked citations (see `ember.rag.ask.ask`)."""
        return ask_with_citations(self, question, **kwargs)

    def close(self) -> None:
        self.store.close()


def open_index(db_path: str | Path, embedder: Any = "auto") -> Index:
    """An existing index (a missing file is an error, not a new empty index)."""
    return Index(db_path, embedder=embedder, create=False)


__all__ = ["AddReport", "Hit", "Index", "MODES", "open_index"]
