"""The original transformer's choices as config switches: sinusoidal positions against the paper's
formula, ALiBi against transformers' BLOOM (load, logits, greedy tokens, save back), post-LN against
the paper's equations written out here, dropout in training only, and every decoding path (the
generator, the engine's paged attention, prepared, quantized and compiled steps) agreeing with a
full forward for each position scheme."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ember import gemv
from ember.checkpoint import save_pretrained
from ember.config import ModelConfig, preset
from ember.cpu_inference import prepare_for_inference
from ember.data import prepare_shards, stdlib_files
from ember.engine import LLM, SamplingParams
from ember.errors import EmberError
from ember.generation import generate_ids
from ember.load import load_model
from ember.model import CausalLM, alibi_slopes, sinusoidal_embedding
from ember.quant import quantize_model
from ember.tokenizer import train_tokenizer

from conftest import need_kernel, need_module

VOCAB = 97
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


# --- sinusoidal ---------------------------------------------------------------------------
def test_sinusoidal_table_equals_the_papers_formula():
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), in float64
    with Python's math, for every position and dimension of a 64-wide table of 300 positions."""
    d, n = 64, 300
    expected = torch.tensor([[math.sin(pos / 10000 ** (j / d)) if j % 2 == 0 else math.cos(pos / 10000 ** ((j - 1) / d))
                              for j in range(d)] for pos in range(n)], dtype=torch.float64)
    got = sinusoidal_embedding(torch.arange(n), d).double()
    # float32 angles up to 300 rad carry a rounding of at most 300 x 2^-24 = 1.8e-5 rad, which moves
    # sin or cos by as much; 3e-5 leaves room for the float32 sin/cos themselves.
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=0)


def test_a_sinusoidal_model_adds_the_table_to_the_embeddings_and_learns_no_positions():
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=VOCAB, position_embedding="sinusoidal")).eval()
    assert not any("position" in name for name, _ in model.named_parameters())
    seen = {}
    model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    ids = torch.randint(0, VOCAB, (2, 20))
    model(ids)
    table = sinusoidal_embedding(torch.arange(20), model.config.hidden_size)
    # the token embeddings scaled by sqrt(d_model) first, as the paper pairs them (section 3.4)
    scale = math.sqrt(model.config.hidden_size)
    torch.testing.assert_close(seen["x"], model.model.embed_tokens(ids) * scale + table, atol=0, rtol=0)
    unscaled = CausalLM(model.config.replace(scale_embeddings=False)).eval()
    unscaled.load_state_dict(model.state_dict())
    unscaled.model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    unscaled(ids)
    torch.testing.assert_close(seen["x"], model.model.embed_tokens(ids) + table, atol=0, rtol=0)


# --- ALiBi --------------------------------------------------------------------------------
def test_alibi_slopes_follow_the_paper_and_bloom():
    # Eight heads: 2^-1 ... 2^-8 (the paper's example). Six: the four of n=4 (2^-2, 2^-4, 2^-6, 2^-8),
    # then the first two of every other slope of n=8 (2^-1, 2^-3).
    assert alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    bloom = need_module("transformers.models.bloom.modeling_bloom", "BLOOM's ALiBi, the peer")
    for n in range(1, 33):
        expected = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]  # slope x position 1
        # BLOOM raises a float32-rounded base to powers k up to 31, which multiplies the base's rounding
        # (2^-24 relative) by k; Ember rounds each exact slope once: 32 x 2^-24 < 2e-6 relative.
        torch.testing.assert_close(alibi_slopes(n), expected, atol=0, rtol=2e-6)


@pytest.fixture(scope="module")
def bloom_pair(tmp_path_factory):
    """A random BLOOM (6 heads: the non-power-of-two slope rule) saved by transformers, with every
    weight, bias and norm drawn at random so that a wrong head layout or bias cannot pass."""
    transformers = need_module("transformers", "the BLOOM peer")
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, bos_token_id=1,
                                      eos_token_id=2)
    hf = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "layernorm.weight" in name or "ln_f.weight" in name else 0.0))
    path = tmp_path_factory.mktemp("bloom") / "hf"
    hf.save_pretrained(path)
    return hf, load_model(path, device="cpu"), path


