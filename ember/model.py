"""The transformer: one decoder for every family in `ember.config`.

Read it top to bottom: normalisation, positions (rotary, sinusoidal, ALiBi; learned ones are
a table), attention, the MLP (plain, gated, or a mixture of experts), the block (its norms before
each sublayer or after each residual add), and the causal LM that stacks them. Module names
follow Hugging Face's Llama layout (`model.layers.0.self_attn.q_proj`, ...), so weights
and PEFT adapters map onto them by name; GPT-2's fused projections are split on load
(see `ember.checkpoint`).

One forward serves every caller: training passes full sequences; the generator and the
engine pass a KV-cache backend whose `attend` stores this step's keys and values and
attends over everything cached (contiguous in `ember.kv_cache`, paged in the engine).

Plain PyTorch throughout. Faster CPU kernels are swapped in from outside, once, when a model
is prepared for inference (`ember.cpu_inference`): its linear layers become inference layers,
and q/k/v (gate/up) become one fused layer in `qkv_proj` (`gate_up_proj`), which the
attention and the MLP use when it is there. The KV-cache backends choose their attention kernels.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.config import ModelConfig


class CacheBackend(Protocol):
    """What attention needs from a KV cache; implementations live beside their callers."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store k, v [B, Hkv, T, D] for this step, return attention of q [B, H, T, D]."""
        ...

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        """Positions of the tokens about to be processed, [B, T] or [T]."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once after all layers have attended."""
        ...


# --- normalisation ---------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 for stability under bf16, as the reference implementations do:
        # the normalised input is rounded to x's dtype before the weight multiplies it. In float32
        # nothing is rounded in between, so the weight goes into PyTorch's one op.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.hidden_size, cfg.norm_eps) if cfg.uses_rmsnorm else nn.LayerNorm(
        cfg.hidden_size, eps=cfg.norm_eps
    )


# --- rotary position embedding -----------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Per-pair rotation frequencies, with Llama-3 or linear context-extension scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: leave high frequencies alone, divide low ones by `factor`, blend in between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables for `positions` ([T] or [B, T]), shaped to broadcast over heads:
    cos(angle) over both halves of a head, -sin(angle) over its first half and sin(angle) over its
    second, as `apply_rope` takes them (made once a forward, for every layer)."""
    angles = positions.float()[..., None] * inv_freq.float()  # [..., T, D/2]
    sin = angles.sin()
    cos, sin = torch.cat((angles.cos(),) * 2, dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)
    if positions.dim() == 2:  # [B, T, D] -> [B, 1, T, D]
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by position-dependent angles (the HF/Llama layout):
    x cos + (x_{D/2..}, x_{..D/2}) (-sin, sin), the halves swapped by one flip and the sign in
    `sin` (`rope_cos_sin`), so a rotation is three operations."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


# --- sinusoidal positions (Vaswani et al. 2017, section 3.5) ---------------------------------
def sinusoidal_embedding(positions: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The fixed position vectors added to the embeddings, [..., dim] for `positions` [...]:
    PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)).
    Computed for any position (nothing is learned, so nothing limits the length); the angles in
    float32, whose rounding of pos x frequency is the table's only error."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # [..., ceil(dim/2)]
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # sin, cos interleaved
    return table[..., :dim].to(dtype)


# --- ALiBi (Press et al. 2022) -------------------------------------------------------------
def alibi_slopes(num_heads: int) -> Tensor:
    """Each head's penalty per token of distance, [num_heads] float32: for n a power of two the
    geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise those of the nearest power of two
    below n, then every other slope of twice that power for the remaining heads (the paper's rule,
    as BLOOM builds them)."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(closest) + geometric(2 * closest)[0::2][:num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_mask(slopes: Tensor, q_positions: Tensor, k_positions: Tensor, visible: Tensor | None,
               dtype: torch.dtype) -> Tensor:
    """The additive attention mask of ALiBi: -slope x (query position - key position) for each head,
    -inf where `visible` (boolean, True = may attend, broadcasting to [.., Tq, Tk]) is False.
    q_positions [.., Tq], k_positions [.., Tk]; returns [.., H, Tq, Tk] in `dtype`."""
    distance = (q_positions[..., :, None] - k_positions[..., None, :]).float()  # [.., Tq, Tk]
    bias = -slopes.float()[:, None, None] * distance[..., None, :, :]  # [.., H, Tq, Tk]
    if visible is not None:
        # [Tq, Tk] and [B, 1, Tq, Tk] broadcast over the heads as they are; [B, Tq, Tk] gains a head axis.
        bias = bias.masked_fill(~(visible[:, None] if visible.dim() == 3 else visible), float("-inf"))
    return bias.to(dtype)


