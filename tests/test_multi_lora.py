"""Many LoRA adapters over one base, unmerged, in one batch (`ember.lora.batched`), in the engine and the server.

The proof is parity with merging: each sequence of a batch that mixes three adapters and the base gets
the greedy tokens its own adapter gives merged into the base and run alone. The adapters come from
`peft` (on a random Llama built with `transformers`) and from Ember's own fine-tuning recipe.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import need_module, smollm2_gguf
from ember.engine import LLM, SamplingParams
from ember.errors import EmberError
from ember.load import load_model
from ember.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from ember.lora.batched import AdapterInUse, BatchedLoraLinear, UnknownAdapter
from ember.synth import synth_rows, write_synth
from ember.tokenizer import train_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)  # random models love EOS; keep going
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=96, block_size=4)
PROMPTS = [[5, 17, 42, 8, 99, 23, 61, 7, 3, 250, 12], [9, 9, 31, 140, 77, 2, 58], [200, 11, 64, 5, 301, 18, 27, 44, 90]]


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random Llama built and saved by `transformers`, with a small Ember tokenizer beside it."""
    transformers = need_module("transformers", "the parity peer that builds the base")
    text = [json.dumps(r) for t in ("arithmetic", "sort") for r in synth_rows(t, 100, seed=9)]
    tok = train_tokenizer(text * 2, vocab_size=400)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, initializer_range=0.2,
                                      eos_token_id=tok.eos_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("multi_lora") / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save(path)
    return path


def peft_adapter(base_dir, out, r, alpha, targets, seed):
    transformers = need_module("transformers", "the parity peer that loads the base for peft")
    peft = need_module("peft", "the parity peer that makes adapters")
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                    init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """Three adapters of different ranks and targets: two by `peft`, one by Ember's SFT recipe (which
    also trains the chat template's token rows, read by the tied head too)."""
    from ember.train.loop import TrainConfig
    from ember.train.sft import sft

    root = tmp_path_factory.mktemp("adapters")
    out = {"qv": peft_adapter(base_dir, root / "qv", 4, 8, ["q_proj", "v_proj"], seed=1),
           "all": peft_adapter(base_dir, root / "all", 8, 16, "all-linear", seed=2)}
    data = write_synth("sort", root / "sort.jsonl", n=32)
    cfg = TrainConfig(max_steps=6, batch_size=4, block_size=64, lr=5e-2, warmup_steps=1, save_every=0,
                      log_every=1, eval_every=0, weight_decay=0.0, schedule="constant")
    sft(base_dir, data, root / "sft", method="lora", lora=LoraConfig(r=6, alpha=12, target_modules="all-linear"),
        train_config=cfg, pack=True, progress=False, log=lambda s: None)
    out["sft"] = root / "sft" / "adapter"
    assert json.loads((out["sft"] / "adapter_config.json").read_text())["trainable_token_indices"]
    return out


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def merged_alone(base, adapter_dir, prompt, params=GREEDY):
    """The reference: the adapter merged into the base weights, the prompt run by itself."""
    llm = LLM(base, adapter=adapter_dir, **ENGINE) if adapter_dir is not None else LLM(base, **ENGINE)
    return llm.generate([prompt], params)[0].outputs[0].token_ids


# --- the engine --------------------------------------------------------------------------------
def test_mixed_batch_greedy_equals_each_adapter_merged_and_run_alone(base_dir, adapters):
    llm = LLM(base_dir, lora_adapters=adapters, max_lora_rank=8, **ENGINE)
    names = ["qv", "all", "sft", None]
    # Every prompt under every adapter and the base, interleaved: each step's batch mixes all four.
    batch = [(p, n) for p in PROMPTS for n in names]
    got = tokens(llm.generate([p for p, _ in batch], GREEDY, lora_name=[n for _, n in batch]))
    for (prompt, name), ids in zip(batch, got):
        assert ids == merged_alone(base_dir, adapters.get(name), prompt), (name, prompt)
    # The adapters matter: under each of them the same prompt continues differently from the base.
    for p in range(len(PROMPTS)):
        by_name = dict(zip(names, got[4 * p:4 * p + 4]))
        assert all(by_name[n] != by_name[None] for n in ("qv", "all")), by_name
    assert any(got[4 * p + 2] != got[4 * p + 3] for p in range(len(PROMPTS)))  # the SFT adapter moved it too


