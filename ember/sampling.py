"""The sampler: from next-token logits to token ids, with OpenAI/vLLM parameter semantics.

`sample(logits[B, V], rows)` is the one place a token is chosen: the engine's step, the
simple generator, the draft model's guesses and speculative verification (through
`SamplingRows.process`) all call it. `rows` (a `SamplingRows`) holds each row's parameters as
tensors, so a batch mixing greedy rows, seeded rows and rows with penalties is processed by
the same few tensor operations, with no per-row trip to the CPU.

Each transform is a pure function over [B, V] logits, so a test can call it with three
numbers. Order: logit bias, banned ids and grammar masks (what logprobs are reported from), then
penalties, temperature, top-k, top-p, min-p, and a draw (or argmax for greedy rows). Grammar
masks (`TokenMask`, from `ember.structured`) change every step, so they come with each call
rather than with the rows, and touch only the rows they constrain. A row's draw uses only its
own random stream when it has one (a seeded request), so its tokens do not depend on what else
is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from ember.errors import EmberError
from ember.structured import StructuredOutput


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
    # Constrained decoding: the completion follows this JSON schema, regex, choice or grammar.
    structured: StructuredOutput | None = None
    # OpenAI's logit_bias: token id -> a number in [-100, 100] added to its logit before sampling.
    logit_bias: dict[int, float] | None = None
    # What the engine's outputs carry (vLLM's RequestOutputKind): the whole completion so far,
    # only what is new since the request's previous output, or one output when it finishes.
    output_kind: Literal["cumulative", "delta", "final"] = "cumulative"

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
            (self.output_kind in ("cumulative", "delta", "final"), "output_kind must be cumulative, delta or final"),
        ]
        for ok, message in checks:
            if not ok:
                raise EmberError(f"Invalid sampling parameter: {message}.")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise EmberError("Invalid sampling parameter: structured must be an ember.structured.StructuredOutput.")
        if self.logit_bias:
            try:
                self.logit_bias = {int(t): float(v) for t, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise EmberError("Invalid sampling parameter: logit_bias maps token ids to numbers.") from None
            bad = [t for t, v in self.logit_bias.items() if t < 0 or not -100 <= v <= 100]
            if bad:
                raise EmberError(f"Invalid sampling parameter: logit_bias for token {bad[0]} needs a token id >= 0 "
                                 f"and a bias in [-100, 100].")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)


@dataclass
class TokenMask:
    """The tokens some rows of a [B, V] batch may draw next (constrained decoding; see FORBIDDEN).

    rows: long [R], the constrained rows (None: every row); allowed: bool [R, V]. Other rows are
    untouched."""

    allowed: Tensor
    rows: Tensor | None = None


# What a token the grammar forbids gets added to its logit. Not -inf: the mask is applied as an
# add (which vectorises, where a boolean masked_fill does not on a CPU), and 0 x inf would be NaN.
# exp() of it underflows to exactly 0 in float32, so such a token is never drawn.
FORBIDDEN = -1e30


def apply_token_mask(logits: Tensor, mask: TokenMask) -> Tensor:
    """The masked rows' forbidden tokens pushed to FORBIDDEN; other rows untouched."""
    allowed = mask.allowed.to(logits.device).contiguous()
    shift = allowed.view(torch.int8) - 1  # 0 where allowed, -1 where forbidden
    if mask.rows is None:
        return logits.add(shift, alpha=-FORBIDDEN)
    rows = mask.rows.to(logits.device)
    return logits.index_copy(0, rows, logits.index_select(0, rows).add(shift, alpha=-FORBIDDEN))


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
    """What the penalties need for one sequence, kept up to date one token at a time (never
    rebuilt per step), on the logits' device: `seen` marks prompt and output tokens
    (repetition), `counts` counts output tokens (presence, frequency). Each stays None when
    its penalties are off."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
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


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A random stream of its own for one sequence, on the device its logits live on."""
    return torch.Generator(device=device).manual_seed(seed)


