"""Turns a schedule into one forward pass: the logits of the positions to sample.

The flat batch: every scheduled token of every sequence in one row `[1, N]`, with its
position and its KV slot. Only sequences whose tokens are now all computed get logits
(the last row of each, or the last 1 + k rows when k guessed tokens are verified), so a
prefill chunk that is not the last costs no LM-head work. Sampling is the engine core's
(one `ember.sampling.sample` call per step). With adapter slots (`ember.lora.batched`), the
forward runs with each token's adapter slot set, so rows of different adapters share it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ember.engine.paged_cache import KVPool, PagedBatch
from ember.engine.sequence import Sequence
from ember.model import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool) -> None:
        self.model, self.pool = model, pool
        self.lora = getattr(model, "lora_slots", None)  # set by LLM(lora_adapters=...)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], Tensor | None, list[int]]:
        """Compute the scheduled tokens. Returns the sequences now fully computed, their logits
        (one row per position to sample: 1, or 1 + k with k guessed tokens) and the row counts."""
        items, sample_rows, sample_seqs, counts = [], [], [], []
        prompt_rows: dict[int, tuple[int, int]] = {}
        token_slots: list[int] = []  # each token's adapter slot (-1: the base), with adapter slots
        row = 0
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            guesses = seq.draft_ids
            tokens = seq.token_ids + guesses if guesses else seq.token_ids
            items.append((tokens[start:start + n], start, seq.block_table))
            if self.lora is not None:
                token_slots += [self.lora.slot_of(seq.lora_id) if seq.lora_id else -1] * n
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows[seq.seq_id] = (row, start)
            row += n
            if start + n == len(tokens):
                k = len(guesses)
                sample_rows.extend(range(row - 1 - k, row))
                sample_seqs.append(seq)
                counts.append(k + 1)
        with self._adapters(token_slots):
            hidden = hidden_states(self.model, self.pool, items)
        with self._adapters([token_slots[r] for r in sample_rows] if token_slots else []):
            logits = self.model.lm_head(hidden[sample_rows]).float() if sample_rows else None
        for seq, n in scheduled:
            if seq.seq_id in prompt_rows:
                row, start = prompt_rows[seq.seq_id]
                with self._adapters(token_slots[row:row + min(n, seq.num_prompt_tokens - start)]):
                    self._prompt_logprobs(seq, hidden, row, start, n)
        return sample_seqs, logits, counts

    def _adapters(self, token_slots: list[int]) -> contextlib.AbstractContextManager:
        """With adapter slots: the rows of the next forward (or head) take these slots' adapters."""
        return self.lora.active(token_slots, self.pool.kv[0].device) if self.lora is not None \
            else contextlib.nullcontext()

    def _prompt_logprobs(self, seq: Sequence, hidden: Tensor, row: int, start: int, n: int) -> None:
        """Log-probabilities of each prompt token given the ones before it (None for the first)."""
        if start == 0:
            seq.prompt_logprobs = [None]
        end = min(start + n, seq.num_prompt_tokens)
        if end - start <= 0:
            return
        logprobs = torch.log_softmax(self.model.lm_head(hidden[row:row + end - start]).float(), dim=-1)
        for i in range(end - start):
            target_pos = start + i + 1
            if target_pos >= seq.num_prompt_tokens:
                break
            seq.prompt_logprobs.append(top_logprobs(logprobs[i], seq.token_ids[target_pos], seq.params.prompt_logprobs))


def hidden_states(model: CausalLM, pool: KVPool, items: list[tuple[list[int], int, list[int]]]) -> Tensor:
    """One forward over a flat batch: items are (token ids, position of the first, block table).
    Returns the final hidden state of every token, [N, hidden]."""
    bs = pool.block_size
    device = pool.kv[0].device  # the pool lives beside the model; reading a (quantized) weight here could dequantize it
    ids, positions, slots = [], [], []
    for tokens, start, table in items:
        ids += tokens
        positions += range(start, start + len(tokens))
        slots += [table[p // bs] * bs + p % bs for p in range(start, start + len(tokens))]
    pos = torch.tensor(positions, device=device)
    batch = PagedBatch(pool, pos, torch.tensor(slots, device=device), [len(t) for t, _, _ in items],
                       [s + len(t) for t, s, _ in items], [table for _, _, table in items], model.config.sliding_window)
    return model.hidden_states(torch.tensor([ids], device=device), positions=pos, cache=batch)[0]


def forward_tokens(model: CausalLM, pool: KVPool, items: list[tuple[list[int], int, list[int]]]) -> Tensor:
    """Logits of each item's last token, [len(items), V] (float32)."""
    hidden = hidden_states(model, pool, items)
    last = torch.tensor([len(t) for t, _, _ in items]).cumsum(0) - 1
    return model.lm_head(hidden[last.to(hidden.device)]).float()


def top_logprobs(logprobs: Tensor, token: int, n: int) -> dict[int, float]:
    """The chosen token's log-probability plus the n most likely (OpenAI's `top_logprobs`)."""
    out = {token: float(logprobs[token])}
    if n > 0:
        values, ids = logprobs.topk(n)
        out.update({int(i): float(v) for i, v in zip(ids, values)})
    return out
