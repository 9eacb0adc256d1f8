"""Before and after issue 21's redesign: the engine, quantization and speculative speeds, A/B.

    python benchmarks/redesign_ab.py [--rounds 5] [--before ecddf4a]

Checks the before-revision out into a temporary git worktree, saves one random-weight model
(preset llama-20m) with this tree's save_pretrained into a temporary directory, and for each case
runs benchmarks/redesign_ab_child.py as a fresh process once with PYTHONPATH=<before tree> and
once with PYTHONPATH=<this tree>, in ABBA order over the rounds (before, after; after, before; ...).
Each side drives its own API the way its own CLI and engine do (see the child's docstring). Cases:
batch-1 greedy decode tokens/s (prefill excluded) for fp32 eager, fp32 compiled, int8 and int4
eager; engine output tokens/s on 32 random requests; ngram speculation at batch 1 on a copy-heavy
prompt. Every run's greedy token ids are compared between the sides. Writes
benchmarks/results/redesign_ab.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, abba, fmt, ratio_spread, spread, write_results  # noqa: E402
from ember.checkpoint import save_pretrained  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.model import CausalLM  # noqa: E402

CHILD = Path(__file__).resolve().parent / "redesign_ab_child.py"
CASES = ("decode-fp32-eager", "decode-fp32-compiled", "decode-int8-eager", "decode-int4-eager",
         "engine", "speculative-ngram")
DESCRIBE = {
    "decode-fp32-eager": "batch-1 greedy decode, fp32, eager",
    "decode-fp32-compiled": "batch-1 greedy decode, fp32, compiled step",
    "decode-int8-eager": "batch-1 greedy decode, int8 weights, eager",
    "decode-int4-eager": "batch-1 greedy decode, int4 weights, eager",
    "engine": "engine: {requests} requests at once (prompt 32–128, 32–64 new tokens)",
    "speculative-ngram": "engine, ngram speculation (k = 4), batch 1, copy-heavy prompt",
}


def child(tree: Path, case: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """One fresh process timing `case` with `tree`'s ember; its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(CHILD), "--side", "before" if tree != REPO else "after", "--case", case,
           "--model", str(model_dir), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--requests", str(args.requests), "--seed", str(args.seed),
           "--warmup-tokens", str(args.warmup_tokens)]
    proc = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{case} with {tree} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(out["ember"]) != tree.resolve():
        raise SystemExit(f"{case}: the child imported ember from {out['ember']}, not {tree}")
    return out


def verdict(ratio: dict, before: dict) -> str:
    """'within noise' when the paired ratio's spread includes 1.0 or the median after/before
    lies within the before side's own spread; otherwise which way and by how much."""
    relative = (before["min"] / before["median"], before["max"] / before["median"])
    if ratio["min"] <= 1.0 <= ratio["max"] or relative[0] <= ratio["median"] <= relative[1]:
        return "within noise"
    change = (ratio["median"] - 1.0) * 100
    return f"{'faster' if change > 0 else 'slower'} by {abs(change):.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="ecddf4a", help="the revision before the redesign")
    ap.add_argument("--rounds", type=int, default=5, help="rounds in ABBA order; the medians count")
    ap.add_argument("--preset", default="llama-20m", help="the random-weight model's shape")
    ap.add_argument("--vocab", type=int, default=8192, help="the model's vocabulary size")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="decode cases' prompt length")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode and speculative cases' new tokens")
    ap.add_argument("--warmup-tokens", type=int, default=16,
                    help="decode cases' warm-up prompt length, 0 for the whole prompt (as benchmarks/quant.py: 16)")
    ap.add_argument("--requests", type=int, default=32, help="the engine case's requests")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results path without extension (default results/redesign_ab)")
    args = ap.parse_args()
    # A terminated run still removes its worktree and its running child (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"Unknown case(s): {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}.")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.before], capture_output=True, text=True,
                            check=True).stdout.strip()
    after_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "ember"],
                                capture_output=True, text=True, check=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="redesign_ab_") as tmp:
        before_tree, model_dir = Path(tmp) / "before", Path(tmp) / "model"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree), commit],
                       check=True, capture_output=True)
        try:
            torch.manual_seed(args.seed)
            model = CausalLM(preset(args.preset, vocab_size=args.vocab)).eval()
            save_pretrained(model, None, model_dir)
            parameters = model.num_parameters()
            del model
            trees = {"before": before_tree, "after": REPO}
            # Untimed: builds each side's C++ kernel and fills each side's compiled-graph cache.
            for name in trees:
                if "decode-fp32-compiled" in cases:
                    child(trees[name], "decode-fp32-compiled", model_dir, args)
                else:
                    child(trees[name], cases[0], model_dir, args)
            rows = []
            for case in cases:
                runs: dict[str, list[dict]] = {"before": [], "after": []}
                for order in abba(["before", "after"], args.rounds):
                    for name in order:
                        runs[name].append(child(trees[name], case, model_dir, args))
                        print(f"{case:22} {name:6} {runs[name][-1]['tok_s']:8.1f} tok/s", flush=True)
                speeds = {name: [r["tok_s"] for r in rs] for name, rs in runs.items()}
                ids = {name: [r["ids"] for r in rs] for name, rs in runs.items()}
                identical = all(b == ids["before"][0] for b in ids["before"] + ids["after"])
                if not identical:
                    print(f"!!! {case}: the greedy token ids differ between before and after !!!", flush=True)
                row = {"case": case, "description": DESCRIBE[case].format(requests=args.requests),
                       "before_tok_s": spread(speeds["before"]), "after_tok_s": spread(speeds["after"]),
                       "ratio": ratio_spread(speeds["after"], speeds["before"]),
                       "before_rounds": speeds["before"], "after_rounds": speeds["after"],
                       "identical_ids": identical,
                       "first_mismatch": None if identical else first_mismatch(ids["before"][0], ids["after"][0])}
                row["verdict"] = verdict(row["ratio"], row["before_tok_s"])
                if case == "speculative-ngram":
                    row["acceptance_rate"] = {name: spread([r["acceptance_rate"] for r in rs])
                                              for name, rs in runs.items()}
                    row["proposed_tokens"] = {name: rs[0]["proposed"] for name, rs in runs.items()}
                rows.append(row)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                           check=False, capture_output=True)
    result = {"benchmark": "redesign_ab", "before": commit, "after": after_commit,
              "after_has_uncommitted_ember_changes": dirty,
              "model": {"preset": args.preset, "vocab_size": args.vocab, "parameters": parameters,
                        "weights": "random, saved once with the after tree's save_pretrained"},
              "prompt_tokens": args.prompt_tokens, "warmup_tokens": args.warmup_tokens, "new_tokens": args.new_tokens,
              "requests": args.requests,
              "rounds": args.rounds, "order": "ABBA, one fresh process per run", "rows": rows}
    md = markdown(result)
    out = Path(args.out) if args.out else None
    path = (write_results(out.name, result, md, results_dir=out.parent) if out
            else write_results("redesign_ab", result, md))
    print(f"Wrote {path} and .json")


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> dict:
    """Where two runs' token ids first part: the sequence and the position."""
    for s, (x, y) in enumerate(zip(a, b)):
        for i, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return {"sequence": s, "position": i}
        if len(x) != len(y):
            return {"sequence": s, "position": min(len(x), len(y))}
    return {"sequence": min(len(a), len(b)), "position": 0}


