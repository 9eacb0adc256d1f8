"""Give a model the activation outliers of large LLMs, without changing its function.

Past a few billion parameters, LLMs grow a handful of hidden channels whose activations
are ~100x the rest (Dettmers et al. 2022, "LLM.int8()"; Xiao et al. 2023, SmoothQuant),
visible right after the norms because those channels' norm weights are large. Small
models do not have them, so to show what they do to per-token int8 (and what SmoothQuant
does about it) we plant them: scale a few channels of every RMSNorm/LayerNorm weight by
`factor` and divide the same input columns of the linears that read the norm by it. In
exact arithmetic the network computes the same function; only its activations change.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def inject_outliers(model: nn.Module, channels: int = 4, factor: float = 50.0, seed: int = 0) -> list[int]:
    """Plant `channels` outlier channels (the same ones in every block); returns their indices."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    chosen = torch.randperm(hidden, generator=g)[:channels].tolist()
    for block in model.model.layers:
        attn = block.self_attn
        pairs = [(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])]
        if hasattr(block, "mlp"):
            mlp = block.mlp
            pairs.append((block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj] if mlp.gated else [mlp.up_proj]))
        else:
            moe = block.block_sparse_moe
            pairs.append((block.post_attention_layernorm,
                          [moe.gate] + [m for ex in moe.experts for m in (ex.w1, ex.w3)]))
        for norm, readers in pairs:
            norm.weight[chosen] *= factor
            if getattr(norm, "bias", None) is not None:
                norm.bias[chosen] *= factor
            for lin in readers:
                lin.weight[:, chosen] /= factor
    return chosen
