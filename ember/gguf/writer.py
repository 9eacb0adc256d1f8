"""An Ember model and its tokenizer -> a GGUF file that llama.cpp loads and runs.

The layout is the one llama.cpp's own converter (`convert_hf_to_gguf.py`) writes, so llama.cpp,
Ollama and LM Studio read the file as one of theirs:

- Architectures: `llama` and `mistral` models are written as `llama` (llama.cpp has no `mistral`
  architecture; its converter writes Mistral as `llama`), `qwen2` as `qwen2`, `gpt2` as `gpt2`.
  Anything else (Mixtral-style experts among them) is refused by name. llama.cpp's `llama` has no
  sliding window, so a model whose window is shorter than its context is refused too.
- Tensor names are `ember.gguf.model`'s map read backwards; GPT-2's q, k and v become one `attn_qkv`
  (rows stacked q, k, v), and a tied output matrix is not written (llama.cpp reuses `token_embd`).
- The rows of llama-family query and key projections are reordered per head from Hugging Face's
  rotary layout (two halves) to ggml's (adjacent pairs): the inverse of `unpermute_qk`.
- RoPE scaling: `linear` as `{arch}.rope.scaling.*`; Llama 3's as the divisor per frequency that
  llama.cpp reads from `rope_freqs.weight`. Other kinds are refused.

Tensor types (the rule of the converter and of `llama-quantize`):
- 1-D tensors (norms, biases), `rope_freqs` and GPT-2's position table: F32.
- Every other weight: the type asked (F32, F16, Q8_0 or Q4_0).
- With Q4_0, the output matrix, or the token embedding where it also serves as the output (tied),
  stays at 8 bits: `llama-quantize` gives it Q6_K, falling back to Q8_0 where its rows are not whole
  256-value blocks; the gguf package cannot write Q6_K, so it is Q8_0 here always.
- A quantized type needs rows of whole 32-value blocks; a weight whose rows are not becomes F16, as in
  the converter.

Tokenizer: byte-level BPE only (`tokenizer.ggml.model` = gpt2): tokens, token types, merges, the
pre-tokenizer named by the llama.cpp name whose split is the tokenizer's (see `pre_tokenizer_name`),
BOS/EOS/PAD ids, `add_bos_token` and the chat template. A vocabulary shorter than the embedding table
is padded with unused `[PADn]` tokens, as the converter does.

The file is written beside its target and renamed into place: a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from ember.config import ModelConfig
from ember.errors import EmberError
from ember.gguf.model import _LAYER_NAMES, _TOP_NAMES, PERMUTED_QK
from ember.gguf.tokenizer import CONTROL, NORMAL, PRE_TOKENIZER_SPLITS, UNUSED, USER_DEFINED, WHOLE_WORDS
from ember.model import CausalLM, rope_inv_freq
from ember.tokenizer import PATTERNS, Tokenizer

# --type -> (the type of the quantized weights, general.file_type)
FILE_TYPES = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# Ember family -> the GGUF architecture llama.cpp runs it as.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

_EMBER_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_LAYER_NAMES = {ember: name for name, ember in _LAYER_NAMES.items()}
_GGUF_TOP_NAMES = {ember: name for name, ember in _TOP_NAMES.items()}

_GPT2_SPLIT = PRE_TOKENIZER_SPLITS["gpt-2"][0]
_LLAMA3_SPLIT = PRE_TOKENIZER_SPLITS["llama-bpe"][0]
# Regexes that split text exactly as a llama.cpp one does, spelled differently: Ember's own two, and the
# one `tokenizers`' ByteLevel applies with use_regex=True. The extra trailing `\s+` only names a piece of
# whitespace that a split keeps as a piece anyway; `(?i:'s|…)` is how Llama 3's tokenizer.json spells
# llama.cpp's `'[sS]|…` (llama.cpp reads the one as the other).
_SAME_SPLIT = {
    PATTERNS["gpt2"]: _GPT2_SPLIT,
    PATTERNS["llama3"]: _LLAMA3_SPLIT,
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": _GPT2_SPLIT,
}


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for an Ember tensor name (the inverse of `ember.gguf.model.ember_name`)."""
    m = _EMBER_LAYER.match(name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        i, module, kind = m.groups()
        return f"blk.{i}.{_GGUF_LAYER_NAMES[module]}.{kind}"
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP_NAMES and kind in ("weight", "bias"):
        return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    raise EmberError(f"Ember tensor {name} has no GGUF name.")


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """ggml's q/k row order: per head, rows go from (half, pair) to (pair, half); `unpermute_qk` undoes it."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(gguf_name: str, shape: tuple[int, ...], asked: Q, tied: bool) -> Q:
    """The type a tensor is stored as, by the rule in the module docstring."""
    if len(shape) <= 1 or gguf_name in ("position_embd.weight", "rope_freqs.weight"):
        return Q.F32
    kind = asked
    serves_as_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if asked == Q.Q4_0 and serves_as_output:
        kind = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    return Q.F16 if shape[-1] % block else kind


def encode_tensor(w: np.ndarray, kind: Q) -> np.ndarray:
    """`w` (float32) as the bytes (or floats) the writer stores for `kind`."""
    if kind == Q.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if kind == Q.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), kind)


def gguf_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32, in llama.cpp's names and layouts."""
    cfg = model.config
    arch = gguf_architecture(cfg)
    sd = {k: v.detach().to(device="cpu", dtype=torch.float32).numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    for name, w in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _EMBER_LAYER.match(name)
        module = m.group(2) if m else ""
        if arch == "gpt2" and module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":
                i, _, kind = m.groups()
                qkv = [sd[f"model.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(qkv, axis=0)
            continue
        if arch in PERMUTED_QK and module in ("self_attn.q_proj", "self_attn.k_proj"):
            w = permute_qk(w, cfg.num_attention_heads if module == "self_attn.q_proj" else cfg.num_key_value_heads)
        out[gguf_tensor_name(name)] = w
    divisors = llama3_divisors(cfg)
    if divisors is not None:
        out["rope_freqs.weight"] = divisors
    return out


def llama3_divisors(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp stores it: each frequency's divisor (None without it)."""
    if not cfg.rope_scaling or cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "llama3":
        return None
    plain = rope_inv_freq(cfg.replace(rope_scaling=None)).double()
    return (plain / rope_inv_freq(cfg).double()).float().numpy()


def gguf_architecture(cfg: ModelConfig) -> str:
    if cfg.model_type not in GGUF_ARCHITECTURES or cfg.num_local_experts:
        kind = "mixture of experts" if cfg.num_local_experts else "model"
        raise EmberError(f"Ember writes GGUF files of {', '.join(GGUF_ARCHITECTURES)} models; this is a "
                         f"{cfg.model_type} {kind}.")
    if cfg.ember_fields().keys() & {"position_embedding", "norm_position"}:
        raise EmberError(f"This {cfg.model_type} model has {cfg.position_embedding} positions and {cfg.norm_position}-"
                         f"norm blocks, which llama.cpp's {GGUF_ARCHITECTURES[cfg.model_type]} architecture cannot express.")
    if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        raise EmberError(f"This {cfg.model_type} model attends over a sliding window of {cfg.sliding_window} tokens, "
                         "which llama.cpp's llama architecture cannot express; it would attend further.")
    if cfg.model_type == "gpt2" and not (cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias):
        raise EmberError("llama.cpp's gpt2 needs a bias on every projection; this gpt2 model lacks some.")
    if cfg.model_type == "qwen2" and (cfg.o_proj_bias or cfg.mlp_bias):
        raise EmberError("llama.cpp's qwen2 has biases on q, k and v only; this qwen2 model has more.")
    return GGUF_ARCHITECTURES[cfg.model_type]


def _add_model_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, arch: str) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "default", "llama3"):
        raise EmberError(f"This model uses RoPE scaling {kind!r}; Ember writes none, linear and Llama 3's to GGUF.")


# --- tokenizer -------------------------------------------------------------------------------
def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """The `tokenizer.ggml.pre` name whose split (regexes in order, and whether a word that is a token is
    taken whole) is this tokenizer's; refuses a tokenizer that no name describes."""
    spec = json.loads(tokenizer.engine.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits: list[str] = []
    byte_level = False
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            splits.append(_SAME_SPLIT.get(step["pattern"]["Regex"], step["pattern"]["Regex"]))
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            byte_level = True
            if step.get("use_regex", True):
                splits.append(_GPT2_SPLIT)
        else:
            raise EmberError(f"The tokenizer's pre-tokenizer step {kind} ({json.dumps(step)[:120]}) has no "
                             "counterpart in llama.cpp's byte-level BPE.")
    model = spec.get("model", {})
    if not byte_level or model.get("type") != "BPE":
        raise EmberError("Ember writes byte-level BPE tokenizers to GGUF (tokenizer.ggml.model gpt2); this "
                         f"tokenizer is a {model.get('type')} model without a byte-level pre-tokenizer.")
    whole_words = bool(model.get("ignore_merges"))
    for name, known in PRE_TOKENIZER_SPLITS.items():
        if tuple(splits) == known and (name in WHOLE_WORDS) == whole_words:
            return name
    raise EmberError(f"The tokenizer splits text with {splits}, which no llama.cpp pre-tokenizer name "
                     f"({', '.join(PRE_TOKENIZER_SPLITS)}) describes.")


def tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): the vocabulary by id, padded with unused tokens to `vocab_size`."""
    spec = json.loads(tokenizer.engine.to_str())
    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(by_id) + 1 if by_id else 0
    if size > vocab_size:
        raise EmberError(f"The tokenizer has {size} tokens but the model's embedding table only {vocab_size} rows.")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, token_types, merges


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    pre = pre_tokenizer_name(tokenizer)
    tokens, types, merges = tokenizer_fields(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    for add, token_id in ((w.add_bos_token_id, tokenizer.bos_id if tokenizer.bos_id is not None else cfg.bos_token_id),
                          (w.add_eos_token_id, tokenizer.eos_id if tokenizer.eos_id is not None else eos),
                          (w.add_pad_token_id, tokenizer.pad_id if tokenizer.pad_id is not None else cfg.pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    w.add_add_bos_token(bool(tokenizer.add_bos_token))
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# --- the file --------------------------------------------------------------------------------
def write_gguf(model: CausalLM, tokenizer: Tokenizer, path: str | os.PathLike, file_type: str = "f16",
               name: str | None = None) -> Path:
    """Write `model` and `tokenizer` to the GGUF file `path` with weights of `file_type` (f32, f16, q8_0,
    q4_0); atomic: `path` is either the whole new file or untouched."""
    if file_type not in FILE_TYPES:
        raise EmberError(f"Unknown GGUF type {file_type!r}; choose one of {', '.join(FILE_TYPES)}.")
    asked, llama_file_type = FILE_TYPES[file_type]
    cfg = model.config
    arch = gguf_architecture(cfg)
    tensors = gguf_tensors(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or path.stem)
        w.add_file_type(int(llama_file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_model_metadata(w, cfg, arch)
        _add_tokenizer(w, tokenizer, cfg)
        for tensor_name, values in tensors.items():
            kind = tensor_type(tensor_name, values.shape, asked, cfg.tie_word_embeddings)
            data = encode_tensor(values, kind)
            w.add_tensor(tensor_name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:  # the data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # a model file others may read, not the temp file's owner-only mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
