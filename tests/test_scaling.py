"""Scaling laws: the Chinchilla fit recovers known constants, the compute-optimal split is the
true minimum, and `ember scaling sweep` / `fit` run, resume and read each other's files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ember.cli import main
from ember.data import prepare_shards, stdlib_files
from ember.errors import EmberError
from ember.scaling import sweep as sweep_module
from ember.scaling.law import Law, Run, fit_law, fit_runs, read_runs
from ember.scaling.sweep import SweepOptions, model_for_size, parse_tokens, sweep
from ember.tokenizer import train_tokenizer
from ember.train.loop import TrainConfig

# Besiroglu et al.'s refit of Chinchilla's law: constants of a realistic shape.
TRUE = Law(E=1.82, A=482.0, B=2085.0, alpha=0.35, beta=0.37)


def synthetic_runs(law: Law, noise: float, seed: int = 0) -> list[Run]:
    """A 5 x 5 grid of sizes (1e7..1e10) and tokens (1e8..3e11), log-normal noise of `noise`."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in np.logspace(7, 10, 5):
        for d in np.logspace(8, 11.5, 5):
            loss = float(law.loss(n, d) * np.exp(rng.normal(0, noise))) if noise else float(law.loss(n, d))
            runs.append(Run(params=float(n), tokens=float(d), loss=loss, flops=6 * n * d))
    return runs


def test_noise_free_losses_give_back_the_constants():
    runs = synthetic_runs(TRUE, noise=0.0)
    law = fit_law([r.params for r in runs], [r.tokens for r in runs], [r.loss for r in runs])
    # Exact data: every residual reaches the quadratic part of the Huber loss and the optimum is
    # the truth; what is left is the optimiser's stopping point (relative objective change 1e-12).
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=2e-3), name


def test_noisy_losses_recover_the_constants_within_their_bootstrap_intervals():
    fit = fit_runs(synthetic_runs(TRUE, noise=0.005), bootstrap=100, seed=0)
    for name in ("E", "A", "B", "alpha", "beta"):
        iv = fit.intervals[name]
        assert iv["low"] <= getattr(TRUE, name) <= iv["high"], (name, iv)
    # The intervals say something: 0.5% noise on 25 runs pins the exponents to a few hundredths.
    assert fit.intervals["alpha"]["high"] - fit.intervals["alpha"]["low"] < 0.1
    assert fit.intervals["beta"]["high"] - fit.intervals["beta"]["low"] < 0.1
    co = fit.compute_optimal
    n_true, d_true = TRUE.compute_optimal(co["flops"])
    assert co["params"]["low"] <= n_true <= co["params"]["high"]
    assert co["tokens"]["low"] <= d_true <= co["tokens"]["high"]


@pytest.mark.parametrize("flops", [1e18, 5.76e23, 1e26])
def test_closed_form_optimum_is_the_brute_force_minimum_over_n(flops):
    n_opt, d_opt = TRUE.compute_optimal(flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-12)
    n = np.logspace(3, 16, 400_001)  # steps of 0.0075% in N
    brute = n[np.argmin(TRUE.loss(n, flops / (6 * n)))]
    assert n_opt == pytest.approx(brute, rel=2e-4)  # two grid steps
    # Chinchilla's own budget (5.76e23 FLOPs) under this law: about 20-ish tokens per parameter.
    if flops == 5.76e23:
        assert 10 < d_opt / n_opt < 40


def test_approach_1_follows_the_laws_frontier_on_a_dense_grid():
    rng = np.random.default_rng(1)
    runs = [Run(params=float(n), tokens=float(d), loss=float(TRUE.loss(n, d)), flops=6 * n * d)
            for n, d in 10 ** rng.uniform([7, 8], [10, 12], size=(400, 2))]
    fit = fit_runs(runs, bootstrap=0)
    expected = TRUE.beta / (TRUE.alpha + TRUE.beta)
    # The frontier runs scatter around the true optimum (random sizes): a slope within 0.05.
    assert fit.approach1["params_exponent"] == pytest.approx(expected, abs=0.05)
    assert fit.approach1["params_exponent"] + fit.approach1["tokens_exponent"] == pytest.approx(1, abs=1e-9)


