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
from ember.packed_linear import packed_linears
from ember.sampling import PenaltyTracker, draw, process_logits


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, pack_weights: bool = False) -> None:
        self.model, self.pool = model, pool
        self.pack_weights = pack_weights  # oneDNN-packed fp32 weights on the CPU (ember/packed_linear.py)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], Tensor | None, list[int]]:
        """Compute the scheduled tokens. Returns the sequences now fully computed, their logits
        (one row per position to sample: 1, or 1 + k with k speculative tokens) and the row counts."""
        items, sample_rows, sample_seqs, counts = [], [], [], []
        prompt_rows: dict[int, tuple[int, int]] = {}
        row = 0
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            tokens = seq.token_ids + seq.spec_ids if seq.spec_ids else seq.token_ids
            items.append((tokens[start:start + n], start, seq.block_table))
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows[seq.seq_id] = (row, start)
            row += n
            if start + n == len(tokens):
                k = len(seq.spec_ids)
                sample_rows.extend(range(row - 1 - k, row))
                sample_seqs.append(seq)
                counts.append(k + 1)
        with packed_linears(self.model, self.pack_weights):
            hidden = hidden_states(self.model, self.pool, items)
            logits = self.model.lm_head(hidden[sample_rows]).float() if sample_rows else None
            for seq, n in scheduled:
                if seq.seq_id in prompt_rows:
                    self._prompt_logprobs(seq, hidden, *prompt_rows[seq.seq_id], n)
        return sample_seqs, logits, counts

    def sample_all(self, seqs: list[Sequence], logits: Tensor, counts: list[int]) -> list[tuple[list[int], list]]:
        """New tokens for each of a step's ready sequences, with their logprobs (or None).

        Plain greedy rows (no penalties, logprobs or min_tokens) share one batched argmax;
        speculative rows are verified against their draft; the rest go through the full
        sampler one by one."""
        from ember.engine.speculative import verify

        best = logits.argmax(-1).tolist() if any(_plain_greedy(s) for s in seqs) else None
        results, row = [], 0
        for seq, count in zip(seqs, counts):
            if seq.spec_ids:
                tokens = verify(logits[row:row + count], seq.spec_ids, seq.params, seq.generator, seq.spec_probs)
                results.append((tokens, [None] * len(tokens)))
            elif best is not None and _plain_greedy(seq):
                results.append(([best[row]], [None]))
            else:
                token, lp = self.sample(seq, logits[row])
                results.append(([token], [lp]))
            row += count
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


def forward_tokens(model: CausalLM, pool: KVPool, items: list[tuple[list[int], int, list[int]]],
                   pack_weights: bool = False) -> Tensor:
    """Logits of each item's last token, [len(items), V] (float32)."""
    with packed_linears(model, pack_weights):
        hidden = hidden_states(model, pool, items)
        last = torch.tensor([len(t) for t, _, _ in items]).cumsum(0) - 1
        return model.lm_head(hidden[last.to(hidden.device)]).float()


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
