"""From generated token ids to the text a reader may see: incremental decoding and stop strings.

The one stop-string implementation, used by the engine's output processor and by the simple
generator's `stream_text`. A stop string ends the text where it starts (it is not shown), and
text that could still grow into one is held back until it cannot: a reader never sees the
first half of a stop string that the next token completes.
"""

from __future__ import annotations

from typing import Any, Sequence

from ember.tokenizer import IncrementalDecoder


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (hold them back)."""
    return max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)


class Detokenizer:
    """One completion's text, a token at a time.

    `push(token)` adds a token and says whether a stop string is now complete (the text is then
    cut before it, and nothing more may be pushed); `finish()` ends the stream (the decoder's
    held bytes come out); `take()` returns the text not taken before that is safe to show.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), prompt_ids: list[int] | None = None) -> None:
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far, cut at a stop string
        self.taken = 0  # characters of `text` already handed out by take()
        self.stopped = False
        self.finished = False
        # Where a stop string can start: no earlier than this (one is at most this long).
        self._longest = max((len(s) for s in self.stops), default=0)

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string just completed."""
        piece = self.decoder.push(token)
        return bool(piece) and self._add(piece)

    def _add(self, piece: str) -> bool:
        before = len(self.text)
        self.text += piece
        if not self.stops:
            return False
        # A new match must end inside the new piece: search from the longest stop's reach before it.
        start = max(0, before - self._longest + 1)
        cut = find_stop(self.text[start:], self.stops)
        if cut is None:
            return False
        self.text = self.text[:start + cut]
        self.stopped = self.finished = True
        return True

    def finish(self) -> bool:
        """End of the stream: flush the decoder (a stop string may complete in what it held)."""
        if self.finished:
            return self.stopped
        stopped = self._add(self.decoder.flush())
        self.finished = True
        return stopped

    def take(self) -> str:
        """The text not handed out yet, less what could still become a stop string (all of it once finished)."""
        end = len(self.text) if self.finished else len(self.text) - stop_holdback(self.text, self.stops)
        if end <= self.taken:
            return ""
        piece = self.text[self.taken:end]
        self.taken = end
        return piece
