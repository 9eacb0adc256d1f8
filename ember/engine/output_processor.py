"""The output processor: from the engine core's new tokens to what a caller sees (vLLM v1's shape).

For each sequence that got tokens in a step it detokenizes them incrementally, applies stop
strings (`ember.detokenizer`, the one implementation; a stop string ends the sequence through
the core's `stop_at`), records a request's timing, and builds one `RequestOutput` per request
that made progress, in the request's `output_kind`:
- "cumulative": every completion so far (the offline API's default);
- "delta": only what is new since the request's previous output: text safe to show (held back
  while it could still grow into a stop string), the token ids and logprobs that made it, and a
  completion's finish reason once, in the output where it finishes;
- "final": one output, when every completion has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ember.detokenizer import Detokenizer
from ember.engine.sequence import Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    """perf_counter() times of a request: added to the engine, its first new token, its end."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0  # of its longest completion (the stop token not counted)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = True
    metrics: RequestMetrics | None = None


@dataclass
class _Completion:
    seq: Sequence
    detokenizer: Detokenizer | None
    tokens_sent: int = 0  # delta mode: output tokens already handed out
    finish_sent: bool = False


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    seqs: list[Sequence]
    metrics: RequestMetrics
    completions: list[_Completion] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Any, stop_at: Callable[[Sequence, int], None]) -> None:
        self.tokenizer = tokenizer
        self.stop_at = stop_at  # the core ends a sequence whose text hit a stop string
        self.requests: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt: str | None, seqs: list[Sequence], arrival_time: float) -> None:
        state = RequestState(request_id, prompt, seqs, RequestMetrics(arrival_time))
        for seq in seqs:
            detok = Detokenizer(self.tokenizer, seq.params.stop) if self.tokenizer is not None else None
            state.completions.append(_Completion(seq, detok))
        self.requests[request_id] = state

    def abort(self, request_id: str) -> list[Sequence]:
        """Forget a request; returns its sequences (for the core to free)."""
        state = self.requests.pop(request_id, None)
        return state.seqs if state is not None else []

    def process(self, updates: list[tuple[Sequence, int]], now: float) -> list[RequestOutput]:
        """Outputs for the requests whose sequences got tokens this step, in the order they progressed."""
        progressed: dict[str, RequestState] = {}
        for seq, added in updates:
            state = self.requests.get(seq.request_id)
            if state is None:
                continue
            if added and state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            self._detokenize(state.completions[seq.index], added)
            progressed[seq.request_id] = state
        outputs = []
        for state in progressed.values():
            finished = all(s.finished for s in state.seqs)
            if finished:
                del self.requests[state.request_id]
                state.metrics.finished_time = now
            out = self._output(state, finished)
            if out is not None:
                outputs.append(out)
        return outputs

    def _detokenize(self, comp: _Completion, added: int) -> None:
        seq, detok = comp.seq, comp.detokenizer
        if detok is None or detok.finished:
            return
        first = len(seq.output_ids) - added
        for i, token in enumerate(seq.output_ids[first:], start=first):
            if token in seq.stop_ids:  # a stop token ends the sequence and is not text
                break
            if detok.push(token):
                self.stop_at(seq, i + 1)  # tokens after the one that completed it are dropped
                return
        if seq.finished:
            detok.finish()

    def _output(self, state: RequestState, finished: bool) -> RequestOutput | None:
        first = state.seqs[0]
        kind = first.params.output_kind
        if kind == "final" and not finished:
            return None
        outs = []
        for comp in state.completions:
            seq, detok = comp.seq, comp.detokenizer
            ids = seq.output_ids
            if seq.finish_reason == "stop" and ids and ids[-1] in seq.stop_ids:
                ids = ids[:-1]  # the stop token itself is not part of the completion
            state.metrics.num_generated_tokens = max(state.metrics.num_generated_tokens, len(ids))
            want_logprobs = seq.params.logprobs is not None
            if kind != "delta":
                outs.append(CompletionOutput(seq.index, detok.text if detok else "", list(ids), seq.finish_reason,
                                             seq.logprobs[:len(ids)] if want_logprobs else None))
                continue
            text = detok.take() if detok else ""
            new_ids: list[int] = []
            # Tokens go out with the text they make (or at once, without a tokenizer).
            if detok is None or text or seq.finished:
                new_ids = list(ids[comp.tokens_sent:])
                lps = seq.logprobs[comp.tokens_sent:len(ids)]
                comp.tokens_sent = len(ids)
            ends_now = seq.finished and not comp.finish_sent
            if not (text or new_ids or ends_now):
                continue
            comp.finish_sent = seq.finished
            outs.append(CompletionOutput(seq.index, text, new_ids, seq.finish_reason if ends_now else None,
                                         lps if want_logprobs and new_ids else [] if want_logprobs else None))
        if kind == "delta" and not outs and not finished:
            return None
        return RequestOutput(state.request_id, state.prompt, first.prompt_ids, outs,
                             prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None
                             else None, finished=finished, metrics=state.metrics)
