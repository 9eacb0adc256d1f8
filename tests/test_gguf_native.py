"""A GGUF file's Q4_0, Q4_1 and Q8_0 blocks kept as Ember's int4 / int8 layers (ember.gguf.blocks).

The proofs: each kept layer's weights are the gguf package's own decoding of the file, value for
value; the kept model's logits equal the decoded-float model's (up to the arithmetic the int
kernels do differently, bounded below); the group-wise int8 kernel against a float64 reference;
and on the real SmolLM2 file the same greedy tokens in about the file's memory.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

import test_gguf
from conftest import need_kernel, smollm2_gguf
from ember import gemv
from ember.cpu_inference import (F16KernelLinear, FusedProjection, Int4KernelLinear, Int8KernelLinear,
                                  prepare_for_inference)
from ember.errors import EmberError
from ember.generation import generate_ids
from ember.gguf import GGUFFile, gguf_tokenizer, load_gguf
from ember.gguf.blocks import q4_exact
from ember.load import load_model
from ember.quant.api import quantize_model, weight_bytes
from ember.quant.f16 import F16Embedding, F16Linear
from ember.quant.int4 import Int4Linear
from ember.quant.int8 import Int8Embedding, Int8Linear
from ember.quant.io import save_quantized
from ember.sampling import SamplingParams

KEPT_TYPES = {Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16}
ARCHS = [("llama", True), ("mistral", False), ("qwen2", False), ("gpt2", True), ("mixtral", False)]


def _file(arch: str, tied: bool, tmp_path, types: list[Q] | None = None, monkeypatch=None):
    """A random GGUF file of `arch` written by test_gguf's writer (its matrices cycle through
    `types`, default test_gguf.TYPES: F32, F16, Q8_0, Q4_0, Q4_1, BF16, and one Q4_K)."""
    if types is not None:
        monkeypatch.setattr(test_gguf, "TYPES", types)
    g, meta = {"gpt2": test_gguf._gpt2, "mixtral": test_gguf._mixtral}.get(
        arch, lambda: test_gguf._llama_like(arch, tied))()
    return g, g.write(tmp_path / f"{arch}.gguf", meta)


def _pair(path):
    f = GGUFFile(path)
    return load_gguf(f, "cpu", torch.float32, keep_blocks=True), load_gguf(f, "cpu", torch.float32)


def _expected_kept(g, tied: bool) -> set[str]:
    """The GGUF matrices a kept model must hold as they are: every Q4_0/Q4_1/Q8_0/F16 tensor but the
    router (a Q4 token table has no int4 embedding in Ember: decoded) and a tied model's copy of its table."""
    return {name for name, _, kind in g.tensors
            if kind in KEPT_TYPES and "ffn_gate_inp" not in name and not (tied and name == "output.weight")
            and not (name == "token_embd.weight" and kind not in (Q.Q8_0, Q.F16))}


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_kept_layers_hold_the_files_weights_exactly(arch, tied, tmp_path):
    g, path = _file(arch, tied, tmp_path)
    kept, decoded = _pair(path)
    assert _expected_kept(g, tied) and kept.quantization_config["method"] == "gguf"
    modules = kept.quantization_config["modules"]
    quantized = {n: m for n, m in kept.named_modules()
                 if isinstance(m, (Int4Linear, Int8Linear, Int8Embedding, F16Linear, F16Embedding))}
    assert set(quantized) == set(modules)
    # Every Q4/Q8 matrix is kept: gpt2's fused q/k/v as three layers, stacked experts as one per expert,
    # and a tied Q8_0 table once more as the head.
    counts: dict[str, int] = {}
    kinds = {n: kind for n, _, kind in g.tensors}
    for name in _expected_kept(g, tied):
        parts = 3 if "attn_qkv" in name else test_gguf.EXPERTS if "_exps" in name else 1
        parts += name == "token_embd.weight" and tied
        counts[kinds[name].name.lower()] = counts.get(kinds[name].name.lower(), 0) + parts
    assert counts == {t: list(modules.values()).count(t) for t in set(modules.values())}
    decoded_weights = dict(decoded.named_parameters(remove_duplicate=False))
    for name, module in quantized.items():
        want = decoded_weights[f"{name}.weight"].detach()
        # The gguf package's decoding, value for value (== treats -0.0 and 0.0 alike: Q4_0's (q - 8) d
        # gives -0.0 where d < 0, Ember's (q - 8) s + 0 gives 0.0).
        assert torch.equal(module.dequantize(torch.float32), want), name
        kind = modules[name]
        if isinstance(module, Int4Linear):
            assert module.group_size == 32 and kind in ("q4_0", "q4_1")
            assert module.scales_and_zeros.dtype == (torch.float16 if kind == "q4_0" else torch.float32)
        elif isinstance(module, (F16Linear, F16Embedding)):
            assert kind == "f16" and module.qweight.dtype == torch.float16
        else:
            assert module.group_size == 32 and kind == "q8_0" and module.scales.dtype == torch.float16
    # Types Ember does not keep (F32, BF16, Q4_K) are float layers as before.
    assert any(type(m) is nn.Linear for n, m in kept.named_modules() if n.startswith("model.layers."))


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_kept_model_gives_the_decoded_models_logits(arch, tied, tmp_path):
    _, path = _file(arch, tied, tmp_path)
    kept, decoded = _pair(path)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, test_gguf.VOCAB, size=(2, 20)))
    with torch.no_grad():
        want = decoded(ids)
        with gemv.disabled():
            plain = kept(ids)
        scale = want.abs().max().item()
        assert scale > 0.1  # a misplaced row or block would move logits by as much
        # The same fp32 weights; the int4 layers may run PyTorch's int4 kernel (fp32 activations and
        # exact scales), which sums in another order: fp32 rounding over widths of 64-256 and two layers.
        assert (plain - want).abs().max().item() < 1e-5 * scale + 1e-5
        prepare_for_inference(kept)
        prepare_for_inference(decoded)
        want = decoded(ids)
        with gemv.disabled():  # the prepared layers' own fallbacks: dequantize (or PyTorch's kernels)
            assert (kept(ids) - want).abs().max().item() < 1e-5 * scale + 1e-5
        if gemv.available():
            # Ember's int kernels round each activation row to int16 (a step of 1/16383 of its largest
            # element, relative error <= 2^-15 of that element), once per layer; through two blocks
            # and the head the logits move by well under 1e-3 of their scale.
            fast = kept(ids)
            assert (fast - want).abs().max().item() < 1e-3 * scale


