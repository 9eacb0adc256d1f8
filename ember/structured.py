"""Structured output: decoding constrained to a JSON schema, a regex, a list of choices or a grammar.

A `StructuredOutput` names one constraint. `compile_constraint` turns it into a grammar for
`llguidance` (the grammar engine of llama.cpp and vLLM) against a tokenizer, once per
(constraint, tokenizer): the result is a matcher in its start state, and each sequence gets a
copy (`GrammarMatcher`). Before every sampled token the engine asks the sequences' matchers for
their token bitmasks (`fill_bitmasks`, `allowed_tokens`), the sampler sets the forbidden
tokens to -inf (`ember.sampling.TokenMask`), and each accepted token advances its matcher.

The grammar sees Ember's vocabulary plus one extra id past the model's, a stand-in for "the
text may end here": its bit in a mask says whether the sequence may stop, and the engine lets
the sequence's own stop ids through exactly then. A matcher that can take no more tokens
(`is_finished`) ends its sequence.

JSON between tokens may hold nothing, one space, or a newline and up to 20 spaces or tabs of
indentation (llama.cpp's rule): a model's usual layouts fit, and a runaway of whitespace cannot.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import llguidance
import numpy as np
import torch
from torch import Tensor

from ember.errors import EmberError

JSON_WHITESPACE = r"(?:\x20|\x0A[\x20\x09]{0,20})?"
# The end-of-text stand-in is a special token (a leading 0xFF byte): grammar text never matches it.
_END_BYTES = b"\xff<|ember-end-of-text|>"


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a completion (set exactly one field).

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: the whole
    completion matches it; choice: the completion is one of these strings; grammar: llguidance's
    Lark syntax (which may embed `%json {schema}`), or GBNF/EBNF (`root ::= ...`), converted.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    _grammar: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise EmberError(f"StructuredOutput takes exactly one of json, regex, choice, grammar or json_object; "
                             f"got {', '.join(given) or 'none'}.")
        object.__setattr__(self, "_grammar", _to_grammar(self, given[0]))
        error = llguidance.LLMatcher.validate_grammar(self._grammar)
        if error:
            raise EmberError(f"Invalid {self.kind}: {_first_line(error)}")

    @property
    def kind(self) -> str:
        """The field that is set: json, regex, choice, grammar or json_object."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar (its JSON form), checked when this object was made."""
        return self._grammar

    def __hash__(self) -> int:
        return hash(self._grammar)


def _first_line(message: str) -> str:
    """llguidance's message up to its source excerpt, as one sentence."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = " ".join(lines[:4]) if lines else "the grammar engine refused it"
    return text if text.endswith(".") else text + "."


def _to_grammar(spec: StructuredOutput, kind: str) -> str:
    if kind in ("json", "json_object"):
        schema: Any = {"type": "object"} if kind == "json_object" else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise EmberError(f"Invalid json: the JSON schema is not valid JSON ({e}).") from None
        if not isinstance(schema, (dict, bool)):
            raise EmberError(f"Invalid json: a JSON schema is an object (or true/false), not {type(schema).__name__}.")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern":
                                                                                   JSON_WHITESPACE})
        except ValueError as e:
            raise EmberError(f"Invalid json: {_first_line(str(e))}") from None
    if kind == "regex":
        if not isinstance(spec.regex, str):
            raise EmberError("Invalid regex: it must be a string.")
        return llguidance.grammar_from("regex", spec.regex)
    if kind == "choice":
        choices = spec.choice
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c
                                                                           for c in choices):
            raise EmberError("Invalid choice: it must be a non-empty list of non-empty strings.")
        return llguidance.grammar_from("choice", json.dumps(list(choices)))
    if not isinstance(spec.grammar, str) or not spec.grammar.strip():
        raise EmberError("Invalid grammar: it must be a non-empty string (Lark or GBNF).")
    try:
        return llguidance.grammar_from("grammar", spec.grammar)
    except ValueError as e:
        raise EmberError(f"Invalid grammar: {_first_line(str(e))}") from None


# --- the tokenizer as the grammar engine sees it ----------------------------------------------------
class _TokenTable:
    """What llguidance's TokenizerWrapper reads: every id's bytes, the specials, an encoder.

    Ids past the tokenizer's own vocabulary (a model's padded rows) have no bytes, so no grammar
    ever allows them; the last id is the end-of-text stand-in."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        own = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(min(own, vocab_size))]
        self.tokens += [b""] * (vocab_size - len(self.tokens)) + [_END_BYTES]
        self.eos_token_id = vocab_size
        self.bos_token_id = None
        self.special_token_ids = sorted({*tokenizer.special_tokens.values(), vocab_size})
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


