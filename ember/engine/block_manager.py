"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, and the prefix cache.

The KV pool is `num_blocks` blocks of `block_size` token slots. A sequence owns a block
table (its logical blocks -> physical block ids). A full block is named by a hash chained
over every token up to its end (seeded with the sequence's LoRA adapter, if any), so two
requests that share a prefix, under the same adapter, share its blocks
(reference counted). A block whose last user finishes keeps its contents and its hash in
an LRU list: it is evicted only when no free block is left. Invariant, checked by
`check()`: free + cached + used == total.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from ember.engine.sequence import Sequence


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


def chain_seed(seq: Sequence) -> int | None:
    """What a sequence's first block hash chains from: its LoRA adapter, so that blocks computed
    under different adapters (or none) never share a hash, nor their KV."""
    return hash(("lora", seq.lora_id)) if seq.lora_id else None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # empty, or contents not worth keeping
        self.cached: OrderedDict[int, None] = OrderedDict()  # unused but reusable, oldest first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # ... and found

    # --- accounting ----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free  # `check()` verifies this against the reference counts

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def check(self) -> None:
        """The allocator invariant: every block is exactly one of free, cached or used."""
        used = sum(1 for r in self.ref_count if r > 0)
        assert len(self.free) + len(self.cached) + used == self.num_blocks, "blocks leaked"
        assert all(self.ref_count[b] == 0 for b in self.free), "a free block is referenced"
        assert all(self.ref_count[b] == 0 for b in self.cached), "a cached block is referenced"
        assert not set(self.free) & set(self.cached), "a block is both free and cached"

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free

    # --- allocation ----------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            return self.free.popleft()
        block, _ = self.cached.popitem(last=False)  # evict the least recently used
        del self.hash_to_block[self.block_hash[block]]
        self.block_hash[block] = self.block_tokens[block] = None
        return block

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            self.cached.pop(block, None)
        self.ref_count[block] += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its longest cached prefix; return its tokens.

        The last prompt token is never taken from the cache: its logits are needed. A request
        that wants prompt logprobs takes no cached blocks (as in vLLM): every prompt token's
        logits are needed; it still publishes its own blocks for others.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return 0
        bs, prev = self.block_size, chain_seed(seq)
        eligible = (seq.num_tokens - 1) // bs
        self.prefix_queries += eligible
        for i in range(eligible):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(prev, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            self.prefix_hits += 1
            self._ref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block = self._take()
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks the last step filled, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else chain_seed(seq), tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block], self.block_tokens[block] = h, tokens

    def free_sequence(self, seq: Sequence) -> None:
        """Drop a sequence's references; hashed blocks stay reusable until evicted."""
        for block in reversed(seq.block_table):  # tail first: it is evicted before the shared head
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is not None:
                    self.cached[block] = None
                else:
                    self.free.append(block)
        seq.block_table = []
        seq.block_hashes = []
