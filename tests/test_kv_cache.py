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


@pytest.mark.slow  # two torch.compile runs of a tiny model
@pytest.mark.parametrize("kind", ["int4", "bf16"])
def test_compiled_greedy_matches_eager_on_a_prepared_model_through_the_kernels(kind):
    """A model prepared for inference (fused q/k/v and gate/up, Ember's int4 or float kernel
    layers, a tied head) decodes the same greedy tokens compiled as eagerly, and the compiled
    graph runs every one of its products and attentions in Ember's kernels, not a fallback."""
    need_kernel()
    from torch.profiler import profile

    from ember.compiled_step import compiled_decode_step, structure_key
    from ember.cpu_inference import prepare_for_inference
    from ember.generation import generate_ids
    from ember.quant import quantize_model

    torch.manual_seed(0)
    # A larger init than training's spreads the logits: greedy choices are not near-ties.
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.2)
    model = CausalLM(cfg).eval()
    model = quantize_model(model, "int4", group_size=32) if kind == "int4" else model.to(torch.bfloat16)
    prepare_for_inference(model)
    prompt = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=20, temperature=0.0)
    eager = list(generate_ids(model, prompt, params))
    assert list(generate_ids(model, prompt, params, compile=True)) == eager

    dtype = model.model.embed_tokens.weight.dtype
    step = compiled_decode_step("cpu")
    with torch.inference_mode():  # the cache made as the generator makes it: the same graph
        cache = StaticKVCache(cfg, cfg.max_position_embeddings, dtype=dtype)
        model(torch.tensor([prompt]), cache=cache)
        with profile() as prof:
            step(model, cache, torch.tensor([[eager[0]]]), cache.next_position(), structure_key(model))
    # One entry a call: the profiler also records an op's inner dispatches under its own name.
    calls = [e.name for e in prof.events() if e.name.startswith("ember_gemv::")
             and (e.cpu_parent is None or e.cpu_parent.name != e.name)]
    layers = cfg.num_hidden_layers
    # Per layer: q/k/v, o, gate/up and down; then the (float, tied) head; one attention a layer.
    product = "ember_gemv::gemv_int4" if kind == "int4" else "ember_gemv::gemv"
    assert calls.count(product) + calls.count("ember_gemv::gemv") * (kind == "int4") == 4 * layers + 1
    assert calls.count("ember_gemv::decode_attention") == layers


def test_greedy_generation_takes_the_argmax_without_the_sampler(monkeypatch):
    """Greedy decoding without penalties is the argmax of each step's logits, taken directly;
    the sampler still runs while stop tokens are banned (before min_tokens), and gives the same
    tokens where both apply."""
    import ember.generation as generation

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, initializer_range=0.2)
    model = CausalLM(cfg).eval()
    prompt = [5, 9, 2, 77, 31]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    sampled = list(generation.generate_ids(model, prompt, params))  # reference, before patching

    # The reference, step by step from the model's own logits: argmax of each.
    cache = KVCache(cfg, 1, 32)
    expected = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1]
        for _ in range(12):
            expected.append(int(logits.argmax()))
            logits = model(torch.tensor([[expected[-1]]]), cache=cache, last_only=True)[:, -1]
    assert sampled == expected

    real_sample, calls = generation.sample, []
    monkeypatch.setattr(generation, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    assert list(generation.generate_ids(model, prompt, params)) == expected
    assert calls == []
    stop = expected[5]  # banned for the first 3 tokens only: there the sampler runs
    banned = SamplingParams(max_tokens=12, temperature=0.0, min_tokens=3)
    list(generation.generate_ids(model, prompt, banned, stop_ids=(stop,)))
    assert len(calls) == 3
