"""Speculative decoding: cheap guesses for the next k tokens, verified in one target step.

A proposer guesses k tokens for a decoding sequence; the engine computes the target
model's logits at all k + 1 positions in the same flat batch as everything else, and
`verify` keeps the longest prefix the target agrees with plus one token of its own, for
every verifying sequence of the step at once. Its distributions are the sampler's
(`ember.sampling.SamplingRows.process`), and the draft model draws its guesses with the
sampler too.

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

from ember.compiled_step import compiled_decode_step, structure_key
from ember.engine.model_runner import forward_tokens
from ember.engine.paged_cache import KVPool
from ember.engine.sequence import Sequence, SpecState, grammar_mask
from ember.kv_cache import StaticKVCache
from ember.model import CausalLM
from ember.sampling import SamplingParams, SamplingRows, TokenMask, race, sample


def can_speculate(params: SamplingParams) -> bool:
    """Speculation needs the token distribution to depend on the context only: penalties
    (which depend on tokens not yet accepted), logprobs and min_tokens opt a request out."""
    return params.logprobs is None and not params.has_penalties and not params.min_tokens


def verify(target_logits: Tensor, rows: SamplingRows, drafts: list[list[int]],
           draft_probs: list[Tensor | None] | None = None, mask: TokenMask | None = None) -> list[list[int]]:
    """Tokens to append for each verifying sequence: its accepted guesses, then one token of the target's.

    target_logits [R, V] holds len(drafts[i]) + 1 rows per sequence, one after another: row j of
    sequence i is the target's prediction after drafts[i][:j]. `rows` gives each of the R rows its
    sequence's parameters and random stream. draft_probs[i] [k, V]: the
    distributions the guesses were drawn from (None: deterministic guesses, q one-hot). `mask`: the
    grammar's allowed tokens at each constrained row, so a guess the grammar forbids has p = 0.
    """
    device = target_logits.device
    draft_probs = draft_probs if draft_probs is not None else [None] * len(drafts)
    processed = rows.process(rows.allowed(target_logits, mask))
    best = processed.argmax(dim=-1)
    guess = torch.tensor([t for d in drafts for t in [*d, 0]], device=device)  # 0: the extra row's placeholder
    is_guess = torch.tensor([j < len(d) for d in drafts for j in range(len(d) + 1)], device=device)
    agrees = (guess == best) & is_guess  # the greedy rule
    if rows.all_greedy:
        accept, choice = agrees, best
    else:
        p = processed.softmax(dim=-1)
        q = torch.zeros_like(p)  # the extra row's q is 0: its residual is p itself
        offset = 0
        for d, dist in zip(drafts, draft_probs):
            if d and dist is None:
                q[offset:offset + len(d)].scatter_(1, torch.tensor(d, device=device).view(-1, 1), 1.0)
            elif d:
                q[offset:offset + len(d)] = dist
            offset += len(d) + 1
        p_d = p.gather(1, guess.view(-1, 1))[:, 0]
        q_d = q.gather(1, guess.view(-1, 1))[:, 0]
        accept = (rows.uniform(len(guess)) * q_d < p_d) & is_guess  # u < p/q, without dividing by 0
        residual = (p - q).clamp_min(0.0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)  # p == q: any draw from p is right
        choice = race(residual, rows.exponential_noise(residual))
        if rows.greedy is not None:
            accept = torch.where(rows.greedy, agrees, accept)
            choice = torch.where(rows.greedy, best, choice)
    accepted, chosen = accept.tolist(), choice.tolist()
    out, offset = [], 0
    for d in drafts:
        n = 0
        while n < len(d) and accepted[offset + n]:
            n += 1
        out.append(d[:n] + [chosen[offset + n]])
        offset += len(d) + 1
    return out


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
    latency case) drafts instead through the compiled one-token step (`ember.compiled_step`), on
    a static cache of its own (the first use compiles, cached on disk after);
    batches keep the shared paged pool, whose one forward serves every sequence's step."""

    def __init__(self, model: CausalLM, target_pool: KVPool, compile_steps: bool = False,
                 max_len: int | None = None) -> None:
        self.model = model.eval()
        self.compile_steps = compile_steps
        # The longest sequence it drafts for (the target's context): like the paged pool, the
        # static cache may run past the draft's own trained context.
        self.max_len = max_len or model.config.max_position_embeddings
        self.pool = KVPool(model.config, target_pool.num_blocks, target_pool.block_size, model.device, model.dtype)
        self._structure: int | None = None  # ember.compiled_step.structure_key of the model, on first compiled step

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
        for seq in seqs:  # the grammar goes back to the accepted tokens; verification redoes the guesses
            if seq.grammar is not None:
                seq.grammar.rollback(seq.spec.grammar_guesses)
                seq.spec.grammar_guesses = 0
        return drafts, [torch.stack(d) if d else None for d in dists]

    def _propose_paged(self, seqs: list[Sequence], ks: list[int], drafts: list[list[int]],
                       dists: list[list[Tensor]]) -> None:
        """All sequences step together: one forward over the shared pool and one sampler call per guessed token."""
        # First pass: catch up on every token the draft has not seen yet (the whole prompt, the
        # first time), ending with the sequence's newest token.
        items = [(seq.token_ids[seq.spec.draft_computed:], seq.spec.draft_computed, seq.block_table) for seq in seqs]
        active = list(range(len(seqs)))
        for _ in range(max(ks)):
            logits = forward_tokens(self.model, self.pool, items)
            tokens = self._draw([seqs[i] for i in active], logits, [dists[i] for i in active])
            next_items, next_active = [], []
            for row, i in enumerate(active):
                seq = seqs[i]
                drafts[i].append(tokens[row])
                start = items[row][1] + len(items[row][0])
                seq.spec.draft_computed = start
                if len(drafts[i]) < ks[i]:
                    next_items.append(([tokens[row]], start, seq.block_table))
                    next_active.append(i)
            items, active = next_items, next_active
            if not active:
                break

    def _static_cache(self, seq: Sequence, k: int, alone: bool) -> StaticKVCache | None:
        """The sequence's own static cache: kept once made; made for a sequence that is alone
        at its first draft, when compiling is on."""
        spec = seq.spec
        if spec.draft_cache is not None or not (self.compile_steps and alone and spec.draft_computed == 0):
            return spec.draft_cache
        need = min(len(seq.prompt_ids) + seq.params.max_tokens + k + 1, self.max_len + k)
        size = -(-need // 256) * 256  # nearby lengths share one compiled graph
        spec.draft_cache = StaticKVCache(self.model.config, size, self.model.device, self.model.dtype)
        return spec.draft_cache

    def _propose_static(self, seq: Sequence, k: int) -> tuple[list[int], list[Tensor]]:
        """k guesses for one sequence: catch up (the prompt eagerly the first time), then one
        compiled step per guess; rejected guesses are forgotten by moving the cache's length back."""
        spec: SpecState = seq.spec
        cache: StaticKVCache = spec.draft_cache
        device = cache.slots.device
        step = compiled_decode_step(device.type)
        cache.length = spec.draft_computed
        todo = seq.token_ids[spec.draft_computed:]
        draft: list[int] = []
        dist: list[Tensor] = []
        if cache.pos is None:  # nothing compiled has run on this cache yet: a prefill, eager
            logits = self.model(torch.tensor([todo], device=device), cache=cache, last_only=True)[:, -1]
            if self._structure is None:  # after a forward has filled the layers' lazy caches
                self._structure = structure_key(self.model)
        else:
            for token in todo:
                logits = step(self.model, cache, torch.tensor([[token]], device=device), cache.next_position(),
                              self._structure)
        spec.draft_computed = len(seq.token_ids)
        while True:
            draft += self._draw([seq], logits.float(), [dist])
            if len(draft) == k:
                return draft, dist
            logits = step(self.model, cache, torch.tensor([[draft[-1]]], device=device), cache.next_position(),
                          self._structure)
            spec.draft_computed += 1

    @staticmethod
    def _draw(seqs: list[Sequence], logits: Tensor, dists: list[list[Tensor]]) -> list[int]:
        """A guess per sequence from the draft's logits [len(seqs), V], through the sampler (under
        the sequence's grammar, which takes each guess it allows); the distribution a sampled
        guess was drawn from is kept for verification."""
        out = sample(logits, SamplingRows([s.params for s in seqs], [s.generator for s in seqs],
                                          device=logits.device), keep_probs=True,
                     mask=grammar_mask(seqs, logits.shape[-1]))
        tokens = out.token_ids.tolist()
        for row, seq in enumerate(seqs):
            if not seq.params.greedy:
                dists[row].append(out.probs[row])
            if seq.grammar is not None and tokens[row] not in seq.stop_ids and seq.grammar.try_advance(tokens[row]):
                seq.spec.grammar_guesses += 1
        return tokens
