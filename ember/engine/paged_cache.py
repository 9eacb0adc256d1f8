"""The paged KV pool and the attention backend that reads and writes it.

The pool holds, per layer, `num_blocks x block_size` token slots of keys and values. A
step's flat batch (every scheduled token of every sequence, concatenated) writes its
keys and values to their slots, then each sequence's queries attend over its own slots,
gathered through its block table. All sequences go through one fused SDPA call, padded
to the longest, with a mask that is causal within each sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ember.config import ModelConfig
from ember.model import attention


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class PagedBatch:
    """One step's attention metadata; passed to the model as its cache backend."""

    def __init__(self, pool: KVPool, positions: Tensor, slot_mapping: Tensor, query_lens: list[int],
                 context_lens: list[int], block_tables: list[list[int]], sliding_window: int | None) -> None:
        self.pool = pool
        self._positions = positions
        self.slot_mapping = slot_mapping
        device = positions.device
        B, bs = len(query_lens), pool.block_size
        max_q, max_ctx = max(query_lens), max(context_lens)
        # Slots of every context token of every sequence, padded (padding reads slot 0, masked out).
        ctx_pos = torch.arange(max_ctx)
        gather = torch.zeros(B, max_ctx, dtype=torch.long)
        q_index = torch.zeros(B, max_q, dtype=torch.long)
        q_valid = torch.zeros(B, max_q, dtype=torch.bool)
        q_pos = torch.zeros(B, max_q, dtype=torch.long)
        start = 0
        for b, (ql, cl, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            blocks = torch.tensor(table, dtype=torch.long)
            p = ctx_pos[:cl]
            gather[b, :cl] = blocks[p // bs] * bs + p % bs
            q_index[b, :ql] = torch.arange(start, start + ql)
            q_valid[b, :ql] = True
            q_pos[b, :ql] = torch.arange(cl - ql, cl)
            start += ql
        k_pos = ctx_pos[None, None, :]
        diff = q_pos[:, :, None] - k_pos
        mask = (diff >= 0) & (k_pos < torch.tensor(context_lens)[:, None, None])
        if sliding_window is not None:
            mask &= diff < sliding_window
        mask[:, :, 0] |= ~q_valid  # padded query rows see one key, so softmax stays finite
        self.gather = gather.to(device)
        self.q_index = q_index.to(device)
        self.q_valid = q_valid.to(device)
        self.mask = mask[:, None].to(device)  # [B, 1, max_q, max_ctx]

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        return self._positions

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [1, H, N, D]; k, v [1, Hkv, N, D] for the N scheduled tokens.
        k_pool, v_pool = self.pool.k[layer], self.pool.v[layer]
        k_pool[self.slot_mapping] = k[0].transpose(0, 1)
        v_pool[self.slot_mapping] = v[0].transpose(0, 1)
        keys = k_pool[self.gather].permute(0, 2, 1, 3)  # [B, Hkv, max_ctx, D]
        values = v_pool[self.gather].permute(0, 2, 1, 3)
        queries = q[0][:, self.q_index].permute(1, 0, 2, 3)  # [B, H, max_q, D]
        out = attention(queries, keys, values, mask=self.mask)  # [B, H, max_q, D]
        out = out.permute(1, 0, 2, 3)[:, self.q_valid]  # [H, N, D], in input order
        return out[None]

    def advance(self, num_tokens: int) -> None:
        pass  # the scheduler tracks what has been computed
