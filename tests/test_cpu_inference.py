"""The CPU fast path swapped in at load time (ember/cpu_inference.py): which layers it replaces,
and that a prepared model computes what the plain one does."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import need
from ember import gemv
from ember.config import ModelConfig
from ember.cpu_inference import (CPULinear, FusedProjection, Int4KernelLinear, Int8KernelLinear,
                                 onednn_packing_available, prepare_for_inference)
from ember.kv_cache import KVCache
from ember.lora import LoraConfig, LoraLinear, apply_lora, merge_and_unload
from ember.model import MLP, Attention, CausalLM
from ember.quant import quantize_model
from ember.quant.int4 import Int4Linear
from ember.quant.int8 import Int8Linear
from ember.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not gemv.available(),
                                reason="the GEMV kernel needs an x86 CPU with AVX2 and a C++ compiler")

INFERENCE_TYPES = (CPULinear, Int8KernelLinear, Int4KernelLinear)


def config(**overrides) -> ModelConfig:
    # A larger init than training's (0.02) spreads the logits, so that greedy choices are not
    # near-ties that float rounding could flip.
    fields = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    return ModelConfig(**{**fields, **overrides})


def variant(name: str) -> CausalLM:
    torch.manual_seed(0)
    if name == "tied":
        return CausalLM(config(tie_word_embeddings=True)).eval()
    if name == "moe":
        return CausalLM(config(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)).eval()
    if name == "mha_bias":  # every head its own KV head; q/k/v biases (Qwen2's layout)
        return CausalLM(config(model_type="qwen2", num_key_value_heads=4, attention_bias=True)).eval()
    model = CausalLM(config()).eval()
    if name == "bf16":
        return model.to(torch.bfloat16)
    if name == "int8":
        return quantize_model(model, "int8")
    if name == "int4":
        return quantize_model(model, "int4", group_size=32)
    return model


# How far a prepared model's logits may sit from the plain model's, relative to their largest
# magnitude. fp32: both sum the same products in fp32, in another order (~1e-7 each, over a few
# hundred products and two layers). bf16: each layer's output is rounded to 8 bits (2^-8) on
# either side, and the two roundings may differ by one step in a few places, for a dozen
# roundings in a row. int8 / int4: the plain layers feed PyTorch's kernels bf16 activations
# (2^-8), the kernels activations rounded to int16 (2^-15): the bf16 side's rounding bounds it.
TOLERANCE = {"fp32": 1e-5, "tied": 1e-5, "moe": 1e-5, "mha_bias": 1e-5, "bf16": 4e-2, "int8": 3e-2, "int4": 3e-2}


def teacher_forced_logits(model: CausalLM, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [1 + len(tokens), V]: the prompt's last position, then one decode step per token."""
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(model.config, 1, len(prompt) + len(tokens), dtype=dtype)
    with torch.inference_mode():
        out = [model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1]]
        for t in tokens:
            out.append(model(torch.tensor([[t]]), cache=cache, last_only=True)[:, -1])
    return torch.cat(out).float()


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "int4", "tied", "moe", "mha_bias"])
def test_prepared_model_gives_the_plain_models_logits_and_greedy_tokens(name, monkeypatch):
    plain = variant(name)
    prepared = prepare_for_inference(copy.deepcopy(plain))
    prompt = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():  # the prompt's 20 rows: more than the GEMV takes
        full_plain, full_prepared = plain(torch.tensor([prompt])).float(), prepared(torch.tensor([prompt])).float()
    tol = TOLERANCE[name]
    assert (full_prepared - full_plain).abs().max() <= tol * full_plain.abs().max()

    tokens = teacher_forced_logits(plain, prompt, [])[0].argmax().view(1).tolist()
    for _ in range(10):  # the plain model's greedy continuation
        tokens.append(int(teacher_forced_logits(plain, prompt, tokens)[-1].argmax()))
    kernel_rows = []
    real, real_int4 = gemv.gemv, gemv.gemv_int4
    monkeypatch.setattr(gemv, "gemv", lambda x, w, *a, **k: kernel_rows.append(w.shape[0]) or real(x, w, *a, **k))
    monkeypatch.setattr(gemv, "gemv_int4",
                        lambda x, w, *a, **k: kernel_rows.append(w.shape[0]) or real_int4(x, w, *a, **k))
    want = teacher_forced_logits(plain, prompt, tokens[:-1])
    kernel_rows.clear()
    got = teacher_forced_logits(prepared, prompt, tokens[:-1])
    assert kernel_rows  # the decode steps' products went through Ember's kernels
    scale = want.abs().amax(-1)
    assert ((got - want).abs().amax(-1) <= tol * scale).all()
    # Where the plain model's best token leads the runner-up by more than both models' difference
    # can move them, the prepared model picks the same token.
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * scale
    assert clear.sum() >= len(tokens) // 2  # the check is not vacuous
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.parametrize("name,layer_type", [("fp32", CPULinear), ("bf16", CPULinear), ("int8", Int8KernelLinear),
                                             ("int4", Int4KernelLinear), ("tied", CPULinear), ("moe", CPULinear)])