def test_layers_of_one_type_fuse_and_of_mixed_types_do_not(tmp_path, monkeypatch):
    _, path = _file("llama", True, tmp_path, [Q.Q4_1], monkeypatch)
    need_kernel()  # the int layers become kernel layers only where Ember's kernel runs
    model, _ = _pair(path)
    prepare_for_inference(model)
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.self_attn.qkv_proj, FusedProjection)
        assert type(layer.self_attn.qkv_proj.layer) is Int4KernelLinear
        assert isinstance(layer.mlp.gate_up_proj, FusedProjection)
    assert type(model.lm_head) is Int8KernelLinear
    assert model.lm_head.qweight.data_ptr() == model.model.embed_tokens.qweight.data_ptr()
    # Ember's int4 kernel takes s and z - 8 s; for Q4_1, z = m + 8 d is exact in fp32, so the kernel's
    # offset is the file's m itself, not a rounding of it, and it reads it as the file stores it (fp16).
    raw = GGUFFile(path).tensors["blk.0.attn_output.weight"].data
    m = np.ascontiguousarray(raw.reshape(raw.shape[0], -1, 20)[..., 2:4]).view(np.float16)[..., 0]
    scale, offset = model.model.layers[0].self_attn.o_proj.kernel_scales()
    assert offset.dtype == scale.dtype == torch.float16
    assert torch.equal(offset, torch.from_numpy(m))
    monkeypatch.setattr(test_gguf, "TYPES", [Q.Q4_0, Q.Q4_1])  # q Q4_0, k Q4_1: scales fp16 and fp32
    g, meta = test_gguf._llama_like("llama", True)
    model, _ = _pair(g.write(tmp_path / "mixed.gguf", meta))
    prepare_for_inference(model)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj is None and type(attn.q_proj) is Int4KernelLinear and type(attn.k_proj) is Int4KernelLinear


def test_tied_head_reads_the_int8_table_and_no_float_table_exists(tmp_path):
    _, path = _file("llama", True, tmp_path)
    model = load_gguf(path, "cpu", torch.bfloat16, keep_blocks=True)
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, Int8Embedding) and type(head) is Int8Linear
    assert head.qweight is table.qweight and head.scales is table.scales
    vocab, hidden = test_gguf.VOCAB, test_gguf.H
    assert not any(t.shape == (vocab, hidden) and t.is_floating_point()
                   for t in [*model.parameters(), *model.buffers()])
    ids = torch.tensor([[3, 7, 3]])
    assert table(ids).dtype == torch.bfloat16  # the model's dtype; its scales stay fp16
    assert table.scales.dtype == torch.float16
    assert torch.equal(table(ids)[0, 0], table.weight[3])


