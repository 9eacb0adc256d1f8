"""The KV pool's size: the rule in `ember.engine.pool_size`, the tensors the engine really
allocates, and what happens to a request that cannot fit."""

from __future__ import annotations


import pytest
import torch

from conftest import smollm2_gguf
from ember.config import preset
from ember.engine import LLM, SamplingParams
from ember.engine.pool_size import DEFAULT_CPU_KV_CACHE_MEMORY, MIN_FITTED_CONTEXT, default_max_model_len
from ember.errors import EmberError
from ember.model import CausalLM

MiB = 1 << 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalLM(preset("tiny", vocab_size=101, max_position_embeddings=512)).eval()


def token_bytes(model, dtype=torch.float32) -> int:
    """The formula, from the config: keys and values x layers x KV heads x head size x dtype size."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.finfo(dtype).bits // 8


def pool_bytes(llm) -> int:
    """What the engine actually allocated for keys and values."""
    return sum(t.numel() * t.element_size() for t in llm.pool.kv)


def test_default_pool_holds_max_num_seqs_full_length_sequences(model):
    llm = LLM(model, max_num_seqs=3, max_model_len=64, block_size=8)
    assert pool_bytes(llm) == 3 * 64 * token_bytes(model) == llm.pool_size.bytes
    assert llm.pool_size.describe().startswith(f"KV pool: {3 * 64 * token_bytes(model) / MiB:.0f} MiB = 3 sequences "
                                               "of 64 tokens")
    # A length that is not a multiple of the block size rounds each sequence up to whole blocks.
    odd = LLM(model, max_num_seqs=2, max_model_len=60, block_size=8)
    assert pool_bytes(odd) == 2 * 64 * token_bytes(model)


def test_default_max_model_len_is_the_model_context(model):
    llm = LLM(model, max_num_seqs=2, block_size=16)
    assert llm.max_model_len == 512  # a tiny model's context fits any machine's memory
    assert pool_bytes(llm) == 2 * 512 * token_bytes(model)


def test_budget_caps_the_pool_in_whole_blocks(model):
    per_block = 8 * token_bytes(model)
    budget = 20 * per_block + per_block // 2  # twenty blocks and a half: the half is not allocated
    llm = LLM(model, max_num_seqs=64, max_model_len=64, block_size=8, kv_cache_memory=budget)
    assert llm.pool.num_blocks == 20 and pool_bytes(llm) == 20 * per_block
    assert "capped by kv_cache_memory" in llm.pool_size.describe()
    text = LLM(model, max_num_seqs=64, max_model_len=64, block_size=8, kv_cache_memory=f"{budget / MiB}MB")
    assert text.pool.num_blocks == 20  # '…MB' is read as MiB, the same bytes


def test_pool_is_never_under_one_full_length_sequence(model):
    llm = LLM(model, max_num_seqs=8, max_model_len=256, block_size=16, kv_cache_memory=1000)
    assert pool_bytes(llm) == 256 * token_bytes(model)
    assert "one full-length sequence" in llm.pool_size.describe()
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=250, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 250  # the longest request it accepts runs to the end


def test_cpu_default_budget_caps_a_model_with_a_long_context():
    # Wide enough a token that 64 sequences of the whole context would need gigabytes.
    big = CausalLM(preset("tiny", vocab_size=101, max_position_embeddings=8192, num_hidden_layers=16)).eval()
    llm = LLM(big, block_size=16)
    per_token = token_bytes(big)
    assert 64 * 8192 * per_token > 4 * DEFAULT_CPU_KV_CACHE_MEMORY  # the case the cap exists for
    assert pool_bytes(llm) == max(DEFAULT_CPU_KV_CACHE_MEMORY // (16 * per_token) * 16, 8192) * per_token
    assert llm.max_model_len == 8192


def test_default_context_is_fitted_to_available_memory_but_not_below_the_minimum():
    per_token = 128 << 10  # a Llama-3-8B-sized token in bf16
    assert default_max_model_len(131072, per_token, 64 << 30) == 131072  # 16 GiB of 32 usable: as the file says
    assert default_max_model_len(131072, per_token, 4 << 30) == 16384  # half of 4 GiB
    assert default_max_model_len(131072, per_token, 100 * MiB) == MIN_FITTED_CONTEXT
    assert default_max_model_len(2048, per_token, 100 * MiB) == 2048  # never above the model's own


def test_requests_that_cannot_fit_are_refused_and_the_engine_keeps_serving(model):
    llm = LLM(model, num_kv_blocks=4, block_size=8, max_model_len=128)  # 32 token slots
    with pytest.raises(EmberError, match=r"needs 5 KV blocks .* holds 4 blocks of 8"):
        llm.add_request(list(range(20)), SamplingParams(max_tokens=20))
    with pytest.raises(EmberError, match="128"):  # longer than the context
        llm.add_request(list(range(1, 100)) * 2, SamplingParams(max_tokens=1))
    assert not llm.has_unfinished()
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 20
    llm.block_manager.check()


@pytest.mark.parametrize("value", ["lots", "2XB", "-"])
def test_unreadable_budget_is_one_sentence(model, value):
    with pytest.raises(EmberError, match="as a size"):
        LLM(model, kv_cache_memory=value)


def test_smollm2_gguf_default_pool_is_sized_from_its_context():
    from ember.engine.pool_size import bytes_per_token, size_pool
    from ember.gguf.model import gguf_config
    from ember.gguf.reader import open_gguf

    path = smollm2_gguf()
    cfg = gguf_config(open_gguf(path))
    per_token = bytes_per_token(cfg, torch.float32)
    assert per_token == 2 * 30 * 3 * 64 * 4  # the published shape: 30 layers, 3 KV heads of 64
    length = default_max_model_len(cfg.max_position_embeddings, per_token, 16 << 30)
    assert length == cfg.max_position_embeddings == 8192  # the file's context_length
    size = size_pool(per_token, 16, length, 64, None, None, torch.device("cpu"))
    # 64 sequences of 8192 would be 22.5 GiB; the pool is one full-length sequence instead.
    assert size.bytes == 8192 * per_token and size.bytes < 400 * MiB
