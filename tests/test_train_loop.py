"""The shared training loop: exact resume, accumulation, schedules, atomic checkpoints."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ember.load import load_model
from ember.config import preset
from ember.model import CausalLM
from ember.train import loop
from ember.train.loop import TrainConfig, learning_rate, lm_loss, train

VOCAB = 64


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(preset("tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2))


def batches(batch_size: int, block: int = 16):
    """Batches as a pure function of (step, micro_step), like the data module's."""
    def get_batch(step: int, micro: int):
        g = torch.Generator().manual_seed(step * 1000 + micro)
        x = torch.randint(0, VOCAB, (batch_size, block + 1), generator=g)
        return x[:, :-1], x[:, 1:]
    return get_batch


def loss_fn(model, batch):
    x, y = batch
    loss, n = lm_loss(model(x), y)
    return loss, n, {}


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resumed_run_ends_with_identical_weights(tmp_path):
    cfg = TrainConfig(max_steps=8, batch_size=4, block_size=16, lr=3e-3, warmup_steps=2, save_every=0,
                      eval_every=0, log_every=1)
    straight = tiny_model()
    train(straight, cfg, batches(4), loss_fn, tmp_path / "straight", progress=False)

    half = tiny_model()
    first = TrainConfig(**{**cfg.__dict__, "max_steps": 8})
    first.save_every = 4  # the first leg checkpoints at step 4, then the process dies
    get = batches(4)

    def get_then_stop(step, micro):
        if step == 4:
            raise KeyboardInterrupt  # the process dies here
        return get(step, micro)

    with pytest.raises(KeyboardInterrupt):
        train(half, first, get_then_stop, loss_fn, tmp_path / "resumed", progress=False)
    resumed = tiny_model(seed=123)  # a fresh process: different init, everything comes from the checkpoint
    train(resumed, cfg, batches(4), loss_fn, tmp_path / "resumed", resume=True, progress=False)
    assert_same(weights(straight), weights(resumed))
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the log reads as one clean run


def float64_loss_fn(model, batch):
    """Summed cross-entropy in the logits' own dtype (lm_loss computes in float32)."""
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((y != -100).sum()), {}


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    # Targets with ignored positions make the token-count normalisation matter.
    def batch_with_mask(n_rows):
        def get(step, micro):
            g = torch.Generator().manual_seed(step)
            x = torch.randint(0, VOCAB, (4, 17), generator=g)
            y = x[:, 1:].clone()
            y[0, :9] = -100  # an uneven number of targets per micro-batch
            rows = slice(micro * n_rows, (micro + 1) * n_rows)
            return x[rows, :-1], y[rows]
        return get

    # In float64, so that the comparison tests the accumulation math and not float32 rounding:
    # a batch of 1 and a batch of 4 go through differently blocked matmuls and sum the gradient
    # in another order, which in float32 differs by ~1e-6 after one step on some CPUs.
    big, small = tiny_model().double(), tiny_model().double()
    start = weights(big)
    common = dict(max_steps=3, block_size=16, lr=1e-2, warmup_steps=1, save_every=0, eval_every=0, grad_clip=0,
                  mixed_precision="off")
    train(big, TrainConfig(batch_size=4, grad_accum=1, **common), batch_with_mask(4), float64_loss_fn,
          tmp_path / "a", progress=False)
    train(small, TrainConfig(batch_size=1, grad_accum=4, **common), batch_with_mask(1), float64_loss_fn,
          tmp_path / "b", progress=False)
    assert all(v.dtype == torch.float64 for v in big.state_dict().values())
    # Float64 rounds at 2^-53 ≈ 1e-16 relative; summing a gradient of ≤ 64 target tokens in another
    # order and AdamW's normalised step (lr 1e-2, 3 steps) keep the two runs within ~1e-14 of each
    # other. A wrong normalisation (per micro-batch instead of per step, with 7 targets in one micro-
    # batch and 16 in the others) reweights the gradient by O(1) and moves weights by O(lr) = 1e-2.
    for (k, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), k
    assert max((big.state_dict()[k] - v).abs().max() for k, v in start.items()) > 1e-3  # the runs did train


