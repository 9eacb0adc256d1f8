"""Retrieval-augmented generation: ingest, chunk, embed, store, search, and grounded answers.

    from ember.rag import Index, load_encoder
    idx = Index("docs.db")                        # SQLite file; all-MiniLM-L6-v2 embeddings
    idx.add(["notes/", {"_id": "1", "title": "T", "text": "..."}])
    for hit in idx.search("query", k=5, mode="hybrid"):   # bm25 | dense | hybrid | average
        print(hit.score, hit.source, hit.location, hit.text[:80])
    print(idx.ask("question", endpoint="http://localhost:8000").render())
    vecs = load_encoder().encode(["a sentence"])  # [N, 384], unit length

Modules: encoder (BERT sentence embeddings), chunk, ingest, store (SQLite), bm25,
vectors (faiss), retrieve (fusion, MMR, LLM re-ranking), prompt, ask, index (`Index`),
commands (the `ember rag` CLI).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"Index": "ember.rag.index", "Hit": "ember.rag.index", "open_index": "ember.rag.index",
            "load_encoder": "ember.rag.encoder", "DecoderEmbedder": "ember.rag.encoder",
            "Encoder": "ember.rag.encoder", "Answer": "ember.rag.ask"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy, so `ember --help` does not import torch through here
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ember.rag' has no attribute {name!r}")
