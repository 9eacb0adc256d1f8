"""SFT data, chat rendering with loss masks, packing, synthetic tasks and the SFT recipe."""

import json
import math

import pytest
import torch

from ember.checkpoint import read_state_dict, save_pretrained
from ember.config import preset
from ember.errors import EmberError
from ember.model import CausalLM
from ember.synth import exact_match, synth_rows, task_pairs, write_synth
from ember.tokenizer import train_tokenizer
from ember.train.examples import (block_diagonal_mask, collate, end_of_turn_id, load_sft_examples,
                                  pack_examples, render_messages)
from ember.train.loop import TrainConfig
from ember.train.sft import sft


@pytest.fixture(scope="module")
def tok():
    text = [json.dumps(r) for t in ("arithmetic", "sort", "format", "reverse") for r in synth_rows(t, 200, seed=9)]
    return train_tokenizer(text * 3, vocab_size=400)


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    torch.manual_seed(0)
    # A wide init gives the frozen head logits of useful scale, as a trained base has.
    model = CausalLM(preset("tiny", vocab_size=448, hidden_size=32, intermediate_size=64, initializer_range=0.3))
    path = tmp_path_factory.mktemp("sft") / "base"
    save_pretrained(model, tok, path)
    return path


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"}]


# --- data ---------------------------------------------------------------------------------
def test_three_row_shapes_load_as_the_same_chat(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            {"prompt": "Hi", "completion": "Yo"}, {"instruction": "Hi", "input": "", "output": "Yo"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    chats = load_sft_examples(f)
    assert chats[0] == chats[1] == chats[2] == rows[0]["messages"]
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Sum", "input": "1 2", "output": "3"}) + "\n")
    assert load_sft_examples(alpaca)[0][0]["content"] == "Sum\n\n1 2"


@pytest.mark.parametrize("row, field", [({"prompt": "x"}, "completion"), ({"instruction": "x"}, "output"),
                                        ({"messages": [{"role": "user"}]}, "content"), ({"text": "x"}, "messages")])
def test_row_missing_a_field_names_file_line_and_field(tmp_path, row, field):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "completion": "ok"}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(EmberError) as e:
        load_sft_examples(f)
    assert str(f) in str(e.value) and "line 3" in str(e.value) and f"'{field}'" in str(e.value)


# --- rendering ----------------------------------------------------------------------------
def test_only_assistant_replies_and_their_end_of_turn_are_trained(tok):
    ids, mask = render_messages(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    eot = end_of_turn_id(tok)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "4<|im_end|>6<|im_end|>"
    assert trained.count(eot) == 2
    # The prompt the model is served is exactly the untrained prefix before the first reply.
    first = mask.index(True)
    assert ids[:first] == tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True)
    assert all(render_messages(tok, CHAT, train_on_prompt=True)[1])


def test_no_double_bos_when_template_writes_it_and_tokenizer_adds_it(tok):
    import copy
    t = copy.copy(tok)
    t.chat_template = "{{ bos_token }}" + tok.chat_template
    t.add_bos_token = True
    ids, _ = render_messages(t, CHAT)
    assert ids[0] == t.bos_id and ids[1] != t.bos_id
    t.chat_template = "{{ bos_token }}" + t.chat_template  # now the template itself doubles it
    with pytest.raises(EmberError, match="double BOS"):
        render_messages(t, CHAT)


def test_template_without_end_of_turn_is_refused(tok):
    import copy
    t = copy.copy(tok)
    t.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    t.eos_token = None
    with pytest.raises(EmberError):
        render_messages(t, CHAT)


# --- packing ------------------------------------------------------------------------------
def test_packed_batch_gives_each_example_its_logits_alone(tok):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=448)).eval()
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
             for p, a in task_pairs("arithmetic", 5, seed=1)]
    rendered = [render_messages(tok, c) for c in chats]
    rows = pack_examples(rendered, block_size=64)
    assert len(rows) < len(rendered)  # several examples share a row
    batch = collate(rows, pad_id=0, length=64)
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"],
                       attn_mask=block_diagonal_mask(batch["doc_ids"]))
        seen = 0
        for r, row in enumerate(rows):
            start = 0
            for doc in sorted(set(row.doc_ids)):
                n = row.doc_ids.count(doc)
                alone = model(torch.tensor([row.input_ids[start:start + n]]))[0]
                # fp32 logits of a tiny model (|logit| < 1) from differently shaped matmuls and masked
                # softmaxes: ~1e-7 apart; one token leaking across documents moves them by ~1e-2.
                torch.testing.assert_close(packed[r, start:start + n], alone, atol=1e-5, rtol=1e-5)
                assert row.positions[start] == 0
                start, seen = start + n, seen + 1
    assert seen == len(rendered)
    # Labels never cross a document boundary: the last token of each document is untrained.
    row = rows[0]
    ends = [j for j in range(len(row.doc_ids) - 1) if row.doc_ids[j] != row.doc_ids[j + 1]]
    assert ends and all(row.labels[j] == -100 for j in ends)


