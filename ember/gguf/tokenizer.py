"""An Ember `Tokenizer` from the `tokenizer.ggml.*` metadata of a GGUF file.

Two vocabulary kinds (`tokenizer.ggml.model`):

- `gpt2`: byte-level BPE from the stored tokens and merges. How text is split into words before
  merging is not stored as a regex but named by `tokenizer.ggml.pre`; each name maps to the split
  llama.cpp applies for it (a sequence of regexes, each cutting every piece further, keeping both
  the matches and the text between them).
- `llama`: SentencePiece-style BPE. The file stores no merges, only a score per token; SentencePiece
  merges the adjacent pair whose union has the best score, so merges ranked by that score give the
  same result. Spaces become "▁", one "▁" is prepended when `tokenizer.ggml.add_space_prefix` (default
  on), and characters outside the vocabulary fall back to their UTF-8 byte tokens `<0xNN>`.

Tokens typed control in `tokenizer.ggml.token_type` become special tokens (plain text in user input
unless allowed, as everywhere in Ember); user-defined ones are matched whole in any text, as
llama.cpp does. The result saves as `tokenizer.json` + `tokenizer_config.json` like any Ember tokenizer.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Engine

from ember.errors import EmberError
from ember.gguf.reader import GGUFFile
from ember.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regexes llama.cpp splits with, applied in order.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "mpt": (_GPT2,),
    "olmo": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "command-r": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
}
# Llama 3's vocabularies: a word that is a token is that token, whatever the merges would make of it,
# and BOS is added unless the file says otherwise (llama.cpp's defaults for these names).
WHOLE_WORDS = ("llama-bpe", "llama3", "llama-v3")
SPACE = "\u2581"  # SentencePiece's visible space


def gguf_tokenizer(path: str | os.PathLike | GGUFFile) -> Tokenizer:
    """The tokenizer a GGUF file describes, as an Ember `Tokenizer`."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    kind = f.require("tokenizer.ggml.model", str)
    tokens = f.require("tokenizer.ggml.tokens", list)
    types = f.get("tokenizer.ggml.token_type", list) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise EmberError(f"{f.path} has {len(types)} entries in tokenizer.ggml.token_type for {len(tokens)} tokens.")
    if kind == "gpt2":
        engine = _byte_level(f, tokens)
        add_bos_default = f.get("tokenizer.ggml.pre", str, "default") in WHOLE_WORDS
    elif kind == "llama":
        engine = _sentencepiece(f, tokens, types)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise EmberError(f"{f.path} has a tokenizer of kind {kind!r} (tokenizer.ggml.model); Ember reads gpt2 "
                         "(byte-level BPE) and llama (SentencePiece BPE).")
    engine.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty == CONTROL])
    engine.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def named(key: str) -> str | None:
        index = f.get(f"tokenizer.ggml.{key}", int)
        if index is None:
            return None
        if not 0 <= index < len(tokens):
            raise EmberError(f"{f.path} has tokenizer.ggml.{key} = {index}, outside its {len(tokens)} tokens.")
        return tokens[index]

    bos, eos, pad, unk = (named(k) for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"))
    add_bos = f.get("tokenizer.ggml.add_bos_token", bool, add_bos_default)
    add_eos = f.get("tokenizer.ggml.add_eos_token", bool, False)
    if add_bos and bos is None:
        raise EmberError(f"{f.path} sets tokenizer.ggml.add_bos_token but has no tokenizer.ggml.bos_token_id.")
    _add_post_processor(engine, bos if add_bos else None, eos if add_eos else None)
    arch = f.get("general.architecture", str)
    context = f.get(f"{arch}.context_length", int) if arch else None
    return Tokenizer(engine, bos_token=bos, eos_token=eos, pad_token=pad,
                     chat_template=f.get("tokenizer.chat_template", str), model_max_length=context,
                     add_bos_token=add_bos, unk_token=unk if kind == "llama" else None)


def _byte_level(f: GGUFFile, tokens: list[str]) -> Engine:
    pre = f.get("tokenizer.ggml.pre", str, "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise EmberError(f"{f.path} names the pre-tokenizer {pre!r} (tokenizer.ggml.pre), which Ember does not know; "
                         f"it knows {', '.join(sorted(PRE_TOKENIZER_SPLITS))}.")
    merges = f.require("tokenizer.ggml.merges", list)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise EmberError(f"{f.path} has a merge {m!r} in tokenizer.ggml.merges that is not two tokens.")
        pairs.append((left, right))
    vocab = {t: i for i, t in enumerate(tokens)}
    engine = Engine(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in WHOLE_WORDS))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    engine.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    engine.decoder = decoders.ByteLevel()
    return engine


def _sentencepiece(f: GGUFFile, tokens: list[str], types: list[int]) -> Engine:
    scores = f.require("tokenizer.ggml.scores", list)
    if len(scores) != len(tokens):
        raise EmberError(f"{f.path} has {len(scores)} entries in tokenizer.ggml.scores for {len(tokens)} tokens.")
    unk_id = f.get("tokenizer.ggml.unknown_token_id", int)
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    candidates = []
    for token, ty, score in zip(tokens, types, scores):
        if ty != NORMAL or len(token) < 2:
            continue
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in mergeable and b in mergeable]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        candidates += [(-score, vocab[token], a, b) for a, b in splits]
    candidates.sort(key=lambda c: (c[0], c[1]))
    merges = [(a, b) for _, _, a, b in candidates]
    engine = Engine(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                               unk_token=tokens[unk_id] if unk_id is not None else None))
    prefix = f.get("tokenizer.ggml.add_space_prefix", bool, True)
    steps = ([normalizers.Prepend(SPACE)] if prefix else []) + [normalizers.Replace(" ", SPACE)]
    engine.normalizer = normalizers.Sequence(steps)
    engine.pre_tokenizer = None
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    engine.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return engine


def _add_post_processor(engine: Engine, bos: str | None, eos: str | None) -> None:
    """What `transformers` adds with add_special_tokens=True (Ember adds BOS itself, on request)."""
    if bos is None and eos is None:
        return
    head = [f"{bos}:0"] if bos else []
    tail = [f"{eos}:0"] if eos else []
    specials = [(t, engine.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    engine.post_processor = processors.TemplateProcessing(
        single=head + ["$A:0"] + tail, pair=head + ["$A:0"] + tail + head + ["$B:1"] + tail, special_tokens=specials)
