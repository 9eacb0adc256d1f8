"""A GGUF model file -> `ModelConfig` + Ember state dict -> `CausalLM`.

Metadata keys are `{arch}.…` (llama.cpp's names); tensors are `token_embd`, `blk.N.attn_q`, …,
`output_norm`, `output`, and for Mixtral `ffn_gate_inp` (the router) with the experts' weights
either stacked (`ffn_gate_exps`, …) or one tensor per expert (`ffn_gate.E`, older files). A
tensor is decoded to float32 with the gguf package's own dequantization (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, K-quants, …), then cast to the dtype asked for; or, with `keep_blocks`, a Q4_0, Q4_1
or Q8_0 matrix keeps its blocks as an Ember int4 or int8 layer (`ember.gguf.blocks`) and an F16 one its
fp16 values (`ember.quant.f16`).

llama.cpp's converter reorders the rows of the query and key projections of llama-family models
(`llama`, `mistral`): within each head it interleaves the two rotary halves, because ggml's rotary
embedding rotates adjacent pairs (x0, x1), (x2, x3), … where Hugging Face and Ember rotate
(x_i, x_{i+d/2}). Loading undoes that. `qwen2` files keep Hugging Face's row order (ggml runs
them with the other, "NeoX", rotary layout) and `gpt2` has no rotary embedding.

RoPE scaling: `{arch}.rope.scaling.type` linear, or Llama 3's, which llama.cpp stores not as
parameters but as a divisor per frequency (`rope_freqs.weight`); the parameters are recovered from it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Collection

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from ember.config import ModelConfig
from ember.device import pick_device, pick_dtype
from ember.errors import EmberError
from ember.gguf.blocks import BLOCK, KEPT, q4_exact, q4_to_int4, q8_to_int8
from ember.gguf.reader import GGUFFile
from ember.model import CausalLM, rope_inv_freq
from ember.modules import set_module
from ember.quant.f16 import F16Embedding, F16Linear
from ember.quant.int4 import Int4Linear
from ember.quant.int8 import Int8Embedding, Int8Linear

# GGUF architecture -> Ember family (a llama file with {arch}.expert_count is Mixtral). Files of any
# other architecture are refused by name.
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}
# Architectures whose q/k rows llama.cpp's converter permuted for ggml's adjacent-pair rotary layout.
PERMUTED_QK = ("llama", "mistral")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "position_embd": "model.embed_positions",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}  # Mixtral's names in Ember
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_down|ffn_up)\.(\d+)\.weight$")  # older files: one per expert


def architecture(f: GGUFFile) -> str:
    arch = f.require("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise EmberError(f"{f.path} holds a model of architecture {arch!r} (general.architecture); Ember loads "
                         f"{', '.join(ARCHITECTURES)}.")
    return arch


def gguf_config(f: GGUFFile) -> ModelConfig:
    """The `ModelConfig` that the metadata of `f` describes."""
    arch = architecture(f)
    family = ARCHITECTURES[arch]
    key = f"{arch}.{{}}".format
    experts = f.get(key("expert_count"), int, 0)
    if experts and family != "llama":
        raise EmberError(f"{f.path} is a {arch} mixture of experts ({key('expert_count')}); Ember loads "
                         "mixtures of experts of architecture llama (Mixtral) only.")
    if "token_embd.weight" not in f.tensors:
        raise EmberError(f"{f.path} has no token_embd.weight tensor, so it holds no model weights.")
    hidden = f.require(key("embedding_length"), int)
    heads = f.require(key("attention.head_count"), int)
    layers = f.require(key("block_count"), int)
    for name, value in (("embedding_length", hidden), ("attention.head_count", heads), ("block_count", layers)):
        if value <= 0:
            raise EmberError(f"{f.path} has {key(name)} = {value}; it must be positive.")
    vocab = int(f.tensors["token_embd.weight"].shape[1])
    if f.has(key("vocab_size")) and f.require(key("vocab_size"), int) != vocab:
        raise EmberError(f"{f.path} says {key('vocab_size')} = {f.require(key('vocab_size'), int)} but its "
                         f"token_embd.weight has {vocab} rows.")
    common: dict[str, Any] = dict(
        model_type="mixtral" if experts else family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=f.require(key("feed_forward_length"), int),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=f.require(key("context_length"), int),
        tie_word_embeddings=_tied(f),
        bos_token_id=f.get("tokenizer.ggml.bos_token_id", int),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id", int),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id", int),
    )
    if family == "gpt2":
        return ModelConfig(**common, num_key_value_heads=heads, hidden_act="gelu_new",
                           norm_eps=f.require(key("attention.layer_norm_epsilon"), float),
                           attention_bias=True, o_proj_bias=True, mlp_bias=True)
    head_dim = f.get(key("attention.key_length"), int, hidden // heads)
    if f.get(key("attention.value_length"), int, head_dim) != head_dim:
        raise EmberError(f"{f.path} has {key('attention.value_length')} different from its key length; Ember's "
                         "attention needs them equal.")
    rope_dims = f.get(key("rope.dimension_count"), int, head_dim)
    if rope_dims != head_dim:
        raise EmberError(f"{f.path} rotates {rope_dims} of {head_dim} head dimensions ({key('rope.dimension_count')}); "
                         "Ember rotates whole heads only.")
    theta = f.get(key("rope.freq_base"), float, 1e6 if family == "qwen2" else 10000.0)
    q_bias, o_bias, mlp_bias = (f"blk.0.{n}.bias" in f.tensors for n in ("attn_q", "attn_output", "ffn_up"))
    sliding = f.get(key("attention.sliding_window"), int) if family == "mistral" else None
    return ModelConfig(
        **common,
        num_key_value_heads=f.get(key("attention.head_count_kv"), int, heads),
        head_dim=head_dim,
        norm_eps=f.require(key("attention.layer_norm_rms_epsilon"), float),
        hidden_act="silu",
        rope_theta=theta,
        rope_scaling=_rope_scaling(f, key, head_dim, theta),
        attention_bias=family == "qwen2" or q_bias,
        o_proj_bias=family == "llama" and o_bias,
        mlp_bias=mlp_bias,
        sliding_window=sliding or None,
        num_local_experts=experts,
        num_experts_per_tok=f.require(key("expert_used_count"), int) if experts else 2,
    )


def _tied(f: GGUFFile) -> bool:
    """True when the file has no separate output matrix, or one byte-identical to the embedding table
    (llama.cpp's gpt2 converter writes the tied table twice)."""
    out = f.tensors.get("output.weight")
    if out is None:
        return True
    emb = f.tensors["token_embd.weight"]
    same_layout = out.tensor_type == emb.tensor_type and out.data.shape == emb.data.shape
    return same_layout and np.array_equal(out.data, emb.data)


def _rope_scaling(f: GGUFFile, key, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = f.get(key("rope.scaling.type"), str, "none")
    if "rope_freqs.weight" in f.tensors:
        if kind not in ("none", "llama3"):
            raise EmberError(f"{f.path} has both rope_freqs.weight and RoPE scaling {kind!r} "
                             f"({key('rope.scaling.type')}); Ember reads one or the other.")
        return _llama3_scaling(f, head_dim, theta)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": f.require(key("rope.scaling.factor"), float)}
    raise EmberError(f"{f.path} uses RoPE scaling {kind!r} ({key('rope.scaling.type')}); Ember supports none, "
                     "linear and Llama 3's (rope_freqs.weight) from GGUF.")


def _llama3_scaling(f: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Llama 3's RoPE scaling from the per-frequency divisors llama.cpp's converter stores in rope_freqs.

    The rule: frequencies with wavelength below old_ctx / high_freq_factor stay, those above
    old_ctx / low_freq_factor are divided by `factor`, and in between 1/divisor blends 1/factor and 1
    by s = (old_ctx / wavelength - low) / (high - low). s is linear in 1/wavelength, so the blended
    divisors fix its slope and intercept, and with low_freq_factor = 1 (every Llama 3 release) they fix
    high_freq_factor and old_ctx. The result is checked against every stored divisor."""
    divisors = f.dequantize("rope_freqs.weight").astype(np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,):
        raise EmberError(f"{f.path} has rope_freqs.weight of {divisors.size} values; a head of {head_dim} "
                         f"dimensions has {head_dim // 2} frequencies.")
    if np.allclose(divisors, 1.0):
        return None
    factor = float(divisors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    blended = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    scaling = None
    if blended.sum() >= 2:
        s = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_freq[blended] / (2 * math.pi), s, 1)  # s = A / wavelength - B
        if intercept < 0 < slope:
            high, old_ctx = 1 - 1 / intercept, -slope / intercept
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                       "high_freq_factor": _tidy(high), "original_max_position_embeddings": _tidy(old_ctx)}
    if scaling is not None:
        probe = ModelConfig(model_type="llama", hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1,
                            rope_theta=theta, rope_scaling=scaling)
        if np.allclose(rope_inv_freq(probe).double().numpy(), inv_freq / divisors, rtol=1e-5, atol=0):
            return scaling
    raise EmberError(f"{f.path} has RoPE divisors (rope_freqs.weight) that do not follow Llama 3's scaling rule, "
                     "the only per-frequency scaling Ember reads.")


def _tidy(x: float) -> float | int:
    """A fitted value written as the round number it was made from, where it is one."""
    for digits in (0, 1, 2, 3):
        if abs(x - round(x, digits)) < 1e-5 * max(1.0, abs(x)):
            return int(round(x)) if digits == 0 else round(x, digits)
    return float(x)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows come as (pair, half); Ember wants (half, pair)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ember_name(gguf_name: str, moe: bool = False) -> str | None:
    """Ember's name for a GGUF tensor name, or None (fused tensors are split by the caller)."""
    m = _EXPERT_TENSOR.match(gguf_name)
    if m and moe:
        i, part, e = m.groups()
        return f"model.layers.{i}.block_sparse_moe.experts.{e}.{_EXPERT_NAMES[part]}.weight"
    m = _LAYER_TENSOR.match(gguf_name)
    if m:
        i, part, kind = m.groups()
        if moe and part == "ffn_gate_inp":
            return f"model.layers.{i}.block_sparse_moe.gate.{kind}"
        return f"model.layers.{i}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES and kind in ("weight", "bias") else None


Rows = Callable[[np.ndarray], np.ndarray]  # picks and orders the rows of a tensor that become one target


def placements(f: GGUFFile, cfg: ModelConfig) -> dict[str, list[tuple[str, Rows]]]:
    """For every tensor of `f`: the Ember tensors it becomes, each with the function that takes its
    rows for it (a fused q/k/v is split, stacked experts are taken apart, llama's q/k rows are put
    back in order). The function moves whole rows, so it serves decoded values and raw blocks alike."""
    arch = architecture(f)

    def rope_rows(proj: str) -> Rows:
        if arch not in PERMUTED_QK or proj not in ("attn_q", "attn_k"):
            return lambda w: w
        heads = cfg.num_attention_heads if proj == "attn_q" else cfg.num_key_value_heads
        return lambda w: unpermute_qk(w, heads)

    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_key_value_heads * cfg.head_dim
    plan: dict[str, list[tuple[str, Rows]]] = {}
    for name in f.tensors:
        if name == "output.weight" and cfg.tie_word_embeddings or name == "rope_freqs.weight":
            continue  # rope_freqs became cfg.rope_scaling
        m = _LAYER_TENSOR.match(name)
        part = m.group(2) if m else None
        if part == "attn_qkv":  # q, k, v stacked by rows (gpt2)
            i, _, kind = m.groups()
            bounds = {"q": (0, q_rows), "k": (q_rows, q_rows + kv_rows), "v": (q_rows + kv_rows, None)}
            plan[name] = [(f"model.layers.{i}.self_attn.{proj}_proj.{kind}",
                           lambda w, a=a, b=b, r=rope_rows(f"attn_{proj}"): r(w[a:b]))
                          for proj, (a, b) in bounds.items()]
        elif part and part.endswith("_exps") and part.removesuffix("_exps") in _EXPERT_NAMES:
            # [experts, out, in]: one weight of every expert of a layer
            expert = _EXPERT_NAMES[part.removesuffix("_exps")]
            plan[name] = [(f"model.layers.{m.group(1)}.block_sparse_moe.experts.{e}.{expert}.weight",
                           lambda w, e=e: w[e]) for e in range(int(f.tensors[name].shape[-1]))]
        else:
            target = ember_name(name, moe=cfg.num_local_experts > 0)
            if target is None:
                raise EmberError(f"{f.path} has a tensor {name} that an Ember {cfg.model_type} model has no place "
                                 "for.")
            plan[name] = [(target, rope_rows(part or ""))]
    return plan


def gguf_state_dict(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of `f` in Ember's names and layouts (but the GGUF tensors named in `skip`),
    decoded to float32 and then cast to `dtype` on `device` one tensor at a time (so no float32 copy
    of the whole model is ever held)."""
    sd: dict[str, torch.Tensor] = {}
    for name, targets in placements(f, cfg).items():
        if name in skip:
            continue
        values = f.dequantize(name)
        for target, rows in targets:
            sd[target] = torch.from_numpy(np.ascontiguousarray(rows(values))).to(device=device, dtype=dtype)
    return sd


# Ember modules a file's blocks can become: the decoder blocks' linear layers and the LM head
# (int4 or int8), the token table (int8 only: Ember has no int4 embedding). The MoE router and
# gpt2's position table stay float.
_KEEPABLE_LINEAR = re.compile(r"(model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|"
                              r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]|lm_head)\.weight$")
_TABLE = "model.embed_tokens.weight"


def _kept_modules(f: GGUFFile, cfg: ModelConfig, plan: dict[str, list[tuple[str, Rows]]], model: CausalLM,
                  device: torch.device) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The modules that keep `f`'s Q4_0, Q4_1 and Q8_0 blocks ({Ember module name: module}) and
    the GGUF type each keeps ({module name: type name}), for the tensors whose layout maps."""
    modules: dict[str, nn.Module] = {}
    types: dict[str, str] = {}
    for name, targets in plan.items():
        t = f.tensors[name]
        kind = t.tensor_type
        if kind not in KEPT or not all(_KEEPABLE_LINEAR.match(target) or target == _TABLE for target, _ in targets):
            continue
        if any(target == _TABLE for target, _ in targets) and KEPT[kind] == "int4":
            continue
        raw = t.data
        if KEPT[kind] == "int4" and not q4_exact(raw, kind):
            continue  # decoded instead: see ember.gguf.blocks
        for target, rows in targets:
            module_name = target.removesuffix(".weight")
            part = rows(raw)
            if kind == Q.F16:  # the file's fp16 values, kept (widening to fp32 is exact)
                weight = torch.from_numpy(np.array(part, dtype=np.float16)).to(device)  # a copy, not the mapping
                old = model.get_submodule(module_name)
                if target == _TABLE:
                    new16: nn.Module = F16Embedding(old.num_embeddings, old.embedding_dim, device="meta")
                else:
                    new16 = F16Linear(old.in_features, old.out_features, old.bias is not None, device="meta")
                _check_shape(f, target, tuple(weight.shape), tuple(old.weight.shape))
                new16.qweight = weight
                modules[module_name] = new16
                types[module_name] = "f16"
                continue
            if target == _TABLE:
                table = model.get_submodule(module_name)
                qweight, scales = q8_to_int8(part)
                _check_shape(f, target, (qweight.shape[0], qweight.shape[1]), tuple(table.weight.shape))
                new: nn.Module = Int8Embedding(table.num_embeddings, table.embedding_dim, BLOCK, scales.dtype,
                                               device="meta")
            else:
                linear = model.get_submodule(module_name)
                args = (linear.in_features, linear.out_features, linear.bias is not None)
                if kind == Q.Q8_0:
                    qweight, scales = q8_to_int8(part)
                    shape = (qweight.shape[0], qweight.shape[1])
                    new = Int8Linear(*args, device="meta", group_size=BLOCK, scale_dtype=scales.dtype)
                else:
                    qweight, scales = q4_to_int4(part, kind)
                    shape = (qweight.shape[0], qweight.shape[1] * 2)
                    new = Int4Linear(*args, group_size=BLOCK, device="meta", scale_dtype=scales.dtype)
                _check_shape(f, target, shape, tuple(linear.weight.shape))
            new.qweight = qweight.to(device)
            if isinstance(new, Int4Linear):
                new.scales_and_zeros = scales.to(device)
            else:
                new.scales = scales.to(device)
            modules[module_name] = new
            types[module_name] = kind.name.lower()
    return modules, types


def _check_shape(f: GGUFFile, target: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise EmberError(f"Tensor for {target} in {f.path} has shape {got}; the metadata implies {want}.")


def load_gguf(path: str | os.PathLike | GGUFFile, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None, keep_blocks: bool = False) -> CausalLM:
    """Load a GGUF model file into a `CausalLM` in eval mode.

    `path` may be an opened `GGUFFile`, so that the tokenizer reads the same parsed header. Every
    tensor is decoded to `dtype`, except with `keep_blocks=True`: then the file's Q4_0 and Q4_1
    matrices become `Int4Linear` layers (groups of 32) and its Q8_0 matrices `Int8Linear` layers
    (a scale per 32), over the same values as the file (see `ember.gguf.blocks`), and its F16
    matrices `F16Linear` layers over the file's fp16 values; a Q8_0 or F16 token table becomes an
    `Int8Embedding` or `F16Embedding`, which a tied LM head reads too. Other types (K-quants, Q5_x,
    IQ, BF16, F32), norms, biases and the MoE router are decoded. `model.quantization_config`
    then names the modules kept and their GGUF types."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    cfg = gguf_config(f)
    device = pick_device(device if device is None or isinstance(device, str) else str(device))
    dtype = pick_dtype(device, dtype)
    with torch.device("meta"):
        model = CausalLM(cfg)
    plan = placements(f, cfg)
    kept, kept_types = _kept_modules(f, cfg, plan, model, device) if keep_blocks else ({}, {})
    kept_sources = {name for name, targets in plan.items()
                    if all(target.removesuffix(".weight") in kept for target, _ in targets)}
    sd = gguf_state_dict(f, cfg, dtype, device, skip=kept_sources)
    own = model.state_dict()
    expected = set(own) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing = sorted(expected - sd.keys() - {f"{name}.weight" for name in kept})
    if missing:
        raise EmberError(f"{f.path} lacks {len(missing)} tensors a {cfg.model_type} model of its metadata needs "
                         f"(e.g. {', '.join(missing[:3])}).")
    for k, v in sd.items():
        if k not in own:
            raise EmberError(f"{f.path} has a tensor for {k}, which a {cfg.model_type} model of its metadata lacks.")
        if tuple(v.shape) != tuple(own[k].shape):
            raise EmberError(f"Tensor for {k} in {f.path} has shape {tuple(v.shape)}; the metadata implies "
                             f"{tuple(own[k].shape)}.")
    for name, module in kept.items():
        set_module(model, name, module)
    model.load_state_dict(sd, strict=False, assign=True)  # the decoded tensors become the parameters
    table = model.model.embed_tokens
    if cfg.tie_word_embeddings:
        if isinstance(table, (Int8Embedding, F16Embedding)):
            model.lm_head = table.head()
            kept_types["lm_head"] = kept_types["model.embed_tokens"]
        else:
            model.lm_head.weight = table.weight
    if kept:
        model.quantization_config = {"method": "gguf", "group_size": BLOCK, "modules": kept_types}
    model.reset_buffers()
    return model.to(dtype).eval()
