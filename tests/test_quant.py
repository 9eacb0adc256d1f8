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
from ember.quant.smoothquant import W8A8Linear, smoothing_factors
from ember.sampling import SamplingParams

from conftest import need_module

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
    # The published constants are float32 roundings of a computation with a 7-digit offset: they
    # agree with the float64 derivation to a few float32 steps of values ≤ 1 (2^-24 each).
    torch.testing.assert_close(nf4_code_from_definition(), NF4_CODE, atol=1e-6, rtol=0)


def test_nf4_blocks_run_over_the_flattened_weight_with_the_first_value_in_the_high_nibble():
    w = torch.zeros(4, 32)  # 128 values = 2 blocks of 64
    w.view(-1)[:64] = NF4_CODE.repeat(4) * 3.0  # block 0: absmax 3, every value exactly a code point
    w.view(-1)[64:] = NF4_CODE.flip(0).repeat(4) * 0.5
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.absmax, torch.tensor([3.0, 0.5]))  # the largest |value| of each block, exactly
    assert q.packed.shape == (64,) and q.packed.dtype == torch.uint8
    assert q.packed[0] == (0 << 4 | 1) and q.packed[32] == (15 << 4 | 14)
    assert torch.equal(q.dequantize(), w)  # code x scale: the very products the weight was made of


def test_double_quant_stores_8bit_scales_in_blocks_of_256_around_their_mean():
    w = torch.randn(64, 1024)  # 1024 blocks of 64 -> 4 second-level blocks
    q, plain = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    assert q.absmax.dtype == torch.uint8 and q.absmax.shape == (1024,) and q.absmax_scale.shape == (4,)
    assert torch.equal(q.absmax_offset, plain.absmax.mean())  # the same mean of the same values
    code = dynamic_code()
    assert code.shape == (256,) and code.min() > -1 and code[-1] == 1 and (code == 0).any()
    # the 8-bit scales are close to the fp32 ones, and cost 8 instead of 32 bits per block
    step = (code[1:] - code[:-1]).max() * q.absmax_scale.max()
    # Half a code step, plus float32 rounding of decoding (code x scale + offset) on scales ~3: 1e-6.
    assert (q.block_scales() - plain.absmax).abs().max() <= step / 2 + 1e-6
    assert plain.nbytes() - q.nbytes() == 1024 * 3 - 4 * 4 - 4
    assert q.nbytes() < w.numel() * 4 / 7.5  # ≈ 4.13 bits per weight


def test_nf4_matches_bitsandbytes():
    F = need_module("bitsandbytes.functional", "the NF4 reference")
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(0))
    ref_q, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, ref_q.view(-1)) and torch.equal(q.absmax, ref_state.absmax)
    assert torch.equal(q.dequantize(), F.dequantize_4bit(ref_q, ref_state))  # code x scale, one rounding
    ref_q, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, ref_q.view(-1))
    assert torch.equal(dynamic_code(), ref_state.state2.code)
    # Float32 defaults (rtol 1.3e-6): bitsandbytes takes the mean of the 768 scales in its own order.
    torch.testing.assert_close(q.absmax_offset, ref_state.offset)
    torch.testing.assert_close(q.absmax_scale, ref_state.state2.absmax)
    # 8-bit scale indices: equal except for values on a rounding midpoint (one step apart)
    diff = (q.absmax.int() - ref_state.absmax.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.98
    # atol 2e-3: a block scale one 8-bit step off where an index differs (the test below bounds it).
    torch.testing.assert_close(q.dequantize(), F.dequantize_4bit(ref_q, ref_state), atol=2e-3, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_nf4_double_quant_scales_are_the_nearest_code_where_bitsandbytes_differs(seed):
    """Ember's 8-bit scale index is the nearest dynamic-code value (the definition), for every
    block; bitsandbytes' CPU search now and then picks a neighbour instead. So the indices are
    equal except in a few blocks, and there bitsandbytes' code is never the nearer one."""
    F = need_module("bitsandbytes.functional", "the NF4 reference")
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(seed))
    ref_q, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, ref_q.view(-1))
    code = dynamic_code()
    scaled = ((quantize_nf4(w, double_quant=False).absmax - q.absmax_offset).view(-1, 256)
              / q.absmax_scale[:, None]).reshape(-1)
    ours = (scaled - code[q.absmax.long()]).abs()
    assert torch.equal(ours, (scaled[:, None] - code).abs().amin(1))
    assert (ours <= (scaled - code[ref_state.absmax.long()]).abs()).all()
    # Dequantized weights are the same 4-bit code times the block scale: equal wherever the block
    # scales are, and elsewhere apart by at most the scales' difference (|code| ≤ 1) plus one float32
    # rounding of each product (2^-24 relative each).
    theirs = F.dequantize_4bit(ref_q, ref_state).view(-1, 64)
    theirs_scales = F.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset
    scale_gap = (q.block_scales() - theirs_scales).abs()[:, None]
    gap = (q.dequantize().view(-1, 64) - theirs).abs()
    same = scale_gap.flatten() == 0
    assert same.float().mean() > 0.98 and (gap[same] == 0).all()
    assert (gap <= scale_gap + 2.0 ** -23 * theirs.abs()).all()


