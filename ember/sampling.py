"""The sampler: from next-token logits to a token, with OpenAI/vLLM parameter semantics.

Every transform is a pure function over a [B, V] logits tensor, so the simple generator
and the batched engine share them and a test can call each with three numbers. Order:
penalties, temperature, top-k, top-p, min-p, then a draw (or argmax when temperature is 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ember.errors import EmberError


@dataclass
class SamplingParams:
    """Per-request decoding parameters (names and meaning as in OpenAI's API and vLLM)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtract once for every token already generated
    frequency_penalty: float = 0.0  # subtract per occurrence in the generated text
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= -1, "top_k must be -1, 0 (off) or a positive integer"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (self.n >= 1, "n must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise EmberError(f"Invalid sampling parameter: {message}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _col(x: float | Tensor, logits: Tensor) -> Tensor:
    """A per-row parameter as a [B, 1] column (scalars broadcast to every row)."""
    if isinstance(x, Tensor):
        return x.to(logits.device, logits.dtype).view(-1, 1)
    return torch.full((logits.shape[0], 1), float(x), device=logits.device, dtype=logits.dtype)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float | Tensor) -> Tensor:
    """CTRL-style: divide positive logits of seen tokens by `penalty`, multiply negative ones.

    seen: bool [B, V], True where the token occurs in the prompt or the output so far.
    """
    p = _col(penalty, logits)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float | Tensor,
                             frequency: float | Tensor) -> Tensor:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), over output tokens."""
    counts = counts.to(logits.dtype)
    return logits - _col(frequency, logits) * counts - _col(presence, logits) * (counts > 0).to(logits.dtype)


def apply_top_k(logits: Tensor, k: int | Tensor) -> Tensor:
    """Keep the k largest logits per row (k <= 0 keeps all)."""
    V = logits.shape[-1]
    k = _col(k, logits).long().clamp(max=V)
    k = torch.where(k <= 0, torch.full_like(k, V), k)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float | Tensor) -> Tensor:
    """Nucleus: keep the smallest set of tokens whose probability sums to at least p."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - _col(p, logits)
    drop[..., -1] = False  # always keep the most likely token
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_min_p(logits: Tensor, min_p: float | Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    probs = logits.softmax(dim=-1)
    threshold = _col(min_p, logits) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


class PenaltyTracker:
    """What the penalties need, kept up to date one token at a time (never rebuilt per step):
    `seen` marks prompt and output tokens (repetition), `counts` counts output tokens
    (presence, frequency). Each stays None when its penalties are off."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int] | tuple[int, ...], vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(list(prompt_ids), device=device)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(1, vocab_size, dtype=torch.int32, device=device)

    def add(self, token: int) -> None:
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
                   output_counts: Tensor | None = None) -> Tensor:
    """All transforms that apply to one request's logits [B, V] (float32)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_counts is not None:
        logits = apply_presence_frequency(logits, output_counts, params.presence_penalty,
                                          params.frequency_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = apply_min_p(logits, params.min_p)
    return logits


def draw(logits: Tensor, greedy: bool, generator: torch.Generator | None = None) -> Tensor:
    """One token per row: argmax, or a draw from softmax(logits) with the given generator."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    # Exponential-race sampling (argmax of p / Exp(1)) equals a categorical draw and is
    # reproducible for a given generator whatever else is in the batch.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)
