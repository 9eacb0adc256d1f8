"""What a generation request may ask for and what ends it, shared by the simple generator
(`ember.generation`) and the engine: prompt ids the model can take, and the token ids that
end a completion (the model's and tokenizer's EOS, and the request's own stop tokens)."""

from __future__ import annotations

from typing import Any, Sequence

from ember.errors import EmberError
from ember.model import CausalLM
from ember.sampling import SamplingParams


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int, context: int) -> None:
    """Refuse prompts the model cannot take: empty, unknown ids, or no room left to generate."""
    if len(prompt_ids) == 0:
        raise EmberError("The prompt is empty; give at least one token.")
    if max(prompt_ids) >= vocab_size or min(prompt_ids) < 0:
        raise EmberError(f"Prompt token ids must be in [0, {vocab_size}).")
    if len(prompt_ids) >= context:
        raise EmberError(f"The prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                         "shorten the prompt.")


def eos_ids(model: CausalLM, tokenizer: Any = None) -> set[int]:
    """The end-of-sequence ids of the model's config and of its tokenizer."""
    ids: set[int] = set()
    eos = model.config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(eos)
    if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        ids.add(tokenizer.eos_id)
    return ids


def stop_token_ids(params: SamplingParams, model: CausalLM, tokenizer: Any = None) -> frozenset[int]:
    """Token ids that end a completion: the request's stop_token_ids always, EOS unless ignore_eos."""
    eos = frozenset() if params.ignore_eos else frozenset(eos_ids(model, tokenizer))
    return frozenset(params.stop_token_ids) | eos