# --- attention -------------------------------------------------------------------------
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = True,
              dropout: float = 0.0) -> Tensor:
    """Scaled dot-product attention with grouped KV heads, through PyTorch's fused kernels.

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D]; mask (optional) boolean, True = may attend, or a float
    mask added to the scores (ALiBi's); `dropout` drops attention weights (training only).
    """
    gqa = k.shape[1] != q.shape[1]  # grouped-query attention: each KV head serves a group of q heads
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1, dropout_p=dropout,
                                          enable_gqa=gqa)


def causal_mask(q_positions: Tensor, k_positions: Tensor, sliding_window: int | None = None) -> Tensor:
    """Boolean mask [.., Tq, Tk]: a query sees keys at or before its position (within the window)."""
    diff = q_positions[..., :, None] - k_positions[..., None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask = mask & (diff < sliding_window)
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, q, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=cfg.o_proj_bias)
        self.dropout = cfg.dropout  # on the attention weights, in training
        # q, k and v from one layer over their stacked weights, once a model is prepared for
        # inference (ember.cpu_inference installs it and removes the three); None: the three layers.
        self.qkv_proj: nn.Module | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: CacheBackend | None) -> Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v)
        else:
            out = attention(q, k, v, mask, dropout=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# --- feed-forward ----------------------------------------------------------------------
def activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


class MLP(nn.Module):
    """SwiGLU (gate * up, then down) when gated; otherwise up -> act -> down (GPT-2)."""

    def __init__(self, cfg: ModelConfig, gated: bool | None = None) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp if gated is None else gated
        h, i = cfg.hidden_size, cfg.intermediate_size
        if self.gated:
            self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one layer, as `Attention.qkv_proj`

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            if self.gate_up_proj is not None:
                gate, up = self.gate_up_proj(x)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.up_proj(x)))