def test_each_rows_update_equals_its_merged_weights_output(base_dir, adapters):
    """One wrapped layer, fused q/k/v on the CPU: row i gives x_i W_s^T with W_s the base merged with
    the adapter of its slot s (the base's own weight for slot -1)."""
    llm = LLM(base_dir, lora_adapters=adapters, max_lora_rank=8, **ENGINE)
    slots = llm.lora
    attn = llm.model.model.layers[1].self_attn
    layer = attn.qkv_proj.layer if attn.qkv_proj is not None else attn.q_proj
    assert isinstance(layer, BatchedLoraLinear)
    parts = ("q_proj", "k_proj", "v_proj") if len(layer.part_sizes) == 3 else ("q_proj",)
    weights = {-1: torch.cat([getattr(load_model(base_dir, device="cpu", dtype=torch.float32).model.layers[1]
                                      .self_attn, p).weight for p in parts])}
    for name, path in adapters.items():
        merged = load_model(base_dir, device="cpu", dtype=torch.float32, adapter=path).model.layers[1].self_attn
        weights[slots.get(name).slot] = torch.cat([getattr(merged, p).weight for p in parts])
    g = torch.Generator().manual_seed(0)
    token_slots = [-1, 0, 1, 2, 2, 0, -1, 1, 1, 0]
    x = torch.randn(len(token_slots), layer.in_features, generator=g)
    with torch.no_grad(), slots.active(token_slots, x.device):
        y = layer(x)
    expected = torch.stack([x[i] @ weights[s].t() for i, s in enumerate(token_slots)])
    # float32 sums of 64 products (the merged weight's) against 64 + 3 * 8 (base, then A and B):
    # the two orders of rounding differ by a few units in the last place of outputs of size ~1.
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-5)
    with torch.no_grad():  # outside a batch the layer is its base exactly
        assert torch.equal(layer(x), layer.base_layer(x))

    # Token rows (the SFT adapter's template tokens 2 and 3): the table and the tied head read the
    # adapter's rows on its slot's rows, the base's elsewhere.
    sft = slots.get("sft").slot
    base = load_model(base_dir, device="cpu", dtype=torch.float32)
    merged = load_model(base_dir, device="cpu", dtype=torch.float32, adapter=adapters["sft"])
    ids, owners = torch.tensor([[2, 3, 7, 3]]), [sft, sft, sft, -1]
    h = torch.randn(4, base.config.hidden_size, generator=g)
    with torch.no_grad():
        with slots.active(owners, ids.device):
            emb = llm.model.model.embed_tokens(ids)[0]
        with slots.active(owners, h.device):
            logits = llm.model.lm_head(h)
        want_emb = torch.cat([merged.model.embed_tokens(ids)[0, :3], base.model.embed_tokens(ids)[0, 3:]])
        want_logits = torch.cat([merged.lm_head(h[:3]), base.lm_head(h[3:])])
    assert not torch.equal(merged.model.embed_tokens.weight[3], base.model.embed_tokens.weight[3])
    assert torch.equal(emb, want_emb)  # rows copied, not computed
    torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-5)  # 64-term float32 dot products


def test_the_update_rides_on_int8_and_int4_base_layers_unchanged(base_dir, adapters):
    for method in ("int8", "int4"):
        llm = LLM(base_dir, quantization=method, lora_adapters={"all": adapters["all"]}, max_lora_rank=8, **ENGINE)
        layer = llm.model.model.layers[0].mlp.down_proj
        assert isinstance(layer, BatchedLoraLinear) and hasattr(layer.base_layer, "qweight")
        merged = load_model(base_dir, device="cpu", dtype=torch.float32, adapter=adapters["all"])
        plain = load_model(base_dir, device="cpu", dtype=torch.float32)
        delta = merged.model.layers[0].mlp.down_proj.weight - plain.model.layers[0].mlp.down_proj.weight
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            with llm.lora.active([0, -1, 0, 0, -1], x.device):
                y = layer(x)
            base = layer.base_layer(x)  # the same kernel path as inside the wrapper (no gradient)
        want = torch.stack([x[i] @ delta.t() if s == 0 else torch.zeros(layer.out_features)
                            for i, s in enumerate([0, -1, 0, 0, -1])])
        # The delta B A x in float32 against the difference of two merged float32 weights, which
        # rounds each weight once (|W| ~ 0.2): a few 1e-7 per product over 128 inputs.
        torch.testing.assert_close(y - base, want, atol=2e-5, rtol=1e-4)


