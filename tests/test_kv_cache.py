"""The contiguous KV caches (ember/kv_cache.py)."""

import pytest
import torch

from ember import gemv
from ember.compiled_step import decode_step
from ember.config import ModelConfig
from ember.kv_cache import KVCache, StaticKVCache
from ember.model import CausalLM
from ember.sampling import SamplingParams

from conftest import need_kernel


@pytest.mark.parametrize("window", [None, 6])
def test_static_cache_steps_give_the_contiguous_cache_logits(window):
    """The compiled decode step's cache (static shapes, masked) against the plain one, eagerly."""
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, sliding_window=window)
    model = CausalLM(cfg).eval()
    prompt = torch.randint(0, 96, (1, 5))
    plain, static = KVCache(cfg, 1, 64), StaticKVCache(cfg, 64)
    with torch.inference_mode():
        model(prompt, cache=plain)
        model(prompt, cache=static)
        for step in range(12):  # past the window: old keys must drop out in both
            token = torch.tensor([[step + 7]])
            expected = model(token, cache=plain, last_only=True)[:, -1]
            got = decode_step(model, static, token, static.next_position())
            assert torch.allclose(got, expected, atol=1e-5), step


@pytest.mark.slow  # three torch.compile runs of a tiny model, ~10 s each on 2 cores
def test_compiled_steps_follow_the_model_they_are_given():
    """The compiled step drops dynamo's guards on the modules and tells models apart by
    `structure_key` instead: a model of the same shapes but another structure (int8 layers, an
    untied head, another config value), and the first one changed in place, each get their own
    graph and their own tokens; a model of the same structure shares the graph, with its own weights."""
    import copy
    import dataclasses

    from torch import nn

    from ember.compiled_step import structure_key
    from ember.generation import generate_ids
    from ember.quant import quantize_model
    from ember.quant.int8 import Int8Linear

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True)
    plain = CausalLM(cfg).eval()
    int8 = quantize_model(copy.deepcopy(plain), "int8")
    prompt = torch.randint(0, 96, (9,)).tolist()

    def tokens(model, compile):
        return list(generate_ids(model, prompt, SamplingParams(max_tokens=24, temperature=0.0), compile=compile))

    twin = CausalLM(cfg).eval()  # same structure, other weights
    untied = copy.deepcopy(plain)  # the same config and shapes, but the head its own tensor
    untied.lm_head.weight = nn.Parameter(plain.lm_head.weight.detach() * -2.0)
    assert structure_key(twin) == structure_key(plain)
    other_theta = CausalLM(dataclasses.replace(cfg, rope_theta=99.0))
    assert len({structure_key(m) for m in (plain, int8, untied, other_theta)}) == 4
    int4_twins = [quantize_model(copy.deepcopy(m), "int4", group_size=32) for m in (plain, twin)]
    assert structure_key(int4_twins[0]) == structure_key(int4_twins[1])  # kernel scales read per call too
    for model in (plain, int8, twin, untied, *int4_twins, plain):
        assert tokens(model, True) == tokens(model, False)
    before = structure_key(plain)
    with torch.no_grad():  # in place: the same object, other weights and another layer type
        plain.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    mlp = plain.model.layers[0].mlp
    mlp.down_proj = Int8Linear.from_linear(mlp.down_proj)
    assert structure_key(plain) != before
    assert tokens(plain, True) == tokens(plain, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_contiguous_cache_decodes_through_the_attention_kernel_with_sdpas_result(dtype, window, monkeypatch):
    """One query a step: the caches attend through Ember's kernel (within and past a sliding
    window, eager and static), and the logits are SDPA's. fp32: the same sums in another order
    (~1e-7 relative each); bf16: the kernel's output is rounded to 8 bits where SDPA's fp32 path
    rounds it too, so one bf16 step (2^-8) in a few places, carried through two layers."""
    need_kernel()
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, sliding_window=window, initializer_range=0.2)
    model = CausalLM(cfg).eval().to(dtype)
    prompt = torch.randint(0, 96, (1, 5))
    tol = 1e-5 if dtype == torch.float32 else 3e-2

    def steps(static: bool) -> torch.Tensor:
        cache = StaticKVCache(cfg, 64, dtype=dtype) if static else KVCache(cfg, 1, 64, dtype=dtype)
        out = []
        with torch.inference_mode():
            model(prompt, cache=cache)
            for step in range(10):  # past the window
                token = torch.tensor([[step + 7]])
                out.append(decode_step(model, cache, token, cache.next_position()) if static
                           else model(token, cache=cache, last_only=True)[:, -1])
        return torch.cat(out).float()

    calls = []
    real = gemv.decode_attention
    monkeypatch.setattr(gemv, "decode_attention", lambda *a: calls.append(1) or real(*a))
    for static in (False, True):
        calls.clear()
        kernel = steps(static)
        assert len(calls) == 10 * cfg.num_hidden_layers  # every decode step's attention, in every layer
        with monkeypatch.context() as m:
            m.setattr(gemv, "decode_attention_applies", lambda *a: False)  # SDPA instead
            sdpa = steps(static)
        assert not (len(calls) > 10 * cfg.num_hidden_layers)
        assert (kernel - sdpa).abs().max() <= tol * sdpa.abs().max()