@functools.lru_cache(maxsize=8)
def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` over a model's `vocab_size` rows (built once: about 0.2 s)."""
    table = _TokenTable(tokenizer, vocab_size)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(table), n_vocab=vocab_size + 1)


@functools.lru_cache(maxsize=256)
def _start_state(spec: StructuredOutput, tokenizer: Any, vocab_size: int) -> llguidance.LLMatcher:
    matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), spec.llguidance_grammar, log_level=0)
    if matcher.is_error():
        raise EmberError(f"Invalid {spec.kind}: {_first_line(matcher.get_error())}")
    return matcher


def compile_constraint(spec: StructuredOutput, tokenizer: Any, vocab_size: int) -> GrammarMatcher:
    """A fresh matcher for one sequence; the grammar is compiled once per (constraint, tokenizer)."""
    if tokenizer is None:
        raise EmberError("Structured output needs the model's tokenizer; this engine has none.")
    return GrammarMatcher(_start_state(spec, tokenizer, vocab_size).deep_copy(), vocab_size)


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the model's; the end-of-text stand-in is id vocab_size

    @property
    def is_finished(self) -> bool:
        """No token can follow (the grammar is complete, or the matcher broke and must stop)."""
        return self.matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete match: the sequence may end here."""
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def advance(self, token: int) -> bool:
        """Consume one sampled token; False (the matcher then stops) if the grammar forbids it."""
        return self.matcher.consume_token(token)

    def try_advance(self, token: int) -> bool:
        """Consume `token` if the grammar allows it (True); otherwise change nothing (False)."""
        return self.matcher.try_consume_tokens([token]) == 1

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` consumed tokens."""
        if num_tokens > 0 and not self.matcher.rollback(num_tokens):
            raise EmberError(f"Cannot roll the grammar back by {num_tokens} tokens: {self.error}")

    def allowed_mask(self) -> Tensor:
        """bool [vocab_size + 1]: the tokens allowed next; the last entry says whether the text may end."""
        bits = empty_bitmask(1, self.vocab_size)
        fill_bitmasks([self], bits)
        return unpack_bitmask(bits, self.vocab_size + 1)[0]


# --- batches of masks --------------------------------------------------------------------------------
def empty_bitmask(rows: int, vocab_size: int) -> Tensor:
    """int32 [rows, words] with every bit set (every token allowed), for `vocab_size` + the end stand-in."""
    return torch.full((rows, (vocab_size + 1 + 31) // 32), -1, dtype=torch.int32)


def fill_bitmasks(matchers: Sequence[GrammarMatcher], bits: Tensor,
                  drafts: Sequence[Sequence[int]] | None = None) -> None:
    """Row i of `bits` := the next-token mask of matchers[i], in this thread: a mask takes a fraction
    of a millisecond, and a pool of grammar threads would wait for work on the cores the model's
    threads use.

    With `drafts`, matcher i owns len(drafts[i]) + 1 consecutive rows (in order): the mask before
    each guessed token and after the last, each guess consumed in turn and rolled back after. A
    guess the grammar forbids ends its run: the rows after it keep every bit set (they are never
    used, since verification rejects that guess)."""
    if not (bits.dtype == torch.int32 and bits.device.type == "cpu" and bits.is_contiguous()):
        raise ValueError("token bitmasks are contiguous int32 CPU tensors")
    words = bits.shape[1]
    if drafts is None:
        for i, m in enumerate(matchers):
            m.matcher.unsafe_compute_mask_ptr(bits[i].data_ptr(), words * 4)
        return
    row = 0
    for m, guess in zip(matchers, drafts):
        consumed = 0
        for j in range(len(guess) + 1):
            m.matcher.unsafe_compute_mask_ptr(bits[row + j].data_ptr(), words * 4)
            if j == len(guess) or m.matcher.try_consume_tokens([guess[j]]) != 1:
                break
            consumed += 1
        m.rollback(consumed)
        row += len(guess) + 1


def unpack_bitmask(bits: Tensor, width: int) -> Tensor:
    """int32 [R, words] on the CPU (bit b of word w: token 32 w + b) -> bool [R, width]."""
    return torch.from_numpy(_unpack(bits)).view(torch.bool)[:, :width]


def _unpack(bits: Tensor) -> np.ndarray:
    """uint8 0/1 [R, 32 words]: numpy's unpackbits on the words' bytes in memory order (little-endian,
    as llguidance writes them), one pass in C; the steps here stay in numpy, free of the thread
    start-up each small torch op pays on a busy CPU."""
    return np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")


def allowed_tokens(matchers: Sequence[GrammarMatcher], stop_ids: Sequence[frozenset[int]], vocab_size: int,
                   drafts: Sequence[Sequence[int]] | None = None) -> Tensor:
    """bool [R, vocab_size] on the CPU: the tokens each matcher's row may take (R = len(matchers), or
    the sum of len(drafts[i]) + 1 with drafts). A row's stop ids are allowed exactly where its
    grammar may end. A row left with nothing allowed (a matcher that broke: it is finished, so its
    sequence ends after this token) allows everything rather than nothing."""
    counts = [1] * len(matchers) if drafts is None else [len(d) + 1 for d in drafts]
    bits = empty_bitmask(sum(counts), vocab_size)
    fill_bitmasks(matchers, bits, drafts)
    unpacked = _unpack(bits)
    may_end, allowed = unpacked[:, vocab_size], unpacked[:, :vocab_size]
    starts = itertools.accumulate(counts, initial=0)
    pairs = [(row, t) for first, ids, n in zip(starts, stop_ids, counts) for row in range(first, first + n)
             for t in ids if t < vocab_size]
    if pairs:
        rows, cols = np.array(pairs).T
        allowed[rows, cols] = may_end[rows]
    allowed[~allowed.any(axis=1)] = 1
    return torch.from_numpy(allowed).view(torch.bool)
