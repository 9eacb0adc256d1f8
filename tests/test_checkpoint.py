"""Checkpoint writes killed with SIGKILL in a real process: the previous checkpoint stays whole
and loadable, no half-written directory takes the target's name, and training resumes from it
to the same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ember.checkpoint import save_pretrained
from ember.config import preset
from ember.load import load_model
from ember.model import CausalLM
from ember.train.loop import TrainConfig, train

from test_train_loop import batches, loss_fn, tiny_model, weights

TESTS = Path(__file__).resolve().parent
WRITING = "writing"  # what a child prints once it is stopped inside a checkpoint write

# Children stop inside a write through a hook installed before Ember is imported, so the kill
# lands at a known point and not at a time that depends on the machine's speed.
HOOK_MID_FILE = """
import os, sys, time
import safetensors.torch

real_save_file = safetensors.torch.save_file
calls = {"n": 0}

def save_file_then_stall(tensors, filename, metadata=None):
    calls["n"] += 1
    if calls["n"] < STALL_AT_CALL:
        return real_save_file(tensors, filename, metadata=metadata)
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:  # half the file reaches the disk, then the process is killed
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    print("writing", flush=True)
    time.sleep(3600)

safetensors.torch.save_file = save_file_then_stall
"""

HOOK_BETWEEN_RENAMES = """
import pathlib, time

real_rename = pathlib.Path.rename

def rename_then_stall(self, target):
    result = real_rename(self, target)
    if pathlib.Path(target).name == ".checkpoint.old":  # the old checkpoint moved aside, the new one not in
        print("writing", flush=True)
        time.sleep(3600)
    return result

pathlib.Path.rename = rename_then_stall
"""

SAVE_TWICE = """
import sys
import torch
from ember.checkpoint import save_pretrained
from ember.config import preset
from ember.model import CausalLM

def model(seed):
    torch.manual_seed(seed)
    return CausalLM(preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2))

save_pretrained(model(0), None, sys.argv[1])  # the previous checkpoint, complete
save_pretrained(model(1), None, sys.argv[1])  # the write that is killed
"""

TRAIN = """
import json, sys
sys.path.insert(0, sys.argv[3])
from test_train_loop import batches, loss_fn, tiny_model
from ember.train.loop import TrainConfig, train

train(tiny_model(), TrainConfig(**json.loads(sys.argv[2])), batches(2), loss_fn, sys.argv[1], progress=False)
"""

# Checkpoints at step 2 and at the end, step 4: the children die writing the second.
TRAIN_CONFIG = TrainConfig(max_steps=4, batch_size=2, block_size=16, lr=3e-3, warmup_steps=1, save_every=2,
                           eval_every=0)


def kill_while_writing(script: str, *args: str) -> None:
    """Run `script` in a fresh interpreter, wait until it is inside a checkpoint write, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the hook's signal; "" if the child ended without reaching it
        assert line.strip() == WRITING, f"the child never reached the write: {proc.communicate()[1][-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def small_model(seed: int) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2))


def same_files(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and \
        json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def hidden_leftovers(folder: Path, name: str) -> list[Path]:
    """Whatever a killed write left beside `name`: only hidden temporary directories may remain."""
    others = [p for p in folder.iterdir() if p.name != name]
    assert all(p.name.startswith(f".{name}.tmp-") or p.name == f".{name}.old" for p in others), others
    return [p for p in others if p.name.startswith(f".{name}.tmp-")]


def test_save_killed_mid_file_leaves_the_previous_model_whole(tmp_path):
    target = tmp_path / "runs" / "model"
    kill_while_writing(HOOK_MID_FILE.replace("STALL_AT_CALL", "2") + SAVE_TWICE, str(target))

    first = save_pretrained(small_model(0), None, tmp_path / "first")
    second = save_pretrained(small_model(1), None, tmp_path / "second")
    assert same_files(target, first)  # the previous model, whole
    load_model(target, device="cpu")
    # The killed write is a hidden temporary directory beside the target, holding the cut file.
    leftovers = hidden_leftovers(target.parent, "model")
    cut = [p / "model.safetensors" for p in leftovers if (p / "model.safetensors").exists()]
    assert len(cut) == 1 and cut[0].stat().st_size < (second / "model.safetensors").stat().st_size
    # The next save goes through beside the leftover.
    save_pretrained(small_model(1), None, target)
    assert same_files(target, second)
    load_model(target, device="cpu")


def straight_run(tmp_path: Path) -> dict:
    model = tiny_model()
    train(model, TRAIN_CONFIG, batches(2), loss_fn, tmp_path / "straight", progress=False)
    return weights(model)


def kill_training(hook: str, out: Path) -> None:
    kill_while_writing(hook + TRAIN, str(out), json.dumps(asdict(TRAIN_CONFIG)), str(TESTS))


def resume_and_compare(out: Path, straight: dict) -> None:
    resumed = tiny_model(seed=123)  # a fresh process: everything comes from the checkpoint
    train(resumed, TRAIN_CONFIG, batches(2), loss_fn, out, resume=True, progress=False)
    got = weights(resumed)
    assert got.keys() == straight.keys()
    for k in straight:
        assert torch.equal(got[k], straight[k]), k
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # the log reads as one clean run


def test_training_killed_writing_its_checkpoint_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "run"
    kill_training(HOOK_MID_FILE.replace("STALL_AT_CALL", "2"), out)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2  # the step-4 checkpoint died mid-file; step 2's is whole
    load_model(out / "checkpoint", device="cpu")
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]
    assert hidden and all(n.startswith(".checkpoint.tmp-") for n in hidden)  # the cut write, out of the way
    resume_and_compare(out, straight_run(tmp_path))


def test_training_killed_between_the_two_renames_resumes_from_the_old_checkpoint(tmp_path):
    out = tmp_path / "run"
    kill_training(HOOK_BETWEEN_RENAMES, out)
    # atomic_dir had moved step 2's checkpoint aside and not yet moved step 4's into place.
    old = out / ".checkpoint.old"
    assert json.loads((old / "trainer_state.json").read_text())["step"] == 2
    load_model(old, device="cpu")
    resume_and_compare(out, straight_run(tmp_path))