def test_bloom_loads_with_logits_equal_to_transformers(bloom_pair):
    hf, model, _ = bloom_pair
    assert model.config.model_type == "bloom" and model.config.position_embedding == "alibi"
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    # fp32 both: the same sums in another order (SDPA's fused kernel against baddbmm + softmax, q, k, v
    # as three products against one), each rounding at 2^-24 relative; over two layers on logits of
    # magnitude ~10 that is ~1e-5, and 1e-4 is a bound with room. A wrong slope, head layout or
    # position would move logits by more than 0.1.
    assert expected.abs().max() > 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_bloom_greedy_tokens_equal_transformers_through_the_generator_and_the_engine(bloom_pair):
    hf, model, _ = bloom_pair
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 19, 33)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
            # No near-ties: every greedy choice leads the runner-up by far more than the logit tolerance
            # (1e-4), so equal tokens test the model rather than rounding.
            top2 = hf(out).logits[0, len(p) - 1:-1].topk(2).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-2
    assert [list(generate_ids(model, p, GREEDY)) for p in prompts] == expected
    llm = LLM(model, block_size=8, num_kv_blocks=64, max_num_batched_tokens=24)  # chunked prefill
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected


def test_bloom_saves_back_to_a_checkpoint_transformers_reloads(bloom_pair, tmp_path):
    transformers = need_module("transformers", "the BLOOM peer")
    hf, model, path = bloom_pair
    save_pretrained(model, None, tmp_path / "back")
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["architectures"] == ["BloomForCausalLM"] and "position_embedding" not in written
    reloaded = transformers.BloomForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)  # the same weights, the same code
    original = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in original.items())


def test_bloom_variants_ember_cannot_express_are_refused():
    with pytest.raises(EmberError, match="apply_residual_connection_post_layernorm"):
        ModelConfig.from_hf({"model_type": "bloom", "apply_residual_connection_post_layernorm": True})


# --- post-LN, from the paper's equations ------------------------------------------------------
def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return weight * (x - mean) / torch.sqrt(var + eps) + bias


def post_ln_reference(model, ids):
    """Vaswani et al.: x = E[ids] sqrt(d_model) + PE; each layer x = LayerNorm(x + MultiHead(x)), then
    x = LayerNorm(x + FFN(x)) with FFN(x) = max(0, x W1 + b1) W2 + b2; logits = x E^T (tied), no final norm."""
    cfg = model.config
    H, d = cfg.num_attention_heads, cfg.head_dim
    T = ids.shape[1]
    x = model.model.embed_tokens.weight[ids] * math.sqrt(cfg.hidden_size) + sinusoidal_embedding(torch.arange(T), cfg.hidden_size)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for layer in model.model.layers:
        a = layer.self_attn
        heads = []
        for h in range(H):
            rows = slice(h * d, (h + 1) * d)
            q = x @ a.q_proj.weight[rows].T + a.q_proj.bias[rows]
            k = x @ a.k_proj.weight[rows].T + a.k_proj.bias[rows]
            v = x @ a.v_proj.weight[rows].T + a.v_proj.bias[rows]
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v)
        attended = torch.cat(heads, dim=-1) @ a.o_proj.weight.T + a.o_proj.bias
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        x = layer_norm(x + attended, n1.weight, n1.bias, n1.eps)
        m = layer.mlp
        ffn = torch.clamp(x @ m.up_proj.weight.T + m.up_proj.bias, min=0) @ m.down_proj.weight.T + m.down_proj.bias
        x = layer_norm(x + ffn, n2.weight, n2.bias, n2.eps)
    return x @ model.model.embed_tokens.weight.T


def test_post_ln_matches_the_papers_equations():
    torch.manual_seed(0)
    cfg = preset("vaswani-mini", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, initializer_range=0.3)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    assert isinstance(model.model.norm, torch.nn.Identity)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        # fp32, the same products in another order (per head against all heads at once, SDPA's fused
        # softmax): rounding of ~1e-6 relative on logits of magnitude ~10; 1e-4 bounds it with room.
        torch.testing.assert_close(model(ids), post_ln_reference(model, ids), atol=1e-4, rtol=0)
        # and pre-LN is a different function of the same weights
        pre = CausalLM(cfg.replace(norm_position="pre", dropout=0.0)).eval()
        pre.load_state_dict(model.state_dict(), strict=False)
        assert (pre(ids) - model(ids)).abs().max() > 0.1


