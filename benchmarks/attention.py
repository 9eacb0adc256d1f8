"""Attention memory and time: Ember's path (PyTorch SDPA's fused kernels) vs naive softmax(QK^T)V.

    python benchmarks/attention.py [--lengths 1024 4096 16384] [--heads 8] [--head-dim 64]

Causal self-attention over one sequence of T tokens, fp32 on the CPU. Each measurement runs
in a fresh process, so its peak resident memory (ru_maxrss) is that attention call's alone,
over the memory of the inputs. The naive version materialises the T x T score matrix per
head (4 * H * T^2 bytes, twice: scores and probabilities); the fused kernel works in tiles.
The two run in ABBA rounds (--rounds); times are the median over rounds with their spread.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, abba, fmt, ratio_spread, spread, write_results


def measure(kind: str, T: int, H: int, D: int, repeats: int) -> dict:
    """Runs in a child process: time and peak-memory growth of one attention implementation."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ember.model import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def naive() -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) / D ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v

    fn = naive if kind == "naive" else (lambda: attention(q, k, v, causal=True))
    with torch.inference_mode():
        out = fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": kind, "T": T, "seconds": statistics.median(times), "peak_extra_mib": (peak - base) / 1024,
            "checksum": float(out.double().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per process (their median counts)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh-process rounds per length, ABBA order")
    ap.add_argument("--out", default=str(RESULTS / "attention"), help="results path without extension")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.heads, args.head_dim, args.repeats)))
        return

    rows = []
    for T in args.lengths:
        runs: dict[str, list[dict]] = {"ember": [], "naive": []}
        for order in abba(["ember", "naive"], args.rounds):
            for kind in order:
                cmd = [sys.executable, __file__, "--child", kind, str(T), "--heads", str(args.heads), "--head-dim",
                       str(args.head_dim), "--repeats", str(args.repeats)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                runs[kind].append({"kind": kind, "T": T, "error": r.stderr.strip().splitlines()[-1:]}
                                  if r.returncode != 0 else json.loads(r.stdout))
        row = {"T": T, "runs": runs}
        errors = [x["error"] for kind in runs for x in runs[kind] if "error" in x]
        if errors:
            row["error"] = errors[0]
        else:
            secs = {kind: [x["seconds"] for x in runs[kind]] for kind in runs}
            mib = {kind: [x["peak_extra_mib"] for x in runs[kind]] for kind in runs}
            row.update({"ember_seconds": spread(secs["ember"]), "naive_seconds": spread(secs["naive"]),
                        "ember_peak_mib": spread(mib["ember"]), "naive_peak_mib": spread(mib["naive"]),
                        "speedup": ratio_spread(secs["naive"], secs["ember"]),
                        "memory_ratio": statistics.median(n / max(e, 1e-9) for n, e in zip(mib["naive"], mib["ember"])),
                        "max_abs_checksum_diff": max(abs(e["checksum"] - n["checksum"])
                                                     for e, n in zip(runs["ember"], runs["naive"]))})
            print(f"T={T:6}  ember {fmt(row['ember_seconds'], 4)} s   naive {fmt(row['naive_seconds'], 4)} s   "
                  f"-> {fmt(row['speedup'], 2, 'x')} faster, {row['memory_ratio']:.0f}x less memory", flush=True)
        rows.append(row)
    result = {"benchmark": "attention", "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
              "rounds": args.rounds, "order": "ABBA", "rows": rows}
    md = ["# Causal attention: fused SDPA vs naive (CPU, fp32)", "",
          f"One sequence, {args.heads} heads of {args.head_dim}; peak memory is the growth of the process's "
          f"resident set during the call (a fresh process each run). {args.rounds} rounds in ABBA order; each "
          f"figure is the median over rounds (min–max), a round's time the median of {args.repeats} calls.", "",
          "| tokens | Ember (SDPA) ms | Ember MiB | naive ms | naive MiB | speed-up | memory saved |",
          "|---:|---|---:|---|---:|---|---:|"]
    ms = lambda x: {k: v * 1e3 if k != "rounds" else v for k, v in x.items()}  # noqa: E731
    for r in rows:
        if "error" not in r:
            md.append(f"| {r['T']} | {fmt(ms(r['ember_seconds']))} | {r['ember_peak_mib']['median']:.0f} | "
                      f"{fmt(ms(r['naive_seconds']))} | {r['naive_peak_mib']['median']:.0f} | "
                      f"{fmt(r['speedup'], 2, 'x')} | {r['memory_ratio']:.0f}x |")
        else:
            md.append(f"| {r['T']} | failed: {r['error']} | | | | | |")
    out = Path(args.out)
    print(f"Wrote {write_results(out.name, result, chr(10).join(md), results_dir=out.parent)} and .json")


if __name__ == "__main__":
    main()
