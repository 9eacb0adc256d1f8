"""The simple generator: one sequence, a contiguous KV cache, a decode loop.

`generate_ids` is the hot loop (prefill once, then one token per forward, nothing but the
cache write allocated per step); `stream_text` turns ids into text that never splits a
UTF-8 character and never shows the start of a stop string; `generate` is the one-call
API. The batched, paged path for serving lives in `ember.engine`.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ember.errors import EmberError
from ember.kv_cache import KVCache, StaticKVCache
from ember.model import CausalLM
from ember.packed_linear import packed_linears
from ember.sampling import PenaltyTracker, SamplingParams, draw, process_logits


def context_length(model: CausalLM) -> int:
    return model.config.max_position_embeddings


def eos_ids(model: CausalLM, tokenizer: Any = None) -> set[int]:
    ids: set[int] = set()
    eos = model.config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(eos)
    if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        ids.add(tokenizer.eos_id)
    return ids


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int, context: int) -> None:
    """Refuse prompts the model cannot take: empty, unknown ids, or no room left to generate."""
    if len(prompt_ids) == 0:
        raise EmberError("The prompt is empty; give at least one token.")
    if max(prompt_ids) >= vocab_size or min(prompt_ids) < 0:
        raise EmberError(f"Prompt token ids must be in [0, {vocab_size}).")
    if len(prompt_ids) >= context:
        raise EmberError(f"The prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                         "shorten the prompt.")


@torch.inference_mode()
def generate_ids(model: CausalLM, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, seed: int | None = None,
                 stop_ids: Sequence[int] = (), compile: bool = False) -> Iterator[int]:
    """Yield new token ids one by one; stops after `max_new_tokens` or a token in `stop_ids`.

    `compile=True` runs each one-token step as one `torch.compile`d graph over a static cache
    (see `compiled_decode_step`): the first call compiles for about a minute (cached on disk after), later
    steps skip most of PyTorch's per-operation overhead."""
    params = SamplingParams(temperature=temperature, top_k=top_k or 0, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, seed=seed, max_tokens=max_new_tokens)
    ctx = context_length(model)
    check_prompt_ids(prompt_ids, model.config.vocab_size, ctx)
    max_new_tokens = min(max_new_tokens, ctx - len(prompt_ids))
    weight = model.model.embed_tokens.weight  # not the head's: a quantized head would dequantize
    device, dtype = weight.device, weight.dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    length = len(prompt_ids) + max_new_tokens
    if compile:
        # One compiled graph per cache size: round sizes up so that nearby lengths share one.
        cache: KVCache = StaticKVCache(model.config, min(ctx, -(-length // 256) * 256), device, dtype)
        step = compiled_decode_step(device.type)
    else:
        cache = KVCache(model.config, 1, length, device, dtype)
    stop = set(stop_ids)

    penalties = PenaltyTracker(params, prompt_ids, model.config.vocab_size, device)
    ids = torch.tensor([list(prompt_ids)], device=device)
    with packed_linears(model, pack=False):  # one-row decode steps through ember.gemv on the CPU
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        # After the prefill, which fills the layers' lazy caches (e.g. int4 kernel scales).
        structure = structure_key(model) if compile else 0
    for _ in range(max_new_tokens):
        token = draw(process_logits(logits, params, penalties.seen, penalties.counts), params.greedy, generator)
        tok = int(token.item())
        yield tok
        if tok in stop:
            return
        penalties.add(tok)
        with packed_linears(model, pack=False):
            if compile:
                logits = step(model, cache, token.view(1, 1), cache.next_position(), structure)
            else:
                logits = model(token.view(1, 1), cache=cache, last_only=True)[:, -1]


def decode_step(model: CausalLM, cache: StaticKVCache, token: Tensor, pos: Tensor, structure: int = 0) -> Tensor:
    """Logits [1, V] of one token at position `pos` (a [1] tensor): static shapes throughout.
    `structure` (`structure_key(model)`) only tells compiled graphs of different models apart:
    dynamo guards a value only where the code reads it, hence the read below."""
    cache.structure = structure
    cache.decode_at(pos)
    return model(token, cache=cache, last_only=True)[:, -1]


def _layout(value: Any, depth: int = 0) -> Any:
    """What a compiled graph depends on in one attribute: a tensor's dtype, shape and device,
    a plain value itself, a plain object's (a config's) fields, anything else its type."""
    if isinstance(value, Tensor):
        return (value.dtype, tuple(value.shape), value.device.type)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_layout(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3:
        return tuple((k, _layout(v, depth + 1)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    if hasattr(value, "__dict__") and not isinstance(value, nn.Module) and not callable(value) and depth < 3:
        return (type(value).__qualname__, _layout(vars(value), depth + 1))
    return type(value).__qualname__


def structure_key(model: nn.Module) -> int:
    """A fingerprint of what a compiled step assumes about a model: every module's type, mode
    and attributes (the config's values among them), every weight's dtype, shape and device and
    which weights are one tensor (a tied head), but not the values, which the graph reads at
    each call. Taken once a generation, it stands in for dynamo's guards on the modules, which
    `compiled_decode_step` drops: checking ~4,000 of them cost ~0.5 ms a token for a 153M model.
    Models of one structure share a graph (dynamo keeps at most 8 per function)."""
    first_seen: dict[int, int] = {}  # a tensor's identity -> the index it was first seen at
    parts = []
    for name, module in model.named_modules():
        attrs = tuple((k, _layout(v)) for k, v in sorted(module.__dict__.items())
                      if k not in ("_parameters", "_buffers", "_modules") and not k.endswith("_hooks"))
        tensors = []
        for k, t in [*module._parameters.items(), *module._buffers.items()]:
            alias = first_seen.setdefault(id(t), len(first_seen)) if t is not None else None
            tensors.append((k, _layout(t), alias))
        parts.append((name, type(module).__qualname__, attrs, tuple(tensors)))
    return hash(tuple(parts))


def _skip_guards_under_model(entries: list) -> list[bool]:
    """Keep every guard but those reached through `decode_step`'s `model` argument. Frames
    that resume after a graph break (a mixture of experts' routing) keep all of theirs: there
    the module is a local of its own, and its guards tell one layer from another."""
    return [not (e.name == "model" or e.name.startswith(("model.", "model["))) for e in entries]


@functools.cache
def compiled_decode_step(device_type: str = "cpu"):
    """`decode_step` under `torch.compile` (one per process and device type; it compiles once per
    model structure and cache size). Not fullgraph: a mixture of experts routes by data (`nonzero`) and
    breaks the graph there. On the CPU the graph's wrapper is generated C++ (`cpp_wrapper`), not
    Python: a step launches ~150 kernels, and calling them from Python cost ~2 ms a token, a
    fifth of the step for a 153M model (benchmarks/quant.py). Dynamo's guards on the model are
    dropped (callers pass `structure_key(model)` instead, which dynamo guards as one int); the
    guards on the cache, token and position stay."""
    options: dict[str, Any] = {}
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # guard filters: torch >= 2.8
        options["guard_filter_fn"] = _skip_guards_under_model
    if device_type == "cpu":
        options["cpp_wrapper"] = True
    return torch.compile(decode_step, dynamic=False, options=options)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (hold them back)."""
    return max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)


def stream_text(model: CausalLM, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                ignore_eos: bool = False, **sampling: Any) -> Iterator[str]:
    """Yield text pieces as they are generated; ends at EOS or the first stop string (excluded)."""
    from ember.tokenizer import IncrementalDecoder

    decoder = IncrementalDecoder(tokenizer)
    stop_ids = () if ignore_eos else tuple(eos_ids(model, tokenizer))
    held = ""  # text that could still turn out to be the start of a stop string
    for tok in generate_ids(model, prompt_ids, stop_ids=stop_ids, **sampling):
        if tok in stop_ids:
            break
        held += decoder.push(tok)
        cut = find_stop(held, stop)
        if cut is not None:
            if held[:cut]:
                yield held[:cut]
            return
        keep = stop_holdback(held, stop)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    held += decoder.flush()
    cut = find_stop(held, stop)
    if cut is not None:
        held = held[:cut]
    if held:
        yield held


def generate(model: CausalLM, tokenizer: Any, prompt: str, max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | str | None = None, compile: bool = False) -> str:
    """Complete `prompt` and return the new text (temperature 0 = greedy)."""
    if isinstance(stop, str):
        stop = [stop]
    prompt_ids = tokenizer.encode(prompt, add_bos=bool(getattr(tokenizer, "add_bos_token", False)))
    return "".join(stream_text(model, tokenizer, prompt_ids, stop=stop or (), max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0,
                               min_p=min_p or 0.0, repetition_penalty=repetition_penalty, seed=seed,
                               compile=compile))
