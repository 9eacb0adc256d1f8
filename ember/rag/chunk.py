"""Chunking: cut a document into retrievable pieces that remember where they came from.

Every chunk keeps character offsets (start, end) into the original text with
`text[start:end] == chunk.text`, so a citation can point back to the exact place.

- `token_chunks`: windows of `size` tokens that overlap by `overlap` tokens.
- `recursive_chunks`: split by the text's own structure first — Markdown headings, then
  paragraphs (blank lines), lines, sentences, and for Python source top-level then nested
  `def`/`class` blocks — descending a level only where a piece is still over `size` tokens,
  then merging neighbouring small pieces back up to `size`. A piece with no structure left
  falls back to token windows.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

Offsets = list[tuple[int, int]]
TokenizeFn = Callable[[str], Offsets]

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# Split points: each pattern marks where a new piece may begin (zero-width, so pieces tile the text).
MARKDOWN_LEVELS = [r"(?m)^(?=#{1} )", r"(?m)^(?=#{2} )", r"(?m)^(?=#{3,6} )", r"\n\s*\n", r"\n",
                   r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])", r"(?<=[;:,])\s+"]
TEXT_LEVELS = MARKDOWN_LEVELS[3:]
PYTHON_LEVELS = [r"(?m)^(?=(?:@|class |def |async def ))", r"(?m)^(?=    (?:@|def |async def ))",
                 r"\n\s*\n", r"\n"]
_HEADING = re.compile(r"(?m)^(#{1,6}) +(.+?)\s*#*\s*$")


def regex_tokenize(text: str) -> Offsets:
    """Word and punctuation offsets: a tokenizer-free stand-in for sub-word tokens."""
    return [m.span() for m in _WORD.finditer(text)]


@dataclass
class Chunk:
    text: str
    start: int
    end: int
    metadata: dict[str, Any] = field(default_factory=dict)


def _trimmed(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _make(text: str, spans: Sequence[tuple[int, int]]) -> list[Chunk]:
    out = []
    for s, e in spans:
        s, e = _trimmed(text, s, e)
        if e > s:
            out.append(Chunk(text[s:e], s, e))
    return out


def token_chunks(text: str, size: int = 256, overlap: int = 32, tokenize: TokenizeFn = regex_tokenize) -> list[Chunk]:
    """Windows of `size` tokens, each starting `size - overlap` tokens after the previous one."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("need size >= 1 and 0 <= overlap < size")
    return _make(text, _token_spans(tokenize(text), 0, size, overlap))


def _token_spans(offs: Offsets, base: int, size: int, overlap: int) -> list[tuple[int, int]]:
    spans = []
    step = size - overlap
    for i in range(0, max(len(offs) - overlap, 1), step):
        window = offs[i:i + size]
        if window:
            spans.append((base + window[0][0], base + window[-1][1]))
    return spans


class _Counter:
    """Token counts of any span in O(log n), from one tokenization of the whole text."""

    def __init__(self, text: str, tokenize: TokenizeFn) -> None:
        self.offs = tokenize(text)
        self.starts = [s for s, _ in self.offs]

    def count(self, s: int, e: int) -> int:
        return bisect.bisect_left(self.starts, e) - bisect.bisect_left(self.starts, s)

    def tokens(self, s: int, e: int) -> Offsets:
        return self.offs[bisect.bisect_left(self.starts, s):bisect.bisect_left(self.starts, e)]


def _split(text: str, s: int, e: int, pattern: str) -> list[tuple[int, int]]:
    # A zero-width match (lookahead) cuts before the next piece; a consumed separator stays
    # with the piece it ends, so the pieces still tile [s, e).
    cuts = {s + (m.end() if m.end() > m.start() else m.start()) for m in re.finditer(pattern, text[s:e])}
    bounds = sorted(c for c in cuts | {s, e} if s <= c <= e)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _recurse(text: str, s: int, e: int, levels: Sequence[str], counter: _Counter, size: int) -> list[tuple[int, int]]:
    if counter.count(s, e) <= size:
        return [(s, e)]
    for li, pat in enumerate(levels):
        parts = _split(text, s, e, pat)
        if len(parts) > 1:
            return _merge(text, [_recurse(text, a, b, levels[li + 1:], counter, size) for a, b in parts], counter, size)
    toks = counter.tokens(s, e)  # no structure left: token windows
    return [(max(s, a), b) for a, b in _token_spans(toks, 0, size, 0)] if toks else [(s, e)]


def _merge(text: str, parts: list[list[tuple[int, int]]], counter: _Counter, size: int) -> list[tuple[int, int]]:
    """Join neighbouring parts that are whole (not themselves split) while the union fits in
    `size` tokens. A split part stays on its own, so a section's heading never ends up glued
    to the tail of the section before it."""
    out: list[tuple[int, int]] = []
    last_whole = False
    for pieces in parts:
        whole = len(pieces) == 1
        if whole and last_whole and counter.count(out[-1][0], pieces[0][1]) <= size:
            out[-1] = (out[-1][0], pieces[0][1])
        else:
            out += pieces
        last_whole = whole
    return out


def recursive_chunks(text: str, size: int = 256, kind: str = "text",
                     tokenize: TokenizeFn = regex_tokenize) -> list[Chunk]:
    """Structure-first chunks of at most `size` tokens; `kind` is "markdown", "python" or "text"."""
    levels = {"markdown": MARKDOWN_LEVELS, "python": PYTHON_LEVELS}.get(kind, TEXT_LEVELS)
    counter = _Counter(text, tokenize)
    chunks = _make(text, _recurse(text, 0, len(text), levels, counter, size))
    if kind == "markdown":
        _add_sections(text, chunks)
    return chunks


def _add_sections(text: str, chunks: list[Chunk]) -> None:
    """Record the heading path a chunk sits under, for display and filters."""
    heads = [(m.start(), len(m.group(1)), m.group(2)) for m in _HEADING.finditer(text)]
    for c in chunks:
        path: list[tuple[int, str]] = []
        for pos, level, title in heads:
            if pos > c.start:
                break
            path = [p for p in path if p[0] < level] + [(level, title)]
        if path:
            c.metadata["section"] = " > ".join(t for _, t in path)


def line_span(text: str, start: int, end: int) -> str:
    """Human location of a character range: "lines a-b" (1-based)."""
    a = text.count("\n", 0, start) + 1
    b = a + text.count("\n", start, end)
    return f"line {a}" if a == b else f"lines {a}-{b}"


def chunk_text(text: str, kind: str = "text", size: int = 256, overlap: int = 32, method: str = "recursive",
               tokenize: TokenizeFn = regex_tokenize) -> list[Chunk]:
    """One entry point for ingest: "recursive", "tokens", or "none" (the whole text as one chunk)."""
    if method == "none":
        return _make(text, [(0, len(text))])
    if method == "tokens":
        return token_chunks(text, size, overlap, tokenize)
    if method == "recursive":
        return recursive_chunks(text, size, kind, tokenize)
    raise ValueError(f"unknown chunking method {method!r}")
