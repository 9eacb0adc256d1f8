"""The LoRA settings: rank, scaling, dropout, which layers adapt and which token rows train.
No torch here, so the command line can build its flags from this dataclass cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember.errors import EmberError

ALL_LINEAR = "all-linear"  # every linear layer but the LM head, as PEFT spells it


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "rank of the low-rank update"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: the update is multiplied by alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    # Module names (a module matches when its path ends with ".name"), "all-linear"
    # (every linear layer but the LM head), or a regex matched against the full path.
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "module names (q_proj, v_proj, ...), all-linear, or a regex over the full path"})
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha/sqrt(r) (rank-stabilised LoRA)"})
    # Rows of the token table that train too (PEFT's `trainable_token_indices`), e.g. chat-template
    # tokens the base never saw; with tied embeddings the LM head reads the same rows.
    trainable_token_indices: list[int] | None = field(
        default=None, metadata={"help": "token-table rows that train beside the adapters"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise EmberError(f"LoRA rank r must be at least 1, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise EmberError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise EmberError("Give at least one LoRA target module.")
            self.target_modules = list(self.target_modules)
        if self.trainable_token_indices is not None:
            self.trainable_token_indices = sorted({int(i) for i in self.trainable_token_indices}) or None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
