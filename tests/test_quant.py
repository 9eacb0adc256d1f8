"""Quantization: error bounds per method, NF4 as QLoRA defines it, checkpoints, the engine,
and SmoothQuant's point (outliers break naive W8A8; migrating them into the weights fixes it)."""

import copy

import pytest
import torch
from torch import nn

import ember
from ember.config import preset
from ember.errors import EmberError
from ember.generation import generate_ids
from ember.model import CausalLM
from ember.quant import quantize_model, weight_bytes
from ember.quant.int4 import Int4Linear
from ember.quant.int8 import Int8Linear
from ember.quant.io import save_quantized
from ember.quant.kernels import fallback_only, kernel_works
from ember.quant.nf4 import NF4_CODE, NF4Linear, dynamic_code, nf4_code_from_definition, quantize_nf4
from ember.quant.outliers import inject_outliers
from ember.quant.smoothquant import W8A8Linear
from ember.sampling import SamplingParams

VOCAB = 97
METHODS = [("int8", {}), ("int4", {"group_size": 32}), ("nf4", {}), ("w8a8", {}), ("smoothquant", {})]


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return CausalLM(preset("tiny", **{"vocab_size": VOCAB, "intermediate_size": 128, **kw})).eval()


def calib(n=4, t=48, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def quantize(model, method, kw):
    kw = dict(kw, calibration=calib()) if method == "smoothquant" else kw
    return quantize_model(copy.deepcopy(model), method, **kw)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- NF4: the QLoRA definition ------------------------------------------------------------------
def test_nf4_code_is_the_normal_quantile_code_of_the_paper():
    assert NF4_CODE.shape == (16,) and torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and NF4_CODE[7] == 0  # exact zero, asymmetric
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7
    torch.testing.assert_close(nf4_code_from_definition(), NF4_CODE, atol=1e-6, rtol=0)


def test_nf4_blocks_run_over_the_flattened_weight_with_the_first_value_in_the_high_nibble():
    w = torch.zeros(4, 32)  # 128 values = 2 blocks of 64
    w.view(-1)[:64] = NF4_CODE.repeat(4) * 3.0  # block 0: absmax 3, every value exactly a code point
    w.view(-1)[64:] = NF4_CODE.flip(0).repeat(4) * 0.5
    q = quantize_nf4(w, double_quant=False)
    torch.testing.assert_close(q.absmax, torch.tensor([3.0, 0.5]))
    assert q.packed.shape == (64,) and q.packed.dtype == torch.uint8
    assert q.packed[0] == (0 << 4 | 1) and q.packed[32] == (15 << 4 | 14)
    torch.testing.assert_close(q.dequantize(), w)


def test_double_quant_stores_8bit_scales_in_blocks_of_256_around_their_mean():
    w = torch.randn(64, 1024)  # 1024 blocks of 64 -> 4 second-level blocks
    q, plain = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    assert q.absmax.dtype == torch.uint8 and q.absmax.shape == (1024,) and q.absmax_scale.shape == (4,)
    torch.testing.assert_close(q.absmax_offset, plain.absmax.mean())
    code = dynamic_code()
    assert code.shape == (256,) and code.min() > -1 and code[-1] == 1 and (code == 0).any()
    # the 8-bit scales are close to the fp32 ones, and cost 8 instead of 32 bits per block
    step = (code[1:] - code[:-1]).max() * q.absmax_scale.max()
    assert (q.block_scales() - plain.absmax).abs().max() <= step / 2 + 1e-6
    assert plain.nbytes() - q.nbytes() == 1024 * 3 - 4 * 4 - 4
    assert q.nbytes() < w.numel() * 4 / 7.5  # ≈ 4.13 bits per weight


def test_nf4_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference")
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(0))
    ref_q, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, ref_q.view(-1)) and torch.equal(q.absmax, ref_state.absmax)
    torch.testing.assert_close(q.dequantize(), F.dequantize_4bit(ref_q, ref_state))
    ref_q, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, ref_q.view(-1))
    assert torch.equal(dynamic_code(), ref_state.state2.code)
    torch.testing.assert_close(q.absmax_offset, ref_state.offset)
    torch.testing.assert_close(q.absmax_scale, ref_state.state2.absmax)
    # 8-bit scale indices: equal except for values on a rounding midpoint (one step apart)
    diff = (q.absmax.int() - ref_state.absmax.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.98
    torch.testing.assert_close(q.dequantize(), F.dequantize_4bit(ref_q, ref_state), atol=2e-3, rtol=0)


def test_nf4_linear_is_frozen_and_passes_gradients_to_its_input():
    lin = nn.Linear(128, 64)
    layer = NF4Linear.from_linear(lin)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    ref = torch.autograd.grad(nn.functional.linear(x, layer.dequantize(), layer.bias).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref)
    assert layer.dequantize().shape == lin.weight.shape


@pytest.mark.parametrize("method,kw", [m for m in METHODS if m[0] in ("int8", "int4", "nf4")])
def test_weight_only_layers_pass_gradients_to_their_input(method, kw):
    """Frozen weight-only quantized layers still let a gradient through to x (e.g. a LoRA adapter
    on a quantized base, or input attributions): the fused kernels have no backward, so such
    inputs take the dequantizing path. (W8A8 rounds x itself, so its gradient is another matter.)"""
    q = quantize(small_model(), method, kw)
    layer = q.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    ref = torch.autograd.grad(nn.functional.linear(x, layer.dequantize(), layer.bias).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref, rtol=0.02, atol=0.02)


# --- error bounds per method ------------------------------------------------------------------------
def test_int8_error_is_at_most_half_a_step_per_row():
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    layer = Int8Linear.from_linear(_with_weight(w))
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((layer.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def _with_weight(w):
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data = w.clone()
    return lin


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group_size):
    w = torch.randn(40, 256) * 2 + torch.randn(40, 1)  # groups with an offset: the zero point matters
    layer = Int4Linear.from_linear(_with_weight(w), group_size)
    g = w.view(40, -1, group_size)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(group_size, 1)
    zero = layer.scales_and_zeros[..., 1].float().t().abs().repeat_interleave(group_size, 1)
    bf16 = 2.0 ** -8  # scales and zero points are stored in bf16
    assert ((layer.dequantize() - w).abs() <= step / 2 + 8 * step * bf16 + zero * bf16 + 1e-6).all()


def test_nf4_error_is_at_most_half_the_widest_code_gap_per_block():
    w = torch.randn(64, 256)
    q = quantize_nf4(w)
    half_gap = ((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2).item()
    scales = q.block_scales().repeat_interleave(64).view(64, 256)
    true_scales = w.view(-1, 64).abs().amax(1).repeat_interleave(64).view(64, 256)
    bound = scales * half_gap + (scales - true_scales).abs() + 1e-6
    assert ((q.dequantize() - w).abs() <= bound).all()


def test_w8a8_matmul_is_exact_integer_arithmetic_on_the_quantized_values():
    lin = nn.Linear(64, 32)
    layer = W8A8Linear.from_linear(lin)
    x = torch.randn(5, 64) * 3
    xs = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / xs)
    expected = (xq.double() @ layer.qweight.double().t()) * xs.double() * layer.scales.double() + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)
    assert rel_err(layer(x), lin(x)) < 0.02


@pytest.mark.parametrize("method,kw", METHODS)
def test_quantized_model_stays_close_to_fp32_and_is_smaller(method, kw):
    model = small_model()
    ids = calib(2, 40, seed=5)
    q = quantize(model, method, kw)
    bound = {"int8": 0.01, "w8a8": 0.02, "smoothquant": 0.02, "int4": 0.15, "nf4": 0.15}[method]
    assert rel_err(q(ids), model(ids)) < bound
    assert weight_bytes(q) < weight_bytes(model) / 2
    assert q.quantization_config["method"] == method
    assert isinstance(q.lm_head, nn.Linear) and isinstance(q.model.embed_tokens, nn.Embedding)


@pytest.mark.parametrize("cls,kw", [(Int8Linear, {}), (Int4Linear, {"group_size": 64})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_agree_with_dequantize_then_matmul(cls, kw, dtype):
    name = "int8pack" if cls is Int8Linear else "int4pack_cpu"
    if not kernel_works(name, torch.device("cpu"), dtype):
        pytest.skip(f"this PyTorch build has no CPU {name} kernel for {dtype}")
    layer = cls.from_linear(nn.Linear(192, 80), **kw).to(dtype)
    x = torch.randn(7, 192).to(dtype)
    with fallback_only():
        ref = layer(x)
    out = layer(x)
    tol = 0.03  # on CPU both kernels take bf16 activations, also in an fp32 model
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


# --- checkpoints, load_model and the engine --------------------------------------------------------
@pytest.mark.parametrize("method,kw", METHODS + [("int4", {"group_size": 64}), ("nf4", {"double_quant": False})])
def test_quantized_checkpoint_round_trip_gives_identical_logits(method, kw, tmp_path):
    q = quantize(small_model(), method, kw)
    ids = calib(2, 30, seed=3)
    save_quantized(q, None, tmp_path / "q")
    loaded = ember.load_model(tmp_path / "q", device="cpu")
    assert loaded.quantization_config == q.quantization_config
    assert torch.equal(loaded(ids), q(ids))


def test_int4_pads_widths_that_are_no_multiple_of_the_group_and_round_trips(tmp_path):
    model = small_model(intermediate_size=176)  # down_proj reads 176 = 5.5 groups of 32
    q = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    ids = calib(1, 20)
    assert rel_err(q(ids), model(ids)) < 0.15
    save_quantized(q, None, tmp_path / "q")
    assert torch.equal(ember.load_model(tmp_path / "q", device="cpu")(ids), q(ids))


def test_load_model_quantizes_on_load_and_loads_bf16(tmp_path):
    model = small_model()
    ember.save_pretrained(model, None, tmp_path / "m")
    ids = calib(1, 20)
    on_load = ember.load_model(tmp_path / "m", device="cpu", quantization="int8")
    assert torch.equal(on_load(ids), quantize_model(copy.deepcopy(model), "int8")(ids))
    save_quantized(on_load, None, tmp_path / "q")
    half = ember.load_model(tmp_path / "q", device="cpu", dtype="bfloat16")
    assert half(ids).dtype == torch.bfloat16 and half.model.layers[0].mlp.up_proj.scales.dtype == torch.float32
    with pytest.raises(EmberError, match="already quantized with int8"):
        ember.load_model(tmp_path / "q", device="cpu", quantization="int4")


def greedy_full_recompute(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("method", ["int4", "nf4", "smoothquant"])
def test_quantized_model_decodes_greedily_in_the_engine(method, tmp_path):
    q = quantize(small_model(), method, {"group_size": 32} if method == "int4" else {})
    save_quantized(q, None, tmp_path / "q")
    prompts = [calib(1, n, seed=n)[0].tolist() for n in (5, 17)]
    llm = ember.LLM(ember.load_model(tmp_path / "q", device="cpu"), num_kv_blocks=64, block_size=8)
    outs = llm.generate(prompts, ember.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == greedy_full_recompute(q, p, 8)


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_lm_head_quantizes_on_request_in_int8_under_the_4bit_methods(method, tmp_path):
    model = small_model(tie_word_embeddings=False)
    kw = {"group_size": 32} if method == "int4" else {}
    q = quantize_model(copy.deepcopy(model), method, include_lm_head=True, **kw)
    assert type(q.lm_head) is Int8Linear and q.quantization_config["lm_head_method"] == "int8"
    ids = calib(2, 30)
    assert rel_err(q(ids), model(ids)) < (0.01 if method == "int8" else 0.15)
    save_quantized(q, None, tmp_path / "q")
    loaded = ember.load_model(tmp_path / "q", device="cpu")
    assert type(loaded.lm_head) is Int8Linear and torch.equal(loaded(ids), q(ids))
    prompts = [calib(1, n, seed=n)[0].tolist() for n in (5, 17)]
    outs = ember.LLM(loaded, num_kv_blocks=64, block_size=8).generate(
        prompts, ember.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for p, out in zip(prompts, outs):
        # Against the KV-cached generator, which decodes one row at a time like the engine: a full
        # recompute past 16 rows takes PyTorch's int8 kernel in bf16, whose logits tie now and then.
        assert out.outputs[0].token_ids == list(generate_ids(q, p, SamplingParams(max_tokens=8, temperature=0.0)))
    tied = quantize_model(small_model(tie_word_embeddings=True), method, include_lm_head=True, **kw)
    assert type(tied.lm_head) is nn.Linear and "lm_head_method" not in tied.quantization_config


def test_lm_head_takes_the_method_itself_on_request_and_round_trips(tmp_path):
    """int4 everywhere (the fewest bytes a token): the head as Int4Linear, saved and loaded as such."""
    model = small_model(tie_word_embeddings=False)
    q = quantize_model(copy.deepcopy(model), "int4", group_size=32, include_lm_head=True, lm_head_method="int4")
    assert type(q.lm_head) is Int4Linear and q.quantization_config["lm_head_method"] == "int4"
    ids = calib(2, 30)
    assert rel_err(q(ids), model(ids)) < 0.15
    save_quantized(q, None, tmp_path / "q")
    loaded = ember.load_model(tmp_path / "q", device="cpu")
    assert type(loaded.lm_head) is Int4Linear and torch.equal(loaded(ids), q(ids))
    with pytest.raises(EmberError, match="int8 or int4"):
        quantize_model(copy.deepcopy(model), "int4", include_lm_head=True, lm_head_method="nf4")


# --- SmoothQuant's point -------------------------------------------------------------------------------
def test_smoothquant_recovers_what_activation_outliers_cost_naive_w8a8():
    model = small_model()
    ids = calib(4, 48, seed=9)
    ref = model(ids)
    outlier = copy.deepcopy(model)
    inject_outliers(outlier, channels=4, factor=50.0)
    assert rel_err(outlier(ids), ref) < 1e-5  # same function, different activations
    clean = rel_err(quantize(model, "w8a8", {})(ids), ref)
    naive = rel_err(quantize(outlier, "w8a8", {})(ids), ref)
    smooth = rel_err(quantize(outlier, "smoothquant", {})(ids), ref)
    assert naive > 5 * clean  # outliers ruin per-token int8 activations
    assert smooth < 1.5 * clean  # SmoothQuant moves them into the weights and recovers


def test_smoothquant_folds_into_norms_and_keeps_the_fp32_function():
    model = small_model()
    ids = calib(2, 30, seed=4)
    q = quantize(model, "smoothquant", {})
    assert not torch.equal(q.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    assert q.model.layers[0].self_attn.q_proj.input_scale is None  # folded upstream
    assert q.model.layers[0].self_attn.o_proj.input_scale is not None  # nothing upstream to fold into
    with torch.no_grad():  # the smoothed network in full precision computes the original function
        dq = copy.deepcopy(q)
        for name, mod in list(dq.named_modules()):
            if isinstance(mod, W8A8Linear):
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                lin.weight.data = mod.dequantize()
                parent, _, child = name.rpartition(".")
                setattr(dq.get_submodule(parent), child, lin)
        assert rel_err(dq(ids), model(ids)) < 0.02


# --- bad input ---------------------------------------------------------------------------------------------
def test_bad_quantization_requests_are_clear_errors():
    model = small_model()
    with pytest.raises(EmberError, match="int8, int4, nf4, smoothquant, w8a8"):
        quantize_model(model, "int3")
    with pytest.raises(EmberError, match="32, 64, 128, 256"):
        quantize_model(copy.deepcopy(model), "int4", group_size=48)
    with pytest.raises(EmberError, match="does not divide in_features 176"):
        quantize_model(small_model(intermediate_size=176), "int4", group_size=32, padding=False)
    with pytest.raises(EmberError, match="calibration"):
        quantize_model(copy.deepcopy(model), "smoothquant")
    with pytest.raises(EmberError, match="does not apply to int8"):
        quantize_model(copy.deepcopy(model), "int8", group_size=64)
    with pytest.raises(EmberError, match="already quantized"):
        quantize_model(quantize_model(copy.deepcopy(model), "int8"), "int8")


def test_cli_quantize_prints_memory_and_writes_a_loadable_model(tmp_path, capsys):
    from ember.cli import main
    from ember.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x * 2\n"] * 40, vocab_size=300)
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size, intermediate_size=128)).eval()
    ember.save_pretrained(model, tok, tmp_path / "m")
    corpus = tmp_path / "calib.txt"
    corpus.write_text("def g(y):\n    return y + 1\n" * 200)
    assert main(["quantize", "--model", str(tmp_path / "m"), "--method", "smoothquant", "--out",
                 str(tmp_path / "q"), "--calibration", str(corpus), "--calibration-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "linear weights:" in out and "MiB ->" in out
    loaded = ember.load_model(tmp_path / "q", device="cpu")
    assert loaded.quantization_config["method"] == "smoothquant"
    tok2 = ember.load_tokenizer(tmp_path / "q")
    out = ember.LLM(tmp_path / "q", num_kv_blocks=32).generate(["def f(x):"], ember.SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))
    expected = greedy_full_recompute(loaded, tok2.encode("def f(x):"), 8)
    got = out[0].outputs[0].token_ids
    assert got == expected
    assert main(["quantize", "--model", str(tmp_path / "m"), "--method", "int3", "--out", str(tmp_path / "x")]) == 1
    assert "choose one of int8, int4, nf4, smoothquant" in capsys.readouterr().err