def test_nf4_linear_is_frozen_and_passes_gradients_to_its_input():
    lin = nn.Linear(128, 64)
    layer = NF4Linear.from_linear(lin)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    ref = torch.autograd.grad(nn.functional.linear(x, layer.dequantize(), layer.bias).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref)  # float32 defaults: the same product, maybe another kernel
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
    # The backward multiplies by the same dequantized weight: float32 rounding over ≤ 128 outputs,
    # ~1e-5 relative at most, within 2e-5; a gradient through another weight is off by percents.
    torch.testing.assert_close(x.grad, ref, rtol=2e-5, atol=1e-6)


# --- error bounds per method ------------------------------------------------------------------------
def test_int8_error_is_at_most_half_a_step_per_row():
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    layer = Int8Linear.from_linear(_with_weight(w))
    step = w.abs().amax(1, keepdim=True) / 127
    # Half a step, plus float32 rounding of w / scale and q x scale (2^-24 relative each, on weights of
    # a few units).
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
    bf16 = 2.0 ** -8  # scales and zero points are stored in bf16 (8-bit mantissa: 2^-8 relative)
    # Half a step; the bf16 scale's rounding over ≤ 8 steps from the group's middle; the zero point's
    # rounding; 1e-6 for float32 rounding of the dequantization itself.
    assert ((layer.dequantize() - w).abs() <= step / 2 + 8 * step * bf16 + zero * bf16 + 1e-6).all()


def test_nf4_error_is_at_most_half_the_widest_code_gap_per_block():
    w = torch.randn(64, 256)
    q = quantize_nf4(w)
    half_gap = ((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2).item()
    scales = q.block_scales().repeat_interleave(64).view(64, 256)
    true_scales = w.view(-1, 64).abs().amax(1).repeat_interleave(64).view(64, 256)
    # Half the widest code gap of the stored scale, the stored scale's own error (double quant), and
    # 1e-6 for float32 rounding of code x scale on weights ≤ ~5.
    bound = scales * half_gap + (scales - true_scales).abs() + 1e-6
    assert ((q.dequantize() - w).abs() <= bound).all()


def test_w8a8_matmul_is_exact_integer_arithmetic_on_the_quantized_values():
    lin = nn.Linear(64, 32)
    layer = W8A8Linear.from_linear(lin)
    x = torch.randn(5, 64) * 3
    xs = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / xs)
    expected = (xq.double() @ layer.qweight.double().t()) * xs.double() * layer.scales.double() + lin.bias.double()
    # The int32 sum is exact; the layer rescales it in float32 (two products, 2^-24 relative each).
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)
    # Rounding x per token (step max|x|/127 ≈ 2.5σ/127, rms error step/√12 ≈ 0.6% of σ) and w per
    # channel (uniform init: rms error 1/(2·127) ≈ 0.4% of rms w) costs ~0.7% of the output: 0.02 is 3x.
    assert rel_err(layer(x), lin(x)) < 0.02


