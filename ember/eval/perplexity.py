"""Rolling-window perplexity and bits-per-byte of text files.

A text of n tokens is scored token by token, each given at most `window` tokens before
it. With a prefix token (BOS, else EOS: lm-eval's `loglikelihood_rolling`) the first
token is scored too. The first window predicts its first `window` tokens; each later
window moves on by `stride` tokens and scores only those, using the `window - stride`
before them as extra context (Hugging Face's perplexity guide). `stride == window` is
exactly lm-eval's disjoint windows; a smaller stride gives each token more context.

Figures: token perplexity exp(NLL/tokens), bits per byte NLL/(ln 2 · UTF-8 bytes), byte
and word perplexity (lm-eval's `wikitext` metrics), over all files and per file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ember.errors import EmberError


@dataclass
class Window:
    context: list[int]  # tokens fed before the scored ones
    targets: list[int]  # tokens scored in this window


def rolling_windows(tokens: Sequence[int], window: int, stride: int | None = None,
                    prefix_token: int | None = None) -> list[Window]:
    """Split `tokens` into (context, targets) windows; every token is a target exactly once.

    Each window's model input is (context + targets)[:-1], at most `window` tokens long.
    Without a prefix token the first token has nothing to be predicted from and is skipped.
    """
    stride = stride or window
    if not 1 <= stride <= window:
        raise EmberError(f"stride must be in [1, window={window}], got {stride}.")
    x = ([prefix_token] if prefix_token is not None else []) + list(tokens)
    out: list[Window] = []
    scored = 1  # x[0] is never a target: the prefix token, or the unpredictable first token
    first = True
    while scored < len(x):
        end = min(len(x), scored + (window if first else stride))
        start = max(0, end - 1 - window)  # input x[start:end-1] has at most `window` tokens
        out.append(Window(x[start:scored], x[scored:end]))
        scored, first = end, False
    return out


@dataclass
class PerplexityResult:
    tokens: int
    bytes: int
    words: int
    nll: float  # nats, summed
    perplexity: float
    bits_per_byte: float
    byte_perplexity: float
    word_perplexity: float
    windows: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(nll: float, tokens: int, nbytes: int, words: int, windows: int) -> PerplexityResult:
    return PerplexityResult(tokens=tokens, bytes=nbytes, words=words, nll=nll,
                            perplexity=math.exp(nll / max(tokens, 1)),
                            bits_per_byte=nll / (math.log(2) * max(nbytes, 1)),
                            byte_perplexity=math.exp(nll / max(nbytes, 1)),
                            word_perplexity=math.exp(nll / max(words, 1)), windows=windows)


def text_perplexity(lm: Any, text: str, window: int | None = None, stride: int | None = None,
                    use_prefix: bool = True) -> PerplexityResult:
    """Perplexity of one text under `lm` (a `LocalLM` or `EndpointLM`)."""
    window = window or lm.max_length
    if window > lm.max_length:
        raise EmberError(f"window {window} is longer than the model's context ({lm.max_length}).")
    tokens = lm.encode(text)
    wins = rolling_windows(tokens, window, stride, lm.prefix_token if use_prefix else None)
    results = lm.loglikelihood([(w.context, w.targets) for w in wins]) if wins else []
    nll = -sum(r.logprob for r in results)
    scored = sum(len(w.targets) for w in wins)
    return _result(nll, scored, len(text.encode("utf-8")), len(text.split()), len(wins))


def perplexity(lm: Any, paths: Sequence[str | Path], window: int | None = None, stride: int | None = None,
               use_prefix: bool = True) -> dict[str, Any]:
    """Per-file and overall figures (overall = pooled NLL over pooled tokens, bytes, words)."""
    files: dict[str, Any] = {}
    total = [0.0, 0, 0, 0, 0]
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise EmberError(f"No such text file: {path}.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EmberError(f"{path} is not UTF-8 text.") from None
        r = text_perplexity(lm, text, window, stride, use_prefix)
        files[str(path)] = r.as_dict()
        for i, v in enumerate((r.nll, r.tokens, r.bytes, r.words, r.windows)):
            total[i] += v
    overall = _result(total[0], int(total[1]), int(total[2]), int(total[3]), int(total[4]))
    return {"overall": overall.as_dict(), "files": files,
            "window": window or lm.max_length, "stride": stride or window or lm.max_length,
            "prefix_token": use_prefix}
