"""Ranking math: fusing result lists, diversity, and re-ranking by a language model.

Pure functions over ids, scores and vectors; `Index.search` wires them to the store.

- Reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009):
      RRF(d) = sum over lists L containing d of 1 / (k + rank_L(d)),  k = 60,
  with rank 1 for the best item of each list. Only ranks matter, so BM25 scores (0..~30)
  and cosines (-1..1) fuse without calibration.
- Score averaging, kept for comparison: each list's scores min-max scaled to [0, 1] over
  its own candidates (absent = 0), then averaged; `normalize=False` averages raw scores.
- MMR (Carbonell & Goldstein, 1998): pick the next item maximising
      lambda * sim(query, d) - (1 - lambda) * max over picked p of sim(d, p).
- LLM re-ranking: score = mean log p(query tokens | passage) under a causal LM (the
  "query likelihood" of UPR, Sachan et al. 2022), or log p(Yes) - log p(No) after a
  relevance question.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np
import torch

RRF_K = 60


def rrf(rankings: Sequence[Sequence[Hashable]], k: int = RRF_K) -> list[tuple[Hashable, float]]:
    """Fuse ranked id lists (best first); returns (id, fused score) best first, ties by first appearance."""
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def score_average(score_lists: Sequence[dict[Hashable, float]], normalize: bool = True,
                  weights: Sequence[float] | None = None) -> list[tuple[Hashable, float]]:
    """Weighted mean of (min-max scaled) scores; an item missing from a list counts as 0 there."""
    weights = list(weights) if weights is not None else [1.0 / len(score_lists)] * len(score_lists)
    total: dict[Hashable, float] = {}
    for w, scores in zip(weights, score_lists):
        if not scores:
            continue
        vals = np.array(list(scores.values()), dtype=np.float64)
        lo, span = (vals.min(), vals.max() - vals.min()) if normalize else (0.0, 1.0)
        for item, s in scores.items():
            scaled = (s - lo) / span if span > 0 else 1.0
            total[item] = total.get(item, 0.0) + w * scaled
    for scores in score_lists:
        for item in scores:
            total.setdefault(item, 0.0)
    return sorted(total.items(), key=lambda kv: -kv[1])


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, lam: float = 0.5) -> list[int]:
    """Indices into `candidates` (unit vectors [n, d]) in MMR order."""
    n = len(candidates)
    if n == 0:
        return []
    rel = candidates @ query
    sim = candidates @ candidates.T
    picked: list[int] = []
    best_sim = np.full(n, -np.inf)  # max similarity to anything picked so far
    free = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        redundancy = np.where(np.isfinite(best_sim), best_sim, 0.0)
        score = np.where(free, lam * rel - (1 - lam) * redundancy, -np.inf)
        i = int(np.argmax(score))
        picked.append(i)
        free[i] = False
        best_sim = np.maximum(best_sim, sim[i])
    return picked


RELEVANCE_PROMPT = "Passage: {passage}\nQuestion: {query}\nDoes the passage answer the question? Answer:"
QUERY_LIKELIHOOD_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


def llm_scores(model: Any, tokenizer: Any, query: str, passages: Sequence[str], method: str = "query_likelihood",
               max_passage_tokens: int = 384) -> list[float]:
    """Relevance of each passage to `query` under a causal LM (higher is more relevant)."""
    ctx = getattr(model.config, "max_position_embeddings", 2048)
    dev = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for passage in passages:
            p_ids = tokenizer.encode(passage)[:max_passage_tokens]
            p_text = tokenizer.decode(p_ids)
            if method == "query_likelihood":
                prefix = tokenizer.encode(QUERY_LIKELIHOOD_PROMPT.format(passage=p_text))
                target = tokenizer.encode(" " + query)
            elif method == "yes_no":
                prefix = tokenizer.encode(RELEVANCE_PROMPT.format(passage=p_text, query=query))
                target = []
            else:
                raise ValueError(f"unknown re-ranking method {method!r}")
            ids = (prefix + target)[-ctx:]
            logp = torch.log_softmax(model(torch.tensor([ids], device=dev)).float()[0], dim=-1)
            if method == "query_likelihood":
                n = len(target)
                tgt = torch.tensor(ids[-n:], device=dev)
                out.append(float(logp[-n - 1:-1].gather(1, tgt[:, None]).mean()))
            else:
                yes, no = tokenizer.encode(" Yes")[0], tokenizer.encode(" No")[0]
                out.append(float(logp[-1, yes] - logp[-1, no]))
    return out