def test_a_q4_1_block_whose_zero_point_fp32_cannot_hold_is_decoded(tmp_path):
    g, meta = test_gguf._llama_like("llama", True)
    rows = np.zeros((test_gguf.H, test_gguf.H // 32, 20), np.uint8)
    rows[..., 0:2] = np.frombuffer(np.float16(1024.0).tobytes(), np.uint8)  # d: 8 d = 2^13
    rows[..., 2:4] = np.frombuffer(np.float16(2.0 ** -14).tobytes(), np.uint8)  # m: 27 binades below
    rows[..., 4:] = np.random.default_rng(0).integers(0, 256, rows[..., 4:].shape, dtype=np.uint8)
    raw = rows.reshape(test_gguf.H, -1)
    assert not q4_exact(raw, Q.Q4_1)  # 2^13 + 2^-14 needs 28 bits
    g.tensors = [(n, raw, Q.Q4_1) if n == "blk.0.attn_output.weight" else (n, d, k) for n, d, k in g.tensors]
    model = load_gguf(g.write(tmp_path / "far.gguf", meta), "cpu", torch.float32, keep_blocks=True)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert "model.layers.0.self_attn.o_proj" not in model.quantization_config["modules"]
    w = gguf.quants.dequantize(raw, Q.Q4_1).reshape(test_gguf.H, test_gguf.H)
    assert np.array_equal(model.model.layers[0].self_attn.o_proj.weight.detach().numpy(), w)


def test_load_model_keeps_blocks_unless_asked_to_quantize(tmp_path):
    _, path = _file("qwen2", False, tmp_path)
    kept = load_model(path, device="cpu", dtype="float32")
    assert kept.quantization_config["method"] == "gguf"
    with pytest.raises(EmberError, match="keeps a GGUF file's quantized blocks"):
        save_quantized(kept, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(EmberError, match="already quantized"):
        quantize_model(kept, "int8")
    requantized = load_model(path, device="cpu", dtype="float32", quantization="int8")
    assert requantized.quantization_config["method"] == "int8"
    assert all(m.group_size is None for m in requantized.modules() if isinstance(m, Int8Linear))


def test_group_int8_kernel_against_a_float64_reference():
    need_kernel()
    rng = torch.Generator().manual_seed(0)
    for k, rows, scale_dtype in [(96, 1, torch.float32), (576, 1, torch.float16), (576, 5, torch.float16),
                                 (1536, 11, torch.float32), (256, 3, torch.float16)]:
        n, groups = 70, k // 32
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=rng)
        s = (torch.rand(n, groups, generator=rng) * 0.02 + 1e-3).to(scale_dtype)
        x = torch.randn(rows, k, generator=rng)
        x[:, 5] = 30.0  # an outlier sets the int16 step, as massive activations do
        w = (q.double().view(n, groups, 32) * s.double()[..., None]).view(n, k)
        ref = x.double() @ w.t()
        y = gemv.gemv(x, q, s, None).double()
        # The kernel rounds each x row to int16 with step amax / 16383 (error <= step / 2 an element),
        # sums each group of 32 products exactly in int32, and accumulates groups in fp32.
        step = x.abs().amax(-1, keepdim=True).double() / 16383
        bound = step / 2 * w.abs().sum(-1) + 1e-6 * (x.double().abs() @ w.abs().t())
        assert ((y - ref).abs() <= bound).all(), (k, rows, scale_dtype)
        if rows == 1:  # a few rows or one: the same numbers through either loop
            assert torch.equal(gemv.gemv(x.expand(3, k).contiguous(), q, s, None)[1:2], gemv.gemv(x, q, s, None))


# --- the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_pair():
    path = smollm2_gguf()
    f = GGUFFile(path)
    return f, load_gguf(f, "cpu", torch.float32, keep_blocks=True), load_gguf(f, "cpu", torch.float32)


def test_smollm_kept_blocks_fit_in_about_the_files_bytes(smollm_pair):
    f, kept, _ = smollm_pair
    file_bytes = sum(int(t.n_bytes) for t in f.tensors.values())
    # Per 32 weights: Q8_0 34 bytes -> int8 + an fp16 scale, 34; Q4_1 20 bytes -> 16 bytes of nibbles + an
    # fp32 scale and zero point (z = m + 8 d needs fp32), 24; F32 norms as they are. SmolLM2 holds 69% of
    # its bytes in Q4_1, so it needs 0.69 * 4/20 ~ 14% more than the file: under 15%.
    expected = 0
    for t in f.tensors.values():
        blocks = int(np.prod(t.shape)) // 32
        expected += {Q.Q8_0: 34 * blocks, Q.Q4_1: 24 * blocks, Q.Q4_0: 20 * blocks}.get(t.tensor_type, int(t.n_bytes))
    assert weight_bytes(kept) == expected
    assert file_bytes < weight_bytes(kept) < 1.15 * file_bytes


def test_smollm_kept_blocks_decode_the_same_greedy_tokens(smollm_pair):
    f, kept, decoded = smollm_pair
    tok = gguf_tokenizer(f)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    want = list(generate_ids(decoded, prompt, params))
    assert list(generate_ids(kept, prompt, params)) == want  # the same fp32 weights: the same tokens
    if gemv.available():
        # As served: Ember's int kernels, which round activations to int16 (logits move by ~1e-2 of
        # their scale over 30 layers); this prompt's greedy choices have wider margins than that.
        prepared = prepare_for_inference(load_gguf(f, "cpu", torch.float32, keep_blocks=True))
        assert list(generate_ids(prepared, prompt, params)) == want


def test_load_model_decodes_for_training_when_told(tmp_path):
    _, path = _file("llama", True, tmp_path)
    model = load_model(path, device="cpu", dtype="float32", keep_blocks=False)
    assert not getattr(model, "quantization_config", None)
    assert not any(isinstance(m, (Int4Linear, Int8Linear, Int8Embedding)) for m in model.modules())
    with pytest.raises(EmberError, match="needs its weights decoded"):
        load_model(path, device="cpu", quantization="int4", keep_blocks=True)


def test_loading_and_generating_never_decode_a_whole_quantized_matrix(tmp_path, monkeypatch):
    """A kept-block model reads its device and dtype off a norm, not off a quantized layer's `.weight`
    (which decodes the whole matrix: the token table of a real model is 113 MB in fp32). Prepared,
    every product runs in the kernels; only an unprepared grouped layer decodes (its fallback)."""
    need_kernel()
    _, path = _file("llama", True, tmp_path)
    decoded = []
    for kind in (Int8Linear, Int8Embedding, Int4Linear):
        monkeypatch.setattr(kind, "dequantize", lambda self, *a, **k: decoded.append(type(self)) or 1 / 0)
    model = prepare_for_inference(load_gguf(path, "cpu", torch.float32, keep_blocks=True))
    with torch.inference_mode():
        out = list(generate_ids(model, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0)))
    assert len(out) == 4 and decoded == []


def test_the_engine_lets_go_of_the_parsed_file_once_model_and_tokenizer_are_loaded():
    """A server keeps running for days: the parsed header (the vocabulary's strings) and the file's
    mapped pages are not kept once the weights are copied out and the tokenizer is built."""
    from ember.engine import LLM
    from ember.gguf import reader

    path = smollm2_gguf()
    reader.open_gguf(path)
    assert reader._opened.cache_info().currsize >= 1
    llm = LLM(str(path), num_kv_blocks=16, block_size=8)
    assert reader._opened.cache_info().currsize == 0
    out = llm.generate("<|im_start|>user\nHi<|im_end|>\n", SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text


def test_f16_matrices_and_table_stay_fp16_and_compute_as_the_decoded_model(tmp_path, monkeypatch):
    """F16 is kept as the file's fp16 values (half the bytes of the fp32 decoding). Widening fp16 to
    fp32 is exact, so unprepared the products are the decoded model's own, bit for bit; prepared,
    Ember's kernel sums the same products in another order (fp32 rounding, 1e-5 of the logits' scale)."""
    need_kernel()
    add = test_gguf.RandomGGUF.add
    monkeypatch.setattr(test_gguf.RandomGGUF, "add",  # the writer's table is Q8_0: make it F16 here
                        lambda self, name, target, w, kind=None, **kw: add(
                            self, name, target, w, Q.F16 if name == "token_embd.weight" else kind, **kw))
    _, path = _file("llama", True, tmp_path, [Q.F16], monkeypatch)
    kept, decoded = _pair(path)
    assert isinstance(kept.model.embed_tokens, F16Embedding) and type(kept.lm_head) is F16Linear
    assert kept.lm_head.qweight is kept.model.embed_tokens.qweight  # the tied head reads the table
    assert kept.model.layers[0].mlp.down_proj.qweight.dtype == torch.float16
    assert set(kept.quantization_config["modules"].values()) == {"f16"}
    ids = torch.randint(0, kept.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(kept(ids), decoded(ids))
        prepare_for_inference(kept)
        assert type(kept.model.layers[0].mlp.down_proj) is F16KernelLinear
        one = torch.tensor([[5]])
        want = decoded(one)
        torch.testing.assert_close(kept(one), want, rtol=0, atol=1e-5 * want.abs().max().item())
