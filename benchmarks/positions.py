"""Position schemes and norm placements, trained alike: which learns best, which reads longer text.

    python benchmarks/positions.py [--steps 600] [--corpus-mb 4] [--hidden 128] [--layers 4]

(about half an hour on 2 CPU cores with these defaults: eight runs of about three minutes and their evaluations)

One small decoder, trained once with each position scheme (a learned table, the original
transformer's sinusoids, rotary, ALiBi) and each norm placement (pre: x + f(norm(x)); post, the
original transformer's: norm(x + f(x))) — eight runs of `ember.train.pretrain` on the same data,
tokenizer, seed, optimizer, schedule and number of steps (the same tokens in the same order).

What is measured:
  * validation loss at the training length (`--block`), on the same held-out windows for all;
  * perplexity on held-out windows longer than any sequence seen in training (`--eval-lengths`,
    each a multiple of `--block`), over all their tokens and over only the tokens past the
    training length, where the schemes differ most: a learned table has untrained rows there,
    sinusoids and rotary angles take values never seen, ALiBi only penalises farther keys more;
  * training wall time (noisy on a shared machine; the runs are not timed in ABBA rounds because
    their quality, not their speed, is the point).
The model is GPT-2's block (LayerNorm, GELU MLP, biases, tied embeddings), dropout 0, its
position table (where learned) as long as the longest evaluation, every weight drawn at std
width^-0.5 (`--init-std`); sinusoidal runs scale the token embeddings by sqrt(width), as the paper
pairs them (`scale_embeddings`). One seed per contender: a
difference smaller than the seed-to-seed spread (a few hundredths of a nat at these sizes)
says nothing. Writes benchmarks/results/positions.{json,md} and positions.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, stamp, write_results  # noqa: E402

from ember.config import POSITION_EMBEDDINGS, ModelConfig  # noqa: E402
from ember.data import TokenShards, prepare_shards, stdlib_files  # noqa: E402
from ember.load import load_model  # noqa: E402
from ember.plot import read_metrics  # noqa: E402
from ember.tokenizer import train_tokenizer  # noqa: E402
from ember.train.loop import TrainConfig  # noqa: E402
from ember.train.pretrain import pretrain  # noqa: E402

NORMS = ("pre", "post")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=4.0, help="MB of the Python standard library to train on")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--hidden", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (the same for every run)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--block", type=int, default=128, help="training sequence length")
    p.add_argument("--eval-lengths", default="1,2,4", help="evaluation lengths as multiples of --block")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation length")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--init-std", type=float, default=None,
                   help="std of every initial weight (default: width^-0.5, the original transformer's scale; "
                   "at GPT-2's 0.02 the unit-scale sinusoids drown the small blocks' outputs for many steps)")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    p.add_argument("--out", default=str(RESULTS), help="where positions.{json,md,png} go")
    return p.parse_args(argv)


def prepare_data(work: Path, corpus_mb: float, vocab: int) -> Path:
    out = work / "data"
    if (out / "meta.json").exists():
        return out
    files = stdlib_files(max_bytes=int(corpus_mb * 1e6))
    tok = train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size=vocab)
    prepare_shards([str(f) for f in files], tok, out, val_fraction=0.05, progress=False)
    return out


def base_config(a: argparse.Namespace, max_len: int) -> ModelConfig:
    return ModelConfig(model_type="gpt2", hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                       max_position_embeddings=max_len, hidden_act="gelu", attention_bias=True,
                       o_proj_bias=True, mlp_bias=True, tie_word_embeddings=True,
                       initializer_range=a.init_std or a.hidden ** -0.5)


@torch.no_grad()
def long_context_losses(model, data: TokenShards, length: int, train_len: int, batch: int,
                        batches: int) -> dict[str, float]:
    """Mean next-token loss over held-out windows of `length` tokens: over all positions, and over
    the positions at or past `train_len` (none when the window is no longer than training's)."""
    total = beyond = 0.0
    n_total = n_beyond = 0
    for x, y in data.iter_eval_batches("val", batch, length, batches):
        losses = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        total, n_total = total + float(losses.sum()), n_total + losses.numel()
        if length > train_len:
            beyond, n_beyond = beyond + float(losses[:, train_len:].sum()), n_beyond + losses[:, train_len:].numel()
    out = {"loss": total / n_total, "ppl": math.exp(total / n_total)}
    if n_beyond:
        out.update(loss_beyond=beyond / n_beyond, ppl_beyond=math.exp(beyond / n_beyond))
    return out


def run_one(a, data_dir: Path, run_dir: Path, position: str, norm: str, max_len: int) -> dict:
    cfg = base_config(a, max_len).replace(position_embedding=position, norm_position=norm)
    train = TrainConfig(max_steps=a.steps, batch_size=a.batch, block_size=a.block, lr=a.lr, warmup_steps=a.warmup,
                        eval_every=max(1, a.steps // 10), save_every=0, log_every=max(1, a.steps // 100),
                        mixed_precision="off")
    start = time.perf_counter()
    last = pretrain(data_dir, run_dir, cfg, train, device="cpu", eval_batches=a.eval_batches, progress=False)
    seconds = time.perf_counter() - start
    model = load_model(run_dir / "model", device="cpu").eval()
    data = TokenShards(data_dir)
    lengths = {}
    for mult in [int(m) for m in a.eval_lengths.split(",")]:
        length = mult * a.block
        lengths[str(length)] = long_context_losses(model, data, length, a.block, max(1, a.batch // mult),
                                                   a.eval_batches * mult)
    curve = [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]
    return {"position_embedding": position, "norm_position": norm, "val_loss": last["val_loss"],
            "train_seconds": seconds, "parameters": model.num_parameters(), "by_length": lengths,
            "val_curve": curve}


def plot(results: list[dict], block: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    colors = dict(zip(POSITION_EMBEDDINGS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for r in results:
        style = "-" if r["norm_position"] == "pre" else "--"
        label = f"{r['position_embedding']}, {r['norm_position']}-LN"
        color = colors[r["position_embedding"]]
        steps, losses = zip(*r["val_curve"])
        left.plot(steps, losses, style, color=color, label=label, lw=1.4)
        lengths = sorted(int(k) for k in r["by_length"])
        right.plot(lengths, [r["by_length"][str(n)]["ppl"] for n in lengths], style, marker="o", color=color,
                   label=label, lw=1.4)
    left.set(xlabel="step", ylabel="validation loss (nats/token)", title=f"training at {block} tokens")
    right.axvline(block, color="gray", lw=0.8, ls=":")
    right.set(xlabel="evaluation length (tokens)", ylabel="perplexity (all tokens)", xscale="log", yscale="log",
              title="length extrapolation")
    right.set_xticks(sorted(int(k) for k in results[0]["by_length"]))
    right.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def markdown(result: dict, a: argparse.Namespace) -> str:
    lengths = sorted(int(k) for k in result["runs"][0]["by_length"])
    longer = [n for n in lengths if n > a.block]
    head = ["positions", "norm", f"val loss @{a.block}"] + [f"ppl @{n}" for n in lengths] + \
        [f"ppl past {a.block} @{n}" for n in longer] + ["train s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        cells = [r["position_embedding"], r["norm_position"], f"{r['val_loss']:.3f}"]
        cells += [f"{r['by_length'][str(n)]['ppl']:.1f}" for n in lengths]
        cells += [f"{r['by_length'][str(n)]['ppl_beyond']:.1f}" for n in longer]
        cells += [f"{r['train_seconds']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    s = result["setup"]
    return "\n".join([
        "# Position schemes and norm placements",
        "",
        f"One GPT-2-style decoder ({s['parameters']:,} parameters with the learned table; {a.layers} layers, width "
        f"{a.hidden}, {a.heads} heads), trained {a.steps} steps of {a.batch} x {a.block} tokens on {a.corpus_mb} MB of "
        f"the Python standard library ({a.vocab}-token BPE), same seed, data order, initial weights' std "
        f"{a.init_std or a.hidden ** -0.5:.3g}, lr {a.lr} and {a.warmup} warmup steps for every run; sinusoidal runs "
        "scale the token embeddings by sqrt(width), as the paper pairs them. Validation loss on the same held-out windows; perplexity on held-out windows "
        f"up to {lengths[-1]} tokens, longer than any training sequence ({a.block}).",
        "",
        *rows,
        "",
        "One seed per run: differences of a few hundredths of a nat are within seed-to-seed noise.",
        "",
        "![validation loss and length extrapolation](positions.png)",
    ])


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = [int(m) * a.block for m in a.eval_lengths.split(",")]
    max_len = max(lengths)
    out_dir = Path(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        data_dir = prepare_data(work, a.corpus_mb, a.vocab)
        runs = []
        for norm in NORMS:
            for position in POSITION_EMBEDDINGS:
                run_dir = work / f"{position}-{norm}"
                r = run_one(a, data_dir, run_dir, position, norm, max_len)
                print(f"{position:>10} {norm}-LN: val loss {r['val_loss']:.3f}, ppl by length "
                      + ", ".join(f"{n}: {v['ppl']:.1f}" for n, v in r["by_length"].items())
                      + f" ({r['train_seconds']:.0f} s)", flush=True)
                runs.append(r)
    result = stamp({"setup": {**vars(a), "parameters": max(r["parameters"] for r in runs)}, "runs": runs}, argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(runs, a.block, out_dir / "positions.png")
    write_results("positions", result, markdown(result, a), results_dir=out_dir)
    print(f"Wrote {out_dir / 'positions.json'}, positions.md and {png.name}")


if __name__ == "__main__":
    main()
