"""ModelConfig: one dataclass for every decoder family Ember runs.

A family (gpt2, llama, mistral, qwen2, mixtral, bloom) is just a choice of a few switches:
how positions enter (`position_embedding`: learned, sinusoidal, rotary or ALiBi), LayerNorm or
RMSNorm and where it sits (`norm_position`: before each sublayer, or after its residual add as in
the original transformer), GELU or SwiGLU (or a mixture of SwiGLU experts), which projections
carry a bias, whether the LM head is tied to the embeddings, and the training-time `dropout`. `from_hf` and `to_hf` translate to and from Hugging Face `config.json`, so a
checkpoint trained here opens in `transformers` and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "bloom")

# How a token's position enters the model:
# - learned: a trained table of position vectors added to the token embeddings (GPT-2);
# - sinusoidal: sines and cosines of geometrically spaced frequencies added to the embeddings,
#   nothing learned (Vaswani et al. 2017, section 3.5);
# - rope: queries and keys rotated by position-dependent angles (Su et al.; Llama);
# - alibi: no position embedding; each head adds a penalty linear in the query-key distance to
#   its attention scores (Press et al. 2022; BLOOM).
POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rope", "alibi")
# Where each sublayer's normalisation sits: "pre" normalises its input, x + f(norm(x)) (GPT-2 and
# after); "post" normalises after the residual add, norm(x + f(x)) (the original transformer).
NORM_POSITIONS = ("pre", "post")
# Ember's own config.json fields for the switches above (written where they differ from the
# family's own choice, so transformers-made configs and Ember's existing ones stay as they were).
EMBER_FIELDS = ("position_embedding", "norm_position", "dropout", "scale_embeddings")

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "bloom": "BloomForCausalLM",
}


def _biased_tied_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """What GPT-2 and BLOOM configs share: biases on every projection, a tied head by default, and
    the initialiser range and special ids as written."""
    return dict(attention_bias=True, o_proj_bias=True, mlp_bias=True,
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                initializer_range=hf.get("initializer_range", 0.02), bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    hidden_act: str = "silu"  # "silu" -> SwiGLU MLP; "gelu_new"/"gelu" -> plain 2-layer MLP
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}
    attention_bias: bool = False  # bias on q, k, v (qwen2; llama's flag also covers o)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # mistral: attend to at most this many past tokens
    num_local_experts: int = 0  # > 0 makes every MLP a mixture of experts (mixtral)
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    position_embedding: str | None = None  # POSITION_EMBEDDINGS; None: the family's own
    norm_position: str = "pre"  # NORM_POSITIONS
    # Probability of dropping an element of the embeddings, of the attention weights and of each
    # sublayer's output before its residual add; in training only (a model in eval() drops nothing).
    dropout: float = 0.0
    # Multiply the token embeddings by sqrt(hidden_size) before positions are added (Vaswani et al.,
    # section 3.4), which then start at std hidden_size^-0.5: unit scale, like the sinusoids added to
    # them (drawn at initializer_range, they would drown in them). None: only with sinusoidal positions.
    scale_embeddings: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF fields, written back as-is

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise EmberError(
                f"Unknown model_type '{self.model_type}'; Ember supports {', '.join(FAMILIES)}."
            )
        if self.position_embedding is None:
            self.position_embedding = family_position_embedding(self.model_type)
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise EmberError(f"position_embedding must be one of {', '.join(POSITION_EMBEDDINGS)}; "
                             f"got {self.position_embedding!r}.")
        if self.norm_position not in NORM_POSITIONS:
            raise EmberError(f"norm_position must be one of {', '.join(NORM_POSITIONS)}; got {self.norm_position!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise EmberError(f"dropout is a probability in [0, 1); got {self.dropout!r}.")
        self.dropout = float(self.dropout)
        if self.scale_embeddings not in (None, True, False):
            raise EmberError(f"scale_embeddings is true, false or null; got {self.scale_embeddings!r}.")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise EmberError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise EmberError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}."
            )

    # --- what the switches mean -------------------------------------------------------
    @property
    def uses_rope(self) -> bool:
        return self.position_embedding == "rope"

    @property
    def uses_alibi(self) -> bool:
        return self.position_embedding == "alibi"

    @property
    def uses_rmsnorm(self) -> bool:
        return self.model_type not in ("gpt2", "bloom")

    @property
    def embedding_norm(self) -> bool:
        """A layer norm on the token embeddings before the first block (BLOOM's)."""
        return self.model_type == "bloom"

    @property
    def embedding_scale(self) -> float:
        """What the token embeddings are multiplied by: sqrt(hidden_size) or 1 (see `scale_embeddings`)."""
        scaled = self.scale_embeddings if self.scale_embeddings is not None else self.position_embedding == "sinusoidal"
        return math.sqrt(self.hidden_size) if scaled else 1.0

    @property
    def final_norm(self) -> bool:
        """A norm after the last block: pre-LN models need one; in a post-LN model the last
        sublayer's own norm already ends the stack (the original transformer has none)."""
        return self.norm_position == "pre"

    @property
    def gated_mlp(self) -> bool:
        return self.hidden_act in ("silu", "swish")

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count from the shapes alone (no model needed)."""
        h, d, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        if self.num_local_experts:
            mlp = mlp * self.num_local_experts + h * self.num_local_experts
        norms = 2 * h * (1 if self.uses_rmsnorm else 2)
        total = L * (attn + mlp + norms) + (h if self.final_norm else 0)
        if self.embedding_norm:
            total += 2 * h
        if include_embeddings:
            total += self.vocab_size * h
            if not self.tie_word_embeddings:
                total += self.vocab_size * h
            if self.position_embedding == "learned":
                total += self.max_position_embeddings * h
        return total

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from an HF `config.json` dict (transformers 4.x or 5.x field names)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise EmberError(
                f"config.json has model_type {model_type!r}; Ember supports {', '.join(FAMILIES)}."
            )
        switches = {k: hf[k] for k in EMBER_FIELDS if k in hf}  # Ember's own fields, where written
        try:
            if model_type == "bloom":
                return cls._from_hf_bloom(hf, switches)
            if model_type == "gpt2":
                n_embd = hf.get("n_embd", 768)
                cfg = cls(
                    **switches,
                    model_type="gpt2",
                    vocab_size=hf.get("vocab_size", 50257),
                    hidden_size=n_embd,
                    intermediate_size=hf.get("n_inner") or 4 * n_embd,
                    num_hidden_layers=hf.get("n_layer", 12),
                    num_attention_heads=hf.get("n_head", 12),
                    num_key_value_heads=hf.get("n_head", 12),
                    max_position_embeddings=hf.get("n_positions", 1024),
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    hidden_act=hf.get("activation_function", "gelu_new"),
                    **_biased_tied_fields(hf),
                )
                if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                    raise EmberError("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                                     "reorder_and_upcast_attn are not supported.")
                return cfg
            # llama-like families
            heads = hf["num_attention_heads"]
            rope = hf.get("rope_parameters") or {}  # transformers 5.x
            rope_theta = hf.get("rope_theta", rope.get("rope_theta", _default_theta(model_type)))
            scaling = hf.get("rope_scaling")
            if scaling is None and rope and rope.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if scaling is not None:
                scaling = dict(scaling)
                scaling.setdefault("rope_type", scaling.get("type", "default"))
                if scaling["rope_type"] == "default":
                    scaling = None
                elif scaling["rope_type"] not in ("llama3", "linear"):
                    raise EmberError(
                        f"rope_scaling type {scaling['rope_type']!r} is not supported "
                        "(supported: default, linear, llama3)."
                    )
            qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
            sliding = hf.get("sliding_window")
            if model_type == "qwen2" and not hf.get("use_sliding_window", False):
                sliding = None
            return cls(
                **switches,
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or None,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                hidden_act=hf.get("hidden_act", "silu"),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                attention_bias=qkv_bias,
                o_proj_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                sliding_window=sliding,
                num_local_experts=hf.get("num_local_experts", 0) if model_type == "mixtral" else 0,
                num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
                initializer_range=hf.get("initializer_range", 0.02),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise EmberError(f"config.json for model_type {model_type!r} lacks the field {e}.") from None
        except (TypeError, ValueError) as e:
            raise EmberError(f"config.json has a field of the wrong type: {e}.") from None

    @classmethod
    def _from_hf_bloom(cls, hf: dict[str, Any], switches: dict[str, Any]) -> "ModelConfig":
        """BLOOM: ALiBi, LayerNorm (also on the embeddings), a 4x GELU MLP, biases everywhere, a tied
        head. Its config names no context length (ALiBi has none): `seq_length` where a checkpoint
        records it, else the 2048 tokens BLOOM was trained on."""
        if hf.get("apply_residual_connection_post_layernorm"):
            raise EmberError("BLOOM variants with apply_residual_connection_post_layernorm (the residual taken "
                             "after the norm) are not supported.")
        hidden = hf.get("hidden_size", hf.get("n_embed", 64))
        heads = hf.get("n_head", hf.get("num_attention_heads", 8))
        return cls(
            **switches,
            model_type="bloom",
            vocab_size=hf.get("vocab_size", 250880),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=hf.get("n_layer", hf.get("num_hidden_layers", 2)),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=hf.get("seq_length") or hf.get("max_position_embeddings") or 2048,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            hidden_act="gelu_pytorch_tanh",
            **_biased_tied_fields(hf),
        )

    def ember_fields(self) -> dict[str, Any]:
        """Ember's switches where they differ from what the family's own config implies."""
        out: dict[str, Any] = {}
        if self.position_embedding != family_position_embedding(self.model_type):
            out["position_embedding"] = self.position_embedding
        if self.norm_position != "pre":
            out["norm_position"] = self.norm_position
        if self.dropout:
            out["dropout"] = self.dropout
        if self.scale_embeddings is not None:
            out["scale_embeddings"] = self.scale_embeddings
        return out

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` dict that `transformers` 4.x and 5.x both read (Ember's own switches
        ride along where they differ from the family's: transformers ignores them)."""
        return {**self._to_hf_family(), **self.ember_fields()}

    def _to_hf_family(self) -> dict[str, Any]:
        common = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "torch_dtype": "float32",
        }
        if self.model_type == "gpt2":
            return {
                **common,
                "n_embd": self.hidden_size,
                "n_layer": self.num_hidden_layers,
                "n_head": self.num_attention_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "n_ctx": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.hidden_act,
                "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
                **self.extra,
            }
        if self.model_type == "bloom":
            if self.intermediate_size != 4 * self.hidden_size or self.num_key_value_heads != self.num_attention_heads:
                raise EmberError("A bloom config has intermediate_size 4 x hidden_size and one KV head per query head.")
            if not (self.attention_bias and self.o_proj_bias and self.mlp_bias):
                raise EmberError("A bloom config has a bias on every projection.")
            return {
                **common,
                "hidden_size": self.hidden_size,
                "n_layer": self.num_hidden_layers,
                "n_head": self.num_attention_heads,
                "seq_length": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "apply_residual_connection_post_layernorm": False,
                "hidden_dropout": self.dropout, "attention_dropout": self.dropout,
                "pretraining_tp": 1, "slow_but_exact": False,
                **self.extra,
            }
        out = {
            **common,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": self.hidden_act,
            # Both spellings: 4.x reads rope_theta/rope_scaling, 5.x reads rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"}
            if self.rope_scaling is None
            else {"rope_theta": self.rope_theta, **self.rope_scaling},
            "attention_dropout": 0.0,
        }
        if self.model_type == "llama":
            if self.attention_bias != self.o_proj_bias:
                raise EmberError("A llama config cannot have a bias on q/k/v but not on o_proj.")
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "mixtral"):
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        if self.model_type == "mixtral":
            out["num_local_experts"] = self.num_local_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
            out["router_aux_loss_coef"] = self.router_aux_loss_coef
        out.update(self.extra)
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise EmberError(f"Config file {path} does not exist.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EmberError(f"Config file {path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(data, dict):
            raise EmberError(f"Config file {path} must hold a JSON object.")
        if "model_type" not in data:
            raise EmberError(f"Config file {path} has no model_type (e.g. \"llama\" or \"gpt2\").")
        return cls.from_hf(data)


def family_position_embedding(model_type: str) -> str:
    """How a family's own checkpoints encode positions."""
    return {"gpt2": "learned", "bloom": "alibi"}.get(model_type, "rope")


def _default_theta(model_type: str) -> float:
    return 1e6 if model_type in ("mixtral", "qwen2") else 10000.0


# --- presets ----------------------------------------------------------------------------
# Sizes a user asks for by name. vocab_size is replaced by the tokenizer's at training time.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests: a few thousand parameters, every feature on
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    # the quickstart model: ~6M parameters, trains to readable Python in minutes on 2 CPU cores
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=True),
    # ~3M parameters: fewer FLOPs per token, so more tokens seen in a short CPU budget
    "mini": dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                 tie_word_embeddings=True),
    # a draft-model-sized llama
    "llama-20m": dict(model_type="llama", hidden_size=384, intermediate_size=1024,
                      num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True),
    # the reference shape of the decoding benchmarks (153M with a GPT-2 vocabulary)
    "llama-153m": dict(model_type="llama", hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                       max_position_embeddings=2048, vocab_size=50257),
    # nanoGPT's "baby GPT" and GPT-2 small
    "gpt2-mini": dict(model_type="gpt2", hidden_size=384, intermediate_size=1536,
                      num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                      max_position_embeddings=256, hidden_act="gelu_new", attention_bias=True,
                      o_proj_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 max_position_embeddings=1024, hidden_act="gelu_new", attention_bias=True,
                 o_proj_bias=True, mlp_bias=True, tie_word_embeddings=True, vocab_size=50257),
    # the original transformer's choices on a GPT-2-sized-down decoder: sinusoidal positions,
    # LayerNorm after each residual add, dropout 0.1 (Vaswani et al. 2017)
    "vaswani-mini": dict(model_type="gpt2", hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, hidden_act="relu", attention_bias=True,
                         o_proj_bias=True, mlp_bias=True, tie_word_embeddings=True,
                         position_embedding="sinusoidal", norm_position="post", dropout=0.1),
    # BLOOM's architecture (ALiBi, a norm on the embeddings) at the size of "mini"
    "bloom-mini": dict(model_type="bloom", hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
                       hidden_act="gelu_pytorch_tanh", attention_bias=True, o_proj_bias=True,
                       mlp_bias=True, tie_word_embeddings=True),
    "moe-tiny": dict(model_type="mixtral", hidden_size=128, intermediate_size=256,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                     router_aux_loss_coef=0.01),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise EmberError(f"Unknown preset '{name}'; choose one of: {', '.join(PRESETS)}.")
    return ModelConfig(**{**PRESETS[name], **overrides})
