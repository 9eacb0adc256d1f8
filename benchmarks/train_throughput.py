"""Training throughput on CPU: Ember's `ember pretrain` vs nanoGPT's `train.py`, side by side.

    python benchmarks/train_throughput.py [--minutes 2] [--rounds 2] [--nanogpt DIR]

nanoGPT is a peer, not a dependency: its code stays outside this repository. Get it with

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt

and point `--nanogpt` (or the `NANOGPT_DIR` environment variable) at the checkout; without
it the benchmark runs Ember alone and says so.

What is compared, and why it is fair:
  * Data. One corpus (the first `--corpus-mb` MB of the Python standard library, Ember's
    default corpus) and one tokenizer (a 4096-token byte-level BPE trained by Ember). Ember's
    shards are flat uint16 arrays, byte-for-byte nanoGPT's `train.bin`/`val.bin`, so the
    same files feed both. A small vocabulary keeps the comparison about the transformer: with
    GPT-2's 50k vocabulary the LM head would be most of the compute of a model this size.
  * Model. The same GPT-2 architecture on both sides: learned positions, pre-LayerNorm with
    biases, exact GELU (nanoGPT's `nn.GELU()`; Ember gets `activation_function: gelu`), tied
    embeddings, dropout 0, vocabulary rounded up to a multiple of 64, GPT-2 initialisation.
  * Training. Same batch, block, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices),
    clipping 1.0, peak lr, warmup, cosine decay over the same `--steps` to lr/10, float32,
    no `torch.compile`, `--threads` intra-op threads, each tool in its own process.
  * Budget. Each run trains for `--minutes` of wall-clock time (Ember: `--time-budget`; nanoGPT
    has no such option, so this script stops it after the first iteration that ends past the
    budget, by nanoGPT's own clock). Both evaluate and checkpoint every `--eval-every` steps.
  * Throughput. Median per-step tokens/s over steady-state steps (the first 5 and the steps
    that paid for an evaluation or a checkpoint are left out), plus the end-to-end figure
    (all tokens trained / training wall time, evaluations included).
  * Validation. The loss "after the budget" is that of the last checkpoint each tool wrote
    inside the budget (the same step grid for both), measured on the SAME held-out windows:
    Ember logs its loss on `TokenShards.iter_eval_batches`; this script loads nanoGPT's
    `ckpt.pt` into nanoGPT's own `GPT` class and computes the loss on exactly those windows.
    nanoGPT's own estimate (random batches) is reported beside it.
Runs alternate nanoGPT, Ember, Ember, nanoGPT, ... (ABBA) so slow drifts of a shared machine
hit both sides alike. Results go to benchmarks/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import abba, ratio_spread, spread, write_results  # noqa: E402
from common import RESULTS  # noqa: E402
from ember.data import TokenShards, stdlib_files  # noqa: E402

GET_NANOGPT = "git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt"
SKIP_FIRST = 5  # steps to let the allocator and caches settle, as nanoGPT's MFU does


# --- data ------------------------------------------------------------------------------------
def run_cmd(cmd: list[str], env: dict, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"Command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def build_data(work: Path, corpus_mb: float, vocab: int, val_fraction: float, env: dict) -> Path:
    """Corpus -> Ember tokenizer -> Ember shards -> the same tokens as nanoGPT's train/val.bin."""
    data = work / "data"
    stamp = {"corpus_mb": corpus_mb, "vocab": vocab, "val_fraction": val_fraction}
    stamp_file = work / "data_stamp.json"
    if data.is_dir() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        print(f"Reusing the prepared data in {data}")
        return data
    for p in (work / "corpus", work / "tok", data):
        shutil.rmtree(p, ignore_errors=True)
    corpus = work / "corpus"
    files = stdlib_files(int(corpus_mb * 1e6))
    root = Path(os.path.commonpath([str(f) for f in files]))
    for f in files:
        dst = corpus / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    ember = [sys.executable, "-m", "ember.cli"]
    print(f"Corpus: {len(files)} stdlib files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB; "
          f"training a {vocab}-token tokenizer and preparing shards with Ember ...")
    run_cmd(ember + ["tokenizer", "train", "--input", str(corpus), "--vocab-size", str(vocab),
                     "--out", str(work / "tok")], env)
    run_cmd(ember + ["data", "prepare", "--input", str(corpus), "--tokenizer", str(work / "tok"),
                     "--out", str(data), "--val-fraction", str(val_fraction)], env)
    stamp_file.write_text(json.dumps(stamp))
    return data


