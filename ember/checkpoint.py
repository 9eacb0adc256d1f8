"""Hugging Face–layout checkpoints: load and save, never unpickling.

A model directory holds `config.json`, `model.safetensors` (or shards plus
`model.safetensors.index.json`), `generation_config.json` and the tokenizer files.
Ember's module names follow HF Llama, so llama/mistral/qwen2/mixtral weights map by
name; GPT-2 stores q, k, v in one `Conv1D` (weights transposed) and is translated here.
Every directory is written to a temporary path beside the target and renamed into place,
so a run killed mid-write leaves the previous checkpoint intact, and carries a checksum manifest
(`ember.manifest`) that loading verifies, so a damaged file is named rather than loaded. The weights here are plain ones:
`ember.load.load_model` composes a LoRA adapter and quantization on top of `load_pretrained`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ember.config import ModelConfig
from ember.errors import EmberError
from ember.files import atomic_dir, read_json, write_json
from ember.manifest import verify_files, write_manifest
from ember.model import CausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


# --- name maps ---------------------------------------------------------------------------
def hf_to_ember(cfg: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Translate an HF state dict of `cfg.model_type` into Ember's module names."""
    hf = {k: v for k, v in hf.items() if not IGNORED_KEYS.search(k)}
    if cfg.model_type != "gpt2":
        out = {}
        for k, v in hf.items():
            if k.startswith("transformer.") or k.startswith("gpt_neox."):
                raise EmberError(f"Weight {k} does not belong to a {cfg.model_type} checkpoint.")
            out[k] = v
        if cfg.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out
    out = {}
    q = cfg.num_attention_heads * cfg.head_dim
    for k, v in hf.items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[k] = v
            continue
        m = re.match(r"h\.(\d+)\.(.+)$", k)
        if m is None:
            top = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight",
                   "ln_f.weight": "model.norm.weight", "ln_f.bias": "model.norm.bias"}
            if k not in top:
                raise EmberError(f"Unexpected GPT-2 weight '{k}' in checkpoint.")
            out[top[k]] = v
            continue
        i, rest = m.groups()
        p = f"model.layers.{i}."
        kind = rest.rsplit(".", 1)[-1]  # weight or bias
        if rest.startswith("attn.c_attn."):
            # Conv1D stores [in, out]; q, k, v are consecutive column blocks.
            v = v.t() if kind == "weight" else v
            out[p + f"self_attn.q_proj.{kind}"] = v[:q].contiguous()
            out[p + f"self_attn.k_proj.{kind}"] = v[q:2 * q].contiguous()
            out[p + f"self_attn.v_proj.{kind}"] = v[2 * q:].contiguous()
            continue
        names = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
                 "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
        module = rest.rsplit(".", 1)[0]
        if module not in names:
            raise EmberError(f"Unexpected GPT-2 weight '{k}' in checkpoint.")
        if kind == "weight" and module not in ("ln_1", "ln_2"):
            v = v.t().contiguous()
        out[p + f"{names[module]}.{kind}"] = v
    return out


def ember_to_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `hf_to_ember`: the names and layouts `transformers` expects."""
    if cfg.model_type != "gpt2":
        out = dict(sd)
        if cfg.tie_word_embeddings:
            out.pop("lm_head.weight", None)  # safetensors cannot store shared tensors twice
        return out
    out = {}
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
             "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
    top = {"model.embed_tokens.weight": "transformer.wte.weight",
           "model.embed_positions.weight": "transformer.wpe.weight",
           "model.norm.weight": "transformer.ln_f.weight", "model.norm.bias": "transformer.ln_f.bias"}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        if k == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[k] = v
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        i, module, kind = m.groups()
        p = f"transformer.h.{i}."
        if module == "self_attn.q_proj":
            qkv = [sd[f"model.layers.{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            fused = torch.cat(qkv, dim=0)
            out[p + f"attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
            continue
        if module in ("self_attn.k_proj", "self_attn.v_proj"):
            continue
        if kind == "weight" and module not in ("input_layernorm", "post_attention_layernorm"):
            v = v.t()
        out[p + f"{names[module]}.{kind}"] = v.contiguous()
    return out


# --- loading ---------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a model dir (single file or shards), on CPU, in their stored dtype.

    A directory Ember wrote is checked against its checksum manifest first, every file of it."""
    verify_files(path)
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = read_json(index, "Shard index").get("weight_map", {})
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise EmberError(f"Shard {path / shard} named in {index.name} is missing.")
            sd.update(_load_safetensors(path / shard))
        return sd
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise EmberError(f"{path} holds only pickled weights (.bin/.pt); Ember loads safetensors only. "
                         "Convert them with transformers' save_pretrained(safe_serialization=True).")
    raise EmberError(f"No {WEIGHTS_NAME} or {INDEX_NAME} in {path}.")


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise EmberError(f"The weights file {file} is corrupt or truncated ({e}).") from None


