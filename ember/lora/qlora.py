"""The QLoRA base (Dettmers et al., 2023): the same adapters over a frozen base stored in NF4.

`quantize_base` swaps every frozen weight for its 4-bit form (see `ember.quant.nf4`); LoRA's A and
B and any trainable token rows stay float32. `dequantize_base` undoes it for inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember.lora.layers import is_quantized
from ember.lora.tokens import output_head, set_output_head, set_token_table, token_table
from ember.modules import replace_modules
from ember.quant.nf4 import NF4Linear


class NF4Embedding(nn.Module):
    """An embedding table stored in NF4 (rows are [out=vocab, in=hidden] of an NF4Linear)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        vocab, hidden = embedding.weight.shape
        shell = nn.Linear(hidden, vocab, bias=False, device="meta")
        shell.weight = embedding.weight  # from_linear reads only .weight and the shapes
        self.table = NF4Linear.from_linear(shell)

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.table.dequantize(self.table.compute_dtype))


class TiedNF4Head(nn.Module):
    """The LM head of a tied model: logits against the NF4 embedding table, stored once."""

    def __init__(self, embedding: NF4Embedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list: not a second submodule, so not stored twice

    @property
    def weight(self) -> Tensor:
        return self._embedding[0].weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._embedding[0].table.dequantize(x.dtype))


def quantize_base(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Store every frozen linear weight (and, with `embeddings`, the token table and a tied
    or untied LM head) in NF4 with double-quantized scales; LoRA A and B stay float32."""
    tied = getattr(model.config, "tie_word_embeddings", False)

    def nf4(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, nn.Linear) or ".lora_" in name or module.weight.requires_grad:
            return None
        if name in ("lm_head", "lm_head.base_layer") and (not embeddings or tied):
            return None  # a tied head becomes TiedNF4Head below, reading the NF4 table
        return NF4Linear.from_linear(module)

    replace_modules(model, nf4)
    if embeddings:
        table = NF4Embedding(token_table(model))
        set_token_table(model, table)
        if tied:
            set_output_head(model, TiedNF4Head(table))
    return model


def dequantize_base(model: nn.Module) -> nn.Module:
    """Undo `quantize_base` for inference: each NF4 weight becomes a plain float32 tensor holding
    exactly the values the NF4 forward multiplies by, so outputs stay the same (what QLoRA
    trained) while the weight is decoded once instead of at every forward; the adapters can then
    be merged too. Costs the float weights' memory again."""
    table = token_table(model)
    if isinstance(table, NF4Embedding):
        plain = nn.Embedding.from_pretrained(table.table.dequantize(torch.float32), freeze=True)
        set_token_table(model, plain)
        if isinstance(output_head(model), TiedNF4Head):
            # a shell on the meta device (no weight allocated), then the table itself as its weight
            head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, device="meta")
            head.weight = plain.weight
            set_output_head(model, head)

    def plain_linear(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, NF4Linear):
            return None
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.dequantize(torch.float32), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
        return linear

    replace_modules(model, plain_linear)
    return model


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the frozen base occupies now, bytes it would occupy in bf16)."""
    now = bf16 = 0
    seen: set[int] = set()
    for m in model.modules():
        if is_quantized(m):
            now += m.nbytes()
            bf16 += 2 * m.in_features * m.out_features + (2 * m.bias.numel() if m.bias is not None else 0)
            seen.update(id(t) for t in m.parameters())
    for p in model.parameters():
        if id(p) not in seen and not p.requires_grad:
            seen.add(id(p))
            now += p.numel() * p.element_size()
            bf16 += 2 * p.numel()
    return now, bf16
