"""Inter-token latency of running requests when a long prompt arrives: chunked prefill on vs off.

    python benchmarks/chunked_prefill.py [--preset llama-20m] [--long-prompt 1500]

Eight requests are decoding; then a long prompt arrives. Without chunked prefill the
engine computes the whole prompt in one step and every running request waits for it;
with chunked prefill the prompt is split over several steps that also carry the decodes,
so the worst inter-token gaps shrink. Reports mean, median and p99 inter-token latency
(vLLM's ITL) of the running requests, for both settings, from the same run: each figure the
median over ABBA rounds (chunked, unchunked; unchunked, chunked; ...) with its spread.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, abba, fmt, ratio_spread, spread, write_results  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.model import CausalLM  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run(model, chunked: bool, args, seed: int) -> dict:
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    llm = LLM(model, block_size=16, max_num_batched_tokens=args.budget, enable_chunked_prefill=chunked,
              num_kv_blocks=1024)
    running = []
    for _ in range(args.running):
        rid = llm.add_request([rng.randrange(1, vocab) for _ in range(32)],
                              SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True))
        running.append(llm.output_processor.requests[rid].seqs[0])
    steps = 0
    while llm.has_unfinished():
        if steps == args.arrive_after:
            llm.add_request([rng.randrange(1, vocab) for _ in range(args.long_prompt)],
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        llm.step()
        steps += 1
    gaps = [b - a for seq in running for a, b in zip(seq.token_times, seq.token_times[1:])]
    return {"mean_itl_ms": 1000 * statistics.mean(gaps), "median_itl_ms": 1000 * statistics.median(gaps),
            "p99_itl_ms": 1000 * percentile(gaps, 99), "max_itl_ms": 1000 * max(gaps), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-20m")
    ap.add_argument("--running", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--long-prompt", type=int, default=1500)
    ap.add_argument("--arrive-after", type=int, default=20, help="engine steps before the long prompt arrives")
    ap.add_argument("--budget", type=int, default=128, help="max_num_batched_tokens (the chunk size)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds, ABBA order")
    ap.add_argument("--out", default=str(RESULTS / "chunked_prefill"), help="results path without extension")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = CausalLM(preset(args.preset, vocab_size=4096, max_position_embeddings=2048)).eval()
    results: dict[str, list[dict]] = {"chunked": [], "unchunked": []}
    for r, order in enumerate(abba(["chunked", "unchunked"], args.repeats)):
        for name in order:  # a round's two runs see the same requests (seed r)
            results[name].append(run(model, name == "chunked", args, seed=r))
            print(name, json.dumps(results[name][-1]), flush=True)
    summary = {name: {k: spread([x[k] for x in runs]) for k in runs[0]} for name, runs in results.items()}
    ratio = ratio_spread([x["p99_itl_ms"] for x in results["unchunked"]], [x["p99_itl_ms"] for x in results["chunked"]])
    out = {"benchmark": "chunked_prefill", "args": vars(args), "order": "ABBA", "summary": summary, "runs": results,
           "p99_itl_unchunked_over_chunked": ratio}
    rows = ["# Chunked prefill: inter-token latency of running requests (CPU)", "",
            f"`{args.preset}` random weights, {args.running} requests decoding when a {args.long_prompt}-token prompt "
            f"arrives; token budget {args.budget}; median over {args.repeats} rounds in ABBA order (min–max).", "",
            "| prefill | mean ITL ms | median ITL ms | p99 ITL ms | max ITL ms |", "|---|---|---|---|---|"]
    for name in ("chunked", "unchunked"):
        s = summary[name]
        rows.append(f"| {name} | {fmt(s['mean_itl_ms'])} | {fmt(s['median_itl_ms'])} | {fmt(s['p99_itl_ms'])} | "
                    f"{fmt(s['max_itl_ms'])} |")
    rows += ["", f"Chunking lowers the p99 inter-token latency by **{fmt(ratio, 2, 'x')}** (the median of each "
             "round's own ratio)."]
    target = Path(args.out)
    write_results(target.name, out, "\n".join(rows), results_dir=target.parent)
    print(f"p99 ITL unchunked / chunked = {fmt(ratio, 2, 'x')}")


if __name__ == "__main__":
    main()