@pytest.mark.parametrize("method,kw", METHODS)
def test_quantized_model_stays_close_to_fp32_and_is_smaller(method, kw):
    model = small_model()
    ids = calib(2, 40, seed=5)
    q = quantize(model, method, kw)
    # Relative error of the logits: int8 rounds each weight to 1/254 of its row's range (~0.4% rms
    # per layer); W8A8 adds the activations' rounding (~0.6%); 4-bit codes have 15-16 levels a block
    # (~9% rms per weight), which the logits inherit. Each bound is ~2x that, over the model's layers.
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
    # On CPU both kernels take bf16 activations, also in an fp32 model: bf16 rounds each input at
    # 2^-9 relative, and the 192-term sums of outputs ~1 inherit up to ~1%; 0.03 is that with room.
    tol = 0.03
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
    assert rel_err(q(ids), model(ids)) < 0.15  # 4-bit rounding, as in the per-method bounds above
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
    assert rel_err(q(ids), model(ids)) < (0.01 if method == "int8" else 0.15)  # as for the rest of the model
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
    assert rel_err(q(ids), model(ids)) < 0.15  # 4-bit rounding, as in the per-method bounds above
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
    # Same function, different activations: x50 and /50 are inexact in binary (2^-24 relative per
    # weight), ~1e-7 in the logits; 1e-5 allows that and nothing that changes the function.
    assert rel_err(outlier(ids), ref) < 1e-5
    clean = rel_err(quantize(model, "w8a8", {})(ids), ref)
    naive = rel_err(quantize(outlier, "w8a8", {})(ids), ref)
    smooth = rel_err(quantize(outlier, "smoothquant", {})(ids), ref)
    assert naive > 5 * clean  # outliers ruin per-token int8 activations
    assert smooth < 1.5 * clean  # SmoothQuant moves them into the weights and recovers


def w8a8_rounding_bound(layer: W8A8Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What int8 rounding may cost each output of `layer(x)` against the exact x @ weight.T.

    With x' = x * input_scale rounded per token to steps s_x (|x' - x̂'| ≤ s_x/2) and the weight
    (carrying the inverse scale) per output channel to steps s_w (|w' - ŵ'| ≤ s_w/2):
    |Σ x'w' - Σ x̂'ŵ'| ≤ Σ |x'|·|w' - ŵ'| + |x' - x̂'|·|ŵ'| ≤ s_w/2 · Σ|x'| + s_x/2 · Σ|ŵ'|.
    The int32 sum is exact (|sum| ≤ 127² · 256 < 2^24, so also as a float32); scaling it back (two
    float32 products), forming 1/s, x' and w' (three more) and the step sizes themselves round at
    2^-24 relative each, on outputs of at most Σ|x||w| plus the rounding term: 2^-21 covers them."""
    x2 = x.float() if layer.input_scale is None else x.float() * layer.input_scale
    step_x = x2.abs().amax(1, keepdim=True).double() / 127
    step_w = layer.scales.double()[None, :]
    w_hat = layer.qweight.double() * layer.scales.double()[:, None]
    rounding = step_w / 2 * x2.double().abs().sum(1, keepdim=True) + step_x / 2 * w_hat.abs().sum(1)[None, :]
    exact_abs = x.double().abs() @ weight.double().abs().t()
    return rounding * (1 + 2.0 ** -21) + 2.0 ** -21 * exact_abs


def test_w8a8_error_stays_within_the_rounding_bound_and_smoothing_shrinks_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=g)
    x[:, torch.randperm(256, generator=g)[:4]] *= 50  # outlier channels, as in LLM activations
    lin = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 256, generator=g) / 16)
    w = lin.weight.detach()
    exact = x.double() @ w.double().t()
    naive = W8A8Linear.from_linear(lin)
    s = smoothing_factors(x.abs().amax(0), [w], alpha=0.5)
    smoothed_lin = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        smoothed_lin.weight.copy_(w * s)  # the weight takes s, the input 1/s: the same product
    smooth = W8A8Linear.from_linear(smoothed_lin, input_scale=1 / s)
    errors, bounds = [], []
    for layer in (naive, smooth):
        err = (layer(x).double() - exact).abs()
        bound = w8a8_rounding_bound(layer, x, w)
        assert (err <= bound).all()
        errors.append(err)
        bounds.append(bound)
    # Every token's activation step is set by its outliers, ~50x the other channels; with α = 0.5
    # smoothing divides channel j by ~sqrt(max|X_j| / max|W_j|), so the outliers shrink ~sqrt(50) ≈ 7x
    # against the rest and the activation step with them, while the weight steps grow less. Both the
    # bound and the error fall several-fold; a factor of 2 is the claim, with room.
    assert bounds[1].max() < bounds[0].max() / 2 and bounds[1].mean() < bounds[0].mean() / 2
    assert errors[1].max() < errors[0].max() / 2 and errors[1].mean() < errors[0].mean() / 2


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
        assert rel_err(dq(ids), model(ids)) < 0.02  # int8 weight rounding only (see the int8 bound)


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