# --- synthetic tasks ----------------------------------------------------------------------
def test_synthetic_tasks_have_checkable_answers_and_disjoint_held_out(tmp_path):
    for p, a in task_pairs("arithmetic", 50):
        x, op, y = p.removeprefix("What is ").rstrip("?").split()
        assert int(a) == eval(f"{x} {op} {y}")
    for p, a in task_pairs("sort", 20):
        assert a.split() == sorted(p.split(": ")[1].split(), key=int)
    for p, a in task_pairs("reverse", 20):
        assert a == p.split(": ")[1][::-1]
    for p, a in task_pairs("format", 20):
        assert json.loads(a) == {k: int(v) if v.isdigit() else v for k, v in
                                 (kv.split("=") for kv in p.split(": ")[1].split("; "))}
    train = {p for p, _ in task_pairs("sort", 100, seed=0)}
    held = task_pairs("sort", 50, seed=1, exclude=train)
    assert not train & {p for p, _ in held}
    for pref in ("correct-over-wrong", "concise-over-rambling"):
        rows = synth_rows(pref, 30, base_task="sort")
        assert all(r["chosen"] == r["answer"] != r["rejected"] for r in rows)
    out = write_synth("format", tmp_path / "f.jsonl", n=10, shape="alpaca")
    assert len(load_sft_examples(out)) == 10


# --- the recipe -----------------------------------------------------------------------------
def _cfg(**kw):
    # A constant lr after warmup: a run stopped at step 4 then resumed follows the same schedule as a straight one.
    base = dict(max_steps=8, batch_size=4, block_size=64, lr=3e-3, warmup_steps=1, save_every=0, log_every=1,
                eval_every=0, weight_decay=0.0, schedule="constant")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_lowers_the_loss_and_resumes_exactly(base_dir, tmp_path, method):
    from ember.lora import LoraConfig

    data = write_synth("sort", tmp_path / "train.jsonl", n=64)
    lora = LoraConfig(r=4, alpha=8, target_modules="all-linear")
    lr = 1e-2 if method == "full" else 5e-2
    sft(base_dir, data, tmp_path / "a", method=method, lora=lora, train_config=_cfg(lr=lr), pack=True,
        progress=False, log=lambda s: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.9 * losses[0]
    sft(base_dir, data, tmp_path / "b", method=method, lora=lora, train_config=_cfg(lr=lr, max_steps=4), pack=True,
        progress=False, log=lambda s: None)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    run["train_config"]["max_steps"] = 8  # the schedule of the straight run
    (tmp_path / "b" / "run.json").write_text(json.dumps(run))
    sft(base_dir, data, tmp_path / "b", train_config=_cfg(lr=lr), resume=True, progress=False, log=lambda s: None)
    out = "model" if method == "full" else "adapter"
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "a" / out / name)), load_file(str(tmp_path / "b" / out / name))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if method == "lora":  # the checkpoint holds the adapter (and the template's token rows), not the base
        ckpt = read_state_dict(tmp_path / "b" / "checkpoint")
        assert ckpt and all(".lora_" in k or k == "model.embed_tokens.trainable_tokens_delta" for k in ckpt)
        assert any(".lora_" in k for k in ckpt)



def test_a_qlora_run_loads_for_evaluation_as_its_nf4_model_at_float_speed(base_dir, tmp_path):
    from ember.load import load_model
    from ember.lora import LoraConfig, load_adapter, quantize_base
    from ember.quant.nf4 import NF4Linear
    from ember.train.sft import load_finetuned

    data = write_synth("sort", tmp_path / "train.jsonl", n=16)
    sft(base_dir, data, tmp_path / "q", method="qlora", lora=LoraConfig(r=4, alpha=8, target_modules="all-linear"),
        train_config=_cfg(lr=5e-2, max_steps=2), progress=False, log=lambda s: None)
    model, _ = load_finetuned(tmp_path / "q", device="cpu")
    assert not [m for m in model.modules() if isinstance(m, NF4Linear)]  # decoded once, not per forward
    trained = quantize_base(load_adapter(load_model(base_dir, device="cpu", dtype=torch.float32), tmp_path / "q" /
                                         "adapter")).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The same NF4 base and adapter reached two ways: fp32 rounding of the dequantized weights only.
        torch.testing.assert_close(model(x), trained(x), atol=1e-5, rtol=0)

