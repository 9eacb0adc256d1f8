"""`ember quickstart` on a slow or busy machine: a short budget trains a smaller run and says so.

The machine's speed is simulated by replacing the step-time measurement, so no test waits minutes.
"""

import json

import pytest

import ember.quickstart as qs
from ember.quickstart import MIN_STEPS, SMALLEST_BLOCK, plan_training


def test_a_fast_machine_trains_the_requested_shape():
    plan = plan_training(step_time=0.1, train_time=100, batch_size=8, block_size=256, evals=2)
    assert (plan.batch_size, plan.block_size) == (8, 256)
    assert plan.steps == plan.requested_steps
    assert 900 < plan.steps < 1000  # 100 s at 0.1 s a step, less two short evaluations and 5% overhead


def test_a_busy_moment_halves_the_batch_instead_of_refusing():
    # The bug report: 2 minutes measured at a busy moment left time for only 9 steps of 8x256.
    plan = plan_training(step_time=6.0, train_time=100, batch_size=8, block_size=256, evals=2)
    assert plan.requested_steps == 9
    assert (plan.batch_size, plan.block_size) == (4, 256)  # the first halving already fits MIN_STEPS
    assert plan.steps >= MIN_STEPS
    assert plan.step_time == pytest.approx(3.0, rel=1e-12)  # half the tokens, half the time (rounding only)


def test_a_slow_machine_shrinks_the_batch_to_one_then_the_block():
    plan = plan_training(step_time=60, train_time=90, batch_size=8, block_size=256, evals=2)
    # 1x256 would take 7.5 s a step: 4 steps; 1x128, 3.75 s: 16 steps.
    assert (plan.batch_size, plan.block_size) == (1, 128)
    assert plan.steps >= MIN_STEPS and plan.requested_steps == 0


def test_a_spent_budget_still_trains_one_step_at_the_smallest_shape():
    plan = plan_training(step_time=60, train_time=-5, batch_size=8, block_size=256, evals=2)
    assert (plan.batch_size, plan.block_size) == (1, SMALLEST_BLOCK)
    assert plan.steps == 1


def test_quickstart_on_a_slow_machine_trains_a_smaller_run_and_says_so(tmp_path, monkeypatch, capsys):
    measured = []

    def slow_machine(model, cfg, data, device):
        measured.append((cfg.batch_size, cfg.block_size))
        return 8.0  # seconds a step of 8x256: the 30 s budget leaves no step of that shape

    monkeypatch.setattr(qs, "measure_step_time", slow_machine)
    last = qs.quickstart(minutes=0.5, out=tmp_path / "qs", preset_name="tiny", vocab_size=300, corpus_mb=0.2,
                         device="cpu")
    out = capsys.readouterr().out
    assert measured == [(8, 256)]
    assert "training a smaller run of" in out and "validation loss" in out and "Next:" in out
    run = json.loads((tmp_path / "qs" / "run.json").read_text())["train_config"]
    assert run["batch_size"] * run["block_size"] < 8 * 256
    assert (tmp_path / "qs" / "model" / "config.json").is_file() and last["step"] >= 1
