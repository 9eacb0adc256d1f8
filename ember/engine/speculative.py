"""Speculative decoding: cheap guesses for the next k tokens, verified in one target step.

A proposer guesses k tokens for a decoding sequence; the engine computes the target
model's logits at all k + 1 positions in the same flat batch as everything else, and
`verify` keeps the longest prefix the target agrees with plus one token of its own.

The acceptance rule is the one of Leviathan et al. (2023) and Chen et al. (2023): accept
draft token d with probability min(1, p(d) / q(d)); at the first rejection, draw from the
normalised residual max(0, p - q). The output is then distributed exactly as the target's
(for greedy decoding: identical tokens), however good or bad the guesses are.

Two proposers:
- `NgramProposer` (prompt lookup): the continuation of the most recent earlier occurrence
  of the context's last n tokens; q is one-hot. Free, and strong when output copies input.
- `DraftProposer`: a smaller model with the same vocabulary. Its KV cache lives in a pool
  of its own that shares the target's block tables (same block ids, same slots), so it
  needs no allocator of its own, and KV it wrote for tokens that were accepted stays valid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ember.engine.paged_cache import KVPool
from ember.engine.sequence import Sequence
from ember.model import CausalLM
from ember.sampling import SamplingParams, process_logits


def can_speculate(params: SamplingParams) -> bool:
    """Speculation needs the token distribution to depend on the context only: penalties
    (which depend on tokens not yet accepted), logprobs and min_tokens opt a request out."""
    return (params.logprobs is None and params.repetition_penalty == 1.0 and not params.presence_penalty
            and not params.frequency_penalty and not params.min_tokens)


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a request samples from: its temperature, top-k, top-p and min-p applied."""
    return torch.softmax(process_logits(logits, params), dim=-1)


def verify(target_logits: Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator | None,
           draft_probs: Tensor | None = None) -> list[int]:
    """Tokens to append: the accepted draft prefix, then one token from the target.

    target_logits [k + 1, V]: row i is the target's prediction after draft[:i].
    draft_probs [k, V]: the proposer's distributions (None: the draft was deterministic).
    """
    if params.greedy:
        best = target_logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        return draft[:n] + [best[n]]
    p = probabilities(target_logits, params)
    for i, d in enumerate(draft):
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if float(torch.rand((), generator=generator)) * q_d < float(p[i, d]):  # u < p/q, without dividing by 0
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - draft_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q exactly: any draw from p is right
            residual = p[i]
        return draft[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
    return list(draft) + [int(torch.multinomial(p[len(draft)], 1, generator=generator))]


class NgramProposer:
    """Prompt lookup: match the last n tokens (n from `max_n` down to `min_n`) earlier in the
    sequence and propose the k tokens that followed the most recent match (that has k)."""

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("prompt lookup needs 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, tokens: list[int], k: int) -> list[int]:
        ids = np.asarray(tokens)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                # The most recent match with k tokens after it; in a short loop that is an earlier
                # period, whose continuation covers all k guesses.
                full = hits[hits + n + k <= len(ids)]
                start = int(full[-1] if full.size else hits[0]) + n
                return ids[start:start + k].tolist()
        return []


class DraftProposer:
    """A small model guesses k tokens one at a time, on its own KV pool (same block tables)."""

    def __init__(self, model: CausalLM, target_pool: KVPool, pack_weights: bool = False) -> None:
        self.model = model.eval()
        self.pack_weights = pack_weights
        w = model.model.embed_tokens.weight  # device and dtype (the head may be quantized)
        self.pool = KVPool(model.config, target_pool.num_blocks, target_pool.block_size, w.device, w.dtype)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[Tensor | None]]:
        """Up to ks[i] tokens for each sequence, and the distributions they were drawn from."""
        from ember.engine.model_runner import forward_tokens

        drafts: list[list[int]] = [[] for _ in seqs]
        dists: list[list[Tensor]] = [[] for _ in seqs]
        # First pass: catch up on every token the draft has not seen yet (the whole prompt, the
        # first time), ending with the sequence's newest token.
        items = [(seq.token_ids[seq.draft_computed:], seq.draft_computed, seq.block_table) for seq in seqs]
        active = list(range(len(seqs)))
        for step in range(max(ks)):
            logits = forward_tokens(self.model, self.pool, items, self.pack_weights)
            next_items, next_active = [], []
            for row, i in enumerate(active):
                seq = seqs[i]
                params = seq.params
                if params.greedy:
                    token = int(logits[row].argmax())
                else:
                    q = probabilities(logits[row:row + 1], params)[0]
                    token = int(torch.multinomial(q, 1, generator=seq.generator))
                    dists[i].append(q)
                drafts[i].append(token)
                start = items[row][1] + len(items[row][0])
                seq.draft_computed = start
                if len(drafts[i]) < ks[i]:
                    next_items.append(([token], start, seq.block_table))
                    next_active.append(i)
            items, active = next_items, next_active
            if not active:
                break
        return drafts, [torch.stack(d) if d else None for d in dists]
