"""LoRA and QLoRA: exactness of the adapter algebra, PEFT file parity both ways, refusals, NF4 base."""

import copy

import pytest
import torch

from ember.checkpoint import save_pretrained
from ember.config import preset
from ember.errors import EmberError
from ember.load import load_model
from ember.lora import (LoraConfig, apply_lora, base_weight_bytes, disable_adapters, load_adapter, lora_layers,
                        merge_and_unload, merge_lora, quantize_base, save_adapter, trainable_summary, unmerge_lora,
                        dequantize_base, token_layers)
from ember.model import CausalLM

VOCAB = 128


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "base"
    save_pretrained(CausalLM(preset("tiny", vocab_size=VOCAB)), None, path)
    return path


def base(path):
    return load_model(path, device="cpu", dtype=torch.float32)


def ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05


def test_zero_init_b_means_the_adapted_model_equals_its_base(base_dir):
    ref = base(base_dir)
    model = apply_lora(base(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        assert torch.equal(model(ids()), ref(ids()))
    layer = next(iter(lora_layers(model).values()))
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    bound = 1 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert layer.lora_A.weight.abs().max() <= bound


def test_targets_by_name_all_linear_and_regex(base_dir):
    names = lambda cfg: sorted(lora_layers(apply_lora(base(base_dir), cfg)))  # noqa: E731
    qv = names(LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert qv == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    every = names(LoraConfig(target_modules="all-linear"))
    assert len(every) == 2 * 7 and "lm_head" not in every
    assert names(LoraConfig(target_modules=r"model\.layers\.1\.mlp\..*")) == [
        f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]
    with pytest.raises(EmberError, match="No linear layer"):
        apply_lora(base(base_dir), LoraConfig(target_modules=["c_attn"]))


def test_only_adapters_train_and_their_share_is_small(base_dir):
    model = apply_lora(base(base_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable, total = trainable_summary(model)
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert trainable == sum(2 * (64 + out) for out in (64, 32)) * 2  # r=2: A [2,64], B [out,2], 2 layers
    assert trainable / total < 0.05


def test_merge_and_unmerge_are_exact_to_rounding(base_dir):
    model = apply_lora(base(base_dir), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = model(ids())
        merge_lora(model)
        torch.testing.assert_close(model(ids()), adapted, atol=1e-5, rtol=1e-5)
        with disable_adapters(model):  # merged: the context takes the update out, then puts it back
            torch.testing.assert_close(model(ids()), base(base_dir)(ids()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids()), adapted, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
        plain = merge_and_unload(model)
        assert not lora_layers(plain)
        torch.testing.assert_close(plain(ids()), adapted, atol=1e-5, rtol=1e-5)


def test_merging_into_a_tied_head_leaves_the_embeddings_alone(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=VOCAB, tie_word_embeddings=True)).eval()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["lm_head", "q_proj"]))
    randomize(model)
    with torch.no_grad():
        adapted = model(ids())
        merged = merge_and_unload(model)
        torch.testing.assert_close(merged(ids()), adapted, atol=1e-5, rtol=0)
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    assert merged.config.tie_word_embeddings is False
    save_pretrained(merged, None, tmp_path / "merged")  # both matrices saved, and read back as such
    with torch.no_grad():
        torch.testing.assert_close(base(tmp_path / "merged")(ids()), adapted, atol=1e-5, rtol=0)


def test_disable_adapters_gives_the_base_exactly(base_dir):
    model = apply_lora(base(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    randomize(model)
    with torch.no_grad():
        with disable_adapters(model):
            assert torch.equal(model(ids()), base(base_dir)(ids()))
        assert not torch.equal(model(ids()), base(base_dir)(ids()))


# --- PEFT parity ------------------------------------------------------------------------------
def test_ember_adapter_opens_in_peft_with_identical_logits(base_dir, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity peer")
    peft = pytest.importorskip("peft", reason="peft is the parity peer")
    model = apply_lora(base(base_dir), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model)
    save_adapter(model, tmp_path / "ad", base_model=str(base_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), theirs(ids()).logits, atol=1e-5, rtol=0)


def test_lora_training_follows_peft_step_by_step(base_dir):
    """Same base, adapter init, batches and AdamW: the two training runs give the same losses,
    so the gradients through Ember's adapters (and the frozen base) are PEFT's."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity peer")
    peft = pytest.importorskip("peft", reason="peft is the parity peer")
    from ember.train.loop import TrainConfig, lm_loss, make_optimizer

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    ours = apply_lora(base(base_dir), LoraConfig(r=4, alpha=16, target_modules=targets)).train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                     task_type="CAUSAL_LM")).train()
    layers = lora_layers(ours)
    copied = 0
    with torch.no_grad():  # start from the same A (random) and B (zero)
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                path, which = name.removeprefix("base_model.model.").split(".lora_")
                p.copy_(getattr(layers[path], "lora_" + which.split(".")[0]).weight)
                copied += 1
    assert copied == 2 * len(layers)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0)

    def losses(model, forward):
        opt, out = make_optimizer(model, cfg), []
        for step in range(6):
            x = ids(seed=10 + step % 2)  # two batches in turn: the loss on them must fall
            loss, n = lm_loss(forward(model, x[:, :-1]), x[:, 1:])
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(float(loss.detach() / n))
        return out

    ember_losses = losses(ours, lambda m, x: m(x))
    peft_losses = losses(theirs, lambda m, x: m(input_ids=x).logits)
    assert ember_losses[-1] < ember_losses[0]  # it trains
    assert ember_losses == pytest.approx(peft_losses, abs=1e-4)


@pytest.mark.parametrize("targets", [["q_proj", "down_proj"], "all-linear"])
def test_peft_adapter_opens_in_ember_with_identical_logits(base_dir, tmp_path, targets):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity peer")
    peft = pytest.importorskip("peft", reason="peft is the parity peer")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                     init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    theirs.save_pretrained(tmp_path / "ad")
    model = load_adapter(base(base_dir), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), theirs(ids()).logits, atol=1e-5, rtol=0)


def test_adapter_for_a_different_base_is_refused(base_dir, tmp_path):
    model = apply_lora(base(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    save_adapter(model, tmp_path / "ad")
    wider = CausalLM(preset("tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=64))
    with pytest.raises(EmberError, match="different base model.*shape"):
        load_adapter(wider, tmp_path / "ad")
    shallower = CausalLM(preset("tiny", vocab_size=VOCAB, num_hidden_layers=1))
    with pytest.raises(EmberError, match="different base model.*model.layers.1"):
        load_adapter(shallower, tmp_path / "ad")
    with pytest.raises(EmberError, match="does not exist"):
        load_adapter(base(base_dir), tmp_path / "nowhere")


# --- QLoRA ------------------------------------------------------------------------------------
def test_qlora_base_is_under_30_percent_of_bf16_and_only_adapters_get_gradients(base_dir):
    model = apply_lora(base(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    _, bf16 = base_weight_bytes(model)
    quantize_base(model)
    now, bf16_after = base_weight_bytes(model)
    assert bf16_after == bf16 and now <= 0.30 * bf16
    assert not [n for n, p in model.named_parameters() if "lora_" not in n and p.requires_grad]
    randomize(model)
    model.train()
    loss = model(ids()).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(torch.count_nonzero(g) > 0 for g in grads.values())
    # The NF4 base computes close to the float base (4-bit weights, not noise).
    model.eval()
    with torch.no_grad(), disable_adapters(model):
        ref = base(base_dir)(ids())
        err = (model(ids()) - ref).abs().mean() / ref.abs().mean()
    assert err < 0.2



@pytest.mark.parametrize("tied", [False, True])
def test_dequantized_qlora_base_gives_the_nf4_models_outputs_and_merges(tied):
    from ember.quant.nf4 import NF4Linear

    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=VOCAB, tie_word_embeddings=tied))
    model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model)
    quantize_base(model).eval()
    with torch.no_grad():
        nf4_logits = model(ids())
        dequantize_base(model)
        assert not [m for m in model.modules() if isinstance(m, NF4Linear)]
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        torch.testing.assert_close(model(ids()), nf4_logits, atol=1e-5, rtol=0)
        # and the float base accepts the merge that an NF4 base refuses
        merged = merge_and_unload(model)
        assert not lora_layers(merged)
        torch.testing.assert_close(merged(ids()), nf4_logits, atol=1e-4, rtol=0)

def test_load_model_and_the_engine_apply_an_adapter(base_dir, tmp_path):
    from ember.engine import LLM, SamplingParams

    model = apply_lora(base(base_dir), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model)
    save_adapter(model, tmp_path / "ad", base_model=str(base_dir))
    with torch.no_grad():
        expected = model(ids())
        merged = load_model(base_dir, device="cpu", dtype=torch.float32, adapter=tmp_path / "ad")
        torch.testing.assert_close(merged(ids()), expected, atol=1e-5, rtol=0)
        assert not lora_layers(merged)  # merged into plain linears: the base's speed
    prompt = ids()[0].tolist()
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    served = LLM(base_dir, device="cpu", dtype="float32", adapter=tmp_path / "ad", num_kv_blocks=16, block_size=8)
    plain = LLM(merged, num_kv_blocks=16, block_size=8)
    assert served.generate([prompt], greedy)[0].outputs[0].token_ids == plain.generate([prompt], greedy)[0].outputs[0].token_ids
    quantized = LLM(base_dir, device="cpu", dtype="float32", adapter=tmp_path / "ad", quantization="int8", num_kv_blocks=16)
    assert len(quantized.generate([prompt], greedy)[0].outputs[0].token_ids) == 6


def tied_base(path, tied):
    torch.manual_seed(0)
    save_pretrained(CausalLM(preset("tiny", vocab_size=VOCAB, tie_word_embeddings=tied)), None, path)
    return path


def with_tokens(model, rows=(2, 5), seed=3):
    """LoRA with token rows 2 and 5 trainable, every tensor moved off its start."""
    model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"],
                                         trainable_token_indices=list(rows)))
    randomize(model)
    g = torch.Generator().manual_seed(seed)
    for t in token_layers(model):
        t.trainable_tokens_delta.data += torch.randn(t.trainable_tokens_delta.shape, generator=g)
    return model


def token_ids():
    x = ids()
    x[:, ::3] = 2  # the trainable rows appear as inputs (and are scored as outputs)
    x[:, 1::4] = 5
    return x


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_token_rows_open_in_peft_both_ways_with_identical_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity peer")
    peft = pytest.importorskip("peft", reason="peft is the parity peer")
    path = tied_base(tmp_path / "base", tied)
    model = with_tokens(base(path))
    save_adapter(model, tmp_path / "ours", base_model=str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        plain = base(path)(token_ids())
        ours = model(token_ids())
        assert (ours - plain).abs().max() > 1e-2  # the rows changed something
        torch.testing.assert_close(ours, theirs(token_ids()).logits, atol=1e-5, rtol=1e-5)
    # and the other way: rows trained in peft load in Ember
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj"],
                                                     trainable_token_indices=[1, 7], task_type="CAUSAL_LM"))
    for n, p in theirs.named_parameters():
        if "trainable_tokens_delta" in n:
            p.data += torch.randn_like(p)
    theirs.save_pretrained(tmp_path / "theirs")
    model = load_adapter(base(path), tmp_path / "theirs")
    x = token_ids()
    x[:, ::5] = 7
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs.eval()(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_token_rows_alone_train_and_merge_unmerge_disable_and_nf4_keep_them(tmp_path, tied):
    path = tied_base(tmp_path / "base", tied)
    model = with_tokens(base(path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.trainable_tokens_delta" in trainable
    assert not any("embed_tokens.base_layer" in n or n.startswith("lm_head") for n in trainable)
    x = token_ids()
    model(x)[..., [2, 5]].sum().backward()
    assert model.model.embed_tokens.trainable_tokens_delta.grad.abs().sum() > 0
    table = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        adapted, plain = model(x), base(path)(x)
        with disable_adapters(model):
            torch.testing.assert_close(model(x), plain, atol=1e-6, rtol=0)
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model.model.embed_tokens.weight, table, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        # QLoRA: the rows sit over an NF4 table, and a dequantized base gives the NF4 model's outputs
        quantize_base(model)
        nf4 = model(x)
        dequantize_base(model)
        torch.testing.assert_close(model(x), nf4, atol=1e-5, rtol=1e-5)
        merged = merge_and_unload(model)
        assert not token_layers(merged) and isinstance(merged.model.embed_tokens, torch.nn.Embedding)
        assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
        torch.testing.assert_close(merged(x), nf4, atol=1e-4, rtol=0)


def test_trainable_token_rows_outside_the_vocabulary_are_refused(base_dir):
    with pytest.raises(EmberError, match="outside the vocabulary"):
        apply_lora(base(base_dir), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[VOCAB]))


def test_merge_disable_unmerge_merge_round_trip_exactly_in_float64():
    """LoRA layers and token rows of a tied float64 model go merged → disabled → merged → unmerged →
    merged, and each state has the weights it had before. Float64 makes the base's rounding
    negligible: adding and subtracting an update on weights below 10 errs by under 1e-14, while a
    fold through float32 would round every base weight by ~1e-8 (and token rows put back from a
    float32 copy likewise). Token rows are written from stored copies, so they return bit for bit."""
    torch.manual_seed(0)
    plain = CausalLM(preset("tiny", vocab_size=VOCAB, tie_word_embeddings=True)).to(torch.float64).eval()
    model = apply_lora(copy.deepcopy(plain), LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                        trainable_token_indices=[2, 5]))
    randomize(model)
    g = torch.Generator().manual_seed(3)
    tokens = model.model.embed_tokens
    tokens.trainable_tokens_delta.data += torch.randn(tokens.trainable_tokens_delta.shape, generator=g)
    table = "model.embed_tokens.base_layer.weight"

    def weights():
        return {k: v.clone() for k, v in model.state_dict().items()}

    def assert_weights(expected):
        now = weights()
        assert now.keys() == expected.keys()
        for k, v in now.items():
            torch.testing.assert_close(v, expected[k], atol=1e-12, rtol=0, msg=k)
        assert torch.equal(now[table], expected[table])

    x = token_ids()
    with torch.no_grad():
        base_logits, adapted = plain(x), model(x)
        original = weights()
        with disable_adapters(model):
            assert torch.equal(model(x), base_logits)  # unmerged: the wrappers return the base's output
        merge_lora(model)
        merged = weights()
        assert not torch.equal(merged[table], original[table])
        assert not torch.equal(merged["model.layers.0.mlp.up_proj.base_layer.weight"],
                               original["model.layers.0.mlp.up_proj.base_layer.weight"])
        # the adapter's product B A is float32 either way, so merged and unmerged logits agree to float32
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
        with disable_adapters(model):
            assert_weights(original)
            torch.testing.assert_close(model(x), base_logits, atol=1e-10, rtol=0)  # float64 rounding only
        assert_weights(merged)
        unmerge_lora(model)
        assert_weights(original)
        torch.testing.assert_close(model(x), adapted, atol=1e-10, rtol=0)  # float64 rounding of the base only
        merge_lora(model)
        assert_weights(merged)
