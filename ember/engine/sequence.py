"""A request's life in the engine: its tokens, how many have been computed, its blocks.

The scheduler needs no prefill/decode phases: a sequence has `num_computed_tokens` out of
`len(token_ids)`; a step computes some of the rest (a prefill chunk, or the one newest
token when decoding). When everything is computed the model's last logits give the next
token, which is appended, and the sequence is uncomputed by exactly one token again.

A constrained sequence carries its grammar matcher (`ember.structured.GrammarMatcher`), which
takes each appended token. Preemption by recompute keeps the tokens, so the matcher keeps its
place. Speculative guesses are consumed only to work out their masks, then rolled back.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ember.kv_cache import StaticKVCache
from ember.sampling import PenaltyTracker, SamplingParams, TokenMask
from ember.structured import GrammarMatcher, allowed_tokens

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecState:
    """A speculating sequence's guesses and its draft model's progress.

    `draft_ids` are the tokens guessed for this step (verified in the same target step as its
    newest token), `draft_probs` [k, V] the distributions they were drawn from (None: the guesses
    were deterministic). `draft_computed` is how far a draft model's own KV has caught up with
    the sequence's tokens; `draft_cache` a compiled draft's static cache of its own. A constrained
    sequence's draft guesses under its grammar too, so its guesses are ones the target may accept."""

    draft_ids: list[int] = field(default_factory=list)
    draft_probs: Tensor | None = None
    draft_computed: int = 0
    draft_cache: StaticKVCache | None = None
    grammar_guesses: int = 0  # guesses its grammar matcher has consumed while drafting (rolled back after)

    def settle(self, num_computed_tokens: int) -> None:
        """The step's guesses are verified: forget them; the draft's KV past the accepted tokens is stale."""
        self.draft_ids, self.draft_probs = [], None
        self.draft_computed = min(self.draft_computed, num_computed_tokens)

    def reset(self) -> None:
        """Preempted: the draft recomputes everything, like the target."""
        self.draft_ids, self.draft_probs = [], None
        self.draft_computed = 0
        self.draft_cache = None


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
    generator: torch.Generator | None = None  # its own random stream (a seeded request), on the logits' device
    penalties: PenaltyTracker | None = None  # set by the engine when the request has penalties
    spec: SpecState | None = None  # set when this sequence speculates
    grammar: GrammarMatcher | None = None  # set when its output is constrained (params.structured)
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each new token
    lora_id: int = 0  # the LoRA adapter it runs with (`LoadedAdapter.id`); 0: the base alone

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def draft_ids(self) -> list[int]:
        """Guessed tokens being verified this step (none when not speculating)."""
        return self.spec.draft_ids if self.spec is not None else []

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens + len(self.draft_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def banned_ids(self) -> frozenset[int]:
        """Tokens it may not draw now: its stop ids until it has min_tokens."""
        if self.params.min_tokens and len(self.output_ids) < self.params.min_tokens:
            return self.stop_ids
        return frozenset()

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_ids.append(token)
        if self.penalties is not None:
            self.penalties.add(token)
        if self.grammar is not None and token not in self.stop_ids:  # a stop token ends it, outside the grammar
            self.grammar.advance(token)

    @property
    def grammar_finished(self) -> bool:
        """Its grammar can take no more tokens: the completion is whole (or the matcher broke)."""
        return self.grammar is not None and self.grammar.is_finished

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past the first `num_output_tokens` (verified after a stop string).
        Only for a sequence that is finishing: its penalties and grammar are not rolled back."""
        drop = len(self.output_ids) - num_output_tokens
        if drop > 0:
            del self.output_ids[num_output_tokens:], self.token_ids[-drop:]
            del self.logprobs[num_output_tokens:], self.token_times[num_output_tokens:]

    def reset_for_recompute(self) -> None:
        """Preempted: blocks are gone; prompt and generated tokens are recomputed later."""
        self.block_table = []
        self.block_hashes = []
        self.num_computed_tokens = 0
        if self.spec is not None:
            self.spec.reset()
        self.status = Status.WAITING


def grammar_mask(seqs: list[Sequence], vocab_size: int, speculating: bool = False) -> TokenMask | None:
    """The sampler's grammar mask for a batch of these sequences' rows (one row each, or with
    `speculating` len(draft_ids) + 1 rows each, one per position verified); None when none is
    constrained."""
    constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not constrained:
        return None
    counts = [len(s.draft_ids) + 1 if speculating else 1 for s in seqs]
    firsts = list(itertools.accumulate(counts, initial=0))
    rows = [r for i in constrained for r in range(firsts[i], firsts[i] + counts[i])]
    allowed = allowed_tokens([seqs[i].grammar for i in constrained], [seqs[i].stop_ids for i in constrained],
                             vocab_size, [seqs[i].draft_ids for i in constrained] if speculating else None)
    return TokenMask(allowed, None if len(rows) == firsts[-1] else torch.tensor(rows))
