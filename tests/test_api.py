"""The top-level Python API other issues and users build on."""

import torch

import ember
from ember.generation import generate_ids


def test_api_round_trip(tmp_path):
    from ember.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x * 2\n"] * 40, vocab_size=300)
    torch.manual_seed(0)
    model = ember.CausalLM(ember.preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    ember.save_pretrained(model, tok, tmp_path / "m")
    loaded, tok2 = ember.load_model(tmp_path / "m", device="cpu"), ember.load_tokenizer(tmp_path / "m")
    ids = torch.tensor([tok2.encode("def f(x):")])
    with torch.no_grad():
        logits = loaded(ids)
    assert logits.shape == (1, ids.shape[1], loaded.config.vocab_size)
    text = ember.generate(loaded, tok2, "def f(x):", ember.SamplingParams(max_tokens=12, temperature=0))
    expected = list(generate_ids(loaded, ids[0].tolist(), ember.SamplingParams(max_tokens=12, temperature=0.0),
                                 stop_ids=[tok.eos_id]))
    if expected and expected[-1] == tok.eos_id:
        expected = expected[:-1]
    assert text == tok2.decode(expected)
    out = ember.LLM(tmp_path / "m", num_kv_blocks=32).generate(["def f(x):"], ember.SamplingParams(temperature=0,
                                                                                                   max_tokens=12))
    assert out[0].outputs[0].text == text  # the engine and the simple generator agree