def save_safetensors(tensors: dict[str, Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """`save_file`, with safetensors' own write errors (a full disk, a file-size limit) as the OSError
    of `file`, which `write_failed` turns into one sentence."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as e:
        raise OSError(0, str(e), str(file)) from None


def write_failed(target: Path, error: OSError) -> EmberError:
    """The message for a directory that could not be written; `atomic_dir` has left the previous one whole."""
    reason = error.strerror or str(error)
    file = f"{Path(error.filename).name}: " if error.filename else ""
    return EmberError(f"Could not write {target} ({file}{reason}); is the disk full? The previous {target.name}, "
                      "if any, is left as it was.")


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise EmberError(f"Model directory {path} does not exist.")
    if not path.is_dir():
        raise EmberError(f"{path} is a file; a model is a directory with config.json and weights.")
    data = read_json(path / "config.json", "Model config")
    if not isinstance(data, dict):
        raise EmberError(f"Model config {path / 'config.json'} must hold a JSON object.")
    return ModelConfig.from_hf(data)


def read_weights(path: Path, model: CausalLM) -> dict[str, Tensor]:
    """The weights in `path`, in Ember's names, checked to fit `model` name by name and shape by shape."""
    cfg = model.config
    sd = hf_to_ember(cfg, read_state_dict(path))
    own = model.state_dict()
    expected = set(own)
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:3])})")
        raise EmberError(f"Weights in {path} do not match its config.json: {'; '.join(parts)}.")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise EmberError(f"Weight {k} in {path} has shape {tuple(v.shape)}, config.json implies "
                             f"{tuple(own[k].shape)}.")
    return sd


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> CausalLM:
    """The plain (unquantized) model an Ember- or transformers-saved directory holds, in eval mode.

    Adapters and quantization are composed on top by `ember.load.load_model`, which is what callers use."""
    path = Path(path)
    cfg = load_config(path)
    if read_json(path / "config.json", "Model config").get("quantization_config") is not None:
        raise EmberError(f"{path} holds quantized weights; load it with ember.load_model.")
    with torch.device("meta"):
        model = CausalLM(cfg)
    sd = read_weights(path, model)
    model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model.to(dtype).eval()


# --- saving ----------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_model_files(model: CausalLM, out: Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and weights (sharded above `max_shard_bytes`) into `out`."""
    cfg = model.config
    sd = ember_to_hf(cfg, {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    hf_cfg = cfg.to_hf()
    dtype = next(iter(sd.values())).dtype
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = _dtype_name(dtype)
    write_json(out / "config.json", hf_cfg)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    if total <= max_shard_bytes:
        save_safetensors(sd, out / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def generation_config(cfg: ModelConfig, **overrides: Any) -> dict[str, Any]:
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "pad_token_id": cfg.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    gen.update(overrides)
    return gen


def save_pretrained(model: CausalLM, tokenizer: Any, path: str | Path, max_shard_bytes: int = 4 << 30,
                    extra_files: dict[str, Any] | None = None) -> Path:
    """Save model (+ tokenizer) as an HF-layout directory, atomically."""
    path = Path(path)
    try:
        with atomic_dir(path) as tmp:
            write_model_files(model, tmp, max_shard_bytes)
            write_json(tmp / "generation_config.json", generation_config(model.config))
            if tokenizer is not None:
                tokenizer.save(tmp)
            for name, data in (extra_files or {}).items():
                write_json(tmp / name, data)
            write_manifest(tmp)
    except OSError as e:
        raise write_failed(path, e) from None
    return path
