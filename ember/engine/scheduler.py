"""Continuous batching with a token budget (the vLLM v1 rule: no prefill/decode phases).

Each step spends at most `max_num_batched_tokens`: running sequences first (a decode
token, or the next chunk of a long prefill), then waiting ones in arrival order, so
several prefills can share a step with decodes. When the KV pool runs out, the youngest
running sequence is preempted: its blocks are freed and it is recomputed later, so
nothing it generated is lost.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, enable_chunked_prefill: bool = True,
                 lookahead: Callable[[Sequence], int] | None = None) -> None:
        self.bm = block_manager
        # Speculative decoding: how many guessed tokens a decoding sequence may have verified
        # this step; they are given budget and KV slots here, and filled in by the proposer.
        self.lookahead = lookahead
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.bm.free_sequence(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick (sequence, number of tokens to compute) pairs for one model step."""
        if not self.enable_chunked_prefill and self.waiting:
            # Without chunking, prefills go first and alone: whole prompts, decodes paused.
            prefills = self._admit_waiting(self.max_num_batched_tokens, [])
            if prefills:
                return prefills
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        queue, still_running, preempted = list(self.running), [], False
        while queue:
            seq = queue.pop(0)
            n = min(seq.num_uncomputed, budget)
            if n == 1 and self.lookahead is not None and seq.num_uncomputed == 1:
                n = min(1 + self.lookahead(seq), budget)
            if n == 0:  # out of budget this step; it keeps its place
                still_running.append(seq)
                continue
            while not self.bm.can_allocate(seq, n):
                victim = queue.pop() if queue else seq  # the youngest goes first
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.WAITING:  # it preempted itself
                continue
            self.bm.allocate(seq, n)
            scheduled.append((seq, n))
            still_running.append(seq)
            budget -= n
        self.running = still_running
        if not preempted and self.enable_chunked_prefill:
            scheduled = self._admit_waiting(budget, scheduled)
        return scheduled

    def _admit_waiting(self, budget: int, scheduled: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Move waiting sequences into the running set, in arrival order, while budget and blocks last."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0:
                self.bm.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.enable_chunked_prefill and n < seq.num_uncomputed:
                if scheduled:  # the whole prompt waits for the next step
                    self._leave_waiting(seq)
                    break
                n = seq.num_uncomputed  # first in its step: may exceed the budget
            if not self.bm.can_allocate(seq, n):
                self._leave_waiting(seq)
                break
            self.bm.allocate(seq, n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _leave_waiting(self, seq: Sequence) -> None:
        """Not admitted this step after all: give back its prefix hits; it retries next step."""
        self.bm.free_sequence(seq)
        seq.num_computed_tokens = 0

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_sequence(seq)