def test_every_linear_layer_is_swapped_and_nothing_patched(name, layer_type):
    model = variant(name)
    tied = model.config.tie_word_embeddings
    prepare_for_inference(model)
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert type(module) not in (nn.Linear, Int8Linear, Int4Linear), module  # none left unswapped
        if isinstance(module, Attention):
            assert isinstance(module.qkv_proj, FusedProjection) and not hasattr(module, "q_proj")
            assert type(module.qkv_proj.layer) is layer_type and type(module.o_proj) is layer_type
        if isinstance(module, MLP):
            assert isinstance(module.gate_up_proj, FusedProjection) and not hasattr(module, "gate_proj")
    experts = [m for n, m in model.named_modules() if n.endswith((".w1", ".w2", ".w3", "block_sparse_moe.gate"))]
    assert all(type(m) is layer_type for m in experts) and (experts or name != "moe")
    if tied:  # the head reads the embedding table itself, not a copy
        assert model.lm_head.weight is model.model.embed_tokens.weight
    before = [(n, id(m)) for n, m in model.named_modules()]
    prepare_for_inference(model)  # a second call finds nothing to do
    assert [(n, id(m)) for n, m in model.named_modules()] == before


def test_adapters_keep_their_layers_and_merged_ones_are_swapped():
    """Live LoRA layers keep their own forward over their plain base (they may be trained or
    switched off), so their attention stays unfused; a merged and unloaded model is an ordinary one."""
    torch.manual_seed(0)
    model = apply_lora(CausalLM(config()).eval(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            nn.init.normal_(layer.lora_B.weight, std=0.1)  # a trained adapter: not zero
    x = torch.randint(0, 96, (1, 9))
    with torch.inference_mode():
        want = model(x)
    prepare_for_inference(model)
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(lora) == 4 and all(type(m.base_layer) is nn.Linear for m in lora)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj is None and type(attn.k_proj) is CPULinear and type(attn.o_proj) is CPULinear
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, FusedProjection)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5 * float(want.abs().max()))

    merged = merge_and_unload(model)
    prepare_for_inference(merged)
    assert not any(type(m) is nn.Linear for m in merged.modules())
    with torch.inference_mode():  # fp32 sums in another order: see TOLERANCE
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_a_model_off_the_cpu_is_left_alone():
    with torch.device("meta"):
        model = CausalLM(config())
    prepare_for_inference(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert model.model.layers[0].self_attn.qkv_proj is None


def test_layers_of_different_formats_stay_apart():
    """q in int8 beside float k and v: no stacked layer of one kind exists, so each layer is swapped
    on its own, and the outputs are those of the unfused layers."""
    torch.manual_seed(0)
    model = CausalLM(config()).eval()
    attn = model.model.layers[0].self_attn
    attn.q_proj = Int8Linear.from_linear(attn.q_proj)
    x = torch.randint(0, 96, (1, 5))
    with torch.inference_mode():
        want = model(x)
    prepare_for_inference(model)
    assert attn.qkv_proj is None and type(attn.q_proj) is Int8KernelLinear and type(attn.k_proj) is CPULinear
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, FusedProjection)
    with torch.inference_mode():  # the int8 layer's activations: bf16 before, int16 now (see TOLERANCE)
        torch.testing.assert_close(model(x), want, rtol=0, atol=TOLERANCE["int8"] * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_projection_gives_each_layers_own_kernel_result(kind, rows):
    """q, k and v stacked into one kernel call: the kernel computes each output row on its own, so
    every part equals, bit for bit, what that layer alone gives through the same kernel, biases
    included (one of them without)."""
    torch.manual_seed(0)
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    plain = [nn.Linear(128, n, bias=n == 64) for n in (128, 64, 64)]
    convert = {"int8": Int8Linear.from_linear, "int4": lambda m: Int4Linear.from_linear(m, 64)}.get(kind)
    layers = [(convert(m) if convert else m).to(dtype) for m in plain]
    alone = {"int8": Int8KernelLinear.of, "int4": Int4KernelLinear.of}.get(kind, CPULinear.of)
    model = CausalLM(config(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32)).eval().to(dtype)
    attn = model.model.layers[0].self_attn
    attn.q_proj, attn.k_proj, attn.v_proj = copy.deepcopy(layers)
    prepare_for_inference(model)
    x = torch.randn(1, rows, 128, dtype=dtype)
    with torch.inference_mode():
        fused = attn.qkv_proj(x)
        assert [y.shape[-1] for y in fused] == [128, 64, 64]
        for layer, y in zip(layers, fused):
            assert torch.equal(y, alone(layer)(x))


def test_packed_weights_match_and_follow_weight_updates():
    need(onednn_packing_available(), "this PyTorch build has no oneDNN packed linear (CI's pinned CPU build has it)")
    torch.manual_seed(0)
    layer = CPULinear.of(nn.Linear(64, 96))
    x = torch.randn(5, 7, 64)  # 35 rows: more than the GEMV takes, so the packed path
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is not None
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # changed in place, as an optimizer step does
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(layer(x[:1, :1]), F.linear(x[:1, :1], layer.weight, layer.bias))
    layer.weight = nn.Parameter(torch.randn(96, 64))  # replaced
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    twin = copy.deepcopy(layer)  # the packed copy stays behind; the twin packs its own
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), layer(x))