class SamplingRows:
    """The sampling parameters of each row of a [B, V] logits batch, as tensors.

    params[i] applies to row i; generators[i] is its own random stream (None: the global
    one); penalties[i] its `PenaltyTracker` (None: no penalties); banned[i] token ids it may
    not draw (the stop ids before min_tokens). A transform that no row uses costs nothing.
    """

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None] | None = None,
                 penalties: Sequence[PenaltyTracker | None] | None = None,
                 banned: Sequence[Sequence[int]] | None = None, device: torch.device | str = "cpu") -> None:
        self.params = list(params)
        B = len(self.params)
        self.device = torch.device(device)
        self.generators = list(generators) if generators is not None else [None] * B
        self.penalties = list(penalties) if penalties is not None else [None] * B
        greedy = [p.greedy for p in self.params]
        self.all_greedy, self.any_greedy = all(greedy), any(greedy)
        self.greedy = torch.tensor(greedy, device=self.device) if self.any_greedy and not self.all_greedy else None

        def column(values: list[float], off: float) -> Tensor | None:
            if all(v == off for v in values):
                return None
            return torch.tensor(values, device=self.device, dtype=torch.float32).view(-1, 1)

        # Greedy rows skip temperature (and truncation cannot change their argmax).
        self.temperature = column([1.0 if p.greedy else p.temperature for p in self.params], 1.0)
        self.top_k = column([p.top_k if p.top_k > 0 and not p.greedy else 0 for p in self.params], 0)
        self.top_p = column([1.0 if p.greedy else p.top_p for p in self.params], 1.0)
        self.min_p = column([0.0 if p.greedy else p.min_p for p in self.params], 0.0)
        self.repetition = column([p.repetition_penalty for p in self.params], 1.0)
        self.presence = column([p.presence_penalty for p in self.params], 0.0)
        self.frequency = column([p.frequency_penalty for p in self.params], 0.0)
        if self.presence is not None or self.frequency is not None:
            self.presence = self.presence if self.presence is not None else torch.zeros(B, 1, device=self.device)
            self.frequency = self.frequency if self.frequency is not None else torch.zeros(B, 1, device=self.device)
        self.banned: tuple[Tensor, Tensor] | None = None
        if banned is not None and any(banned):
            rows = [i for i, ids in enumerate(banned) for _ in ids]
            cols = [t for ids in banned for t in ids]
            self.banned = (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
        self.bias: tuple[tuple[Tensor, Tensor], Tensor] | None = None
        biased = [(i, int(t), float(v)) for i, p in enumerate(self.params) for t, v in (p.logit_bias or {}).items()]
        if biased:
            rows_, cols_, values = zip(*biased)
            self.bias = ((torch.tensor(rows_, device=self.device), torch.tensor(cols_, device=self.device)),
                         torch.tensor(values, device=self.device))
        self.logprobs = [p.logprobs for p in self.params]

    def _stacked(self, attr: str, vocab_size: int, dtype: torch.dtype) -> Tensor:
        parts = [getattr(t, attr) if t is not None and getattr(t, attr) is not None
                 else torch.zeros(1, vocab_size, dtype=dtype, device=self.device) for t in self.penalties]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def allowed(self, logits: Tensor, mask: TokenMask | None = None) -> Tensor:
        """float32 logits with each row's logit bias added, its banned tokens at -inf and those its
        grammar forbids at FORBIDDEN: what logprobs are reported from."""
        logits = logits.float()
        if self.bias is not None:
            logits = logits.index_put(self.bias[0], self.bias[1], accumulate=True)
        if self.banned is not None:
            logits = logits.index_put(self.banned, torch.tensor(float("-inf"), device=logits.device))
        if mask is not None:
            logits = apply_token_mask(logits, mask)
        return logits

    def process(self, logits: Tensor) -> Tensor:
        """Every transform each row asked for, in order: penalties, temperature, top-k, top-p, min-p."""
        V = logits.shape[-1]
        if self.repetition is not None:
            logits = apply_repetition_penalty(logits, self._stacked("seen", V, torch.bool), self.repetition)
        if self.presence is not None:
            logits = apply_presence_frequency(logits, self._stacked("counts", V, torch.int32), self.presence,
                                              self.frequency)
        if self.all_greedy:
            return logits
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.top_k is not None:
            logits = apply_top_k(logits, self.top_k)
        if self.top_p is not None:
            logits = apply_top_p(logits, self.top_p)
        if self.min_p is not None:
            logits = apply_min_p(logits, self.min_p)
        return logits

    def exponential_noise(self, like: Tensor) -> Tensor:
        """Exp(1) noise shaped like `like`, each row from its own stream when it has one."""
        noise = torch.empty_like(like)
        own = [i for i, g in enumerate(self.generators) if g is not None]
        if len(own) < len(self.generators):
            noise.exponential_(1.0)
        for i in own:
            noise[i].exponential_(1.0, generator=self.generators[i])
        return noise

    def uniform(self, n: int) -> Tensor:
        """One U[0, 1) number per row, each from its row's stream when it has one."""
        u = torch.rand(n, device=self.device)
        for i, g in enumerate(self.generators):
            if g is not None:
                u[i] = torch.rand((), generator=g, device=self.device)
        return u


def race(probs: Tensor, noise: Tensor) -> Tensor:
    """A categorical draw per row from (unnormalised) probabilities: argmax of p / Exp(1)
    (the exponential race), which needs no normalising and reads only its own row's noise."""
    return (probs / noise).argmax(dim=-1)


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [B], on the logits' device
    # [B, V] distributions the rows drew from (keep_probs=True and some row not greedy), else None
    probs: Tensor | None = None
    # per row: {token: logprob} for the drawn token and the row's top `logprobs`; None where not asked
    logprobs: list[dict[int, float] | None] | None = None


def sample(logits: Tensor, rows: SamplingRows, keep_probs: bool = False,
           mask: TokenMask | None = None) -> SamplerOutput:
    """The next token of every row of `logits` [B, V], each under its own parameters (and the
    grammar masks of the rows `mask` constrains)."""
    allowed = rows.allowed(logits, mask)
    processed = rows.process(allowed)
    probs = None
    if rows.all_greedy:
        tokens = processed.argmax(dim=-1)
    else:
        probs = processed.softmax(dim=-1)
        tokens = race(probs, rows.exponential_noise(probs))
        if rows.greedy is not None:
            tokens = torch.where(rows.greedy, processed.argmax(dim=-1), tokens)
    return SamplerOutput(tokens, probs if keep_probs else None, _logprobs(allowed, tokens, rows.logprobs))


def _logprobs(logits: Tensor, tokens: Tensor, wanted: list[int | None]) -> list[dict[int, float] | None] | None:
    """The chosen token's log-probability plus the n most likely (OpenAI's `top_logprobs`), for the
    rows that asked; computed for those rows at once and read back in one transfer."""
    asked = [i for i, n in enumerate(wanted) if n is not None]
    if not asked:
        return None
    lp = torch.log_softmax(logits[asked], dim=-1)
    chosen = lp.gather(-1, tokens[asked].view(-1, 1))[:, 0].tolist()
    k = max(wanted[i] for i in asked)
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    top_v, top_i, token_list = top_v.tolist(), top_i.tolist(), tokens[asked].tolist()
    out: list[dict[int, float] | None] = [None] * len(wanted)
    for j, i in enumerate(asked):
        entry = {token_list[j]: chosen[j]}
        entry.update({t: v for t, v in zip(top_i[j][:wanted[i]], top_v[j][:wanted[i]])})
        out[i] = entry
    return out