def nanogpt_dataset(data: Path, work: Path) -> tuple[Path, int]:
    """Concatenate Ember's shards into nanoGPT's train.bin/val.bin (+ meta.pkl with the vocab)."""
    meta = json.loads((data / "meta.json").read_text())
    if meta["dtype"] != "uint16":
        sys.exit("nanoGPT reads uint16 tokens; use a vocabulary below 65536.")
    vocab = ((meta["vocab_size"] + 63) // 64) * 64  # what Ember's pretrain rounds to
    out = work / "nanogpt_data"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        arrays = [np.fromfile(data / s["file"], dtype=np.uint16) for s in meta["shards"][split]]
        np.concatenate(arrays).tofile(out / f"{split}.bin")
    with open(out / "meta.pkl", "wb") as f:  # nanoGPT reads vocab_size from here
        pickle.dump({"vocab_size": vocab}, f)
    return out, vocab


# --- the two runners ---------------------------------------------------------------------------
def run_ember(a, data: Path, run: Path, vocab: int, env: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    config = {"model_type": "gpt2", "n_layer": a.n_layer, "n_head": a.n_head, "n_embd": a.n_embd,
              "n_positions": a.block_size, "vocab_size": vocab, "activation_function": "gelu",
              "tie_word_embeddings": True}
    (run / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "ember.cli", "pretrain", "--config", str(run / "config.json"),
           "--data", str(data), "--out", str(run / "out"), "--max-steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--block-size", str(a.block_size), "--lr", str(a.lr),
           "--min-lr-ratio", "0.1", "--warmup-steps", str(a.warmup), "--weight-decay", "0.1",
           "--grad-clip", "1.0", "--eval-every", str(a.eval_every), "--eval-batches", str(2 * a.eval_batches),
           "--save-every", str(a.eval_every), "--log-every", "1", "--time-budget", str(a.minutes),
           "--mixed-precision", "off", "--no-progress", "--device", "cpu", "--seed", "1337"]
    t = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t
    (run / "stdout.txt").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"ember pretrain failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    recs = [json.loads(x) for x in (run / "out" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens_per_step = a.batch_size * a.block_size
    E = a.eval_every
    # Record for step s covers the time since record s-1; the step after an eval/save pays for it.
    steady = [r["tokens_per_s"] for r in recs
              if r["step"] > SKIP_FIRST and (r["step"] - 1) % E != 0 and "tokens_per_s" in r]
    budget = a.minutes * 60
    grid = [r for r in recs if "val_loss" in r and r["step"] % E == 0 and r["elapsed_s"] <= budget]
    last = recs[-1]
    train_losses = [r["loss"] for r in recs[-10:]]
    return {
        "steps": last["step"], "train_elapsed_s": last["elapsed_s"], "process_wall_s": wall,
        "tokens_per_s_median": statistics.median(steady) if steady else float("nan"),
        "tokens_per_s_end_to_end": last["step"] * tokens_per_step / last["elapsed_s"],
        "train_loss_last10": sum(train_losses) / len(train_losses),
        "val_step": grid[-1]["step"] if grid else None,
        "val_loss_same_windows": grid[-1]["val_loss"] if grid else None,
        "val_loss_own_estimate": grid[-1]["val_loss"] if grid else None,
        "final_val_loss": last.get("val_loss"),
    }


ITER = re.compile(r"^iter (\d+): loss ([\d.naninf]+), time ([\d.]+)ms")
STEP = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def run_nanogpt(a, ndir: Path, ndata: Path, run: Path, env: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copyfile(ndir / "configurator.py", run / "configurator.py")  # train.py exec()s it from cwd
    overrides = dict(out_dir=str(run / "out"), dataset=str(ndata), device="cpu", dtype="float32",
                     compile=False, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                     block_size=a.block_size, batch_size=a.batch_size, gradient_accumulation_steps=1,
                     dropout=0.0, bias=True, learning_rate=float(a.lr), min_lr=float(a.lr) / 10,
                     max_iters=a.steps, lr_decay_iters=a.steps, warmup_iters=a.warmup, weight_decay=0.1,
                     beta1=0.9, beta2=0.95, grad_clip=1.0, decay_lr=True, eval_interval=a.eval_every,
                     eval_iters=a.eval_batches, log_interval=1, always_save_checkpoint=True,
                     wandb_log=False, init_from="scratch")
    # os.path.join('data', dataset) keeps an absolute dataset path as it is.
    cmd = [sys.executable, "-u", str(ndir / "train.py")] + [f"--{k}={v}" for k, v in overrides.items()]
    budget = a.minutes * 60
    iters, evals, clock, log = [], [], 0.0, []
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = False
    for line in proc.stdout:
        log.append(line)
        m = STEP.match(line)
        if m:
            evals.append({"step": int(m[1]), "train": float(m[2]), "val": float(m[3]), "clock": clock})
        m = ITER.match(line)
        if m:
            dt = float(m[3]) / 1000
            clock += dt
            iters.append((int(m[1]), float(m[2]), dt))
            if clock > budget:  # no checkpoint is being written between an iter line and the next eval
                proc.terminate()
                stopped = True
                break
    proc.wait()
    wall = time.time() - t
    (run / "stdout.txt").write_text("".join(log))
    if not iters:
        sys.exit(f"nanoGPT's train.py printed no iterations:\n{''.join(log)[-3000:]}")
    if proc.returncode not in (0, -15) and not stopped:
        sys.exit(f"nanoGPT's train.py failed ({proc.returncode}):\n{''.join(log)[-3000:]}")
    tokens_per_step = a.batch_size * a.block_size
    E = a.eval_every
    # nanoGPT's iteration N includes the evaluation and checkpoint it runs first when N % E == 0.
    steady = [tokens_per_step / dt for n, _, dt in iters if n >= SKIP_FIRST and n % E != 0]
    steps = iters[-1][0] + 1
    inside = [e for e in evals if e["step"] > 0 and e["clock"] <= budget]
    out = {
        "steps": steps, "train_elapsed_s": clock, "process_wall_s": wall,
        "tokens_per_s_median": statistics.median(steady) if steady else float("nan"),
        "tokens_per_s_end_to_end": steps * tokens_per_step / clock,
        "train_loss_last10": sum(x[1] for x in iters[-10:]) / len(iters[-10:]),
        "val_step": inside[-1]["step"] if inside else None,
        "val_loss_own_estimate": inside[-1]["val"] if inside else None,
        "val_loss_same_windows": None,
    }
    if inside:
        out["val_loss_same_windows"] = eval_nanogpt_ckpt(ndir, run / "out" / "ckpt.pt", a, inside[-1]["step"])
    return out


def eval_nanogpt_ckpt(ndir: Path, ckpt_path: Path, a, expect_step: int) -> float:
    """nanoGPT's checkpoint, in nanoGPT's own model class, on Ember's validation windows."""
    sys.path.insert(0, str(ndir))
    try:
        from model import GPT, GPTConfig  # nanoGPT's model.py
    finally:
        sys.path.remove(str(ndir))
    # weights_only=False: nanoGPT pickles its config dict; this is the file we just wrote locally.
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["iter_num"] == expect_step, (ckpt["iter_num"], expect_step)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    return same_window_loss(lambda x, y: model(x, y)[1], a)


def same_window_loss(loss_of, a) -> float:
    shards = TokenShards(a.data_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in shards.iter_eval_batches("val", a.batch_size, a.block_size, 2 * a.eval_batches):
            total += float(loss_of(x, y)) * y.numel()
            count += y.numel()
    return total / count


# --- report ------------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> dict:
    """Each figure's median over the tool's runs, with its spread (min–max)."""
    keys = ["tokens_per_s_median", "tokens_per_s_end_to_end", "steps", "train_loss_last10",
            "val_loss_same_windows", "val_loss_own_estimate", "val_step"]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = spread(vals) if vals else None
    return out


def per_round(runs: dict) -> tuple[str, dict]:
    """One row per run and the Ember/nanoGPT tokens/s ratio of each round (neighbouring runs)."""
    lines = ["| round | tool | load avg before | tok/s, median step | tok/s, end to end | steps | val loss (step) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r, (e, n) in enumerate(zip(runs["ember"], runs["nanogpt"]), 1):
        for tool, x in (("nanoGPT", n), ("Ember", e)):
            lines.append(f"| {r} | {tool} | {x.get('load_average_before', float('nan')):.2f} | "
                         f"{fmt(x['tokens_per_s_median'])} | {fmt(x['tokens_per_s_end_to_end'])} | {x['steps']} | "
                         f"{fmt(x['val_loss_same_windows'], 3)} ({x['val_step']}) |")
    ratio = ratio_spread([e["tokens_per_s_median"] for e in runs["ember"]],
                         [n["tokens_per_s_median"] for n in runs["nanogpt"]])
    lines.append("")
    lines.append(f"Ember / nanoGPT tokens/s (median step): the median of {ratio['rounds']} rounds' own ratios "
                 f"**{ratio['median']:.3f}** ({ratio['min']:.3f}–{ratio['max']:.3f}).")
    return "\n".join(lines), ratio


def fmt(v, nd=0):
    if v is None:
        return "—"
    if isinstance(v, dict):  # a spread
        return f"{v['median']:,.{nd}f} ({v['min']:,.{nd}f}–{v['max']:,.{nd}f})"
    return f"{v:,.{nd}f}"


def table(summary: dict, has_peer: bool) -> str:
    e, n = summary["ember"], summary.get("nanogpt") or {}
    rows = [("tokens/s, median step", "tokens_per_s_median", 0),
            ("tokens/s, end to end (evals included)", "tokens_per_s_end_to_end", 0),
            ("steps in the budget", "steps", 0),
            ("train loss (last 10 steps)", "train_loss_last10", 3),
            ("val loss, same windows (last checkpoint in budget)", "val_loss_same_windows", 3),
            ("val loss, the tool's own estimate", "val_loss_own_estimate", 3),
            ("step of that checkpoint", "val_step", 0)]
    lines = ["| metric | nanoGPT | Ember | Ember / nanoGPT (medians) |", "|---|---|---|---:|"]
    for label, k, nd in rows:
        ev, nv = e.get(k), n.get(k)
        ratio = f"{ev['median'] / nv['median']:.3f}" if has_peer and ev is not None and nv else "—"
        lines.append(f"| {label} | {fmt(nv, nd)} | {fmt(ev, nd)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR"),
                   help=f"nanoGPT checkout (default $NANOGPT_DIR); get it with: {GET_NANOGPT}")
    p.add_argument("--nanogpt-rev", default=os.environ.get("NANOGPT_REV"),
                   help="nanoGPT commit to record when DIR is not a git checkout")
    p.add_argument("--minutes", type=float, default=2.0, help="wall-clock training budget per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per tool, in ABBA order")
    p.add_argument("--steps", type=int, default=250, help="length of the lr schedule (and step cap)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--workdir", default="/tmp/ember_train_bench")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    p.add_argument("--out", default=str(RESULTS / "train_throughput"), help="results path without extension")
    a = p.parse_args()

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    torch.set_num_threads(a.threads)

    ndir = Path(a.nanogpt).expanduser().resolve() if a.nanogpt else None
    if ndir is None or not (ndir / "train.py").is_file() or not (ndir / "model.py").is_file():
        where = f"in {ndir}" if ndir else "(no --nanogpt and no NANOGPT_DIR)"
        print(f"nanoGPT not found {where}: running Ember alone. To compare, run\n  {GET_NANOGPT}\n"
              f"and pass --nanogpt /tmp/nanogpt (or set NANOGPT_DIR).")
        ndir = None

    data = build_data(work, a.corpus_mb, a.vocab_size, 0.05, env)
    a.data_dir = data
    ndata, vocab = nanogpt_dataset(data, work)
    meta = json.loads((data / "meta.json").read_text())
    print(f"Data: {meta['num_tokens']['train']:,} train / {meta['num_tokens']['val']:,} val tokens, "
          f"vocab {meta['vocab_size']} (model {vocab})")
    print(f"Model: GPT-2, {a.n_layer} layers, {a.n_head} heads, {a.n_embd} wide, block {a.block_size}; "
          f"batch {a.batch_size}; {a.minutes} min per run, {a.rounds} round(s), float32, {a.threads} threads")

    order = [t for pair in abba(["ember", "nanogpt"], a.rounds) for t in pair if t == "ember" or ndir is not None]
    runs = {"ember": [], "nanogpt": []}
    for i, tool in enumerate(order):
        run = work / f"run_{i}_{tool}"
        print(f"[{i + 1}/{len(order)}] {tool} ...", flush=True)
        load = os.getloadavg()[0]  # a busy machine makes a run's figures worthless: record it
        res = run_ember(a, data, run, vocab, env) if tool == "ember" else run_nanogpt(a, ndir, ndata, run, env)
        res["load_average_before"] = load
        runs[tool].append(res)
        print(f"    {res['steps']} steps, {res['tokens_per_s_median']:,.0f} tok/s (median step), "
              f"{res['tokens_per_s_end_to_end']:,.0f} tok/s end to end, "
              f"val {fmt(res['val_loss_same_windows'], 3)} at step {res['val_step']}", flush=True)

    summary = {"ember": summarize(runs["ember"])}
    if ndir is not None:
        summary["nanogpt"] = summarize(runs["nanogpt"])
    md = table(summary, ndir is not None)
    rounds_md, ratio = per_round(runs) if ndir is not None else ("", None)
    if ratio:
        md = rounds_md + "\n\nMedians over all runs, min–max (read the per-round ratios above first):\n\n" + md
    print()
    print(md)
    result = {
        "benchmark": "train_throughput",
        "nanogpt": {"dir": str(ndir) if ndir else None, "commit": git_commit(ndir) or (a.nanogpt_rev if ndir else None)},
        "setup": {k: getattr(a, k) for k in ("minutes", "rounds", "steps", "warmup", "lr", "n_layer", "n_head",
                                             "n_embd", "block_size", "batch_size", "eval_every",
                                             "eval_batches", "threads", "corpus_mb", "vocab_size")},
        "data": {"train_tokens": meta["num_tokens"]["train"], "val_tokens": meta["num_tokens"]["val"],
                 "tokenizer_vocab": meta["vocab_size"], "model_vocab": vocab},
        "order": order, "runs": runs, "summary": summary,
        "tokens_per_s_ratio": ratio,
    }
    if a.no_save:
        return
    out = Path(a.out)
    write_results(out.name, result,
        "# Training throughput: Ember vs nanoGPT (CPU)\n\n"
        f"nanoGPT {result['nanogpt']['commit'] or '(not run)'}; {a.threads} threads for both.\n\n"
        f"GPT-2 architecture, {a.n_layer} layers × {a.n_head} heads × {a.n_embd} wide, block {a.block_size}, "
        f"batch {a.batch_size}, vocab {vocab} (Ember BPE on {a.corpus_mb:g} MB of the Python stdlib, "
        f"{meta['num_tokens']['train']:,} train tokens), float32, no compile, AdamW lr {a.lr:g}, "
        f"warmup {a.warmup}, cosine over {a.steps} steps; {a.minutes:g} min of training per run, "
        f"{a.rounds} run(s) per tool in ABBA order ({', '.join(order)}); each round pairs neighbouring runs, "
        "so machine drift hits both tools alike.\n\n"
        + md + "\n\n"
        "Val loss \"same windows\": each tool's last checkpoint inside the budget (every "
        f"{a.eval_every} steps), on the same {2 * a.eval_batches}×{a.batch_size} held-out windows "
        "(nanoGPT's ckpt.pt evaluated by this script in nanoGPT's own model class). "
        "\"Own estimate\": nanoGPT averages random val batches; Ember's is the same-windows figure. "
        f"Per evaluation both spend {2 * a.eval_batches} forward batches (nanoGPT {a.eval_batches} train + "
        f"{a.eval_batches} val). Steps that paid for an evaluation or checkpoint are left out of the median.\n",
        results_dir=out.parent)
    print(f"\nWrote {out}.json and .md")


def git_commit(d: Path | None) -> str | None:
    if d is None:
        return None
    try:
        r = subprocess.run(["git", "-C", str(d), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return r.stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    main()
