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
from ember.kv_cache import StaticKVCache
from ember.model import CausalLM
from ember.packed_linear import packed_linears
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
    """A small model guesses k tokens one at a time, on its own KV pool (same block tables).

    A draft's k steps run one after another, and for a small model each is almost all
    per-operation overhead, which can cost more than the target step it saves. With
    `compile_steps`, a sequence that runs alone when it first drafts (batch-1 decoding, the
    latency case) drafts instead through the compiled one-token step of `ember.generation`, on
    a static cache of its own (first use compiles for about half a minute, cached on disk after);
    batches keep the shared paged pool, whose one forward serves every sequence's step."""

    def __init__(self, model: CausalLM, target_pool: KVPool, pack_weights: bool = False,
                 compile_steps: bool = False, max_len: int | None = None) -> None:
        self.model = model.eval()
        self.pack_weights = pack_weights
        self.compile_steps = compile_steps
        # The longest sequence it drafts for (the target's context): like the paged pool, the
        # static cache may run past the draft's own trained context.
        self.max_len = max_len or model.config.max_position_embeddings
        w = model.model.embed_tokens.weight  # device and dtype (the head may be quantized)
        self.pool = KVPool(model.config, target_pool.num_blocks, target_pool.block_size, w.device, w.dtype)
        self._structure: int | None = None  # ember.generation.structure_key of the model, on first compiled step

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[Tensor | None]]:
        """Up to ks[i] tokens for each sequence, and the distributions they were drawn from."""
        drafts: list[list[int]] = [[] for _ in seqs]
        dists: list[list[Tensor]] = [[] for _ in seqs]
        paged = []
        for i, seq in enumerate(seqs):
            if self._static_cache(seq, ks[i], alone=len(seqs) == 1) is not None:
                drafts[i], dists[i] = self._propose_static(seq, ks[i])
            else:
                paged.append(i)
        if paged:
            self._propose_paged([seqs[i] for i in paged], [ks[i] for i in paged],
                                [drafts[i] for i in paged], [dists[i] for i in paged])
        return drafts, [torch.stack(d) if d else None for d in dists]

    def _propose_paged(self, seqs: list[Sequence], ks: list[int], drafts: list[list[int]],
                       dists: list[list[Tensor]]) -> None:
        """All sequences step together: one forward over the shared pool per guessed token."""
        from ember.engine.model_runner import forward_tokens

        # First pass: catch up on every token the draft has not seen yet (the whole prompt, the
        # first time), ending with the sequence's newest token.
        items = [(seq.token_ids[seq.draft_computed:], seq.draft_computed, seq.block_table) for seq in seqs]
        active = list(range(len(seqs)))
        for step in range(max(ks)):
            logits = forward_tokens(self.model, self.pool, items, self.pack_weights)
            next_items, next_active = [], []
            for row, i in enumerate(active):
                seq = seqs[i]
                token = self._draw(seq, logits[row:row + 1], dists[i])
                drafts[i].append(token)
                start = items[row][1] + len(items[row][0])
                seq.draft_computed = start
                if len(drafts[i]) < ks[i]:
                    next_items.append(([token], start, seq.block_table))
                    next_active.append(i)
            items, active = next_items, next_active
            if not active:
                break

    def _static_cache(self, seq: Sequence, k: int, alone: bool) -> StaticKVCache | None:
        """The sequence's own static cache: kept once made; made for a sequence that is alone
        at its first draft, when compiling is on."""
        if seq.draft_cache is not None or not (self.compile_steps and alone and seq.draft_computed == 0):
            return seq.draft_cache
        need = min(len(seq.prompt_ids) + seq.params.max_tokens + k + 1, self.max_len + k)
        size = -(-need // 256) * 256  # nearby lengths share one compiled graph
        w = self.model.model.embed_tokens.weight
        seq.draft_cache = StaticKVCache(self.model.config, size, w.device, w.dtype)
        return seq.draft_cache

    def _propose_static(self, seq: Sequence, k: int) -> tuple[list[int], list[Tensor]]:
        """k guesses for one sequence: catch up (the prompt eagerly the first time), then one
        compiled step per guess; rejected guesses are forgotten by moving the cache's length back."""
        from ember.generation import compiled_decode_step, structure_key

        cache: StaticKVCache = seq.draft_cache
        device = cache.slots.device
        step = compiled_decode_step(device.type)
        cache.length = seq.draft_computed
        todo = seq.token_ids[seq.draft_computed:]
        draft: list[int] = []
        dist: list[Tensor] = []
        with packed_linears(self.model, pack=False):
            if cache.pos is None:  # nothing compiled has run on this cache yet: a prefill, eager
                logits = self.model(torch.tensor([todo], device=device), cache=cache, last_only=True)[:, -1]
                if self._structure is None:  # after a forward has filled the layers' lazy caches
                    self._structure = structure_key(self.model)
            else:
                for token in todo:
                    logits = step(self.model, cache, torch.tensor([[token]], device=device), cache.next_position(),
                                  self._structure)
            seq.draft_computed = len(seq.token_ids)
            while True:
                draft.append(self._draw(seq, logits.float(), dist))
                if len(draft) == k:
                    return draft, dist
                logits = step(self.model, cache, torch.tensor([[draft[-1]]], device=device), cache.next_position(),
                              self._structure)
                seq.draft_computed += 1

    @staticmethod
    def _draw(seq: Sequence, logits: Tensor, dists: list[Tensor]) -> int:
        """A guess from the draft's logits [1, V]: its argmax, or a draw whose distribution is kept."""
        if seq.params.greedy:
            return int(logits[0].argmax())
        q = probabilities(logits, seq.params)[0]
        dists.append(q)
        return int(torch.multinomial(q, 1, generator=seq.generator))
