"""The engine core: schedule → run the model → sample → token ids (vLLM v1's EngineCore).

Each `step()` asks the scheduler for a token budget's worth of work, fills the lookahead
slots of speculating sequences with guesses, runs one forward over the flat batch, and
chooses the next tokens of every sequence whose tokens are all computed: plain rows in one
`ember.sampling.sample` call, speculating ones in one `verify` call over the same processed
distributions. It appends the tokens, ends sequences on a stop token or a length limit, and
reports (sequence, number of new tokens); text, stop strings and outputs are the output
processor's (`ember.engine.output_processor`).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from torch import Tensor

from ember.engine.block_manager import BlockManager
from ember.engine.model_runner import ModelRunner
from ember.engine.paged_cache import KVPool
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Sequence, grammar_mask
from ember.engine.speculative import DraftProposer, NgramProposer, verify
from ember.errors import EmberError
from ember.model import CausalLM
from ember.sampling import SamplingRows, sample

Proposer = NgramProposer | DraftProposer


class EngineCore:
    def __init__(self, model: CausalLM, pool: KVPool, block_manager: BlockManager, max_model_len: int,
                 max_num_batched_tokens: int, max_num_seqs: int, enable_chunked_prefill: bool,
                 proposer: Proposer | None = None, num_speculative_tokens: int = 0) -> None:
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.runner = ModelRunner(model, pool)
        self.device = pool.kv[0].device
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        self.scheduler = Scheduler(block_manager, max_num_batched_tokens, max_num_seqs, enable_chunked_prefill,
                                   lookahead=self._lookahead if proposer is not None else None)
        # n > 1: the siblings of a request wait until the first has computed the prompt, then
        # start from its blocks through the prefix cache (only the partial last block is redone).
        self._forks: dict[int, tuple[Sequence, list[Sequence]]] = {}
        self._rows_key: tuple | None = None  # the batch `_rows` was built for (see _plain_rows)
        self._rows: SamplingRows | None = None
        self.stats: dict[str, Any] = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0,
                                      "spec_proposed_tokens": 0, "spec_accepted_tokens": 0, "spec_verify_steps": 0}

    # --- requests ------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence], fork: bool) -> None:
        """Queue a request's sequences; with `fork`, the siblings wait for the first one's prompt."""
        for seq in seqs[:1] if fork else seqs:
            self.scheduler.add(seq)
        if fork and len(seqs) > 1:
            self._forks[seqs[0].seq_id] = (seqs[0], seqs[1:])
        self.stats["prompt_tokens"] += sum(s.num_prompt_tokens for s in seqs)

    def finish(self, seq: Sequence, reason: str) -> None:
        if not seq.finished:
            self.scheduler.finish(seq, reason)

    def stop_at(self, seq: Sequence, num_output_tokens: int) -> None:
        """A stop string ended `seq` after its first `num_output_tokens` output tokens."""
        self.stats["generated_tokens"] -= len(seq.output_ids) - num_output_tokens
        seq.truncate_output(num_output_tokens)
        if seq.finished:
            seq.finish_reason = "stop"  # the stop string came with its last token
        else:
            self.scheduler.finish(seq, "stop")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, int]]:
        """One forward pass; returns each sequence that got tokens, with how many it got."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.waiting:
                raise EmberError("The KV pool cannot hold the next request; raise num_kv_blocks.")
            return []
        if self.proposer is not None:
            scheduled = self._propose(scheduled)
        ready, logits, counts = self.runner.run(scheduled)
        self.stats["steps"] += 1
        ready_ids = {seq.seq_id for seq in ready}
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if seq.seq_id not in ready_ids:  # a prefill chunk: its full blocks can be shared now
                self.block_manager.commit(seq)
        updates = []
        now = time.perf_counter()
        for seq, (tokens, lps) in zip(ready, self._sample(ready, logits, counts) if ready else []):
            if seq.draft_ids:
                self._settle_speculation(seq, accepted=len(tokens) - 1)
            reason, added = None, 0
            for token, lp in zip(tokens, lps):
                seq.append(token)
                seq.token_times.append(now)
                if lp is not None:
                    seq.logprobs.append(lp)
                added += 1
                reason = self._stop_reason(seq, token)
                if reason:  # tokens verified after a stop are dropped
                    break
            self.stats["generated_tokens"] += added
            seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            self.block_manager.commit(seq)
            if reason:
                self.scheduler.finish(seq, reason)
            updates.append((seq, added))
        if self._forks:
            self._release_forks()
        return updates

    def _plain_rows(self, seqs: list[Sequence], device: Any) -> SamplingRows:
        """The sampler's rows for these sequences, rebuilt only when the batch changes: a sequence's
        parameters, generator and penalty tracker (updated in place) are fixed for its life, and its
        banned ids change once, when it reaches min_tokens."""
        key = (tuple(s.seq_id for s in seqs), tuple(bool(s.banned_ids) for s in seqs), str(device))
        if self._rows_key != key:
            self._rows_key = key
            self._rows = SamplingRows([s.params for s in seqs], [s.generator for s in seqs],
                                      [s.penalties for s in seqs], banned=[sorted(s.banned_ids) for s in seqs],
                                      device=device)
        return self._rows

    def _sample(self, ready: list[Sequence], logits: Tensor, counts: list[int]) -> list[tuple[list[int], list]]:
        """New tokens (and logprobs, or None) for each ready sequence: the plain ones from one
        sampler call, the speculating ones from one verification over their k + 1 rows each."""
        starts = list(itertools.accumulate(counts, initial=0))[:-1]  # each sequence's first row
        plain = [i for i, s in enumerate(ready) if not s.draft_ids]
        guessing = [i for i, s in enumerate(ready) if s.draft_ids]
        results: list[tuple[list[int], list]] = [([], [])] * len(ready)
        if plain:
            seqs = [ready[i] for i in plain]
            rows = self._plain_rows(seqs, logits.device)
            out = sample(logits if not guessing else logits[[starts[i] for i in plain]], rows,
                         mask=grammar_mask(seqs, logits.shape[-1]))
            tokens = out.token_ids.tolist()
            for j, i in enumerate(plain):
                results[i] = ([tokens[j]], [out.logprobs[j] if out.logprobs is not None else None])
        if guessing:
            seqs = [ready[i] for i in guessing]
            picks = [r for i in guessing for r in range(starts[i], starts[i] + counts[i])]
            rows = SamplingRows([s.params for s in seqs for _ in range(len(s.draft_ids) + 1)],
                                [s.generator for s in seqs for _ in range(len(s.draft_ids) + 1)], device=logits.device)
            accepted = verify(logits[picks], rows, [s.draft_ids for s in seqs], [s.spec.draft_probs for s in seqs],
                              mask=grammar_mask(seqs, logits.shape[-1], speculating=True))
            for i, tokens in zip(guessing, accepted):
                results[i] = (tokens, [None] * len(tokens))
        return results

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_ids:  # never before min_tokens: the sampler bans them until then
            return "stop"
        if seq.grammar_finished:  # the constrained completion is whole
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _release_forks(self) -> None:
        """Queue the siblings of sequences whose prompt is now computed (and cached), first in line."""
        for parent_id, (parent, siblings) in list(self._forks.items()):
            if parent.num_computed_tokens >= parent.num_prompt_tokens or parent.finished:
                del self._forks[parent_id]
                self.scheduler.waiting.extendleft(reversed([s for s in siblings if not s.finished]))

    # --- speculation ---------------------------------------------------------------------------
    def _lookahead(self, seq: Sequence) -> int:
        """Guessed tokens worth verifying for this sequence: within its budget of new tokens and the context."""
        if seq.spec is None:
            return 0
        room = min(seq.params.max_tokens - len(seq.output_ids), self.max_model_len - seq.num_tokens + 1) - 1
        return max(0, min(self.num_speculative_tokens, room))

    def _propose(self, scheduled: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Fill the lookahead slots the scheduler gave decoding sequences with guessed tokens."""
        wanted = [(seq, n - seq.num_uncomputed) for seq, n in scheduled if n > seq.num_uncomputed]
        if not wanted:
            return scheduled
        if isinstance(self.proposer, NgramProposer):
            for seq, k in wanted:
                seq.spec.draft_ids = self.proposer.propose(seq.token_ids, k)
        else:
            drafts, dists = self.proposer.propose([seq for seq, _ in wanted], [k for _, k in wanted])
            for (seq, _), draft, dist in zip(wanted, drafts, dists):
                seq.spec.draft_ids, seq.spec.draft_probs = draft, dist
        for seq, _ in wanted:
            self.stats["spec_proposed_tokens"] += len(seq.draft_ids)
            self.stats["spec_verify_steps"] += bool(seq.draft_ids)
        # Each sequence computes its newest token plus its guesses (fewer than its slots if the
        # proposer found less); unused slots stay allocated for the tokens still to come.
        return [(seq, seq.num_uncomputed if n > seq.num_uncomputed else n) for seq, n in scheduled]

    def _settle_speculation(self, seq: Sequence, accepted: int) -> None:
        """Forget the KV of rejected guesses: they are simply overwritten later."""
        seq.num_computed_tokens -= len(seq.draft_ids) - accepted
        seq.spec.settle(seq.num_computed_tokens)
        self.stats["spec_accepted_tokens"] += accepted
