"""Turns a schedule into one forward pass and samples the next tokens.

The flat batch: every scheduled token of every sequence in one row `[1, N]`, with its
position and its KV slot. Only sequences whose tokens are now all computed get logits
(the last row of each), so a prefill chunk that is not the last costs no LM-head work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ember.engine.paged_cache import KVPool, PagedBatch
from ember.engine.sequence import Sequence
from ember.model import CausalLM
from ember.sampling import PenaltyTracker, draw, process_logits


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool) -> None:
        self.model, self.pool = model, pool
        self.device = model.lm_head.weight.device

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], Tensor | None]:
        """Compute the scheduled tokens; return the sequences now fully computed and their
        last-token logits, one row each."""
        bs = self.pool.block_size
        ids, positions, slots = [], [], []
        query_lens, context_lens, tables, sample_rows, sample_seqs = [], [], [], [], []
        prompt_rows: dict[int, tuple[int, int]] = {}
        row = 0
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows[seq.seq_id] = (row, start)
            row += n
            if start + n == seq.num_tokens:
                sample_rows.append(row - 1)
                sample_seqs.append(seq)
        dev = self.device
        pos = torch.tensor(positions, device=dev)
        batch = PagedBatch(self.pool, pos, torch.tensor(slots, device=dev), query_lens, context_lens, tables,
                           self.model.config.sliding_window)
        hidden = self.model.hidden_states(torch.tensor([ids], device=dev), positions=pos, cache=batch)[0]
        logits = self.model.lm_head(hidden[sample_rows]).float() if sample_rows else None
        for seq, n in scheduled:
            if seq.seq_id in prompt_rows:
                self._prompt_logprobs(seq, hidden, *prompt_rows[seq.seq_id], n)
        return sample_seqs, logits

    def sample_all(self, seqs: list[Sequence], logits: Tensor) -> list[tuple[int, dict[int, float] | None]]:
        """Next tokens for a step's sequences. Plain greedy rows (no penalties, logprobs or
        min_tokens) take one batched argmax; the rest go through the full sampler one by one."""
        plain = [i for i, s in enumerate(seqs) if _plain_greedy(s)]
        results: list = [None] * len(seqs)
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[plain]
            for i, token in zip(plain, rows.argmax(-1).tolist()):
                results[i] = (token, None)
        for i, seq in enumerate(seqs):
            if results[i] is None:
                results[i] = self.sample(seq, logits[i])
        return results

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

    def sample(self, seq: Sequence, logits: Tensor) -> tuple[int, dict[int, float] | None]:
        """The next token for one sequence, under its own parameters and random stream."""
        params = seq.params
        if seq.penalties is None:
            seq.penalties = PenaltyTracker(params, seq.token_ids, logits.shape[-1])
        row = logits[None].cpu()
        if params.min_tokens and len(seq.output_ids) < params.min_tokens and seq.stop_ids:
            row = row.clone()
            row[0, list(seq.stop_ids)] = float("-inf")
        token = int(draw(process_logits(row, params, seq.penalties.seen, seq.penalties.counts), params.greedy,
                         seq.generator)[0])
        lp = None
        if params.logprobs is not None:
            lp = top_logprobs(torch.log_softmax(row[0], dim=-1), token, params.logprobs)
        return token, lp


def _plain_greedy(seq: Sequence) -> bool:
    p = seq.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and not (p.min_tokens and len(seq.output_ids) < p.min_tokens))


def top_logprobs(logprobs: Tensor, token: int, n: int) -> dict[int, float]:
    """The chosen token's log-probability plus the n most likely (OpenAI's `top_logprobs`)."""
    out = {token: float(logprobs[token])}
    if n > 0:
        values, ids = logprobs.topk(n)
        out.update({int(i): float(v) for i, v in zip(ids, values)})
    return out