def test_a_prepared_model_still_trains_through_pytorchs_kernels():
    """The kernels have no backward: under autograd the inference layers hand the product to
    PyTorch, so the head's gradient is the plain model's."""
    plain = variant("fp32").train()
    prepared = prepare_for_inference(copy.deepcopy(plain))
    x = torch.randint(0, 96, (1, 1))  # one row: the GEMV's shape, but a gradient is wanted
    for model in (plain, prepared):
        model(x).float().logsumexp(-1).sum().backward()
    assert prepared.lm_head.weight.grad is not None
    torch.testing.assert_close(prepared.lm_head.weight.grad, plain.lm_head.weight.grad)


@pytest.mark.slow  # one torch.compile run of a tiny model
def test_compiled_decode_step_runs_a_prepared_model():
    from ember.generation import generate_ids

    model = prepare_for_inference(variant("int8"))
    prompt = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    eager = list(generate_ids(model, prompt, SamplingParams(max_tokens=16, temperature=0.0)))
    assert list(generate_ids(model, prompt, SamplingParams(max_tokens=16, temperature=0.0), compile=True)) == eager


def test_packing_a_weight_at_first_use_leaves_the_structure_key_alone():
    """The packed copy fills at the first many-row product; a compiled step keyed on the model's
    structure must not recompile for it (it would, inside the first long prompt's generation)."""
    from ember.compiled_step import structure_key

    model = prepare_for_inference(variant("fp32"))
    before = structure_key(model)
    with torch.inference_mode():
        model(torch.randint(0, 96, (1, 40)))  # 40 rows: past the GEMV, through the packed weights
    assert any(getattr(m, "_packed", None) is not None for m in model.modules())
    assert structure_key(model) == before


def test_a_model_prepared_and_run_inside_inference_mode_packs_its_weights():
    """Weights made in inference mode have no version counter; the packed copy is named by the
    weight's storage alone there."""
    with torch.inference_mode():
        model = prepare_for_inference(variant("fp32"))
        ids = torch.randint(0, 96, (1, 40))
        torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)  # the second reads the packed copy
