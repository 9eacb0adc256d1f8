"""The CPU decode kernels (ember/gemv.py): same products as PyTorch, used only where they apply,
by the layers `ember.cpu_inference` swaps in and by the KV caches."""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file

from ember import gemv
from ember.config import ModelConfig
from ember.cpu_inference import Int4KernelLinear, Int8KernelLinear, prepare_for_inference
from ember.generation import generate_ids
from ember.kv_cache import decode_attention as cache_decode_attention
from ember.model import CausalLM
from ember.quant.int4 import Int4Linear, unpack_nibbles
from ember.quant.int8 import Int8Linear
from ember.sampling import SamplingParams

from conftest import need_kernel

need_kernel()  # skips where the kernel is not meant to run (not x86/AVX2, EMBER_GEMV=0); fails a failed build under CI

# Rounding of the output row into its dtype bounds the error: bf16 keeps 8 bits, fp16 11.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(2048, 768), (7, 40), (130, 8), (3, 1000)])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13])  # several rows share each weight load, 8 at a time
def test_gemv_matches_linear_in_float64(dtype, n, k, rows):
    torch.manual_seed(n + k + rows)
    w, x, b = torch.randn(n, k).to(dtype), torch.randn(1, rows, k).to(dtype), torch.randn(n).to(dtype)
    with torch.inference_mode():
        y = gemv.gemv(x, w, bias=b)
    ref = F.linear(x.double(), w.double(), b.double())
    assert y.shape == (1, rows, n) and y.dtype == dtype
    scale = ref.abs().amax(-1, keepdim=True)  # per row: each row is rounded on its own scale
    assert ((y.double() - ref).abs() <= TOLERANCE[dtype] * scale).all()


def test_gemv_refuses_what_it_cannot_multiply():
    with pytest.raises(RuntimeError, match="rows of 32 columns"):
        gemv.gemv(torch.randn(2, 16), torch.randn(16, 32))


@pytest.mark.parametrize("k", [64, 40, 8200, 20000])  # a 32-block tail; sums past int32 without chunks
@pytest.mark.parametrize("rows", [1, 3, 11])  # each row rounded on its own step; 8 rows at a time
def test_int8_weights_times_row_scales(k, rows):
    """int8 weights multiply each activation row rounded to int16 (step max|x| / 16383), so the
    error is at most half a step per element: |y - exact| <= (|q| s) @ (step / 2)."""
    torch.manual_seed(k + rows)
    q = torch.randint(-127, 128, (300, k), dtype=torch.int8)
    q[0] = 127  # the worst case for the integer sums: every weight and activation at its largest
    s, x = torch.rand(300), torch.randn(rows, k) * torch.rand(rows, 1) * 10  # rows of different scales
    x[:, ::2] = x.abs().amax(1, keepdim=True)
    with torch.inference_mode():
        y = gemv.gemv(x, q, s)
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    step = x.abs().amax(1, keepdim=True).double() / 16383
    row_mass = (q.double().abs() * s.double()[:, None]).sum(1)
    bound = row_mass[None, :] * step / 2
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-6 * ref.abs() + 1e-4).all(), (err - bound).max()
    assert err.max() > 0  # really rounded: this is not the float path
    # and far better than the int8 weights themselves: 1e-4 of the row's scale
    assert (err <= 1e-4 * row_mass[None, :] * x.abs().amax(1, keepdim=True).double()).all()


@pytest.mark.parametrize("k", [24576, 24544])  # AVX-512 VNNI blocks of 64 where the CPU has them; AVX2's 32
@pytest.mark.parametrize("rows", [1, 4])
def test_int8_integer_sums_stay_inside_int32(k, rows):
    """Every weight and activation at its largest: 127 * 16383 * k is 5e10, past int32, so the
    kernels must move their integer sums to fp32 every chunk of weights."""
    q = torch.full((5, k), 127, dtype=torch.int8)
    q[1] = -127
    x = torch.ones(rows, k)
    with torch.inference_mode():
        y = gemv.gemv(x, q, torch.ones(5))
    assert torch.allclose(y.double(), x.double() @ q.double().t(), rtol=1e-5)


