"""Trainable token rows (PEFT's TrainableTokens, which LoRA's `trainable_token_indices` uses).

Adapters on the linear layers cannot move a token's embedding, and chat-template tokens such as
`<|im_end|>` never occur in pretraining text: the base leaves them untrained and, with a tied head,
pushed below every other logit, so a LoRA model learns to answer but not to end its turn. A few rows
of the token table therefore train beside the adapters; with tied embeddings the LM head reads the
same new rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.errors import EmberError


class TrainableTokens(nn.Module):
    """A few rows of the frozen token table that train. `trainable_tokens_delta` [n, hidden] starts
    as a copy of those rows and replaces them (PEFT's name: the new values, not a difference)."""

    def __init__(self, base_layer: nn.Embedding, indices: list[int]) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise EmberError("Trainable token rows wrap a plain embedding table; add them before quantizing the base.")
        vocab = base_layer.weight.shape[0]
        bad = [i for i in indices if not 0 <= i < vocab]
        if bad:
            raise EmberError(f"Trainable token index {bad[0]} is outside the vocabulary (0..{vocab - 1}).")
        self.base_layer = base_layer
        rows = base_layer.weight.detach()[indices]
        self.register_buffer("token_indices", torch.tensor(indices, device=rows.device), persistent=False)
        # What unmerging puts back, in the table's own dtype so that it is put back exactly.
        self.register_buffer("original", rows.clone(), persistent=False)
        self.trainable_tokens_delta = nn.Parameter(rows.to(torch.float32, copy=True))  # float32, like LoRA's A and B
        self.merged = False
        self.disabled = False

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base_layer(ids)
        if self.merged or self.disabled:
            return out
        hit = ids.unsqueeze(-1) == self.token_indices  # [..., n]: which listed token each id is
        new = hit.to(self.trainable_tokens_delta.dtype) @ self.trainable_tokens_delta
        return torch.where(hit.any(-1, keepdim=True), new.to(out.dtype), out)

    def write_rows(self, rows: Tensor) -> None:
        """Put `rows` [n, hidden] into the table at the trainable indices."""
        if not isinstance(self.base_layer, nn.Embedding):
            raise EmberError("Cannot merge trainable token rows into a quantized (e.g. NF4) table; dequantize it first.")
        w = self.base_layer.weight
        w.data.index_copy_(0, self.token_indices, rows.to(w.dtype))


class TiedTokensHead(nn.Module):
    """The LM head of a tied model with trainable token rows: those tokens' logits come from the
    new rows, as the embedding's inputs do."""

    def __init__(self, base_layer: nn.Module, tokens: TrainableTokens) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tokens = [tokens]  # a list: not a second submodule, so the rows are stored once

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        t = self._tokens[0]
        if t.merged or t.disabled:
            return out
        new = F.linear(x.to(t.trainable_tokens_delta.dtype), t.trainable_tokens_delta)
        return out.index_copy(-1, t.token_indices, new.to(out.dtype))


def add_trainable_tokens(model: nn.Module, indices: list[int]) -> TrainableTokens:
    """Wrap the model's token table (and a tied LM head) so that the rows `indices` train."""
    tokens = TrainableTokens(model.model.embed_tokens, indices)
    model.model.embed_tokens = tokens
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head = TiedTokensHead(model.lm_head, tokens)
    return tokens


def token_layers(model: nn.Module) -> list[TrainableTokens]:
    return [m for m in model.modules() if isinstance(m, TrainableTokens)]


def token_table(model: nn.Module) -> nn.Module:
    """The token table, under trainable token rows if the model has them."""
    e = model.model.embed_tokens
    return e.base_layer if isinstance(e, TrainableTokens) else e


def set_token_table(model: nn.Module, table: nn.Module) -> None:
    if isinstance(model.model.embed_tokens, TrainableTokens):
        model.model.embed_tokens.base_layer = table
    else:
        model.model.embed_tokens = table


def output_head(model: nn.Module) -> nn.Module:
    """The LM head, under a tied head's trainable token rows if the model has them."""
    return model.lm_head.base_layer if isinstance(model.lm_head, TiedTokensHead) else model.lm_head


def set_output_head(model: nn.Module, head: nn.Module) -> None:
    if isinstance(model.lm_head, TiedTokensHead):
        model.lm_head.base_layer = head
    else:
        model.lm_head = head
