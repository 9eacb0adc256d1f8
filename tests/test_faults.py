"""Faults in training and indexing, each in a real process that dies: `ember pretrain` killed with
SIGKILL twenty times (in steps, in validation, in every part of a checkpoint write and of its commit,
twice in a row inside the commit) and resumed each time ends with the weights of an uninterrupted run,
bit for bit; a checkpoint write that runs out of space fails in one sentence and leaves the previous
checkpoint loadable; every damaged file is named; `ember rag index` killed midway leaves the old index
serving.

Every command runs in a process forked from one "zygote" interpreter that imported Ember once and
never ran a torch operation: each child is a real process (its own memory, killed by a real SIGKILL,
leaving its files as they were) that skips the three seconds of imports a fresh `python -m ember` pays,
which is what keeps twenty kills and resumes within a few seconds of CPU. A child dies at a chosen
moment through hooks installed after the fork (test-only code, in this file): the n-th optimizer step,
the n-th validation batch, half-way through the n-th weights or optimizer file, before the manifest,
after the old checkpoint is moved aside, before or after the new one is renamed in, half-way through
deleting the old one, or after a seeded random delay.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember.checkpoint import load_config, save_pretrained
from ember.cli import main
from ember.config import preset
from ember.data import prepare_shards, stdlib_files
from ember.errors import EmberError
from ember.load import load_model
from ember.manifest import MANIFEST
from ember.model import CausalLM
from ember.rag.index import Index, open_index
from ember.tokenizer import train_tokenizer
from ember.train.loop import TrainConfig, load_checkpoint, make_optimizer

from test_rag import BowEmbedder

ZYGOTE = r"""
import json, os, signal, sys, threading, time, traceback
import torch, torch._dynamo, safetensors.torch  # torch._dynamo: what building an optimizer imports
from torch.optim.optimizer import register_optimizer_step_pre_hook
import ember.cli, ember.checkpoint, ember.data, ember.files, ember.train.loop, ember.train.pretrain
import ember.rag.commands, ember.rag.index, ember.rag.store


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(faults):
    import pathlib, shutil, resource
    if "fsize" in faults:  # a full disk, as far as writing files goes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (faults["fsize"], faults["fsize"]))
    if "timer" in faults:
        threading.Timer(faults["timer"], die).start()
    event, n = faults.get("event"), faults.get("n", 1)
    seen = {"n": 0}

    def hit(name):
        if name == event:
            seen["n"] += 1
            return seen["n"] == n
        return False

    def halfway(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        die()

    register_optimizer_step_pre_hook(lambda *a: die() if hit("step") else None)
    real_eval = ember.data.TokenShards.iter_eval_batches

    def eval_batches(self, *a, **k):
        for batch in real_eval(self, *a, **k):
            if hit("validation"):
                die()
            yield batch
    ember.data.TokenShards.iter_eval_batches = eval_batches
    real_save_file = ember.checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        if hit("weights"):
            halfway(filename, safetensors.torch.save(tensors, metadata=metadata))
        return real_save_file(tensors, filename, metadata=metadata)
    ember.checkpoint.save_file = save_file
    real_torch_save = torch.save

    def torch_save(obj, f, *a, **k):
        if hit("optimizer"):
            import io
            buf = io.BytesIO()
            real_torch_save(obj, buf)
            halfway(f, buf.getvalue())
        return real_torch_save(obj, f, *a, **k)
    torch.save = torch_save
    real_manifest = ember.train.loop.write_manifest

    def write_manifest(folder):
        if hit("manifest"):
            die()
        return real_manifest(folder)
    ember.train.loop.write_manifest = write_manifest
    real_rename = pathlib.Path.rename

    def rename(self, target):
        name = pathlib.Path(target).name
        if name == "checkpoint" and hit("rename_in"):
            die()
        result = real_rename(self, target)
        if (name == ".checkpoint.old" and hit("rename_aside")) or (name == "checkpoint" and hit("renamed_in")):
            die()
        return result
    pathlib.Path.rename = rename
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        path = pathlib.Path(path)
        if path.name == ".checkpoint.old" and hit("delete_old"):
            next(p for p in sorted(path.iterdir()) if p.is_file()).unlink()
            die()
        return real_rmtree(path, *a, **k)
    shutil.rmtree = rmtree
    real_put = ember.rag.store.Store.put_document

    def put_document(self, *a, **k):
        result = real_put(self, *a, **k)
        if hit("index_pause"):  # mid-transaction: say so, then wait to be killed
            pathlib.Path(faults["marker"]).write_text("paused")
            time.sleep(60)
        return result
    ember.rag.store.Store.put_document = put_document


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(120)  # a child that hangs dies rather than the test
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            install(job.get("faults", {}))
            rc = ember.cli.main(job["argv"])
        except BaseException:
            traceback.print_exc()
            rc = 70
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """One interpreter with Ember imported, forking a child per command."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        # One thread: the tiny model gains nothing from more, and on a busy machine the spinning
        # workers of a second thread cost ten times the CPU.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.count = 0

    def start(self, argv: list[str], **faults) -> tuple[int, Path]:
        self.count += 1
        log = self.logs / f"child-{self.count}.log"
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "faults": faults, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"], log

    def finish(self) -> int:
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)["exit"]

    def run(self, argv: list[str], **faults) -> tuple[int, str]:
        _, log = self.start(argv, **faults)
        code = self.finish()
        return code, log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("logs"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    files = stdlib_files(max_bytes=200_000)
    tok = train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size=384)
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_shards([str(f) for f in files], tok, out, val_fraction=0.1, progress=False)
    return out


MAX_STEPS = 60


def pretrain_args(data_dir: Path, out: Path) -> list:
    return ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", out, "--device", "cpu", "--no-progress",
            "--max-steps", MAX_STEPS, "--batch-size", 2, "--block-size", 32, "--lr", 3e-3, "--warmup-steps", 5,
            "--eval-every", 3, "--eval-batches", 2, "--save-every", 2, "--log-every", 1]


def resume_args(data_dir: Path, out: Path) -> list:
    return ["pretrain", "--data", data_dir, "--out", out, "--device", "cpu", "--no-progress", "--eval-batches", 2,
            "--resume"]  # nothing else: the run's own settings, max steps and schedule included


def kill_plan(seed: int) -> list[dict]:
    """Twenty kills: two after random delays (at most a few steps in), then the rest shuffled, with the commit's windows twice in
    a row (the old checkpoint aside and the new one not in; then the next commit, while `.checkpoint.old`
    is the only checkpoint there is, killed at the same point)."""
    rng = random.Random(seed)
    # A timer kills at a random instant; the step cap keeps a fast machine from finishing the run
    # before the plan is through (whichever comes first lands).
    timers = [{"timer": rng.uniform(0.3, 0.8), "event": "step", "n": rng.randint(3, 6)} for _ in range(2)]
    singles = ([{"event": "step", "n": rng.randint(1, 5)} for _ in range(4)]
               + [{"event": "validation", "n": rng.randint(1, 3)} for _ in range(3)]
               + [{"event": e, "n": rng.randint(1, 3)} for e in ("weights", "weights", "optimizer", "optimizer",
                                                                 "manifest", "renamed_in", "delete_old")])
    rng.shuffle(singles)
    in_a_row = [[{"event": "rename_aside", "n": 1}, {"event": "rename_in", "n": 1}],
                [{"event": "rename_aside", "n": 1}, {"event": "rename_aside", "n": 1}]]
    return timers + singles[:4] + in_a_row[0] + singles[4:8] + in_a_row[1] + singles[8:]


def test_twenty_kills_and_resumes_end_with_the_uninterrupted_weights(zygote, data_dir, tmp_path):
    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    code, log = zygote.run(pretrain_args(data_dir, straight))
    assert code == 0, log
    plan = kill_plan(seed=28)
    assert len(plan) == 20
    history = []
    for i, faults in enumerate(plan):
        args = pretrain_args(data_dir, faulted) if i == 0 else resume_args(data_dir, faulted)
        code, log = zygote.run(args, **faults)
        assert code == -signal.SIGKILL, f"kill {i} ({faults}) did not land: exit {code}\n{log[-3000:]}"
        names = sorted(p.name for p in faulted.iterdir())
        history.append((faults, names))
        if faults.get("event") == "rename_aside":
            assert "checkpoint" not in names and ".checkpoint.old" in names  # the window the issue fell into
    assert any(h[0].get("event") == "rename_in" and "checkpoint" not in h[1] for h in history)
    code, log = zygote.run(resume_args(data_dir, faulted))
    assert code == 0, log
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(faulted / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (faulted / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))  # one clean log, to the run's own max steps
    leftovers = [p.name for p in faulted.iterdir() if p.name.startswith(".checkpoint")]
    assert leftovers == []  # killed writes' temp dirs and the old copy are gone


def test_resume_refuses_a_changed_setting_and_accepts_a_new_step_budget(zygote, data_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(data_dir, out)
    args[args.index("--max-steps") + 1] = 4
    assert zygote.run(args)[0] == 0
    code, log = zygote.run(resume_args(data_dir, out) + ["--lr", "0.1"])
    assert code == 1 and "--lr cannot change when resuming" in log and "Traceback" not in log
    code, log = zygote.run(resume_args(data_dir, out) + ["--max-steps", "6", "--log-every", "2"])
    assert code == 0, log
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6


def test_a_checkpoint_write_out_of_space_fails_clearly_and_keeps_the_previous(zygote, data_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(data_dir, out)
    args[args.index("--max-steps") + 1] = 4
    assert zygote.run(args)[0] == 0
    weights = out / "checkpoint" / "model.safetensors"
    before = load_file(str(weights))
    limit = weights.stat().st_size // 2  # the next weights file does not fit; log lines still do
    code, log = zygote.run(resume_args(data_dir, out) + ["--max-steps", "8"], fsize=limit)
    assert code == 1, log
    assert f"Could not write {out / 'checkpoint'} (model.safetensors: " in log and "File too large" in log, log
    assert "Traceback" not in log and len(log.strip().splitlines()) == 1, log
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    after = load_file(str(weights))
    assert all(torch.equal(before[k], after[k]) for k in before)
    load_model(out / "checkpoint", device="cpu")  # verified against its manifest
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []


# --- damaged files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(zygote, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    args = pretrain_args(data_dir, out)
    args[args.index("--max-steps") + 1] = 2
    code, log = zygote.run(args)
    assert code == 0, log
    return out


def damage(path: Path, how: str) -> None:
    """Damage as a disk does it: the content changes, the modification time does not (a person's edit
    of a config or tokenizer file, which changes it, is not damage)."""
    times = path.stat()
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one bit in the middle: the kind of damage that parses fine and loads silently wrong
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def resume_state(run: Path) -> dict:
    """What --resume loads: weights, optimizer state and trainer state, each checked."""
    model = CausalLM(load_config(run / "checkpoint"))
    return load_checkpoint(run, model, make_optimizer(model, TrainConfig()))


CHECKPOINT_FILES = ["model.safetensors", "optimizer.pt", "trainer_state.json", "tokenizer.json", "config.json"]


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_checkpoint_file_is_named(run_dir, tmp_path, name, how):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    resume_state(out)  # whole, it loads
    damage(out / "checkpoint" / name, how)
    with pytest.raises(EmberError, match=f"{out / 'checkpoint' / name}"):
        resume_state(out)


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_damaged_model_file_is_named_by_the_command_line(run_dir, tmp_path, capsys, name, how):
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    damage(model / name, how)
    assert main(["generate", "--model", str(model), "--prompt", "x", "--max-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert str(model / name) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_without_a_manifest_a_model_loads_as_before_and_damage_is_still_named(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "checkpoint" / MANIFEST).unlink()
    resume_state(out)  # a directory without a manifest (as downloaded) loads unchecked
    (out / "model" / MANIFEST).unlink()
    load_model(out / "model", device="cpu")
    damage(out / "checkpoint" / "optimizer.pt", "truncate")
    with pytest.raises(EmberError, match=f"{out / 'checkpoint' / 'optimizer.pt'} is corrupt or truncated"):
        resume_state(out)
    damage(out / "model" / "model.safetensors", "truncate")
    with pytest.raises(EmberError, match=f"{out / 'model' / 'model.safetensors'} is corrupt or truncated"):
        load_model(out / "model", device="cpu")


def test_an_edited_config_file_is_not_damage(run_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    time.sleep(0.01)  # the edit comes after the manifest, on any file-system clock
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.5}))
    load_model(model, device="cpu")
    weights = model / "model.safetensors"  # weights are never edited: a newer file that differs is damage
    damage(weights, "flip")
    os.utime(weights)
    with pytest.raises(EmberError, match=f"{weights} is corrupt"):
        load_model(model, device="cpu")


def test_a_damaged_shard_is_named(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2))
    save_pretrained(model, None, tmp_path / "m", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    load_model(tmp_path / "m", device="cpu")
    damage(shards[1], "flip")
    with pytest.raises(EmberError, match=f"{shards[1]} is corrupt"):
        load_model(tmp_path / "m", device="cpu")


# --- the RAG index ------------------------------------------------------------------------------
def write_notes(folder: Path, topic: str, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{topic}{i}.md").write_text(f"# {topic.title()} {i}\n\nNotes about {topic} number {i}: "
                                               f"the {topic}{i}marker word and some more text.\n")
    return folder


def contents(db: Path) -> list:
    idx = open_index(db, embedder=None)
    snap = idx.snapshot()
    rows = sorted(zip(snap.doc_ids, snap.texts))
    idx.close()
    return rows


def test_a_killed_index_run_leaves_the_old_index_serving(zygote, tmp_path):
    db = tmp_path / "notes.db"
    old_notes, new_notes = write_notes(tmp_path / "a", "apple", 3), write_notes(tmp_path / "b", "pear", 6)
    code, log = zygote.run(["rag", "index", old_notes, "--db", db, "--embedder", "none"])
    assert code == 0, log
    before = contents(db)
    server = open_index(db, embedder=None)  # a long-lived reader, as a server keeps one
    assert server.search("apple1marker", k=1)[0].source.endswith("apple1.md")

    marker = tmp_path / "paused"
    pid, log = zygote.start(["rag", "index", new_notes, old_notes, "--db", db, "--embedder", "none"],
                            event="index_pause", n=4, marker=str(marker))
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), log.read_text()
    # Mid-run: four new files written but not committed; every reader sees the old index.
    assert contents(db) == before
    assert server.search("pear1marker", k=3, mode="bm25") == []
    os.kill(pid, signal.SIGKILL)
    assert zygote.finish() == -signal.SIGKILL
    assert contents(db) == before  # nothing of the killed run
    assert server.search("apple2marker", k=1)[0].source.endswith("apple2.md")

    code, log = zygote.run(["rag", "index", new_notes, old_notes, "--db", db, "--embedder", "none"])
    assert code == 0, log
    assert "6 new, 0 changed, 3 unchanged" in log
    assert server.search("pear5marker", k=1)[0].source.endswith("pear5.md")  # the reader moves on once committed
    assert len(contents(db)) == len(before) + 6
    server.close()


def build_index(db: Path) -> None:
    idx = Index(db, embedder=BowEmbedder(), chunking="none")
    idx.add([{"_id": f"d{i}", "title": f"Doc {i}", "text": f"document number {i} says uniquetoken{i} " * 3}
             for i in range(40)])
    idx.close()


def snapshot_of(db: Path):
    idx = open_index(db, embedder=BowEmbedder())
    snap = idx.snapshot()
    idx.close()
    return snap


def test_a_flipped_byte_in_a_chunk_is_named(tmp_path):
    db = tmp_path / "i.db"
    build_index(db)
    data = bytearray(db.read_bytes())
    at = data.index(b"uniquetoken17")
    data[at] ^= 0x01  # 'u' -> 't': still valid UTF-8, a silently different text without a checksum
    db.write_bytes(bytes(data))
    with pytest.raises(EmberError, match=f"The RAG index {db} is corrupt: chunk .* does not match its SHA-256"):
        open_index(db, embedder=None).search("uniquetoken17")


def test_a_truncated_index_is_named(tmp_path, capsys):
    db = tmp_path / "i.db"
    build_index(db)
    damage(db, "truncate")
    assert main(["rag", "search", "uniquetoken3", "--db", str(db), "--embedder", "none"]) == 1
    err = capsys.readouterr().err
    assert f"The RAG index {db} is corrupt" in err and len(err.strip().splitlines()) == 1, err


def test_any_flipped_byte_in_an_index_is_an_error_or_harmless(tmp_path):
    """Thirty bytes flipped one at a time across the file: each either changes nothing a search reads or
    ends in an EmberError naming the file, never a silently different chunk or vector."""
    db = tmp_path / "i.db"
    build_index(db)
    good = db.read_bytes()
    whole = snapshot_of(db)
    rng = random.Random(7)
    outcomes = {"error": 0, "harmless": 0}
    for _ in range(30):
        data = bytearray(good)
        data[rng.randrange(100, len(data))] ^= 1 << rng.randrange(8)  # past the 100-byte file header
        db.write_bytes(bytes(data))
        try:
            snap = snapshot_of(db)
        except EmberError as e:
            assert str(db) in str(e)
            outcomes["error"] += 1
            continue
        assert (snap.doc_ids, snap.texts, snap.metadata, snap.locations) == \
            (whole.doc_ids, whole.texts, whole.metadata, whole.locations)
        assert (snap.vectors == whole.vectors).all()
        outcomes["harmless"] += 1
    assert outcomes["error"] > 0  # the flips did reach the data


def test_an_index_locked_by_another_writer_says_so(tmp_path):
    import sqlite3

    db = tmp_path / "i.db"
    build_index(db)
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another `ember rag index`, mid-run
    idx = Index(db, embedder=BowEmbedder(), chunking="none")  # opening only reads: no wait
    assert len(idx.snapshot()) == 40  # and reading still works
    idx.store.db.execute("PRAGMA busy_timeout = 50")  # instead of the minute a real run waits
    with pytest.raises(EmberError, match=f"The RAG index {db} stayed locked by another writer"):
        idx.add([{"_id": "new", "text": "more"}])
    other.execute("ROLLBACK")
    idx.add([{"_id": "new", "text": "more"}])
    assert len(idx.snapshot()) == 41
