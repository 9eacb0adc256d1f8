"""RAG retrieval on BEIR NFCorpus, Ember beside its peers in one run.

    python benchmarks/rag_beir.py [--data ../shared/data/rag] [--throughput-docs 384]

- Quality (test split, 323 queries): nDCG@10 and Recall@100 (IDCG over all relevant
  documents) for Ember BM25, dense (all-MiniLM-L6-v2), hybrid RRF (k=60) and score
  averaging (min-max and raw), beside bm25s (English stopwords + Snowball stemmer),
  SQLite FTS5 bm25() (Porter stemmer) and sentence-transformers dense.
- Speed: query latency p50/p95 per mode, BM25 queries/s (Ember vs bm25s), embedding
  throughput Ember vs sentence-transformers on the same texts (ABBA rounds, the median with
  its spread), and the cosine between the two models' vectors.
- Chunking: token-level recall@5 on the chunking-evaluation corpora (Chroma's protocol:
  characters of the reference excerpts covered by the 5 chunks nearest the question).

Corpus embeddings are cached under /tmp/ember_rag_cache because encoding 3.6k abstracts takes
minutes on 2 cores; the key covers the texts, the encoder's code and the torch version, so a
changed encoder encodes afresh. Throughput is always measured in the run.
Writes benchmarks/results/rag_beir.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import fmt, ratio_spread, run_rounds, spread, stamp, write_results  # noqa: E402

from ember.rag.bm25 import ENGLISH_STOPWORDS  # noqa: E402
from ember.rag.chunk import recursive_chunks, token_chunks  # noqa: E402
from ember.rag.encoder import default_encoder_path, load_encoder  # noqa: E402
from ember.rag.index import Index  # noqa: E402
from ember.rag.retrieve import score_average  # noqa: E402

CACHE = Path(os.environ.get("EMBER_RAG_CACHE", "/tmp/ember_rag_cache"))


def load_beir(d: Path):
    docs = [json.loads(line) for line in open(d / "corpus.jsonl")]
    queries = {q["_id"]: q["text"] for q in map(json.loads, open(d / "queries.jsonl"))}
    qrels: dict[str, dict[str, int]] = {}
    for line in list(open(d / "qrels" / "test.tsv"))[1:]:
        q, doc, rel = line.rstrip("\n").split("\t")
        if int(rel) > 0:
            qrels.setdefault(q, {})[doc] = int(rel)
    return docs, queries, qrels


def ndcg_at(ranked: list[str], rel: dict[str, int], k: int = 10) -> float:
    dcg = sum((2 ** rel.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: list[str], rel: dict[str, int], k: int = 100) -> float:
    return len(set(ranked[:k]) & set(rel)) / len(rel) if rel else 0.0


def evaluate(run: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    return {"ndcg@10": round(float(np.mean([ndcg_at(run[q], r) for q, r in qrels.items()])), 4),
            "recall@100": round(float(np.mean([recall_at(run[q], r) for q, r in qrels.items()])), 4)}


def cached(name: str, texts: list[str], fn) -> np.ndarray:
    import torch

    code = (ROOT / "ember" / "rag" / "encoder.py").read_bytes()
    key = hashlib.sha256(("\x00".join(texts)).encode() + code + torch.__version__.encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{key}.npy"
    if path.exists():
        return np.load(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    vecs = np.asarray(fn(texts), dtype=np.float32)
    print(f"  encoded {len(texts)} texts with {name} in {time.perf_counter() - t:.0f}s (cached at {path})")
    np.save(path, vecs)
    return vecs


class CachedEmbedder:
    """The Ember encoder, answering from precomputed corpus vectors where it has them."""

    def __init__(self, enc, texts: list[str], vecs: np.ndarray) -> None:
        self.enc, self.name, self.dim = enc, enc.name, enc.dim
        self.table = dict(zip(texts, vecs))

    def encode(self, texts):
        missing = [t for t in texts if t not in self.table]  # queries: encoded every time, so latency counts them
        fresh = dict(zip(missing, self.enc.encode(missing))) if missing else {}
        return np.stack([self.table[t] if t in self.table else fresh[t] for t in texts])


def percentiles(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(xs, 50)) * 1e3, 2), "p95_ms": round(float(np.percentile(xs, 95)) * 1e3, 2)}


def encoder_flops(enc, texts: list[str]) -> float:
    """Multiply-add FLOPs of one encoder pass over `texts` at their truncated lengths: the
    linear layers (2 per weight per token) plus attention's QK^T and AV (4 T^2 H per layer)."""
    c = enc.model.config
    H, n_layers = c.hidden_size, c.num_hidden_layers
    per_token = 2 * n_layers * (4 * H * H + 2 * H * c.intermediate_size)
    lengths = [len(e.ids) for e in enc.tokenizer.encode_batch(texts)]
    return float(sum(per_token * t + n_layers * 4 * t * t * H for t in lengths))


