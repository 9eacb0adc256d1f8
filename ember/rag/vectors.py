"""Vector index over unit-length embeddings (inner product = cosine), on faiss.

Below `hnsw_threshold` vectors the search is exact (IndexFlatIP): brute force is fast
there and never misses. Above it an HNSW graph is built, then checked against exact
search on probe queries; `efSearch` is doubled until recall@10 reaches `min_recall`
(or the exact index is kept, if even a wide search falls short). The measured recall
is kept on the index (`.recall`) so callers can see what they are getting.
"""

from __future__ import annotations

import numpy as np

from ember.errors import EmberError

HNSW_THRESHOLD = 20_000


def _faiss():
    try:  # imported on first dense search: BM25-only indexes work without faiss
        import faiss
    except ImportError as e:
        raise EmberError("Dense search needs faiss-cpu (pip install faiss-cpu).") from e
    return faiss


class VectorIndex:
    def __init__(self, vectors: np.ndarray, hnsw_threshold: int = HNSW_THRESHOLD, m: int = 32,
                 ef_construction: int = 128, ef_search: int = 64, min_recall: float = 0.95, seed: int = 0) -> None:
        faiss = _faiss()
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = self.vectors.shape if self.vectors.ndim == 2 else (0, 0)
        self.dim = d
        self.kind = "exact"
        self.recall = 1.0
        self.index = faiss.IndexFlatIP(max(d, 1))
        if n:
            self.index.add(self.vectors)
        if n >= hnsw_threshold:
            hnsw = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = ef_construction
            hnsw.add(self.vectors)
            probes = self._probes(min(200, n), seed)
            _, truth = self.index.search(probes, 10)
            ef = ef_search
            while True:
                hnsw.hnsw.efSearch = ef
                _, got = hnsw.search(probes, 10)
                recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)]))
                if recall >= min_recall or ef >= 1024:
                    break
                ef *= 2
            if recall >= min_recall:
                self.index, self.kind, self.recall, self.ef_search = hnsw, "hnsw", recall, ef

    def _probes(self, n: int, seed: int) -> np.ndarray:
        """Queries near the data but not on it: midpoints of random pairs of stored vectors."""
        rng = np.random.default_rng(seed)
        a = self.vectors[rng.integers(0, len(self.vectors), n)]
        b = self.vectors[rng.integers(0, len(self.vectors), n)]
        q = a + b
        return (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [m, k'], rows [m, k']) best first; with a row mask the search is exact over the allowed rows."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise EmberError(f"Query vectors have {q.shape[1]} dimensions but the index holds {self.dim}.")
        k = min(k, len(self))
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if mask is None:
            return self.index.search(q, k)
        rows = np.flatnonzero(mask)
        k = min(k, len(rows))
        sims = q @ self.vectors[rows].T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, top, 1), rows[top]
