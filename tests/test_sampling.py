"""Sampler transforms on a handful of numbers, and the generator's stop handling."""

import math

import pytest
import torch

from ember.config import preset
from ember.errors import EmberError
from ember.generation import generate_ids, stream_text
from ember.model import CausalLM
from ember.sampling import (PenaltyTracker, SamplingParams, SamplingRows, apply_min_p, apply_presence_frequency,
                            apply_repetition_penalty, apply_top_k, apply_top_p, sample)

NEG = float("-inf")


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 1.0, 2.0, 3.0]])
    out = apply_top_k(logits, torch.tensor([2, 1]))
    assert out[0].tolist() == [NEG, 3.0, 2.0, NEG]
    assert out[1].tolist() == [4.0, NEG, NEG, NEG]
    assert torch.equal(apply_top_k(logits, 0), logits)  # 0 = off


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_p(probs.log(), 0.75)  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = apply_top_p(probs.log(), 0.85)
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]
    out = apply_top_p(probs.log(), 0.1)  # the top token always survives
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_min_p_is_relative_to_the_top_probability():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    out = apply_min_p(probs.log(), 0.2)  # threshold 0.12
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0, 1, 3]])
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25]]


def test_draw_matches_the_distribution():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]]).repeat(20000, 1)
    torch.manual_seed(0)
    tokens = sample(logits, SamplingRows([SamplingParams(temperature=1.0)] * len(logits))).token_ids
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(max_tokens=0), dict(top_k=-5), dict(repetition_penalty=0)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(EmberError):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalLM(preset("tiny", vocab_size=50, max_position_embeddings=64)).eval()


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    a = list(generate_ids(model, [1, 2, 3], SamplingParams(max_tokens=20, temperature=1.0, seed=7)))
    b = list(generate_ids(model, [1, 2, 3], SamplingParams(max_tokens=20, temperature=1.0, seed=7)))
    c = list(generate_ids(model, [1, 2, 3], SamplingParams(max_tokens=20, temperature=1.0, seed=8)))
    assert a == b and a != c


def test_kv_cache_decoding_matches_full_recompute(model):
    prompt = [5, 6, 7, 8]
    got = list(generate_ids(model, prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    ids = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_generation_stops_at_stop_token_and_respects_context(model):
    free = list(generate_ids(model, [1, 2], SamplingParams(max_tokens=10, temperature=0.0)))
    stop_at = free[3]
    got = list(generate_ids(model, [1, 2], SamplingParams(max_tokens=10, temperature=0.0), stop_ids=[stop_at]))
    assert got == free[:free.index(stop_at) + 1]
    with pytest.raises(EmberError, match="context"):
        list(generate_ids(model, list(range(10)) * 7, SamplingParams(max_tokens=5)))
    # generation never runs past the context window
    assert len(list(generate_ids(model, [1] * 60, SamplingParams(max_tokens=50, temperature=0.0)))) == 4


class CharTokenizer:
    """Each id is one character: enough to test stop-string handling."""
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_are_cut_and_never_partially_shown(model):
    tok = CharTokenizer()
    full = "".join(stream_text(model, tok, [1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0)))
    stop = full[10:13]
    pieces = list(stream_text(model, tok, [1, 2, 3], SamplingParams(stop=[stop], max_tokens=30, temperature=0.0)))
    text = "".join(pieces)
    assert text == full[:full.index(stop)]
    assert all(stop not in p for p in pieces)


def test_one_batched_call_draws_what_each_row_draws_alone():
    """Rows of every kind in one call (greedy, seeded, penalised, truncated, banned tokens) get
    the tokens and logprobs each would get alone: a row's parameters and random stream are its own."""
    V = 40
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1, top_k=5),
              SamplingParams(temperature=1.3, seed=2, top_p=0.8, min_p=0.05),
              SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=3),
              SamplingParams(temperature=0.9, seed=3, presence_penalty=0.5, frequency_penalty=0.7, logprobs=0),
              SamplingParams(temperature=1.0, seed=4)]
    banned = [[], [], [], [int(logits[3].argmax())], [], [1, 2, 3]]

    def rows_for(indices):
        trackers = []
        for i in indices:
            tracker = PenaltyTracker(params[i], [7, 8, 9], V) if params[i].has_penalties else None
            for t in (int(logits[i].argmax()), 3, 3) if tracker else ():
                tracker.add(t)
            trackers.append(tracker)
        gens = [torch.Generator().manual_seed(params[i].seed) if params[i].seed is not None else None for i in indices]
        return SamplingRows([params[i] for i in indices], gens, trackers, [banned[i] for i in indices])

    for trial in range(3):  # each trial: fresh streams, the same draws
        together = sample(logits, rows_for(range(6)))
        for i in range(6):
            alone = sample(logits[i:i + 1], rows_for([i]))
            assert int(together.token_ids[i]) == int(alone.token_ids[0])
            assert together.logprobs[i] == (alone.logprobs[0] if alone.logprobs else None)
    assert int(together.token_ids[3]) != int(logits[3].argmax())  # the banned greedy choice
    assert int(together.token_ids[5]) not in banned[5]
    assert set(together.logprobs[3]) >= {int(together.token_ids[3])} and len(together.logprobs[3]) <= 4
    assert list(together.logprobs[4]) == [int(together.token_ids[4])]  # logprobs=0: the chosen token only


def test_greedy_rows_take_the_argmax_after_penalties():
    logits = torch.tensor([[3.0, 2.9, 0.0], [1.0, 2.0, 0.0]])
    seen = PenaltyTracker(SamplingParams(repetition_penalty=2.0), [0], 3)  # token 0 is in the prompt
    rows = SamplingRows([SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(temperature=0)],
                        penalties=[seen, None])
    assert sample(logits, rows).token_ids.tolist() == [1, 1]  # 3.0 / 2 falls below 2.9



def test_the_generator_keeps_min_tokens_as_the_engine_does(model):
    """A stop token cannot end a generation before min_tokens; after that it ends it as usual."""
    prompt = [3, 4, 5]
    first = next(generate_ids(model, prompt, SamplingParams(max_tokens=1, temperature=0.0)))
    free = list(generate_ids(model, prompt, SamplingParams(max_tokens=8, temperature=0.0), stop_ids=[first]))
    assert free == [first]
    held = list(generate_ids(model, prompt, SamplingParams(max_tokens=8, temperature=0.0, min_tokens=3),
                             stop_ids=[first]))
    assert first not in held[:3] and len(held) >= 3