def matmul_peak_gflops(enc, rows: int = 4096, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate on the encoder's own FFN shape, the fastest of `repeats`: the
    compute roofline (a ceiling, so the fastest run is the right figure here)."""
    import torch
    import torch.nn.functional as F
    c = enc.model.config
    x, w = torch.randn(rows, c.hidden_size), torch.randn(c.intermediate_size, c.hidden_size)
    F.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * rows * c.hidden_size * c.intermediate_size / best / 1e9


def throughput(enc, st, texts: list[str], rounds: int) -> dict:
    """Docs/s of the two encoders in ABBA rounds, so machine noise hits both alike (the median with
    its spread); each one's FLOP rate against the machine's fp32 matmul peak (the compute roofline)."""
    enc.encode(texts[:8]), st.encode(texts[:8])
    vectors = {}

    def timed(name, fn):
        def run() -> float:
            t = time.perf_counter()
            vectors[name] = fn()
            return len(texts) / (time.perf_counter() - t)
        return run

    speeds = run_rounds({"ember": timed("ember", lambda: enc.encode(texts)),
                         "sentence_transformers": timed("st", lambda: st.encode(texts, normalize_embeddings=True))},
                        rounds)
    cos = (vectors["ember"] * vectors["st"]).sum(1)
    e, s = spread(speeds["ember"]), spread(speeds["sentence_transformers"])
    flops, peak = encoder_flops(enc, texts), matmul_peak_gflops(enc)
    per_doc = flops / len(texts) / 1e9
    e_rate, s_rate = per_doc * e["median"], per_doc * s["median"]
    return {"docs": len(texts), "order": "ABBA", "ember_docs_per_s": e, "st_docs_per_s": s,
            "ratio": ratio_spread(speeds["ember"], speeds["sentence_transformers"]),
            "min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 7),
            "gflop_per_doc": round(flops / len(texts) / 1e9, 3), "matmul_peak_gflops": round(peak, 1),
            "ember_gflops": round(e_rate, 1), "st_gflops": round(s_rate, 1),
            "ember_share_of_peak": round(e_rate / peak, 3), "st_share_of_peak": round(s_rate / peak, 3),
            "best_possible_ratio": round(peak / s_rate, 2)}


def fts5_run(docs: list[dict], queries: dict[str, str], qrels: dict) -> dict[str, list[str]]:
    """SQLite FTS5 bm25() with its Porter stemmer; stopwords dropped from the OR query."""
    import re
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE f USING fts5(doc_id UNINDEXED, body, tokenize='porter unicode61')")
    db.executemany("INSERT INTO f VALUES (?, ?)", [(d["_id"], f"{d.get('title', '')} {d['text']}") for d in docs])
    run = {}
    for q in qrels:
        words = [w for w in re.findall(r"\w\w+", queries[q].lower()) if w not in ENGLISH_STOPWORDS]
        expr = " OR ".join(f'"{w}"' for w in words) or '""'
        rows = db.execute("SELECT doc_id FROM f WHERE f MATCH ? ORDER BY bm25(f) LIMIT 100", (expr,)).fetchall()
        run[q] = [r[0] for r in rows]
    return run


def chunking_eval(data: Path, enc, corpora: list[str] | None = None, k: int = 5) -> dict:
    import csv
    d = data / "chunking_eval"
    questions = [q for q in csv.DictReader(open(d / "questions_df.csv")) if not corpora or q["corpus_id"] in corpora]
    tok = enc.tokenizer
    from tokenizers import Tokenizer
    free = Tokenizer.from_str(tok.to_str())
    free.no_truncation()
    tokenize = lambda text: list(free.encode(text, add_special_tokens=False).offsets)  # noqa: E731
    chunkers = {"tokens-200-overlap-0": lambda t: token_chunks(t, 200, 0, tokenize),
                "recursive-200": lambda t: recursive_chunks(t, 200, "markdown", tokenize)}
    qvecs = enc.encode([q["question"] for q in questions])
    out = {}
    for name, chunker in chunkers.items():
        per_q = []
        for corpus in sorted({q["corpus_id"] for q in questions}):
            text = (d / "corpora" / f"{corpus}.md").read_text(encoding="utf-8")
            chunks = chunker(text)
            vecs = cached(f"chunks-{name}-{corpus}", [c.text for c in chunks], enc.encode)
            for qi, q in enumerate(questions):
                if q["corpus_id"] != corpus:
                    continue
                top = np.argsort(-(vecs @ qvecs[qi]))[:k]
                covered = [(chunks[i].start, chunks[i].end) for i in top]
                refs = [(r["start_index"], r["end_index"]) for r in json.loads(q["references"])]
                total = sum(e - s for s, e in refs)
                hit = 0
                for s, e in refs:  # characters of the excerpt inside any retrieved chunk
                    mark = np.zeros(e - s, dtype=bool)
                    for cs, ce in covered:
                        lo, hi = max(s, cs), min(e, ce)
                        if hi > lo:
                            mark[lo - s:hi - s] = True
                    hit += int(mark.sum())
                per_q.append(hit / total if total else 0.0)
        out[name] = {"recall@5": round(float(np.mean(per_q)), 4), "questions": len(per_q)}
        print(f"  chunking {name}: recall@5 {out[name]['recall@5']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("EMBER_SHARED_DATA", str(ROOT.parent / "shared" / "data")) + "/rag")
    ap.add_argument("--throughput-docs", type=int, default=384)
    ap.add_argument("--skip-chunking", action="store_true")
    ap.add_argument("--chunking-corpora", nargs="*", default=None,
                    help="subset of the chunking-evaluation corpora (default: all five)")
    ap.add_argument("--no-peer-dense", action="store_true",
                    help="skip encoding the whole corpus with sentence-transformers (minutes on 2 cores)")
    ap.add_argument("--no-dense", action="store_true",
                    help="BM25 only on NFCorpus (skip encoding the corpus; throughput and chunking still run)")
    ap.add_argument("--throughput-rounds", type=int, default=4, help="embedding throughput rounds, ABBA order")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rag_beir"),
                    help="results path without extension")
    a = ap.parse_args()
    data = Path(a.data)
    docs, queries, qrels = load_beir(data / "nfcorpus")
    texts = [f"{d.get('title', '')}\n{d['text']}" if d.get("title") else d["text"] for d in docs]
    ids = [d["_id"] for d in docs]
    res: dict = stamp({"corpus_docs": len(docs), "test_queries": len(qrels)})
    print(f"NFCorpus: {len(docs)} documents, {len(qrels)} test queries")

    from sentence_transformers import SentenceTransformer
    enc = load_encoder()
    st = SentenceTransformer(str(default_encoder_path()), device="cpu")
    rng = np.random.default_rng(0)
    sub = [texts[i] for i in rng.choice(len(texts), min(a.throughput_docs, len(texts)), replace=False)]
    res["embedding_throughput"] = throughput(enc, st, sub, a.throughput_rounds)
    print("  throughput", res["embedding_throughput"])

    ember_vecs = None if a.no_dense else cached("ember-nfcorpus", texts, enc.encode)
    st_vecs = None if a.no_peer_dense or a.no_dense else cached(
        "st-nfcorpus", texts, lambda t: st.encode(t, normalize_embeddings=True, batch_size=32))

    with tempfile.TemporaryDirectory() as tmp:
        embedder = None if a.no_dense else CachedEmbedder(enc, texts, ember_vecs)
        idx = Index(Path(tmp) / "nf.db", embedder=embedder, chunking="none")
        t = time.perf_counter()
        idx.add(docs)
        res["index_seconds_cached_vectors"] = round(time.perf_counter() - t, 1)
        qids = list(qrels)
        modes = ("bm25",) if a.no_dense else ("bm25", "dense", "hybrid", "average")
        runs, lat = {}, {}
        for mode in modes:
            runs[mode], lat[mode] = {}, []
            for q in qids:
                t = time.perf_counter()
                hits = idx.search(queries[q], k=100, mode=mode)
                lat[mode].append(time.perf_counter() - t)
                runs[mode][q] = [h.doc_id for h in hits]
        for q in ([] if a.no_dense else qids):
            lists = [dict(idx.bm25(queries[q], 100)), dict(idx.dense(queries[q], 100))]
            snap = idx.snapshot()
            runs.setdefault("raw_average", {})[q] = [snap.doc_ids[r] for r, _ in score_average(lists, normalize=False)[:100]]
        # Query latency without the query encoder: what the index itself costs.
        t = time.perf_counter()
        for q in qids:
            idx.bm25(queries[q], 100)
        ember_qps = len(qids) / (time.perf_counter() - t)
        res["ember"] = {m: {**evaluate(r, qrels), **(percentiles(lat[m]) if m in lat else {})} for m, r in runs.items()}
        res["ember"]["bm25"]["queries_per_s"] = round(ember_qps, 1)
        res["ember"]["index"] = {"vector_index": idx._vindex[1].kind if idx._vindex else None}
        idx.close()

    import bm25s
    import Stemmer
    stem = Stemmer.Stemmer("english")
    retr = bm25s.BM25()
    retr.index(bm25s.tokenize([t.replace("\n", " ") for t in texts], stopwords="en", stemmer=stem,
                              show_progress=False), show_progress=False)
    qt = bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=stem, show_progress=False)
    t = time.perf_counter()
    R, _ = retr.retrieve(qt, k=100, show_progress=False, n_threads=1)
    bm25s_batch_qps = len(qids) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in qids:  # one at a time, tokenization included, like the Ember loop above
        retr.retrieve(bm25s.tokenize([queries[q]], stopwords="en", stemmer=stem, show_progress=False),
                      k=100, show_progress=False)
    bm25s_qps = len(qids) / (time.perf_counter() - t)
    res["bm25s"] = {**evaluate({q: [ids[i] for i in R[j]] for j, q in enumerate(qids)}, qrels),
                    "queries_per_s_one_by_one": round(bm25s_qps, 1), "queries_per_s_batched": round(bm25s_batch_qps, 1)}
    res["sqlite_fts5_porter"] = evaluate(fts5_run(docs, queries, qrels), qrels)
    if st_vecs is not None:
        qv = st.encode([queries[q] for q in qids], normalize_embeddings=True)
        top = np.argsort(-(qv @ st_vecs.T), axis=1)[:, :100]
        res["sentence_transformers_dense"] = evaluate({q: [ids[i] for i in top[j]] for j, q in enumerate(qids)},
                                                      qrels)
    else:
        res["sentence_transformers_dense"] = {"ndcg@10": "skipped", "recall@100": "skipped"}
    res["ember_bm25_qps_vs_bm25s"] = round(res["ember"]["bm25"]["queries_per_s"] / bm25s_qps, 2)
    if not a.skip_chunking:
        res["chunking_recall@5"] = chunking_eval(data, enc, a.chunking_corpora)
    write(res, Path(a.out))


def write(res: dict, out: Path) -> None:
    e = res["ember"]
    lines = ["# RAG retrieval on BEIR NFCorpus", "",
             f"{res['corpus_docs']} documents, {res['test_queries']} test queries.", "",
             "| system | nDCG@10 | Recall@100 | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for m in ("bm25", "dense", "hybrid", "average", "raw_average"):
        r = e.get(m, {"ndcg@10": "not run", "recall@100": "not run"})
        lines.append(f"| Ember {m} | {r['ndcg@10']} | {r['recall@100']} | {r.get('p50_ms', '')} | {r.get('p95_ms', '')} |")
    lines.append(f"| bm25s (stopwords + Snowball) | {res['bm25s']['ndcg@10']} | {res['bm25s']['recall@100']} | | |")
    lines.append(f"| SQLite FTS5 bm25() (Porter) | {res['sqlite_fts5_porter']['ndcg@10']} | "
                 f"{res['sqlite_fts5_porter']['recall@100']} | | |")
    lines.append(f"| sentence-transformers dense | {res['sentence_transformers_dense']['ndcg@10']} | "
                 f"{res['sentence_transformers_dense']['recall@100']} | | |")
    t = res["embedding_throughput"]
    lines += ["", "hybrid = reciprocal rank fusion (k = 60, 1-based ranks) of the top 100 of each; average = mean of "
              "min-max-scaled scores; raw_average = mean of unscaled scores. Latency is per query, one at a time, "
              "query encoding included.", "",
              f"BM25 queries/s (index only, one at a time): Ember {e['bm25']['queries_per_s']}, bm25s "
              f"{res['bm25s']['queries_per_s_one_by_one']} (tokenize + retrieve per query; batched "
              f"{res['bm25s']['queries_per_s_batched']}); ratio {res['ember_bm25_qps_vs_bm25s']}.", "",
              f"Embedding throughput on {t['docs']} NFCorpus documents (same model, same texts, median over "
              f"{t['ratio']['rounds']} rounds in ABBA order, min–max): Ember {fmt(t['ember_docs_per_s'], 2)} docs/s, "
              f"sentence-transformers {fmt(t['st_docs_per_s'], 2)} docs/s, ratio {fmt(t['ratio'], 3, 'x')}; "
              f"cosine between their vectors min {t['min_cosine']}, mean {t['mean_cosine']}."]
    if "matmul_peak_gflops" in t:
        lines += ["", f"Compute roofline: one document costs {t['gflop_per_doc']} GFLOP (linear layers + attention at "
                  f"its truncated length). This machine's fp32 matmul peak on the encoder's FFN shape is "
                  f"{t['matmul_peak_gflops']} GFLOP/s; Ember runs at {t['ember_gflops']} GFLOP/s "
                  f"({t['ember_share_of_peak']:.0%} of it), sentence-transformers at {t['st_gflops']} "
                  f"({t['st_share_of_peak']:.0%}). No fp32 encoder can beat sentence-transformers by more than "
                  f"{t['best_possible_ratio']}x here; going further needs fewer FLOPs (lower precision), "
                  "which would give up the cosine >= 0.9999 agreement."]
    if "chunking_recall@5" in res:
        lines += ["", "Chunking (token-level recall@5 over the chunking-evaluation corpora, MiniLM retrieval):", "",
                  "| chunker | recall@5 |", "|---|---|"]
        lines += [f"| {n} | {r['recall@5']} |" for n, r in res["chunking_recall@5"].items()]
    write_results(out.name, res, "\n".join(lines), results_dir=out.parent)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