@pytest.mark.parametrize("line,message", [
    ('{"params": 1e6, "tokens": 1e8}', "line 2 has no field 'loss'"),
    ('{"params": 1e6, "tokens": -5, "loss": 3}', "line 2: field 'tokens' must be a positive number"),
    ('{"params": "big", "tokens": 1e8, "loss": 3}', "line 2: field 'params' must be a positive number"),
    ("not json", "line 2 is not valid JSON"),
])
def test_a_malformed_runs_line_names_file_line_and_field(tmp_path, line, message, capsys):
    path = tmp_path / "RUNS.jsonl"
    path.write_text('{"params": 1e6, "tokens": 1e8, "loss": 3.1}\n' + line + "\n")
    with pytest.raises(EmberError, match=message):
        read_runs(path)
    assert main(["scaling", "fit", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_sizes_and_token_counts_parse_or_say_why():
    assert parse_tokens("200k") == 200_000 and parse_tokens("1.5M") == 1_500_000 and parse_tokens("64") == 64
    cfg = model_for_size("128x3")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 3, 4)
    with pytest.raises(EmberError, match="WIDTHxLAYERS"):
        model_for_size("huge")
    with pytest.raises(EmberError, match="multiple of 32"):
        model_for_size("40x2")
    with pytest.raises(EmberError, match="like 200000"):
        parse_tokens("lots")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    files = stdlib_files(max_bytes=200_000)
    tok = train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size=300)
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_shards([str(f) for f in files], tok, out, val_fraction=0.1, progress=False)
    return out