# Deliberate: the comparison needs both paths, and a CPU without VNNI has only AVX2's (which the
# tests above check against float64 on every machine).
@pytest.mark.skipif(gemv.instruction_set() != "avx512_vnni",
                    reason="this CPU has no AVX-512 VNNI: the AVX2 integer paths are the only ones, tested above")
def test_avx512_and_avx2_integer_paths_give_the_same_products(tmp_path):
    """The run-time choice of instruction set changes the speed, not the result: both paths sum
    the same integer products (int8 weights, and int4 in groups of 128 and 256), so they differ
    only by the order of float additions."""
    torch.manual_seed(0)
    tensors = {"q": torch.randint(-127, 128, (257, 768), dtype=torch.int8), "s": torch.rand(257),
               "x": torch.randn(6, 768) * 5, "q4": torch.randint(0, 256, (130, 384), dtype=torch.uint8)}
    for g in (128, 256):
        tensors[f"s4_{g}"], tensors[f"z4_{g}"] = torch.rand(130, 768 // g), torch.randn(130, 768 // g)
    save_file(tensors, str(tmp_path / "in.safetensors"))
    script = (
        "import sys, torch; from safetensors.torch import load_file, save_file; from ember import gemv\n"
        "assert gemv.instruction_set() == 'avx2', gemv.instruction_set()\n"
        "t = load_file(sys.argv[1]); out = {}\n"
        "with torch.inference_mode():\n"
        "    for r in (1, 6):\n"
        "        out[f'y{r}'] = gemv.gemv(t['x'][:r], t['q'], t['s'])\n"
        "        for g in (128, 256):\n"
        "            out[f'i4_{g}_{r}'] = gemv.gemv_int4(t['x'][:r], t['q4'], t[f's4_{g}'], t[f'z4_{g}'], g)\n"
        "save_file(out, sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                   env={**os.environ, "EMBER_GEMV_AVX512": "0"}, check=True, timeout=600)
    avx2 = load_file(str(tmp_path / "out.safetensors"))
    t = tensors
    with torch.inference_mode():
        for r in (1, 6):
            ours = {f"y{r}": gemv.gemv(t["x"][:r], t["q"], t["s"])}
            for g in (128, 256):
                ours[f"i4_{g}_{r}"] = gemv.gemv_int4(t["x"][:r], t["q4"], t[f"s4_{g}"], t[f"z4_{g}"], g)
            for k, y in ours.items():
                assert torch.allclose(y, avx2[k], rtol=1e-5, atol=1e-5 * float(y.abs().max())), k


def test_applies_only_to_a_few_rows_without_autograd():
    w = torch.randn(16, 32)
    with torch.inference_mode():
        assert gemv.applies(torch.randn(1, 1, 32), w)
        assert gemv.applies(torch.randn(1, gemv.MAX_ROWS, 32), w)  # a verification step, a small batch
        assert not gemv.applies(torch.randn(gemv.MAX_ROWS + 1, 32), w)  # more rows: a matrix product
        assert gemv.applies(torch.randn(2, 32), w.to(torch.int8))
        assert not gemv.applies(torch.randn(1, 16), w)  # the shapes do not match
        assert not gemv.applies(torch.randn(1, 32), torch.randn(16, 30))  # K not a multiple of 8
        assert not gemv.applies(torch.randn(1, 32), w.t().contiguous().t())  # not row-major
    assert not gemv.applies(torch.randn(1, 32), w)  # autograd on: no backward through the kernel


def tiny_model(dtype=torch.float32) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    return CausalLM(cfg).eval().to(dtype)


def linear_rows(model: CausalLM) -> int:
    """Output rows of every linear product a one-token step makes (the head included)."""
    return sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def test_decode_steps_go_through_the_kernel_and_keep_greedy_tokens(monkeypatch):
    plain_tokens = list(generate_ids(tiny_model(), list(range(3, 20)), SamplingParams(max_tokens=12, temperature=0.0)))
    model = tiny_model()
    every_step = linear_rows(model)
    prepare_for_inference(model)
    prompt = list(range(3, 20))
    rows = []  # output rows of each product the kernel served
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, w, *a, **k: rows.append(w.shape[0]) or real(x, w, *a, **k))
    with_kernel = list(generate_ids(model, prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    assert sum(rows) >= 11 * every_step  # 11 one-token steps: every linear product of each in the kernel
    assert with_kernel == plain_tokens
    monkeypatch.setattr(gemv, "_built", False)
    assert list(generate_ids(model, prompt, SamplingParams(max_tokens=12, temperature=0.0))) == with_kernel


def test_verification_steps_multiply_their_few_rows_in_the_kernel(monkeypatch):
    """A speculative step verifies k + 1 rows of one sequence: they share one read of each
    weight through the kernel, and the greedy tokens stay those of plain decoding."""
    from ember.engine import LLM, SamplingParams

    model = prepare_for_inference(tiny_model())
    prompt = list(range(3, 20)) * 3  # repeats: prompt lookup has guesses to verify
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(tiny_model(), num_kv_blocks=64, block_size=8).generate([prompt], params)[0].outputs[0].token_ids
    rows = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, *a, **k: rows.append(x.numel() // x.shape[-1]) or real(x, *a, **k))
    llm = LLM(model, num_kv_blocks=64, block_size=8, speculative="ngram", num_speculative_tokens=4)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == plain
    assert llm.stats["spec_verify_steps"] > 0 and max(rows) == 5  # the newest token + 4 guesses


def test_int8_layer_single_row_matches_its_dequantized_weight(monkeypatch):
    torch.manual_seed(0)
    layer = Int8KernelLinear.of(Int8Linear.from_linear(torch.nn.Linear(64, 48)))
    x = torch.randn(1, 1, 64)
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        y = layer(x)
    assert calls  # the kernel's product, not PyTorch's
    ref = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
    assert torch.allclose(y.double(), ref, atol=1e-4)



@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_weights_times_rows_within_the_activation_rounding(group, rows):
    """int4 products run in integers against each row rounded to int16 (step max|x| / 16383)
    and take the group's scale and zero point in fp32, so the only error beyond float rounding
    is half a step per element times the weight's nibble: |y - exact| <= (q s) @ (step / 2)."""
    torch.manual_seed(group + rows)
    k = 512
    w = torch.randn(96, k) * 2 + torch.randn(96, 1) * 3  # offset rows: the zero point matters
    lin = torch.nn.Linear(k, 96)
    lin.weight.data = w
    layer = Int4KernelLinear.of(Int4Linear.from_linear(lin, group))
    layer.qweight[0] = 0xFF  # the largest nibbles everywhere in one row
    x = torch.randn(rows, k)
    x[:, ::3] = x.abs().max()
    sz = layer.scales_and_zeros.double()
    s = sz[..., 0].t().repeat_interleave(group, 1)
    exact = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
    with torch.inference_mode():
        y = gemv.gemv_int4(x, layer.qweight, *layer.kernel_scales(), group, layer.bias)
        assert torch.equal(layer(x), y)  # the layer takes this path for any number of rows
    step = x.abs().amax(1, keepdim=True).double() / 16383
    bound = step / 2 * (unpack_nibbles(layer.qweight).double() * s).sum(1)
    err = (y.double() - exact).abs()
    assert (err <= bound + 1e-5 * exact.abs() + 1e-4).all(), (err - bound).max()
    assert err.max() > 0  # really the integer path


@pytest.mark.parametrize("group", [32, 128])
def test_int4_fp16_scales_give_the_fp32_scales_result_exactly(group):
    """The kernel reads fp16 scales and offsets (a GGUF file's block scales) by widening them to
    fp32, so values exact in fp16 give what the same values in fp32 give. Not bit for bit: the
    compiler may fuse a multiply-add in one instantiation and not the other (one rounding more or
    less per group), so the two agree to a few fp32 ulps of the output's magnitude (8 allowed)."""
    torch.manual_seed(group)
    k, n = 256, 48
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale = (torch.rand(n, k // group) * 0.1 + 0.01).half()
    offset = (torch.randn(n, k // group) * 0.5).half()
    x = torch.randn(3, k)
    with torch.inference_mode():
        half = gemv.gemv_int4(x, q, scale, offset, group)
        single = gemv.gemv_int4(x, q, scale.float(), offset.float(), group)
    torch.testing.assert_close(half, single, rtol=0, atol=8 * 2**-23 * single.abs().max().item())
    assert not torch.equal(half, torch.zeros_like(half))
    wrong = gemv.gemv_int4(x, q, scale, (offset.float() + 0.01).half(), group)  # the offsets are read
    assert (wrong - single).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="all fp32 or all fp16"):
        gemv.gemv_int4(x, q, scale, offset.float(), group)


@pytest.mark.parametrize("half", [False, True])
def test_dequantize_int4_and_int8_decode_what_the_kernels_multiply(half):
    """The decoded weights, against float64: int4's w = q s + o is one fp32 product and one sum
    (at most two roundings of 2^-24 relative to |q s| + |o|); int8's q s with fp16 scales is exact
    in fp32 (8 + 11 significant bits), with fp32 scales one rounding."""
    torch.manual_seed(7)
    n, k, group = 40, 256, 32
    q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale = torch.rand(n, k // group) * 0.1 + 0.01
    offset = torch.randn(n, k // group) * 0.5
    if half:
        scale, offset = scale.half(), offset.half()
    w4 = gemv.dequantize_int4(q4, scale, offset, group)
    nibbles = unpack_nibbles(q4).double()
    s, o = (t.double().repeat_interleave(group, 1) for t in (scale, offset))
    exact = nibbles * s + o
    assert w4.dtype == torch.float32 and ((w4.double() - exact).abs() <= 2 * 2**-24 * ((nibbles * s).abs() + o.abs())).all()
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w8 = gemv.dequantize_int8(q8, scale)
    exact8 = q8.double() * s
    if half:
        assert torch.equal(w8.double(), exact8)
    else:
        assert ((w8.double() - exact8).abs() <= 2**-24 * exact8.abs()).all()


def test_products_of_many_rows_run_in_the_float_gemm_over_the_decoded_weight():
    """More rows than gemv.DEQUANTIZE_ROWS: the layer decodes its weight once and multiplies in
    fp32, so it equals F.linear over the decoded weight exactly and carries no int16 activation
    rounding; up to that many rows, the row kernel runs."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(256, 96)
    int4 = Int4KernelLinear.of(Int4Linear.from_linear(lin, 32))
    grouped = Int8Linear(256, 96, bias=True, group_size=32, scale_dtype=torch.float16)  # a GGUF Q8_0 layout
    grouped.qweight.copy_(torch.randint(-127, 128, (96, 256), dtype=torch.int8))
    grouped.scales.copy_((torch.rand(96, 8) * 0.01 + 0.001).half())
    grouped.bias.data.normal_()
    grouped = Int8KernelLinear.of(grouped)
    with torch.inference_mode():
        many, few = torch.randn(gemv.DEQUANTIZE_ROWS + 1, 256), torch.randn(gemv.DEQUANTIZE_ROWS, 256)
        for layer in (int4, grouped):
            w = layer.dequantize(torch.float32)
            torch.testing.assert_close(layer(many), F.linear(many, w, layer.bias), rtol=0, atol=0)
            assert not torch.equal(layer(few), F.linear(few, w, layer.bias))  # the kernel's int16 rounding


def test_int4_layer_leaves_inputs_that_need_a_gradient_to_pytorch():
    layer = Int4KernelLinear.of(Int4Linear.from_linear(torch.nn.Linear(128, 32), 64))
    x = torch.randn(2, 128, requires_grad=True)
    assert not layer.kernel_applies(x)  # the kernel has no backward
    layer(x).sum().backward()  # the dequantizing path carries the gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.kernel_applies(torch.randn(2, 128))  # grad mode, but nothing to differentiate
    with torch.inference_mode():
        assert layer.kernel_applies(torch.randn(1, 128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,hkv,d,t", [(1, 12, 4, 64, 256), (3, 8, 8, 32, 40), (2, 6, 2, 128, 17), (1, 8, 1, 64, 9)])
def test_decode_attention_matches_sdpa_in_float64(dtype, b, h, hkv, d, t):
    """One query per sequence over its cache, each sequence seeing its own positions (a sliding
    window, a short context, everything): the softmax in fp32, so only the output's rounding
    into its dtype is left."""
    torch.manual_seed(b * t + d)
    q, k, v = torch.randn(b, h, 1, d).to(dtype), torch.randn(b, hkv, t, d).to(dtype), torch.randn(b, hkv, t, d).to(dtype)
    pos = torch.arange(t)
    visible = torch.stack([(pos < t - 3 * i) & (pos >= i) for i in range(b)])  # [B, T], per sequence
    for mask in (visible, visible[:1].clone(), None):
        with torch.inference_mode():
            out = gemv.decode_attention(q, k, v, mask if mask is not None else torch.ones(t, dtype=torch.bool))
            via_cache = cache_decode_attention(q, k, v, mask)
        full = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.expand(b, t)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=full[:, None, None, :],
                                             enable_gqa=h != hkv)
        assert out.shape == q.shape and out.dtype == dtype
        assert (out.double() - ref).abs().max().item() <= TOLERANCE[dtype] * 4
        assert torch.equal(via_cache, out)  # the KV caches' decode attention takes this path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv,d", [(12, 4, 64), (8, 8, 32), (6, 1, 16)])
def test_paged_decode_attention_reads_the_pool_through_the_slot_table(dtype, h, hkv, d):
    """Sequences whose positions lie in scattered, shared and reused pool slots: attention read
    in place through the slot table equals SDPA over the keys and values gathered first."""
    torch.manual_seed(h + d)
    b, t, slots_in_pool = 3, 37, 128
    pool = torch.randn(slots_in_pool, 2 * hkv, d).to(dtype)
    slots = torch.stack([torch.randperm(slots_in_pool)[:t] for _ in range(b)])
    slots[1, :10] = slots[0, :10]  # a shared prefix: the same slots in two sequences
    q = torch.randn(b, h, 1, d).to(dtype)
    visible = torch.arange(t)[None, :] < torch.tensor([[t], [20], [5]])  # each sequence's own length
    with torch.inference_mode():
        out = gemv.paged_decode_attention(q, pool, slots, visible)
    kv = pool[slots].double().transpose(1, 2)  # [B, 2 Hkv, T, D]
    ref = F.scaled_dot_product_attention(q.double(), kv[:, :hkv], kv[:, hkv:], attn_mask=visible[:, None, None, :],
                                         enable_gqa=h != hkv)
    assert out.shape == q.shape and out.dtype == dtype
    assert (out.double() - ref).abs().max().item() <= TOLERANCE[dtype] * 4
    with pytest.raises(RuntimeError, match="outside the pool"):
        gemv.paged_decode_attention(q, pool, slots + slots_in_pool, visible)


def test_engine_decode_steps_read_the_paged_pool_in_place(monkeypatch):
    from ember.engine import LLM, SamplingParams

    model = tiny_model()
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    calls = []
    real = gemv.paged_decode_attention
    monkeypatch.setattr(gemv, "paged_decode_attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    outs = [o.outputs[0].token_ids for o in LLM(model, num_kv_blocks=64, block_size=4).generate(prompts, params)]
    assert calls and max(calls) == 3  # the three sequences' decode steps, in one call a layer
    monkeypatch.setattr(gemv, "paged_decode_attention_applies", lambda *a: False)  # the gathering path
    assert [o.outputs[0].token_ids for o in LLM(model, num_kv_blocks=64, block_size=4).generate(prompts, params)] == outs


def test_decode_attention_leaves_training_and_long_queries_to_pytorch():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16)
    with torch.inference_mode():
        assert gemv.decode_attention_applies(q, k, k, None)
        assert not gemv.decode_attention_applies(torch.randn(1, 4, 2, 16), k, k, None)  # two queries
        assert not gemv.decode_attention_applies(q, k, k, torch.zeros(1, 1, 1, 8))  # an additive float mask
    assert not gemv.decode_attention_applies(q, k, k, None)  # autograd on


def test_a_build_lock_left_by_a_dead_build_is_cleared_and_a_live_one_kept(tmp_path):
    """PyTorch's builder waits forever on its lock file: one older than any real build is removed."""
    dead, live = tmp_path / "dead", tmp_path / "live"
    dead.touch()
    live.touch()
    old = time.time() - gemv.BUILD_LOCK_STALE_S - 60
    os.utime(dead, (old, old))
    gemv._clear_dead_build_lock(dead)
    gemv._clear_dead_build_lock(live)
    gemv._clear_dead_build_lock(tmp_path / "absent")
    assert not dead.exists() and live.exists()