def test_checkpoint_is_a_loadable_model_and_metrics_are_logged(tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=2, block_size=16, save_every=3, eval_every=3, log_every=2)
    model = tiny_model()
    train(model, cfg, batches(2), loss_fn, tmp_path, evaluate=lambda m: {"val_loss": 1.5}, progress=False)
    loaded = load_model(tmp_path / "checkpoint", device="cpu")
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        # The same float32 weights; a loaded model may run the CPU fast path's kernels, which sum each
        # dot product (≤ 64 terms) in another order: ≤ 64 · 2^-24 ≈ 4e-6 relative, within allclose's
        # default rtol=1e-5; atol=1e-6 covers logits near zero.
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert {"step", "loss", "lr"} <= r.keys()
    assert any("tokens_per_s" in r for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]


def test_killed_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    cfg = TrainConfig(max_steps=4, batch_size=2, block_size=16, save_every=2, eval_every=0)
    model = tiny_model()
    real_save = loop.write_model_files
    calls = {"n": 0}

    def dying_save(m, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies mid-write
            (path / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(m, path, *a, **k)

    monkeypatch.setattr(loop, "write_model_files", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(model, cfg, batches(2), loss_fn, tmp_path, progress=False)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    load_model(tmp_path / "checkpoint", device="cpu")  # intact
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_schedules_warm_up_then_end_at_their_floor(schedule):
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule=schedule)
    lrs = [learning_rate(s, cfg) for s in range(101)]
    # Float64 arithmetic of a closed formula: pytest.approx's 1e-6 relative (and 1e-9, 1e-12 below)
    # is rounding only; a wrong schedule is off by percents.
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))
    end = 1.0 if schedule == "constant" else 0.1
    assert lrs[100] == pytest.approx(end)
    if schedule == "wsd":
        assert lrs[79] == pytest.approx(1.0) and lrs[90] < 1.0
    if schedule == "cosine":
        assert lrs[55] == pytest.approx(0.55, abs=1e-9)  # halfway through the decay: mean of peak and floor


def test_training_lowers_the_loss_on_learnable_data(tmp_path):
    # A repeating sequence is learnable; the loss must drop far below chance (ln 64 = 4.16).
    def get(step, micro):
        x = torch.arange(17).repeat(4, 1) % 8
        return x[:, :-1], x[:, 1:]
    model = tiny_model()
    last = train(model, TrainConfig(max_steps=60, batch_size=4, block_size=16, lr=1e-2, warmup_steps=5,
                                    eval_every=0, save_every=0, log_every=60), get, loss_fn, tmp_path,
                 progress=False)
    assert last["loss"] < 0.5 < math.log(VOCAB)  # chance is ln 64 = 4.16; a model that learns nothing stays near it


def test_moe_router_loss_is_added_in_training(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(preset("moe-tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                            num_hidden_layers=1))
    model.train()
    model(torch.randint(0, VOCAB, (2, 8)))
    aux = model.aux_loss()
    assert aux is not None and torch.isfinite(aux) and aux.item() > 0
    aux.backward()  # the load-balancing loss trains the router
    gate = model.model.layers[0].block_sparse_moe.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_every_training_setting_explains_itself_for_the_command_line():
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("help", "").split()) >= 3, f"TrainConfig.{f.name} has no help text"


def test_time_budget_is_typed_in_minutes_and_kept_in_seconds():
    import argparse

    from ember.settings import add_flags, values

    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig)
    assert values(TrainConfig, parser.parse_args(["--time-budget", "1.5"])).time_budget_s == 90.0
    assert values(TrainConfig, parser.parse_args([])) == TrainConfig()  # no flag: the dataclass's own defaults
