"""`ember rag index | search | ask`: the command line over `ember.rag.Index`.

Only argparse and the standard library at import time, so `ember --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ember.errors import EmberError


def add_commands(sub: argparse._SubParsersAction) -> dict:
    p = sub.add_parser("rag", help="index documents, search them, answer questions with citations",
                       description="Retrieval-augmented generation over an SQLite index file.")
    acts = p.add_subparsers(dest="action", metavar="ACTION")

    a = acts.add_parser("index", help="add files to an index (incremental)",
                        description="Ingest text, Markdown, HTML, Python, PDF and JSONL (BEIR shape) into --db. "
                        "Unchanged files are skipped by content hash, changed files replace their chunks. With no "
                        "PATH, the standard library's documentation is indexed.")
    a.add_argument("paths", nargs="*", help="files or directories (default: this Python's stdlib docs)")
    a.add_argument("--db", required=True, help="index file (SQLite)")
    a.add_argument("--embedder", default="auto",
                   help="encoder directory, 'auto' (all-MiniLM-L6-v2) or 'none' (BM25 only)")
    a.add_argument("--chunking", default="recursive", choices=["recursive", "tokens", "none"])
    a.add_argument("--chunk-size", type=int, default=200, help="tokens per chunk (default 200)")
    a.add_argument("--overlap", type=int, default=32, help="token overlap for --chunking tokens (default 32)")
    a.add_argument("--prune", action="store_true", help="also remove indexed files that no longer exist")

    s = acts.add_parser("search", help="ranked chunks for a query",
                        description="Print the best chunks with score, source and location.")
    s.add_argument("query")
    s.add_argument("--db", required=True)
    s.add_argument("--mode", default=None, choices=["bm25", "dense", "hybrid", "average"],
                   help="default: hybrid when the index has vectors, else bm25")
    s.add_argument("-k", "--k", type=int, default=10)
    s.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="metadata filter (repeatable)")
    s.add_argument("--diversity", type=float, default=None, help="MMR re-ordering strength 0..1")
    s.add_argument("--embedder", default="auto", help="must be the model the index was built with")
    s.add_argument("--json", action="store_true", help="one JSON object per hit")

    q = acts.add_parser("ask", help="answer a question from the index, with checked citations",
                        description="Retrieve, build a grounded prompt and answer with numbered citations; each "
                        "citation is checked against its source and unsupported ones are flagged.")
    q.add_argument("question")
    q.add_argument("--db", required=True)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="local Ember checkpoint directory or a .gguf file (llama.cpp's format; Q4_0/Q4_1 blocks kept as int4, Q8_0 as int8, F16 as fp16, other types decoded to float)")
    g.add_argument("--endpoint", help="OpenAI-compatible server URL (e.g. http://localhost:8000)")
    q.add_argument("--api", default="chat", choices=["chat", "completions"], help="endpoint API (default chat)")
    q.add_argument("--endpoint-model", default=None, help="model name sent to the endpoint")
    q.add_argument("--api-key", default=None)
    q.add_argument("--mode", default=None, choices=["bm25", "dense", "hybrid", "average"])
    q.add_argument("-k", "--k", type=int, default=5, help="chunks to retrieve (default 5)")
    q.add_argument("--where", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--template", default="grounded-qa", help="prompt template name")
    q.add_argument("--templates", default=None, help="YAML or Jinja file with more templates")
    q.add_argument("--max-tokens", type=int, default=256)
    q.add_argument("--min-similarity", type=float, default=0.3, help="cosine below which a chunk is not relevant")
    q.add_argument("--embedder", default="auto")
    q.add_argument("--json", action="store_true")
    return {("rag", "index"): cmd_index, ("rag", "search"): cmd_search, ("rag", "ask"): cmd_ask}


def _embedder(value: str):
    return None if value == "none" else value


def cmd_index(a: argparse.Namespace) -> None:
    from ember.rag.index import Index

    idx = Index(a.db, embedder=_embedder(a.embedder), chunking=a.chunking, chunk_size=a.chunk_size,
                overlap=a.overlap)
    report = idx.add(a.paths or None, progress=lambda src: print(f"  indexed {src}", file=sys.stderr))
    pruned = idx.prune() if a.prune else []
    for src, why in report.errors:
        print(f"skipped {src}: {why}", file=sys.stderr)
    if report.errors and not (report.added or report.updated or report.skipped):
        raise EmberError(f"Nothing could be indexed: {report.errors[0][0]}: {report.errors[0][1]}.")
    c = idx.store.counts()
    print(f"{report.added} new, {report.updated} changed, {report.skipped} unchanged, {len(report.errors)} "
          f"skipped, {len(pruned)} removed; the index holds {c['documents']} documents in {c['chunks']} chunks "
          f"({a.db}).")


def _open(a: argparse.Namespace):
    from ember.rag.index import open_index
    if not Path(a.db).exists():
        raise EmberError(f"No index at {a.db}; build one with `ember rag index PATH... --db {a.db}`.")
    return open_index(a.db, embedder=_embedder(a.embedder))


def cmd_search(a: argparse.Namespace) -> None:
    from ember.rag.store import iter_where

    idx = _open(a)
    hits = idx.search(a.query, k=a.k, mode=a.mode, where=iter_where(a.where), diversity=a.diversity)
    if not hits:
        print("no matching chunks", file=sys.stderr)
    for i, h in enumerate(hits, 1):
        if a.json:
            print(json.dumps({"rank": i, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "source": h.source,
                              "location": h.location, "score": h.score, "text": h.text}, ensure_ascii=False))
        else:
            loc = f" ({h.location})" if h.location else ""
            body = " ".join(h.text.split())
            print(f"{i:>2}. {h.score:.4f}  {h.source}{loc}\n    {body[:300]}{'...' if len(body) > 300 else ''}")


def cmd_ask(a: argparse.Namespace) -> None:
    from ember.rag.store import iter_where

    idx = _open(a)
    ans = idx.ask(a.question, model=a.model, endpoint=a.endpoint, k=a.k, mode=a.mode, where=iter_where(a.where),
                  template=a.template, templates_file=a.templates, max_tokens=a.max_tokens,
                  min_similarity=a.min_similarity, api=a.api, endpoint_model=a.endpoint_model, api_key=a.api_key)
    if a.json:
        print(json.dumps({"answer": ans.text, "answered": ans.answered,
                          "sources": [{"n": i, "doc_id": h.doc_id, "source": h.source, "location": h.location}
                                      for i, h in enumerate(ans.sources, 1)],
                          "citations": [c.__dict__ for c in ans.citations]}, ensure_ascii=False))
    else:
        print(ans.render())
