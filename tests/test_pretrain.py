"""Pretraining end to end on real shards: exact resume, the run directory, the quickstart."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from ember.checkpoint import read_state_dict
from ember.config import preset
from ember.data import prepare_shards, stdlib_files
from ember.load import load_model
from ember.tokenizer import load_tokenizer, train_tokenizer
from ember.train.loop import TrainConfig
from ember.train.pretrain import pretrain

from conftest import need_module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    files = stdlib_files(max_bytes=400_000)
    tok = train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size=512)
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_shards([str(f) for f in files], tok, out, val_fraction=0.1, progress=False)
    return out


def tiny():
    return preset("tiny", hidden_size=32, intermediate_size=64)


def cfg(**kw):
    base = dict(max_steps=6, batch_size=2, block_size=32, lr=3e-3, warmup_steps=2, eval_every=3, save_every=0,
                log_every=1)
    return TrainConfig(**{**base, **kw})


def test_interrupted_and_resumed_pretraining_matches_straight_run(data_dir, tmp_path):
    pretrain(data_dir, tmp_path / "a", tiny(), cfg(), device="cpu", eval_batches=2, progress=False)
    # Leg one: the same run, stopped after 3 steps (its checkpoint is at step 3).
    pretrain(data_dir, tmp_path / "b", tiny(), cfg(max_steps=3), device="cpu", eval_batches=2, progress=False)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    # Leg two: --resume with the full step count (the schedule is the same: max_steps is restored too).
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    run["train_config"]["max_steps"] = 6
    (tmp_path / "b" / "run.json").write_text(json.dumps(run))
    pretrain(data_dir, tmp_path / "b", None, cfg(), device="cpu", resume=True, eval_batches=2, progress=False)
    a, b = read_state_dict(tmp_path / "a" / "model"), read_state_dict(tmp_path / "b" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_directory_has_model_tokenizer_metrics(data_dir, tmp_path):
    last = pretrain(data_dir, tmp_path, tiny(), cfg(), device="cpu", eval_batches=2, progress=False)
    assert "val_loss" in last and last["val_loss"] > 0
    model = load_model(tmp_path / "model", device="cpu")
    tok = load_tokenizer(tmp_path / "model")
    assert model.config.vocab_size >= tok.vocab_size and model.config.eos_token_id == tok.eos_id
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= r.keys() for r in lines)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ember.cli", "pretrain", "--preset", "tiny", "--data", str(data_dir), "--out",
            str(out), "--max-steps", "100000", "--batch-size", "2", "--block-size", "32", "--eval-every", "0",
            "--save-every", "0", "--log-every", "1", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "--resume" in stderr and "Traceback" not in stderr
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert step >= 3
    resumed = subprocess.run(args[:10] + ["--max-steps", str(step + 2)] + args[12:] + ["--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ember.cli", "quickstart", "--minutes", "2", "--out",
                        str(tmp_path / "qs"), "--corpus-mb", "3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation loss" in r.stdout and "Next:" in r.stdout
    assert (tmp_path / "qs" / "loss.png").exists()
    transformers = need_module("transformers", "the peer that opens the checkpoint")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs" / "model")
    ember_model = load_model(tmp_path / "qs" / "model", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        # Two float32 implementations of one network: see LOGIT_ATOL in test_model_parity.py.
        assert (hf(ids).logits - ember_model(ids)).abs().max() < 1e-4