def test_exact_match_scores_greedy_answers(base_dir, tok, monkeypatch):
    from ember import synth
    from ember.load import load_model

    model = load_model(base_dir, device="cpu", dtype=torch.float32)
    rows = synth_rows("sort", 4)
    result = exact_match(model, tok, rows, max_new_tokens=4)  # the real greedy decoder runs
    assert result["n"] == 4 and 0.0 <= result["exact_match"] <= 1.0 and len(result["samples"]) == 4
    # A decoder that answers three of four right (then ends its turn) scores 0.75.
    answers = iter([r["answer"] for r in rows[:3]] + ["9 9"])
    monkeypatch.setattr(synth, "generate_ids",
                        lambda *a, **k: iter(tok.encode(" " + next(answers)) + [end_of_turn_id(tok)]))
    assert exact_match(model, tok, rows)["exact_match"] == 0.75


# --- `ember finetune` flags -------------------------------------------------------------------
def _finetune_call(monkeypatch, *flags):
    """The arguments `ember finetune` hands to `sft` (which is replaced by a recorder)."""
    from ember import cli
    from ember.train import sft as sft_module

    calls = []
    monkeypatch.setattr(sft_module, "sft", lambda *a, **kw: calls.append((a, kw)) or {"step": 0, "method": "lora"})
    assert cli.main(["finetune", "--model", "m", "--data", "d", "--out", "o", *flags]) == 0
    return calls[0][1]


def test_finetune_flags_reach_the_lora_and_recipe_configs(monkeypatch):
    from ember.lora import LoraConfig

    got = _finetune_call(monkeypatch, "--method", "qlora", "--pack", "--lora-r", "4", "--lora-alpha", "8",
                         "--lora-dropout", "0.1", "--lora-targets", "q_proj,v_proj", "--rslora",
                         "--trainable-tokens", "5,3", "--grad-clip", "0.5", "--mixed-precision", "off")
    assert (got["method"], got["pack"], got["train_on_prompt"]) == ("qlora", True, False)
    assert got["lora"] == LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                     trainable_token_indices=[3, 5])
    cfg = got["train_config"]
    assert (cfg.grad_clip, cfg.mixed_precision, cfg.lr) == (0.5, "off", 2e-3)  # QLoRA's learning rate
    plain = _finetune_call(monkeypatch)
    assert plain["method"] == "lora" and plain["lora"] == LoraConfig(r=8, alpha=16.0, target_modules="all-linear")
    assert plain["train_template_tokens"] is True


def test_recipe_options_are_the_sft_keywords():
    import dataclasses
    import inspect

    from ember.train.sft import SFTOptions, sft

    params = inspect.signature(sft).parameters
    for f in dataclasses.fields(SFTOptions):
        assert f.name in params and params[f.name].default == f.default, f.name


def test_a_gguf_base_fine_tunes_decoded_to_float_and_its_lora_run_reloads(base_dir, tmp_path):
    """`ember finetune --model base.gguf`: the file's tokenizer, its tensors decoded to float32 (a
    kept int8 block layer has no weight to train or wrap), and the run reloads for evaluation as
    the decoded base plus the adapter."""
    from ember import cli
    from ember.gguf import load_gguf
    from ember.lora import LoraConfig, load_adapter
    from ember.train.sft import load_finetuned

    pytest.importorskip("gguf")  # a dependency of Ember itself; named for the reader
    path = tmp_path / "base.gguf"
    assert cli.main(["convert", str(base_dir), "--to", "gguf", "--type", "q8_0", "--out", str(path)]) == 0
    data = write_synth("sort", tmp_path / "train.jsonl", n=16)
    lora = LoraConfig(r=4, alpha=8, target_modules="all-linear")
    sft(path, data, tmp_path / "run", method="lora", lora=lora, train_config=_cfg(lr=5e-2, max_steps=3),
        progress=False, log=lambda s: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    model, tokenizer = load_finetuned(tmp_path / "run", device="cpu")
    assert tokenizer.vocab_size >= 400  # the file's own tokenizer
    expected = load_adapter(load_gguf(path, "cpu", torch.float32), tmp_path / "run" / "adapter").eval()
    x = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # One decoded base and one adapter reached two ways: the same arithmetic, so equal exactly.
        assert torch.equal(model(x), expected(x))