def test_the_prefix_cache_never_shares_blocks_across_adapters(base_dir, adapters, tmp_path):
    llm = LLM(base_dir, lora_adapters={"qv": adapters["qv"], "all": adapters["all"]}, max_lora_rank=8, **ENGINE)
    bm = llm.block_manager
    prompt = PROMPTS[0] * 2  # 22 tokens: 5 full blocks of 4 that a second request could share

    def run(name):
        before_hits = bm.prefix_hits
        ids = tokens(llm.generate([prompt], GREEDY, lora_name=name))[0]
        return ids, bm.prefix_hits - before_hits, set(bm.hash_to_block.values())

    qv, hits, _ = run("qv")
    assert hits == 0
    again, hits, _ = run("qv")
    assert again == qv and hits == 5  # the same adapter shares its own blocks
    for name in ("all", None):
        ids, hits, _ = run(name)
        assert hits == 0, name  # same tokens, other adapter (or none): nothing shared
        assert ids == merged_alone(base_dir, adapters.get(name), prompt)
    # In one batch: two adapters, one prompt, no block in common.
    seqs = []
    for i, name in enumerate(("qv", "all")):
        llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), f"r{i}", lora_name=name)
    llm.step()
    seqs = llm.scheduler.running
    assert len(seqs) == 2 and not set(seqs[0].block_table) & set(seqs[1].block_table)
    while llm.has_unfinished():
        llm.step()
    # A name unloaded and loaded again from another directory is a new adapter: its old blocks are not reused.
    llm.unload_lora("qv")
    llm.load_lora("qv", adapters["sft"])
    ids, hits, _ = run("qv")
    assert hits == 0 and ids == merged_alone(base_dir, adapters["sft"], prompt)


def test_loading_unloading_and_bad_adapters(base_dir, adapters, tmp_path):
    llm = LLM(base_dir, lora_adapters={}, max_loras=2, max_lora_rank=4, **ENGINE)
    with pytest.raises(EmberError, match="rank 8, above max_lora_rank 4"):
        llm.load_lora("all", adapters["all"])
    llm.load_lora("qv", adapters["qv"])
    with pytest.raises(EmberError, match="already loaded"):
        llm.load_lora("qv", adapters["qv"])
    with pytest.raises(UnknownAdapter, match="No LoRA adapter named 'nope'"):
        llm.generate([PROMPTS[0]], GREEDY, lora_name="nope")
    # An adapter of another shape of base.
    other = tmp_path / "other"
    shutil.copytree(adapters["qv"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file
    state = {k: torch.zeros(v.shape[0], 32) if "lora_A" in k else v
             for k, v in load_file(str(other / "adapter_model.safetensors")).items()}
    save_file(state, str(other / "adapter_model.safetensors"))
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EmberError, match="made for a different base model"):
        llm.load_lora("other", other)
    llm.load_lora("qv2", adapters["qv"])
    with pytest.raises(EmberError, match="All 2 adapter slots are in use"):
        llm.load_lora("third", adapters["qv"])
    # In use while a request of it is unfinished; free once it finishes.
    llm.add_request(PROMPTS[1], GREEDY, "busy", lora_name="qv2")
    llm.step()
    with pytest.raises(AdapterInUse, match="'qv2' has 1 unfinished request"):
        llm.unload_lora("qv2")
    while llm.has_unfinished():
        llm.step()
    llm.unload_lora("qv2")
    assert set(llm.lora_adapters) == {"qv"}
    with pytest.raises(EmberError, match="model object is used as it is"):
        LLM(load_model(base_dir, device="cpu", dtype=torch.float32), lora_adapters={}, num_kv_blocks=8)


# --- the server ----------------------------------------------------------------------------------
@pytest.fixture()
def client(base_dir, adapters, tmp_path):
    need_module("httpx", "the HTTP client of FastAPI's TestClient")
    from fastapi.testclient import TestClient

    from ember.serve.app import create_app

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    shutil.copytree(adapters["sft"], lora_dir / "sft")
    # A pool for one whole-context request: the one that keeps an adapter busy below runs long.
    llm = LLM(base_dir, lora_adapters={"qv": adapters["qv"]}, max_lora_rank=8, **(ENGINE | {"num_kv_blocks": 160}))
    app = create_app(llm, "base", embedding_model=None, lora_dirs=[lora_dir])
    with TestClient(app) as c:
        c.lora_dir = lora_dir
        yield c


def complete(client, model, prompt, max_tokens=12, **extra):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                 "temperature": 0, "ignore_eos": True, "logprobs": 0, **extra})


