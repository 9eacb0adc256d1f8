"""BM25 over an inverted index held as numpy arrays.

Text is analysed the usual way for English retrieval: lower-case, words of two or more
word characters, English stopwords dropped, Snowball (Porter2) stems via PyStemmer.
Scoring is Lucene's BM25 (the variant Pyserini and bm25s use):

    score(q, d) = sum over distinct query terms t of
                  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with k1 = 1.5, b = 0.75. Each posting stores its finished term weight, so a query only
adds up a few posting lists (the eager-scoring idea bm25s is built on).
SQLite FTS5's bm25() (Porter stemmer, stopwords dropped from the query) also clears the
NFCorpus target; this index is the one `Index` uses because it scores exactly like bm25s
(same analysis, same formula: a test checks it), drops stopwords on the document side
too, and answers a query by adding a few arrays (benchmarks/results/rag_beir.md has
both side by side).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

from ember.errors import EmberError

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
# Common English function words: frequent everywhere, so they only add noise to ranking.
ENGLISH_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves also
""".split())


class Analyzer:
    """Text -> stemmed terms (lower-case, stopwords out, Snowball English stems)."""

    def __init__(self, stopwords: Iterable[str] = ENGLISH_STOPWORDS, stem: bool = True) -> None:
        self.stopwords = frozenset(stopwords)
        self.stemmer = None
        if stem:
            try:  # imported here so that an index without stemming works where PyStemmer is not installed
                import Stemmer
            except ImportError as e:
                raise EmberError("BM25 stemming needs PyStemmer (pip install PyStemmer).") from e
            self.stemmer = Stemmer.Stemmer("english")
        self._cache: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        words = [w for w in _TOKEN.findall(text.lower()) if w not in self.stopwords]
        if self.stemmer is None:
            return words
        new = [w for w in set(words) if w not in self._cache]
        if new:  # stem each distinct word once per process
            self._cache.update(zip(new, self.stemmer.stemWords(new)))
        return [self._cache[w] for w in words]


class BM25Index:
    """Postings per term: (row, weight) pairs in one flat array, CSC-style."""

    def __init__(self, docs_terms: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.n_docs = len(docs_terms)
        vocab: dict[str, int] = {}
        rows, cols, tfs = [], [], []
        lengths = np.zeros(self.n_docs, dtype=np.float32)
        for r, terms in enumerate(docs_terms):
            lengths[r] = len(terms)
            counts: dict[int, int] = {}
            for t in terms:
                tid = vocab.setdefault(t, len(vocab))
                counts[tid] = counts.get(tid, 0) + 1
            rows += [r] * len(counts)
            cols += counts.keys()
            tfs += counts.values()
        self.vocab = vocab
        rows_a, cols_a = np.asarray(rows, dtype=np.int32), np.asarray(cols, dtype=np.int64)
        tf = np.asarray(tfs, dtype=np.float32)
        df = np.bincount(cols_a, minlength=len(vocab)).astype(np.float32)
        idf = np.log1p((self.n_docs - df + 0.5) / (df + 0.5))
        avgdl = float(lengths.mean()) if self.n_docs and lengths.mean() > 0 else 1.0
        norm = k1 * (1 - b + b * lengths[rows_a] / avgdl)
        weight = idf[cols_a] * tf / (tf + norm)
        order = np.argsort(cols_a, kind="stable")  # group postings by term
        self.rows, self.weights = rows_a[order], weight[order].astype(np.float32)
        self.indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(df.astype(np.int64), out=self.indptr[1:])

    def scores(self, query_terms: Sequence[str]) -> np.ndarray:
        """BM25 score of every row for one analysed query."""
        s = np.zeros(self.n_docs, dtype=np.float32)
        for t in set(query_terms):
            tid = self.vocab.get(t)
            if tid is not None:
                a, b = self.indptr[tid], self.indptr[tid + 1]
                s[self.rows[a:b]] += self.weights[a:b]  # rows are distinct within one posting list
        return s


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best positive scores (ties broken by index), best first."""
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    cand = np.flatnonzero(scores > 0)
    if len(cand) > k:
        part = np.argpartition(-scores[cand], k - 1)[:k]
        cand = cand[part]
    order = np.lexsort((cand, -scores[cand]))
    cand = cand[order]
    return cand, scores[cand]
