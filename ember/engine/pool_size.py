"""How many KV blocks the engine allocates, and the longest sequence it accepts by default.

The rule (stated in `LLM`'s docstring and `ember serve --help`):

- `max_model_len` defaults to the model's context length (a GGUF file's `context_length`). Where
  one sequence that long would need more than half the memory available for the pool (free RAM
  on a CPU, free GPU memory on a GPU), the default is cut to what that half holds, but not below
  `MIN_FITTED_CONTEXT` tokens (llama.cpp fits its context to free memory the same way). An
  explicit `max_model_len` is never cut.
- The pool holds `max_num_seqs` sequences of `max_model_len` tokens (more is never used),
  capped by the memory budget: `kv_cache_memory` when given, else `DEFAULT_CPU_KV_CACHE_MEMORY`
  on a CPU, where the pool shares RAM with everything else, and `GPU_MEMORY_UTILIZATION` of the
  free memory on a GPU (vLLM's `gpu_memory_utilization`).
- It is never smaller than one full-length sequence, whatever the budget: every request the
  engine accepts must fit the pool on its own. The summary says when this floor overrode a budget.
- `num_kv_blocks` sets the pool directly; a request that then cannot fit is refused when added.

Bytes a token: 2 (keys and values) x layers x KV heads x head size x the cache dtype's size. With
paged attention, any sequence may use any free block, so a pool of one full-length sequence still
serves many short requests at once (llama.cpp's `-c` is likewise one context that its `-np`
slots share).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ember.config import ModelConfig
from ember.errors import EmberError

DEFAULT_CPU_KV_CACHE_MEMORY = 256 << 20  # bytes; a larger pool is asked for with kv_cache_memory
GPU_MEMORY_UTILIZATION = 0.9  # of the free GPU memory when the pool is sized
FIT_FRACTION = 0.5  # of the available memory one default-length sequence may take
MIN_FITTED_CONTEXT = 4096  # tokens: fitting the default context to memory never goes below this


@dataclass(frozen=True)
class PoolSize:
    num_blocks: int
    block_size: int
    bytes_per_token: int
    max_model_len: int
    why: str  # which part of the rule decided the size

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    def describe(self) -> str:
        """One line for a server's log, e.g. 'KV pool: 360 MiB = 1 sequence of 8192 tokens (8192 tokens; ...)'."""
        full = self.tokens // self.max_model_len
        return (f"KV pool: {self.bytes / (1 << 20):.0f} MiB = {full} sequence{'s' if full != 1 else ''} of "
                f"{self.max_model_len} tokens ({self.tokens} tokens in {self.num_blocks} blocks of "
                f"{self.block_size}; {self.why})")


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes one token takes: keys and values of every layer's KV heads."""
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def available_memory(device: torch.device) -> int:
    """Bytes the pool could take now: free GPU memory, or the RAM the OS reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable caches, unlike free pages
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_model_len(context: int, per_token: int, available: int) -> int:
    """The model's context, cut to what FIT_FRACTION of `available` holds (not below MIN_FITTED_CONTEXT)."""
    fits = int(available * FIT_FRACTION) // per_token
    return context if fits >= context else max(min(context, MIN_FITTED_CONTEXT), fits)


def size_pool(per_token: int, block_size: int, max_model_len: int, max_num_seqs: int,
              kv_cache_memory: int | None, num_kv_blocks: int | None, device: torch.device) -> PoolSize:
    """The pool for these settings, by the rule in the module docstring."""
    if block_size < 1:
        raise EmberError("block_size must be at least 1.")
    if max_num_seqs < 1:
        raise EmberError("max_num_seqs must be at least 1.")
    if num_kv_blocks is not None:
        if num_kv_blocks < 1:
            raise EmberError("num_kv_blocks must be at least 1.")
        return PoolSize(num_kv_blocks, block_size, per_token, max_model_len, "set by num_kv_blocks")
    per_block = per_token * block_size
    one_sequence = -(-max_model_len // block_size)
    wanted = max_num_seqs * one_sequence
    if kv_cache_memory is not None:
        if kv_cache_memory < 1:
            raise EmberError("kv_cache_memory must be a positive size, e.g. 512MB.")
        budget, source = kv_cache_memory, "kv_cache_memory"
    elif device.type == "cuda":
        budget, source = int(available_memory(device) * GPU_MEMORY_UTILIZATION), \
            f"{GPU_MEMORY_UTILIZATION:.0%} of free GPU memory"
    else:
        budget, source = DEFAULT_CPU_KV_CACHE_MEMORY, "the CPU default budget"
    within = budget // per_block
    if wanted <= within:
        return PoolSize(wanted, block_size, per_token, max_model_len, f"max_num_seqs={max_num_seqs} at full length")
    if within >= one_sequence:
        return PoolSize(int(within), block_size, per_token, max_model_len,
                        f"capped by {source}, {budget / (1 << 20):.0f} MiB")
    return PoolSize(one_sequence, block_size, per_token, max_model_len,
                    f"one full-length sequence, more than {source} ({budget / (1 << 20):.0f} MiB) allows; "
                    "lower max_model_len to stay within it")
