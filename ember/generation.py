"""The simple generator: one sequence, a contiguous KV cache, a decode loop.

`generate_ids` is the hot loop (prefill once, then one token per forward, nothing but the
cache write allocated per step); `stream_text` turns ids into text that never splits a
UTF-8 character and never shows the start of a stop string (`ember.detokenizer`);
`generate` is the one-call API. Tokens are chosen by the same sampler as the engine's
(`ember.sampling.sample`). The batched, paged path for serving lives in `ember.engine`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from ember.compiled_step import compiled_decode_step, structure_key
from ember.detokenizer import Detokenizer
from ember.kv_cache import KVCache, StaticKVCache
from ember.model import CausalLM
from ember.request import check_prompt_ids, stop_token_ids
from ember.sampling import PenaltyTracker, SamplingParams, SamplingRows, TokenMask, sample, seeded_generator
from ember.structured import GrammarMatcher, allowed_tokens, compile_constraint


def context_length(model: CausalLM) -> int:
    return model.config.max_position_embeddings


@torch.inference_mode()
def generate_ids(model: CausalLM, prompt_ids: Sequence[int], params: SamplingParams,
                 stop_ids: Sequence[int] = (), compile: bool = False,
                 grammar: GrammarMatcher | None = None) -> Iterator[int]:
    """Yield new token ids one by one, under `params` (its max_tokens, temperature, top-k, top-p,
    min-p, penalties and seed); stops after max_tokens, at the context's end, or after a token
    in `stop_ids` (the caller's choice: no EOS is added here).

    `compile=True` runs each one-token step as one `torch.compile`d graph over a static cache
    (see `ember.compiled_step`): the first call compiles (cached on disk after), later steps
    skip most of PyTorch's per-operation overhead. `grammar` (params.structured compiled for the
    tokenizer) constrains each token, and its completion ends the generation."""
    ctx = context_length(model)
    check_prompt_ids(prompt_ids, model.config.vocab_size, ctx)
    max_new_tokens = min(params.max_tokens, ctx - len(prompt_ids))
    device, dtype = model.device, model.dtype
    generator = seeded_generator(params.seed, device) if params.seed is not None else None
    penalties = PenaltyTracker(params, prompt_ids, model.config.vocab_size, device) if params.has_penalties else None
    rows = SamplingRows([params], [generator], [penalties], device=device)
    length = len(prompt_ids) + max_new_tokens
    if compile:
        # One compiled graph per cache size: round sizes up so that nearby lengths share one.
        cache: KVCache = StaticKVCache(model.config, min(ctx, -(-length // 256) * 256), device, dtype)
        step = compiled_decode_step(device.type)
    else:
        cache = KVCache(model.config, 1, length, device, dtype)
    stop = set(stop_ids)
    # As in the engine: the stop tokens cannot be drawn before min_tokens.
    early = SamplingRows([params], [generator], [penalties], banned=[sorted(stop)], device=device) if (
        params.min_tokens and stop) else rows

    # Greedy without penalties is the logits' argmax (the sampler's own greedy result, as it
    # computes no logprobs here): taken directly, not through the sampler's steps. Not while
    # stop tokens are banned (before min_tokens).
    argmax_only = params.greedy and penalties is None and not params.logit_bias and grammar is None

    logits = model(torch.tensor([list(prompt_ids)], device=device), cache=cache, last_only=True)[:, -1]
    # After the prefill, which fills the layers' lazy caches (e.g. int4 kernel scales).
    structure = structure_key(model) if compile else 0
    for i in range(max_new_tokens):
        current = early if i < params.min_tokens else rows
        mask = TokenMask(allowed_tokens([grammar], [frozenset(stop)], logits.shape[-1])) if grammar else None
        token = logits.argmax(dim=-1) if argmax_only and current is rows else sample(logits, current,
                                                                                      mask=mask).token_ids
        tok = int(token.item())
        yield tok
        if tok in stop or (grammar is not None and (not grammar.advance(tok) or grammar.is_finished)):
            return
        if penalties is not None:
            penalties.add(tok)
        if compile:
            logits = step(model, cache, token.view(1, 1), cache.next_position(), structure)
        else:
            logits = model(token.view(1, 1), cache=cache, last_only=True)[:, -1]


def stream_text(model: CausalLM, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams,
                compile: bool = False) -> Iterator[str]:
    """Yield text pieces as they are generated; ends at EOS (unless params.ignore_eos), a stop
    token, or the first stop string (excluded)."""
    detok = Detokenizer(tokenizer, params.stop)
    stop_ids = stop_token_ids(params, model, tokenizer)
    grammar = compile_constraint(params.structured, tokenizer, model.config.vocab_size) if params.structured else None
    for tok in generate_ids(model, prompt_ids, params, stop_ids=tuple(stop_ids), compile=compile, grammar=grammar):
        if tok in stop_ids:
            break
        stopped = detok.push(tok)
        piece = detok.take()
        if piece:
            yield piece
        if stopped:
            return
    detok.finish()
    piece = detok.take()
    if piece:
        yield piece


def generate(model: CausalLM, tokenizer: Any, prompt: str, params: SamplingParams | None = None,
             compile: bool = False) -> str:
    """Complete `prompt` and return the new text (params.temperature 0 = greedy). A raw prompt's
    special-token text (`<|im_start|>`) becomes the special ids, as in the engine and the server."""
    prompt_ids = tokenizer.encode(prompt, allowed_special="all",
                                  add_bos=bool(getattr(tokenizer, "add_bos_token", False)))
    return "".join(stream_text(model, tokenizer, prompt_ids, params or SamplingParams(max_tokens=128),
                               compile=compile))
