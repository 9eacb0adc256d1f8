"""The paged KV pool and the attention backend that reads and writes it.

The pool holds, per layer, `num_blocks x block_size` token slots of keys and values. A
step's flat batch (every scheduled token of every sequence, concatenated) writes its
keys and values to their slots, then each sequence's queries attend over its own slots,
gathered through its block table. All sequences go through one fused SDPA call, padded
to the longest, with a mask that is causal within each sequence. Decoding sequences (one
query each) on the CPU instead go through `ember.gemv.paged_decode_attention`, which reads each
position's keys and values where its slot lies, with no gathered copy, wherever it serves the
shapes (no autograd, up to 8 query heads a KV head, head size a multiple of 8 up to 256); where
it does not, their gathered keys and values go through `ember.kv_cache.decode_attention`.
ALiBi models take neither decode kernel: every group attends through SDPA under ALiBi's float
mask (`ember.kv_cache.alibi_attention`), made once a step for all layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ember import gemv
from ember.config import ModelConfig
from ember.kv_cache import alibi_attention, alibi_mask_dtype, decode_attention
from ember.model import alibi_mask, alibi_slopes, attention


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        # Keys and values of a slot side by side, [slots, 2 * Hkv, D]: one gather fetches both.
        shape = (num_blocks * block_size, 2 * cfg.num_key_value_heads, cfg.head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.num_kv_heads = cfg.num_key_value_heads
        self.num_blocks, self.block_size = num_blocks, block_size
        # ALiBi's per-head slopes (None: no bias on the scores), and the dtype its attention runs in
        self.alibi_slopes = alibi_slopes(cfg.num_attention_heads) if cfg.uses_alibi else None
        self.alibi_dtype = alibi_mask_dtype(device, dtype)
        if torch.device(device).type == "cpu":
            gemv.available()  # build the decode kernel now (once a process), not inside a step

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class _Group:
    """Sequences attended in one SDPA call: all decodes together, each prefill chunk alone
    (padding a decode to a prefill chunk's length would multiply its attention work)."""

    def __init__(self, members: list[tuple[int, int, int, list[int]]], block_size: int,
                 sliding_window: int | None, device: torch.device, alibi: tuple[Tensor, torch.dtype] | None = None) -> None:
        # members: (first row in the flat batch, query length, context length, block table)
        B = len(members)
        rows, q_lens, ctx_lens = (torch.tensor([m[i] for m in members]) for i in range(3))
        max_q, max_ctx = int(q_lens.max()), int(ctx_lens.max())
        ctx_pos, q_off = torch.arange(max_ctx), torch.arange(max_q)
        # Block tables padded with block 0: slots past a sequence's context are read but masked.
        width = -(-max_ctx // block_size)
        tables = torch.tensor([m[3][:width] + [0] * (width - len(m[3][:width])) for m in members])
        gather = tables[:, ctx_pos // block_size] * block_size + ctx_pos % block_size  # [B, max_ctx]
        q_valid = q_off[None, :] < q_lens[:, None]  # [B, max_q]
        q_index = torch.where(q_valid, rows[:, None] + q_off, 0)
        q_pos = (ctx_lens - q_lens)[:, None] + q_off  # absolute position of each query
        self.rows = q_index[q_valid].to(device)  # flat-batch rows, in output order
        self.shape = (B, max_ctx)
        self.decode = max_q == 1
        self.q_index, self.q_valid = q_index.to(device), q_valid.to(device)
        self.gather = gather.view(-1).to(device)
        self.slots = self.gather.view(B, max_ctx)
        self.mask = None
        self.causal = False
        fresh_prompt = B == 1 and members[0][1] == members[0][2]  # a whole prompt: plain causal attention
        if fresh_prompt and (sliding_window is None or max_ctx <= sliding_window):
            self.causal = True
        elif not (max_q == 1 and bool((ctx_lens == max_ctx).all()) and
                  (sliding_window is None or max_ctx <= sliding_window)):
            k_pos = ctx_pos[None, None, :]
            diff = q_pos[:, :, None] - k_pos
            mask = (diff >= 0) & (k_pos < ctx_lens[:, None, None])
            if sliding_window is not None:
                mask &= diff < sliding_window
            mask[:, :, 0] |= ~q_valid  # padded query rows see one key, so softmax stays finite
            self.mask = mask[:, None].to(device)  # [B, 1, max_q, max_ctx]
        # ALiBi (slopes and dtype given): the whole float mask, bias and visibility, for every layer.
        self.alibi = None
        if alibi is not None:
            k_pos = ctx_pos[None, None, :]
            diff = q_pos[:, :, None] - k_pos
            visible = (diff >= 0) & (k_pos < ctx_lens[:, None, None])
            if sliding_window is not None:
                visible &= diff < sliding_window
            visible[:, :, 0] |= ~q_valid  # as above: padded query rows see one key
            self.alibi = alibi_mask(alibi[0], q_pos, ctx_pos, visible[:, None], alibi[1]).to(device)
        # For the paged decode kernel: which of the positions each sequence sees.
        self.visible = None
        if self.decode:
            self.visible = (self.mask.view(B, max_ctx) if self.mask is not None
                            else torch.ones(max_ctx, dtype=torch.bool, device=device))


# What one more decode group costs (its gather, SDPA call and row indexing in every layer),
# in gathered key slots: a split pays off when it saves more padding than this. Chosen on the
# engine benchmark (benchmarks/engine_throughput.py): much smaller costs split so often that the
# extra calls cost more than the padding they save.
GROUP_COST_SLOTS = 1024


def split_by_length(decodes: list[tuple[int, int, int, list[int]]]) -> list[list[tuple[int, int, int, list[int]]]]:
    """Split decoding sequences into groups of similar context length.

    A group is padded to its longest context, so one group of a 30-token and a 400-token
    sequence gathers and attends over 800 slots for 430 real ones. Sorting by length and
    cutting where it saves the most (an exact dynamic program over the sorted order, each
    group charged GROUP_COST_SLOTS) keeps the padding small without many small calls."""
    if len(decodes) < 2:
        return [decodes] if decodes else []
    order = sorted(decodes, key=lambda m: m[2])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = order[j - 1][2]  # sorted, so the last member of a group is its longest
        for i in range(j):
            cost = best[i] + (j - i) * longest + GROUP_COST_SLOTS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    if len(groups) == 1:
        return [decodes]  # one group: keep batch order, so the decode fast path applies
    return groups[::-1]


class PagedBatch:
    """One step's attention metadata; passed to the model as its cache backend."""

    def __init__(self, pool: KVPool, positions: Tensor, slot_mapping: Tensor, query_lens: list[int],
                 context_lens: list[int], block_tables: list[list[int]], sliding_window: int | None) -> None:
        self.pool = pool
        self._positions = positions
        self.slot_mapping = slot_mapping
        members, row = [], 0
        for ql, cl, table in zip(query_lens, context_lens, block_tables):
            members.append((row, ql, cl, table))
            row += ql
        device = positions.device
        decodes = [m for m in members if m[1] == 1]
        alibi = (pool.alibi_slopes, pool.alibi_dtype) if pool.alibi_slopes is not None else None
        self.groups = [_Group(g, pool.block_size, sliding_window, device, alibi) for g in split_by_length(decodes)]
        self.groups += [_Group([m], pool.block_size, sliding_window, device, alibi) for m in members if m[1] > 1]
        self.num_tokens = row
        # one group whose rows are the batch in order (all decodes, or one prefill): no scatter needed
        self.single_ordered = len(self.groups) == 1 and (len(members) == 1 or all(m[1] == 1 for m in members))

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        return self._positions

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [1, H, N, D]; k, v [1, Hkv, N, D] for the N scheduled tokens.
        pool, hkv = self.pool.kv[layer], self.pool.num_kv_heads
        pool.index_copy_(0, self.slot_mapping, torch.cat((k[0], v[0]), dim=0).transpose(0, 1))
        out = None if self.single_ordered else torch.empty_like(q[0])  # [H, N, D]
        for g in self.groups:
            if g.alibi is not None:  # ALiBi: SDPA under its float mask, prefill and decode alike
                kv = pool.index_select(0, g.gather).view(*g.shape, 2 * hkv, -1).transpose(1, 2)
                queries = q[0][:, g.q_index].transpose(0, 1)  # [B, H, max_q, D]
                o = alibi_attention(queries, kv[:, :hkv], kv[:, hkv:], g.alibi).transpose(0, 1)[:, g.q_valid]
            elif g.decode:  # one query a sequence: pick the rows directly (in batch order: take them all)
                rows = q[0] if self.single_ordered else q[0][:, g.rows]
                queries = rows.transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
                if gemv.paged_decode_attention_applies(queries, pool):  # keys and values read in place
                    o = gemv.paged_decode_attention(queries, pool, g.slots, g.visible)
                else:
                    kv = pool.index_select(0, g.gather).view(*g.shape, 2 * hkv, -1).transpose(1, 2)
                    o = decode_attention(queries, kv[:, :hkv], kv[:, hkv:], g.visible)
                o = o.squeeze(2).transpose(0, 1)  # [H, B, D]
            else:
                kv = pool.index_select(0, g.gather).view(*g.shape, 2 * hkv, -1).transpose(1, 2)  # [B, 2Hkv, ctx, D]
                queries = q[0][:, g.q_index].transpose(0, 1)  # [B, H, max_q, D]
                o = attention(queries, kv[:, :hkv], kv[:, hkv:], mask=g.mask, causal=g.causal)
                o = o.transpose(0, 1)[:, g.q_valid]  # [H, rows, D]
            if out is None:
                return o[None]
            out[:, g.rows] = o
        return out[None]

    def advance(self, num_tokens: int) -> None:
        pass  # the scheduler tracks what has been computed
