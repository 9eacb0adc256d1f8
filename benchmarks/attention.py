"""Attention memory and time: Ember's path (PyTorch SDPA's fused kernels) vs naive softmax(QK^T)V.

    python benchmarks/attention.py [--lengths 1024 4096 16384] [--heads 8] [--head-dim 64]

Causal self-attention over one sequence of T tokens, fp32 on the CPU. Each measurement runs
in a fresh process, so its peak resident memory (ru_maxrss) is that attention call's alone,
over the memory of the inputs. The naive version materialises the T x T score matrix per
head (4 * H * T^2 bytes, twice: scores and probabilities); the fused kernel works in tiles.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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
    return {"kind": kind, "T": T, "seconds": min(times), "peak_extra_mib": (peak - base) / 1024,
            "checksum": float(out.double().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.heads, args.head_dim, args.repeats)))
        return

    import torch

    rows = []
    for T in args.lengths:
        pair = {}
        for kind in ("ember", "naive"):
            cmd = [sys.executable, __file__, "--child", kind, str(T), "--heads", str(args.heads), "--head-dim",
                   str(args.head_dim), "--repeats", str(args.repeats)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                pair[kind] = {"kind": kind, "T": T, "error": r.stderr.strip().splitlines()[-1:]}
            else:
                pair[kind] = json.loads(r.stdout)
        e, n = pair["ember"], pair["naive"]
        row = {"T": T, "ember": e, "naive": n}
        if "error" not in e and "error" not in n:
            row["speedup"] = n["seconds"] / e["seconds"]
            row["memory_ratio"] = n["peak_extra_mib"] / max(e["peak_extra_mib"], 1e-9)
            row["max_abs_checksum_diff"] = abs(e["checksum"] - n["checksum"])
            print(f"T={T:6}  ember {e['seconds'] * 1e3:9.1f} ms {e['peak_extra_mib']:8.1f} MiB   naive "
                  f"{n['seconds'] * 1e3:9.1f} ms {n['peak_extra_mib']:8.1f} MiB   -> {row['speedup']:.2f}x faster, "
                  f"{row['memory_ratio']:.0f}x less memory", flush=True)
        rows.append(row)
    result = {"benchmark": "attention", "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
              "rows": rows, "machine": {"cpu": platform.processor() or platform.machine(),
                                        "threads": torch.get_num_threads(), "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Causal attention: fused SDPA vs naive (CPU, fp32)", "",
          f"One sequence, {args.heads} heads of {args.head_dim}; peak memory is the growth of the process's "
          "resident set during the call (fresh process each). Command: `python benchmarks/attention.py`.", "",
          "| tokens | Ember (SDPA) ms | Ember MiB | naive ms | naive MiB | speed-up | memory saved |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "speedup" in r:
            md.append(f"| {r['T']} | {r['ember']['seconds'] * 1e3:.1f} | {r['ember']['peak_extra_mib']:.0f} | "
                      f"{r['naive']['seconds'] * 1e3:.1f} | {r['naive']['peak_extra_mib']:.0f} | "
                      f"{r['speedup']:.2f}x | {r['memory_ratio']:.0f}x |")
        else:
            md.append(f"| {r['T']} | failed: {r['ember'].get('error') or r['naive'].get('error')} | | | | | |")
    (RESULTS / "attention.md").write_text("\n".join(md) + "\n")
    print(f"Wrote {RESULTS / 'attention.json'} and .md")


if __name__ == "__main__":
    main()