class Expert(nn.Module):
    """One SwiGLU expert, with Mixtral's weight names (w1 gate, w3 up, w2 down)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed mixture of experts: each token goes to its k best experts, outputs are
    mixed by the router's renormalised probabilities (Mixtral)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_local_experts))
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        if self.training:
            # Switch-Transformer load balancing: fraction routed x mean probability, per expert.
            routed = F.one_hot(chosen, len(self.experts)).float().mean(0)  # [k, E]
            self.aux_loss = len(self.experts) * (routed * probs.mean(0)).sum()
        return out.view(shape)


# --- the block and the model -------------------------------------------------------------
class Block(nn.Module):
    """Attention then the MLP, each added to the residual stream. Pre-norm (`norm_position`
    "pre"): x + f(norm(x)). Post-norm ("post", the original transformer's): norm(x + f(x)), so
    `input_layernorm` follows the attention's residual add and `post_attention_layernorm` the MLP's.
    In training each sublayer's output is dropped out (`dropout`) before its add."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.dropout = cfg.dropout
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        if cfg.num_local_experts:
            self.block_sparse_moe = MoE(cfg)  # Mixtral's name, so checkpoints map 1:1
        else:
            self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope, mask, cache) -> Tensor:
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        if self.post_norm or (self.dropout and self.training):
            return self._forward_with_switches(x, ffn, rope, mask, cache)
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + ffn(self.post_attention_layernorm(x))

    def _forward_with_switches(self, x: Tensor, ffn: nn.Module, rope, mask, cache) -> Tensor:
        """The block under post-norm or residual dropout (the plain pre-norm path stays as short as it was)."""
        if self.post_norm:
            x = self.input_layernorm(x + self._drop(self.self_attn(x, rope, mask, cache)))
            return self.post_attention_layernorm(x + self._drop(ffn(x)))
        x = x + self._drop(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self._drop(ffn(self.post_attention_layernorm(x)))

    def _drop(self, x: Tensor) -> Tensor:
        """Residual dropout: only in training, and only where asked for (no op otherwise)."""
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position_embedding == "learned":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        if cfg.embedding_norm:
            self.embed_norm = make_norm(cfg)  # BLOOM's word_embeddings_layernorm
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        # Post-norm blocks end normalised already: no final norm (an identity keeps the name).
        self.norm = make_norm(cfg) if cfg.final_norm else nn.Identity()


class CausalLM(nn.Module):
    """Decoder-only language model: ids [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg) if cfg.uses_rope else torch.empty(0),
                             persistent=False)
        self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_attention_heads) if cfg.uses_alibi
                             else torch.empty(0), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's trick: shrink projections that write into the residual stream by depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))
        if cfg.embedding_scale != 1.0:
            # Scaled embeddings (Vaswani et al.) start at std hidden_size^-0.5, as tensor2tensor and fairseq
            # draw them: times sqrt(hidden_size) they have unit scale, like the sinusoids added to them.
            nn.init.normal_(self.model.embed_tokens.weight, mean=0.0, std=cfg.hidden_size ** -0.5)

    def _norm_weight(self) -> Tensor:
        """The last norm's weight: the final norm's, or in a post-norm model the last block's."""
        if isinstance(self.model.norm, nn.Identity):
            return self.model.layers[-1].post_attention_layernorm.weight
        return self.model.norm.weight

    @property
    def device(self) -> torch.device:
        """Where the model runs (read off the last norm: a quantized layer's `.weight` dequantizes)."""
        return self._norm_weight().device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in (the last norm's; quantized layers compute in it too)."""
        return self._norm_weight().dtype

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        device = self.device
        self.rope_inv_freq = (rope_inv_freq(self.config) if self.config.uses_rope
                              else torch.empty(0)).to(device)
        self.alibi_slopes = (alibi_slopes(self.config.num_attention_heads) if self.config.uses_alibi
                             else torch.empty(0)).to(device)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def hidden_states(self, input_ids: Tensor, positions: Tensor | None = None,
                      cache: CacheBackend | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Final normalised hidden states [B, T, H] (value and reward heads read these)."""
        cfg = self.config
        B, T = input_ids.shape
        if positions is None:
            positions = (cache.positions(T, input_ids.device) if cache is not None
                         else torch.arange(T, device=input_ids.device))
        x = self.model.embed_tokens(input_ids)
        if cfg.embedding_scale != 1.0:
            x = x * cfg.embedding_scale
        rope = None
        if cfg.uses_rope:
            rope = rope_cos_sin(self.rope_inv_freq, positions, x.dtype)
        elif cfg.position_embedding == "learned":
            x = x + self.model.embed_positions(positions)
        elif cfg.position_embedding == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.hidden_size, x.dtype)
        if cfg.embedding_norm:
            x = self.model.embed_norm(x)
        if cfg.dropout and self.training:
            x = F.dropout(x, cfg.dropout, training=True)
        mask = attn_mask
        if mask is None and cache is None and cfg.sliding_window is not None and T > cfg.sliding_window:
            mask = causal_mask(positions, positions, cfg.sliding_window)
        if cfg.uses_alibi and cache is None:  # the caches add ALiBi's bias themselves
            if mask is None:
                mask = causal_mask(positions, positions)
            mask = alibi_mask(self.alibi_slopes, positions, positions, mask, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None,
                cache: CacheBackend | None = None, attn_mask: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`, which skips the head elsewhere)."""
        h = self.hidden_states(input_ids, positions, cache, attn_mask)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def aux_loss(self) -> Tensor | None:
        """Sum of the MoE load-balancing losses from the last training forward, if any."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
