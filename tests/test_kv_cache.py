"""The contiguous KV caches (ember/kv_cache.py)."""

import pytest
import torch

from ember.config import ModelConfig
from ember.model import CausalLM


@pytest.mark.parametrize("window", [None, 6])
def test_static_cache_steps_give_the_contiguous_cache_logits(window):
    """The compiled decode step's cache (static shapes, masked) against the plain one, eagerly."""
    from ember.generation import decode_step
    from ember.kv_cache import KVCache, StaticKVCache

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, sliding_window=window)
    model = CausalLM(cfg).eval()
    prompt = torch.randint(0, 96, (1, 5))
    plain, static = KVCache(cfg, 1, 64), StaticKVCache(cfg, 64)
    with torch.inference_mode():
        model(prompt, cache=plain)
        model(prompt, cache=static)
        for step in range(12):  # past the window: old keys must drop out in both
            token = torch.tensor([[step + 7]])
            expected = model(token, cache=plain, last_only=True)[:, -1]
            got = decode_step(model, static, token, static.next_position())
            assert torch.allclose(got, expected, atol=1e-5), step