def markdown(result: dict) -> str:
    m = result["model"]
    lines = [
        "# Issue 21's redesign, before and after (CPU)", "",
        f"Before: `{result['before'][:10]}`; after: `{result['after'][:10]}`"
        + (" (with uncommitted changes under ember/)" if result["after_has_uncommitted_ember_changes"] else "")
        + f". Model: random-weight `{m['preset']}` with a {m['vocab_size']}-token vocabulary "
        f"({m['parameters'] / 1e6:.1f}M parameters), saved once by the after tree and loaded by both. Each run is "
        f"a fresh process with one tree on PYTHONPATH, driving that tree's own API as its CLI and engine do; "
        f"{result['rounds']} rounds in ABBA order (before, after; after, before; ...). tok/s are medians (min–max) "
        "over rounds; after/before is the median of each round's own ratio (the pair ran seconds apart), with its "
        "spread. Decode rows: batch 1, greedy, prompt "
        f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, timed from the first new token to the "
        "last (prefill excluded) after a warm-up generation on "
        + (f"the prompt's first {result['warmup_tokens']} tokens" if result["warmup_tokens"] else "the whole prompt")
        + "; the compiled row is compiled against compiled, the "
        "others eager against eager. Engine rows time `generate` after a warm-up request, prefill included.", "",
        "The verdict says 'within noise' when the ratio's spread includes 1.0 or its median lies within the before "
        "side's own spread (relative to its median); otherwise which way and by how much. ABBA pairs absorb the "
        "machine's drift (it is shared and noisy), but not every spike.", "",
        "| case | before tok/s | after tok/s | after/before | verdict | same greedy ids |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        same = "yes" if r["identical_ids"] else f"**NO** (first at {r['first_mismatch']})"
        lines.append(f"| {r['description']} | {fmt(r['before_tok_s'])} | {fmt(r['after_tok_s'])} | "
                     f"**{fmt(r['ratio'], 3, 'x')}** | {r['verdict']} | {same} |")
    for r in result["rows"]:
        if r["case"] == "speculative-ngram":
            acc = r["acceptance_rate"]
            lines += ["", f"Speculation: acceptance rate before {fmt(acc['before'], 2)}, after {fmt(acc['after'], 2)} "
                      f"({r['proposed_tokens']['before']} and {r['proposed_tokens']['after']} tokens proposed in "
                      "round 1)."]
            if max(acc["before"]["max"], acc["after"]["max"]) < 0.05:
                lines.append("The acceptance rate is about 0: a random-weight model's greedy output does not "
                             "follow the repeated passage, so prompt lookup's guesses are rejected and this row "
                             "measures the cost of proposing and verifying, not the gain of accepted guesses.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