def test_sweep_runs_resumes_skipping_done_runs_and_fit_reads_it(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    cfg = TrainConfig(batch_size=2, block_size=16, lr=3e-3, eval_every=0, save_every=0, log_every=5)
    records = sweep(data_dir, out, ["32x1", "64x1"], [160, 320], cfg,
                    SweepOptions(eval_batches=2), device="cpu", progress=False)
    assert len(records) == 4
    lines = [json.loads(x) for x in (out / "RUNS.jsonl").read_text().splitlines()]
    by_name = {r["name"]: r for r in lines}
    assert set(by_name) == {"32x1-160", "32x1-320", "64x1-160", "64x1-320"}
    for r in lines:
        assert r["tokens"] == r["tokens_requested"]  # 160 and 320 are whole steps of 2 x 16
        assert r["steps"] == r["tokens"] // 32
        assert r["flops"] == 6 * r["params"] * r["tokens"]
        assert 0 < r["non_embedding_params"] < r["params"]
        assert np.isfinite(r["loss"]) and r["loss"] > 0
        # Each run's schedule ended at its own length: the last step logged is its last step.
        logged = [json.loads(x) for x in (out / "runs" / r["name"] / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == r["steps"] and "val_loss" in logged[-1]
    assert by_name["64x1-160"]["params"] > by_name["32x1-160"]["params"]

    # Again with one more token count: the four done runs are skipped (training them would fail here),
    # only the two new ones train.
    trained = []
    real_pretrain = sweep_module.pretrain

    def counting_pretrain(data, run_dir, *args, **kwargs):
        trained.append(run_dir.name)
        return real_pretrain(data, run_dir, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "pretrain", counting_pretrain)
    records = sweep(data_dir, out, ["32x1", "64x1"], [160, 320, 480], cfg,
                    SweepOptions(eval_batches=2), device="cpu", progress=False)
    assert sorted(trained) == ["32x1-480", "64x1-480"]
    assert len(records) == 6 and len((out / "RUNS.jsonl").read_text().splitlines()) == 6

    # Different shared settings are refused, not mixed into the same RUNS.jsonl.
    with pytest.raises(EmberError, match="lr"):
        sweep(data_dir, out, ["32x1"], [160], TrainConfig(batch_size=2, block_size=16, lr=1e-3),
              SweepOptions(eval_batches=2), device="cpu", progress=False)

    capsys.readouterr()
    png = tmp_path / "fit.png"
    assert main(["scaling", "fit", str(out / "RUNS.jsonl"), "--json", "--bootstrap", "20", "--plot", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert set(result[name]) == {"value", "low", "high"}
        assert all(np.isfinite(result[name][k]) for k in ("value", "low", "high"))
    co = result["compute_optimal"]
    assert co["flops"] == max(r["flops"] for r in records)
    assert {"params", "tokens", "tokens_per_param"} <= set(co)
    assert png.stat().st_size > 0


def test_sweep_cli_trains_and_skips_on_the_second_call(data_dir, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["scaling", "sweep", "--data", str(data_dir), "--sizes", "32x1", "--tokens", "160", "--out", str(out),
            "--batch-size", "2", "--block-size", "16", "--eval-batches", "1", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    first = (out / "RUNS.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "RUNS.jsonl").read_text() == first
    assert "1 runs in" in capsys.readouterr().out


def test_an_interrupted_run_continues_from_its_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    cfg = TrainConfig(batch_size=2, block_size=16, lr=3e-3, eval_every=0, save_every=0, log_every=1)
    # A run that stopped at step 3 of its 10 (320 tokens / 32 a step), checkpoint written.
    sweep_module.pretrain(data_dir, out / "runs" / "32x1-320", model_for_size("32x1"),
                          TrainConfig(**{**cfg.__dict__, "max_steps": 3, "warmup_steps": 1}), device="cpu",
                          eval_batches=1, progress=False)
    calls = []
    real_pretrain = sweep_module.pretrain

    def recording_pretrain(data, run_dir, model_config, train_config, **kwargs):
        calls.append((run_dir.name, kwargs["resume"], model_config))
        return real_pretrain(data, run_dir, model_config, train_config, **kwargs)

    monkeypatch.setattr(sweep_module, "pretrain", recording_pretrain)
    (record,) = sweep(data_dir, out, ["32x1"], [320], cfg, SweepOptions(eval_batches=1), device="cpu", progress=False)
    assert calls == [("32x1-320", True, None)]  # resumed: the model comes from the checkpoint
    assert record["steps"] == 10
    logged = [json.loads(x)["step"] for x in (out / "runs" / "32x1-320" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 11))  # steps 1-3 from the first leg, 4-10 from the resumed one


def test_sweep_flags_reach_the_sweep(monkeypatch):
    seen = {}

    def fake_sweep(data, out, sizes, tokens, train_config, options=None, device=None, progress=True):
        seen.update(data=data, sizes=sizes, tokens=tokens, cfg=train_config, options=options, progress=progress)
        return []

    monkeypatch.setattr(sweep_module, "sweep", fake_sweep)
    assert main(["scaling", "sweep", "--data", "d", "--sizes", "tiny", "64x2", "--tokens", "20k", "1.5M", "--out", "o",
                 "--lr", "0.01", "--batch-size", "3", "--budget-minutes", "2", "--warmup-fraction", "0.1",
                 "--no-progress"]) == 0
    assert seen["sizes"] == ["tiny", "64x2"] and seen["tokens"] == [20_000, 1_500_000]
    assert (seen["cfg"].lr, seen["cfg"].batch_size, seen["cfg"].eval_every) == (0.01, 3, 0)
    assert (seen["options"].budget_minutes, seen["options"].warmup_fraction) == (2.0, 0.1)
    assert seen["progress"] is False


def test_fit_prints_the_law_the_split_and_both_approaches(tmp_path, capsys):
    path = tmp_path / "RUNS.jsonl"
    path.write_text("".join(json.dumps({"params": r.params, "tokens": r.tokens, "loss": r.loss}) + "\n"
                            for r in synthetic_runs(TRUE, noise=0.005)))
    assert main(["scaling", "fit", str(path), "--bootstrap", "10", "--budget", "1e22"]) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "Compute-optimal at C = 1e+22 FLOPs" in text
    assert "approach 3: N_opt ~ C^" in text and "approach 1 (" in text
