"""Speculative decoding: speed-up over plain decoding, with identical greedy output.

    python benchmarks/speculative.py --target runs/quickstart/model --draft runs/draft/model

Make the two models with Ember itself, on the same tokenizer and data:
    ember quickstart --out runs/quickstart                       # the target, ~5.4M parameters
    ember pretrain --preset tiny --data runs/quickstart/data --out runs/draft --time-budget 6

Two workloads, each decoded greedily by the same engine with and without speculation:
  1. copy-heavy (what prompt lookup is for): the prompt holds a held-out source file, then
     its first lines again, so a good continuation copies the rest;
  2. free continuation of held-out source code (what a draft model is for).
Each runs at batch size 1 (single stream, the latency case) and with 16 concurrent requests,
plain and speculative in ABBA rounds (plain, ngram, draft; draft, ngram, plain; ...). The
figures are output tokens/s, the median over rounds with the spread (min–max); a speed-up is
the median of each round's own ratio; every speculative run must give exactly the plain run's
tokens. The target runs eagerly throughout; the draft model runs eager and, in a separate row,
with its lone-sequence steps compiled.
"""

from __future__ import annotations

import argparse
import random
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, abba, fmt, ratio_spread, spread, write_results  # noqa: E402
from ember.data import stdlib_files  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.load import load_model  # noqa: E402
from ember.tokenizer import load_tokenizer  # noqa: E402


def held_out_sources(n: int, seed: int) -> list[str]:
    """Source files of the stdlib's test suite, which the default corpus leaves out."""
    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))
    if not files:  # some installs ship without tests: fall back to the corpus itself
        files = stdlib_files()
    random.Random(seed).shuffle(files)
    texts = []
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 3000:
            texts.append(text)
        if len(texts) == n:
            break
    return texts


def copy_prompts(tok, n: int, seed: int, budget: int) -> list[list[int]]:
    prompts = []
    for text in held_out_sources(n, seed):
        ids = tok.encode(text)[:budget]
        prompts.append(ids + tok.encode("\n\n# The same code again:\n") + ids[:24])
    return prompts


def free_prompts(tok, n: int, seed: int) -> list[list[int]]:
    return [tok.encode(text)[:96] for text in held_out_sources(n, seed + 1)]


def run(llm: LLM, prompts: list[list[int]], max_tokens: int, concurrent: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), concurrent):
        outs = llm.generate(prompts[i:i + concurrent], params)
        outputs += [o.outputs[0].token_ids for o in outs]
    elapsed = time.perf_counter() - start
    return sum(map(len, outputs)) / elapsed, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target model directory")
    ap.add_argument("--draft", default=None, help="draft model directory (same tokenizer)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="tokens guessed per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="rounds in ABBA order; the median counts")
    ap.add_argument("--eager-draft", action="store_true", help="only the eager draft row (no compiled draft steps)")
    ap.add_argument("--out", default=str(RESULTS / "speculative"), help="results path without extension")
    args = ap.parse_args()

    tok = load_tokenizer(args.target)
    target = load_model(args.target, device="cpu", dtype="float32")
    draft = load_model(args.draft, device="cpu", dtype="float32") if args.draft else None
    context = target.config.max_position_embeddings
    workloads = {"copy": copy_prompts(tok, args.prompts, args.seed, context - args.max_tokens - 64),
                 "free": free_prompts(tok, args.prompts, args.seed)}
    # name -> engine arguments. Eager and compiled draft steps are separate rows: the target is
    # eager in every row, so only the eager draft compares like with like.
    methods = {"ngram": {"speculative": "ngram"}}
    if draft is not None:
        methods["draft, eager"] = {"speculative": draft, "compile_draft": False}
        if not args.eager_draft:
            methods["draft, compiled draft steps"] = {"speculative": draft, "compile_draft": True}
    engine = dict(block_size=16, num_kv_blocks=2048, max_num_batched_tokens=1024)
    for name, spec in methods.items():  # warm up: the compiled draft step compiles on first use
        for prompts in workloads.values():
            run(LLM(target, tok, num_speculative_tokens=args.k, **spec, **engine), prompts[:1], args.max_tokens, 1)
    rows = []
    for workload, prompts in workloads.items():
        for concurrent in (1, 16):
            n = len(prompts) if concurrent > 1 else min(4, len(prompts))
            # ABBA rounds, and the median of each round's ratio counts: the machine's speed drifts
            # by 10-30% within minutes.
            speeds: dict[str, list[float]] = {name: [] for name in ["plain", *methods]}
            found = {name: {"identical": True} for name in methods}
            for order in abba(list(speeds), args.rounds):
                outputs = {}
                for name in order:
                    spec = {} if name == "plain" else {"num_speculative_tokens": args.k, **methods[name]}
                    llm = LLM(target, tok, **spec, **engine)
                    tps, outputs[name] = run(llm, prompts[:n], args.max_tokens, concurrent)
                    speeds[name].append(tps)
                    if name != "plain":
                        found[name]["acceptance_rate"] = llm.spec_acceptance_rate
                        found[name]["mean_accepted_length"] = llm.spec_mean_accepted_length
                    print(f"{workload:5} c={concurrent:<3} {name:28} {tps:7.1f} tok/s", flush=True)
                for name in methods:
                    found[name]["identical"] &= outputs[name] == outputs["plain"]
            for name, f in found.items():
                rows.append({"workload": workload, "concurrent": concurrent, "method": name,
                             "plain_tok_s": spread(speeds["plain"]), "spec_tok_s": spread(speeds[name]),
                             "speedup": ratio_spread(speeds[name], speeds["plain"]), "identical": f["identical"],
                             "acceptance_rate": f["acceptance_rate"],
                             "mean_accepted_length": f["mean_accepted_length"]})
    result = {"benchmark": "speculative", "target": {"path": args.target, "parameters": target.num_parameters()},
              "draft": {"path": args.draft, "parameters": draft.num_parameters()} if draft else None,
              "k": args.k, "max_tokens": args.max_tokens, "rounds": args.rounds, "order": "ABBA", "rows": rows}
    size = (f"target {target.num_parameters() / 1e6:.1f}M parameters"
            + (f", draft {draft.num_parameters() / 1e6:.2f}M ({target.num_parameters() / draft.num_parameters():.0f}x "
               "smaller)" if draft else ""))
    md = ["# Speculative decoding (CPU)", "",
          f"{size}; greedy, {args.max_tokens} new tokens, k = {args.k}. {args.rounds} rounds in ABBA order; tok/s "
          "are medians (min–max), a speed-up the median of each round's own ratio. The target runs eagerly in "
          "every row; 'compiled draft steps' compiles the draft's steps for a lone sequence.", "",
          "| workload | concurrent | method | plain tok/s | speculative tok/s | speed-up | acceptance | "
          "tokens/step | identical |", "|---|---:|---|---|---|---|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['workload']} | {r['concurrent']} | {r['method']} | {fmt(r['plain_tok_s'])} | "
                  f"{fmt(r['spec_tok_s'])} | **{fmt(r['speedup'], 2, 'x')}** | {r['acceptance_rate']:.2f} | "
                  f"{r['mean_accepted_length']:.2f} | {'yes' if r['identical'] else 'NO'} |")
    out = Path(args.out)
    print(f"Wrote {write_results(out.name, result, chr(10).join(md), results_dir=out.parent)} and .json")


if __name__ == "__main__":
    main()