# --- dropout ------------------------------------------------------------------------------
def test_dropout_acts_in_training_at_every_site_and_never_in_eval(monkeypatch):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=VOCAB, dropout=0.2)
    model = CausalLM(cfg)
    plain = CausalLM(cfg.replace(dropout=0.0))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 16))
    sites, attention_p = [], []
    real_dropout, real_sdpa = F.dropout, F.scaled_dot_product_attention
    monkeypatch.setattr(F, "dropout", lambda x, p, training=True, inplace=False: (
        sites.append(p if training else 0.0), real_dropout(x, p, training, inplace))[1])
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, dropout_p=0.0, **k: (
        attention_p.append(dropout_p), real_sdpa(*a, dropout_p=dropout_p, **k))[1])
    model.train()
    a, b = model(ids), model(ids)
    # in each of the two forwards: the embeddings once, each layer's two residual branches, each
    # layer's attention weights
    assert sites == [0.2] * 2 * (1 + 2 * cfg.num_hidden_layers)
    assert attention_p == [0.2] * 2 * cfg.num_hidden_layers
    assert not torch.equal(a, b)
    sites.clear(), attention_p.clear()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain.eval()(ids), atol=0, rtol=0)
    assert not any(sites) and not any(attention_p)


def test_bad_switches_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(EmberError, match="position_embedding must be one of"):
        preset("tiny", position_embedding="absolute")
    with pytest.raises(EmberError, match="norm_position must be one of"):
        preset("tiny", norm_position="sandwich")
    with pytest.raises(EmberError, match=r"dropout is a probability in \[0, 1\)"):
        preset("tiny", dropout=1.0)
    with pytest.raises(EmberError, match="scale_embeddings is true, false or null"):
        preset("tiny", scale_embeddings="yes")


def test_switches_round_trip_through_config_json_and_family_configs_stay_as_they_were():
    for cfg in (preset("vaswani-mini"), preset("tiny", position_embedding="alibi", norm_position="post", dropout=0.1),
                preset("tiny", position_embedding="sinusoidal", scale_embeddings=False),
                preset("gpt2-mini", position_embedding="rope"), preset("bloom-mini")):
        assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg
    for name in ("tiny", "gpt2-mini", "moe-tiny"):  # nothing new written for a family's own choices
        assert not {"position_embedding", "norm_position", "dropout"} & preset(name).to_hf().keys()
    assert preset("gpt2-mini").position_embedding == "learned" and preset("tiny").position_embedding == "rope"


# --- every decoding path, each position scheme ---------------------------------------------
VARIANTS = {
    "alibi": dict(position_embedding="alibi"),
    "sinusoidal-post": dict(position_embedding="sinusoidal", norm_position="post"),
    "learned": dict(position_embedding="learned"),
    "bloom": dict(model_type="bloom", hidden_size=48, intermediate_size=192, num_attention_heads=6,
                  num_key_value_heads=6, hidden_act="gelu_pytorch_tanh", attention_bias=True, o_proj_bias=True,
                  mlp_bias=True, tie_word_embeddings=True),
}


def variant(name):
    """A random model whose greedy choices are far from ties (a wide init spreads the logits)."""
    torch.manual_seed(0)
    base = dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48, intermediate_size=96)
    return CausalLM(preset("tiny", **{**base, "vocab_size": VOCAB, "initializer_range": 0.2,
                                      **VARIANTS[name]})).eval()


