"""A request's life in the engine: its tokens, how many have been computed, its blocks.

The scheduler needs no prefill/decode phases: a sequence has `num_computed_tokens` out of
`len(token_ids)`; a step computes some of the rest (a prefill chunk, or the one newest
token when decoding). When everything is computed the model's last logits give the next
token, which is appended, and the sequence is uncomputed by exactly one token again.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.sampling import PenaltyTracker, SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    index: int = 0  # which of the request's n completions this is
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_ids: frozenset[int] = frozenset()  # token ids that end it (EOS and stop_token_ids)
    text: str = ""  # detokenized output so far (stop strings removed)
    generator: torch.Generator | None = None
    decoder: Any = None  # incremental detokenizer, set by the engine when it has a tokenizer
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each new token
    # Speculative decoding: proposed tokens being verified this step, the proposer's
    # distributions (None when its guesses were deterministic), and how far a draft model's
    # own KV cache has caught up with token_ids.
    spec_ids: list[int] = field(default_factory=list)
    spec_probs: Any = None
    draft_computed: int = 0
    draft_cache: Any = None  # a compiled draft's own static cache (DraftProposer), when it has one
    speculate: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        if self.params.seed is not None:
            # Each completion of a seeded request draws from its own stream, whatever the batch.
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)
        self.penalties: PenaltyTracker | None = None  # built by the runner, which knows the vocabulary

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens + len(self.spec_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_ids.append(token)
        if self.penalties is not None:
            self.penalties.add(token)

    def reset_for_recompute(self) -> None:
        """Preempted: blocks are gone; prompt and generated tokens are recomputed later."""
        self.block_table = []
        self.block_hashes = []
        self.num_computed_tokens = 0
        self.draft_computed = 0
        self.draft_cache = None
        self.spec_ids, self.spec_probs = [], None
        self.status = Status.WAITING