def text_of(response):
    """The text of a one-choice completion that succeeded."""
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_server_lists_serves_loads_and_unloads_adapters(client, base_dir, adapters):
    from ember.load import load_tokenizer

    tok = load_tokenizer(base_dir)
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("qv", "base")]
    # A request picks its adapter by `model`: the text of the adapter merged and run alone.
    for name in ("qv", "base"):
        want = tok.decode(merged_alone(base_dir, adapters["qv"] if name == "qv" else None, PROMPTS[0]))
        reply = complete(client, name, PROMPTS[0])
        assert text_of(reply) == want
        assert reply.json()["model"] == name  # the reply names the adapter it used, as vLLM's does
    r = complete(client, "nope", PROMPTS[0])
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "'nope'" in r.json()["error"]["message"]

    # Loading at run time: only from under --lora-dir.
    for path in (str(adapters["all"]), str(client.lora_dir / ".." / ".." / "x"), "../elsewhere"):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 403 and path in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "lora_path"
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "sft", "lora_path": "sft"})
    assert r.status_code == 200, r.text
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "qv", "sft"]
    want = tok.decode(merged_alone(base_dir, adapters["sft"], PROMPTS[1]))
    assert text_of(complete(client, "sft", PROMPTS[1])) == want
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "sft", "lora_path": "sft"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(client.lora_dir / "absent")})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]

    # Unloading: unknown 404; in use 409 until its requests finish.
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    with client.stream("POST", "/v1/completions", json={"model": "sft", "prompt": PROMPTS[2], "max_tokens": 500,
                                                        "temperature": 0, "ignore_eos": True, "stream": True}) as s:
        assert s.status_code == 200, s.read()
        lines = s.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "sft"})
        assert r.status_code == 409 and r.json()["error"]["param"] == "lora_name", r.text
        assert any(line == "data: [DONE]" for line in lines)
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "sft"})
    assert r.status_code == 200, r.text
    assert complete(client, "sft", PROMPTS[0]).status_code == 404
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "qv"]


def test_serve_flags_refuse_a_malformed_lora(capsys):
    from ember import cli

    assert cli.main(["serve", "--model", "m", "--lora", "no-equals-sign"]) != 0
    assert "--lora takes NAME=DIR" in capsys.readouterr().err


# --- the real model --------------------------------------------------------------------------------
def random_peft_adapter(out, slots, short_names, r, seed):
    """A PEFT-format adapter (config and safetensors, as `peft` writes them) with random A and B on
    the named layers of every block; B large enough that greedy text changes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, (layer, part) in slots.targets.items():
        if path.rsplit(".", 1)[-1] in short_names:
            a = torch.randn(r, layer.in_features, generator=g) / layer.in_features ** 0.5
            state[f"base_model.model.{path}.lora_A.weight"] = a
            state[f"base_model.model.{path}.lora_B.weight"] = torch.randn(layer.part_sizes[part], r, generator=g) * 0.2
    out.mkdir()
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                         "target_modules": list(short_names), "lora_dropout": 0.0}))
    return out


def test_smollm2_mixed_batch_equals_each_adapter_merged_alone(tmp_path):
    """The real model with adapters loaded at run time. On its weights decoded to float, each row of a
    mixed batch gives the greedy tokens of its adapter merged and run alone. On the file's kept Q4_1
    blocks (whose integer kernel rounds differently from any float merge, so no merged twin exists),
    each row gives what its adapter gives run alone, and the adapters change the text."""
    from ember.checkpoint import save_pretrained
    from ember.load import load_tokenizer

    gguf = smollm2_gguf()
    engine = dict(device="cpu", num_kv_blocks=32, block_size=16, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = "My favourite kitchen tool is"
    names = ["qv", "mlp", None]
    kept = LLM(gguf, lora_adapters={}, max_loras=2, max_lora_rank=8, **engine)
    dirs = {"qv": random_peft_adapter(tmp_path / "qv", kept.lora, ("q_proj", "v_proj"), 8, seed=1),
            "mlp": random_peft_adapter(tmp_path / "mlp", kept.lora, ("o_proj", "gate_proj", "down_proj"), 4, seed=2)}
    for name, path in dirs.items():
        kept.load_lora(name, path)
    mixed = tokens(kept.generate([prompt] * 3, params, lora_name=names))
    for name, ids in zip(names, mixed):
        assert ids == tokens(kept.generate([prompt], params, lora_name=name))[0], name
        assert name is None or ids != mixed[2], name  # the adapter changes the text
    del kept

    decoded = tmp_path / "smollm2"  # the file's weights decoded to float, as a model directory
    save_pretrained(load_model(gguf, device="cpu", dtype=torch.bfloat16, keep_blocks=False), load_tokenizer(gguf),
                    decoded)
    floats = dict(engine, dtype="float32")
    mixed = tokens(LLM(decoded, lora_adapters=dirs, **floats).generate([prompt] * 3, params, lora_name=names))
    for name, ids in zip(names[:2], mixed):
        assert ids == tokens(LLM(decoded, adapter=dirs[name], **floats).generate([prompt], params))[0], name
