"""The transformer against `transformers`, family by family: same weights, same logits,
same greedy tokens, in both directions (HF checkpoint -> Ember, Ember checkpoint -> HF)."""

import pytest
import torch

from ember.checkpoint import save_pretrained
from ember.config import ModelConfig, preset
from ember.generation import generate_ids
from ember.load import load_model
from ember.model import CausalLM
from ember.sampling import SamplingParams

from conftest import need_module

transformers = need_module("transformers", "the parity peer")

VOCAB = 97

HF_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "gpt2-untied": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                        n_positions=128, tie_word_embeddings=False),
    "llama-gqa-untied": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False),
    "llama-tied-bias": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama3-rope-scaling": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                rope_theta=500000.0, max_position_embeddings=512,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16}),
    "mistral": dict(model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "qwen2-qkv-bias": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True),
    "mixtral-moe": dict(model_type="mixtral", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2),
}


# Logit tolerance for two float32 implementations of the same network. Each logit is a chain of
# dot products of ≤ 96 terms through 2 layers; Ember and transformers sum them in different orders
# (fused q/k/v, SDPA against eager attention, their own RMSNorm), so each differs from the exact
# value by a few hundred units of 2^-24 relative to logits of size ~1-10: ~1e-5 at most. A weight
# mapped to the wrong name, a norm weight or bias left out, or a transposed matrix moves logits by
# ~1e-2 and more (the norms and biases are perturbed by 0.1 for that reason).
LOGIT_ATOL = 1e-4


def hf_model(spec: dict) -> "transformers.PreTrainedModel":
    spec = dict(spec)
    cfg = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    # Random ids must never stop HF's generation early: no EOS, and no special ids to pad.
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = None
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    # Non-zero biases and norms, so a mapping error in any of them shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_and_ember(request, tmp_path_factory):
    hf = hf_model(HF_CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, load_model(path, device="cpu", dtype=torch.float32)


def test_hf_checkpoint_gives_same_logits(hf_and_ember):
    hf, ember_model = hf_and_ember
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ember_model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LOGIT_ATOL


def test_greedy_generation_token_identical_to_transformers(hf_and_ember):
    hf, ember_model = hf_and_ember
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, 7:]
    got = list(generate_ids(ember_model, prompt[0].tolist(), SamplingParams(max_tokens=64, temperature=0.0)))
    assert got == expected.tolist()


@pytest.mark.slow  # torch.compile takes ~15 s a model on 2 cores
@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2", "mixtral-moe"])
def test_compiled_decode_token_identical_to_transformers(name, tmp_path):
    hf = hf_model(HF_CONFIGS[name])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ember_model = load_model(tmp_path, device="cpu", dtype=torch.float32)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, 7:]
    got = list(generate_ids(ember_model, prompt[0].tolist(), SamplingParams(max_tokens=40, temperature=0.0), compile=True))
    assert got == expected.tolist()


@pytest.mark.parametrize("name,overrides", [
    ("tiny", {}),
    ("tiny", dict(attention_bias=True, o_proj_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    ("tiny", dict(model_type="qwen2", attention_bias=True)),
    ("gpt2-mini", {}),
    ("moe-tiny", {}),
], ids=["llama", "llama-biases-untied", "qwen2-qkv-bias", "gpt2", "mixtral"])
def test_ember_checkpoint_opens_in_transformers_with_same_logits(name, overrides, tmp_path):
    torch.manual_seed(0)
    cfg = preset(name, **{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2 if name != "gpt2-mini" else 4),
                          **overrides})
    model = CausalLM(cfg).eval()
    # Every norm weight and bias starts at 1 or 0, where a name mistake on save would go unseen
    # (transformers initialises a missing norm to 1 and a missing bias to 0): make each one differ.
    vectors = [n for n, p in model.named_parameters() if p.dim() == 1]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    assert any("norm" in n for n in vectors) and (any("bias" in n for n in vectors) or not overrides)
    save_pretrained(model, None, tmp_path / "ckpt")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing initialised afresh
    ids = torch.randint(0, VOCAB, (2, 33))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= LOGIT_ATOL


def test_sliding_window_matches_transformers(tmp_path):
    spec = dict(HF_CONFIGS["mistral"], sliding_window=8)
    hf = hf_model(spec)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, device="cpu")
    assert model.config.sliding_window == 8
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= LOGIT_ATOL


def test_transformers_5_rope_parameters_config_loads():
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                    "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
