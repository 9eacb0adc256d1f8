"""A contiguous, pre-allocated KV cache for the simple generator.

Every sequence in the batch is at the same length (one prompt, or prompts of one length),
so keys and values live in one [B, Hkv, max_len, D] tensor per layer and each step writes
its slice in place: nothing is allocated per token. The engine's paged cache
(`ember.engine`) implements the same `attend` interface over blocks.

A decoding step (one query a sequence) attends through `decode_attention`, which picks the
kernel for that shape; longer queries (a prompt) go through `ember.model.attention` (SDPA).
ALiBi models attend through `alibi_attention` at every step: SDPA with ALiBi's bias as its float
mask (Ember's C++ decode kernels add no bias, so these models never take them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ember import gemv
from ember.config import ModelConfig
from ember.model import alibi_mask, alibi_slopes, attention, causal_mask


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor | None = None) -> Tensor:
    """Attention of one query per sequence, q [B, H, 1, D], over cached keys and values
    [B, Hkv, T, D]; `visible` [T] or [B, T] bool says which positions each sequence sees (None: all).

    On the CPU without autograd, where the shapes suit it, Ember's kernel
    (`ember.gemv.decode_attention`: each KV head read once for its group of query heads, hidden
    positions skipped, the softmax in fp32). Otherwise, bf16 and fp16 queries on the CPU go through
    PyTorch's fp32 kernel, which for one query is both the faster and the more accurate of its two;
    everything else through SDPA."""
    T = keys.shape[2]
    if q.device.type == "cpu" and gemv.decode_attention_applies(q, keys, values, visible):
        return gemv.decode_attention(q, keys, values, visible if visible is not None else _all_visible(T))
    mask = visible.view(-1, 1, 1, T) if visible is not None else None
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return attention(q.float(), keys.float(), values.float(), mask, causal=False).to(q.dtype)
    return attention(q, keys, values, mask, causal=False)


def alibi_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of q [B, H, Tq, D] over keys and values [B, Hkv, Tk, D] under ALiBi's float mask
    (`ember.model.alibi_mask`); computed in the mask's dtype (float32 for bf16/fp16 queries on the
    CPU, where PyTorch's fp32 kernel is both faster and more accurate), returned in q's."""
    if q.dtype != mask.dtype:
        return attention(q.to(mask.dtype), keys.to(mask.dtype), values.to(mask.dtype), mask).to(q.dtype)
    return attention(q, keys, values, mask)


def alibi_mask_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype ALiBi's attention runs in for a cache of `dtype` on `device` (see `alibi_attention`)."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


_ALL_VISIBLE = torch.ones(256, dtype=torch.bool)


def _all_visible(T: int) -> Tensor:
    """A [T] row of True (every cached position visible): a view of one row, grown when needed,
    not a new tensor for every layer of every step."""
    global _ALL_VISIBLE
    if _ALL_VISIBLE.numel() < T:
        _ALL_VISIBLE = torch.ones(max(T, 2 * _ALL_VISIBLE.numel()), dtype=torch.bool)
    return _ALL_VISIBLE[:T]


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already cached
        self.sliding_window = cfg.sliding_window
        # ALiBi's per-head slopes (None: no bias on the scores) and the dtype its attention runs in.
        self.alibi_slopes = alibi_slopes(cfg.num_attention_heads).to(device) if cfg.uses_alibi else None
        self.alibi_dtype = alibi_mask_dtype(device, dtype)
        if torch.device(device).type == "cpu":
            gemv.available()  # build the decode kernel now (once a process), not while a step is compiled

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        return torch.arange(self.length, self.length + num_tokens, device=device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        start, T = self.length, q.shape[2]
        end = start + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} tokens; step needs {end}")
        cached_k, cached_v = self.k[layer], self.v[layer]
        cached_k.narrow(2, start, T).copy_(k)
        cached_v.narrow(2, start, T).copy_(v)
        keys, values = cached_k.narrow(2, 0, end), cached_v.narrow(2, 0, end)
        window = self.sliding_window
        if self.alibi_slopes is not None:
            q_pos, k_pos = torch.arange(start, end, device=q.device), torch.arange(0, end, device=q.device)
            mask = alibi_mask(self.alibi_slopes, q_pos, k_pos, causal_mask(q_pos, k_pos, window), self.alibi_dtype)
            return alibi_attention(q, keys, values, mask)
        if T == 1 and (window is None or end <= window):
            return decode_attention(q, keys, values)  # one new token sees everything cached
        if start == 0 and (window is None or end <= window):
            return attention(q, keys, values, causal=True)
        q_pos = torch.arange(start, end, device=q.device)
        k_pos = torch.arange(0, end, device=q.device)
        mask = causal_mask(q_pos, k_pos, window)  # [T, end]
        if T == 1:
            return decode_attention(q, keys, values, visible=mask[0])
        return attention(q, keys, values, mask=mask)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class StaticKVCache(KVCache):
    """The contiguous cache with static shapes for a compiled one-token decode step.

    The prompt fills it like `KVCache`. Then `decode_at(pos)` switches it to what
    `torch.compile` needs (gpt-fast's way): the position is a tensor, the step writes its key
    and value there and attends over the whole buffer under a mask, so every step has the
    same shapes and one compiled graph serves them all."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, 1, max_len, device, dtype)
        self.slots = torch.arange(max_len, device=device)
        self.pos: Tensor | None = None  # [1]: the decoding position, once decoding

    def next_position(self) -> Tensor:
        """The next decoded token's position as the compiled step takes it (a [1] tensor); the
        token counts as cached from here, since the compiled step cannot count it."""
        self.length += 1
        return torch.tensor([self.length - 1], device=self.slots.device)

    def decode_at(self, pos: Tensor) -> None:
        self.pos = pos

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        return super().positions(num_tokens, device) if self.pos is None else self.pos

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.pos is None:
            return super().attend(layer, q, k, v)
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        visible = self.slots <= self.pos
        if self.sliding_window is not None:
            visible = visible & (self.slots > self.pos - self.sliding_window)
        if self.alibi_slopes is not None:
            return alibi_attention(q, self.k[layer], self.v[layer],
                                   alibi_mask(self.alibi_slopes, self.pos, self.slots, visible, self.alibi_dtype))
        return decode_attention(q, self.k[layer], self.v[layer], visible)

    def advance(self, num_tokens: int) -> None:
        if self.pos is None:
            super().advance(num_tokens)