def full_forward_greedy(model, prompt, n):
    """Greedy decoding by a whole forward over the sequence at every step: no cache at all."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def prompts(seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 21, 40)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generator_and_paged_engine_decode_like_a_full_forward(name):
    model = variant(name)
    ps = prompts()
    ps.append(ps[2][:24] + [5, 6])  # a shared prefix: the engine's prefix cache serves it
    expected = [full_forward_greedy(model, p, GREEDY.max_tokens) for p in ps]
    assert [list(generate_ids(model, p, GREEDY)) for p in ps] == expected
    llm = LLM(model, block_size=8, num_kv_blocks=64, max_num_batched_tokens=16, enable_prefix_caching=True)
    assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == expected


@pytest.mark.parametrize("name", ["alibi", "sinusoidal-post", "bloom"])
def test_prepared_and_int8_models_decode_alike_in_the_generator_and_the_engine(name):
    """Prepared for inference (fused projections, kernel layers) and int8-quantized: the generator and
    the engine agree, the prepared float model with its unprepared self."""
    model = variant(name)
    ps = prompts(seed=5)
    expected = [list(generate_ids(model, p, GREEDY)) for p in ps]
    prepared = prepare_for_inference(variant(name))
    assert [list(generate_ids(prepared, p, GREEDY)) for p in ps] == expected
    int8 = prepare_for_inference(quantize_model(variant(name), "int8"))
    short = SamplingParams(temperature=0.0, max_tokens=6)
    ps = prompts(seed=9)
    by_generator = [list(generate_ids(int8, p, short)) for p in ps]
    # Ember's int8 kernel rounds a few rows' activations to int16, where a many-row step takes the float
    # GEMM: the two paths' logits differ by up to ~1e-2, so every greedy choice compared here must lead
    # its runner-up by more than 0.03 for equal tokens to be the test.
    for p, tokens in zip(ps, by_generator):
        with torch.no_grad():
            top2 = int8(torch.tensor([p + tokens]))[0, len(p) - 1:-1].topk(2).values
        assert (top2[:, 0] - top2[:, 1]).min() > 0.03
    llm = LLM(int8, block_size=8, num_kv_blocks=64)
    assert [o.outputs[0].token_ids for o in llm.generate(ps, short)] == by_generator


def test_alibi_decoding_never_reaches_the_bias_free_decode_kernels(monkeypatch):
    """Ember's C++ decode attention adds no ALiBi bias: ALiBi models must not reach it, prepared or not
    (and the same setup does reach it for a rotary model, so the check bites)."""
    need_kernel()
    calls = []
    for fn in ("decode_attention", "paged_decode_attention"):
        real = getattr(gemv, fn)
        monkeypatch.setattr(gemv, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))
    p = prompts()[1]
    for name in ("alibi", "learned"):
        calls.clear()
        model = prepare_for_inference(variant(name))
        list(generate_ids(model, p, GREEDY))
        LLM(model, block_size=8, num_kv_blocks=64).generate([p], GREEDY)
        assert (calls == []) == (name == "alibi"), (name, calls)


@pytest.mark.slow  # torch.compile of two tiny models
@pytest.mark.parametrize("name", ["alibi", "sinusoidal-post"])
def test_compiled_decode_step_decodes_like_eager(name):
    model = prepare_for_inference(variant(name))
    p = prompts()[1]
    assert list(generate_ids(model, p, GREEDY, compile=True)) == list(generate_ids(model, p, GREEDY))


# --- training: the one loop, from the command line ------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    files = stdlib_files(max_bytes=60_000)
    tok = train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size=300)
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_shards([str(f) for f in files], tok, out, val_fraction=0.1, progress=False)
    return out


def test_pretrain_from_a_config_with_switch_flags_trains_a_model_whose_loss_falls(data_dir, tmp_path):
    """`--config` brings sinusoidal positions and post-LN; the flags then switch positions to ALiBi and
    add dropout: one run through the CLI, the one training loop and the saved checkpoint."""
    config = preset("tiny", position_embedding="sinusoidal", norm_position="post").to_hf()
    (tmp_path / "config.json").write_text(json.dumps(config))
    model_args = ["--config", tmp_path / "config.json", "--position-embedding", "alibi", "--dropout", "0.1"]
    expected = {"position_embedding": "alibi", "norm_position": "post", "dropout": 0.1}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ember.cli", "pretrain", *map(str, model_args), "--data", str(data_dir),
                        "--out", str(out), "--max-steps", "16", "--batch-size", "4", "--block-size", "32",
                        "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0", "--save-every", "0",
                        "--log-every", "1", "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5  # from ~ln(vocab) towards the data's entropy
    saved = json.loads((out / "model" / "config.json").read_text())
    assert expected.items() <= saved.items()
    model = load_model(out / "model", device="cpu")
    assert all(getattr(model.config, k) == v for k, v in expected.items())
    assert list(generate_ids(model, [1, 2, 3], GREEDY)) == full_forward_greedy(model, [1, 2, 3], GREEDY.max_tokens)


def test_pretrain_refuses_a_bad_switch_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ember.cli", "pretrain", "--preset", "tiny", "--dropout", "1.5",
                        "--data", str(tmp_path), "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "dropout is a probability" in lines[0], r.stderr
