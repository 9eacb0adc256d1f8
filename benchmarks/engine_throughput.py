"""Offline generation throughput: Ember's engine vs `transformers` on the same requests.

    python benchmarks/engine_throughput.py [--requests 32,128] [--preset llama-20m]

Three ways to serve the same random-length requests with the same random-weight model:
  1. Ember `LLM.generate` (paged KV cache, continuous batching, token budget);
  2. `transformers` `generate()` on padded static batches (a batch runs until its longest
     request is done; only the tokens each request asked for count);
  3. `transformers` `generate()` one request at a time.
A second workload measures prefix caching: every prompt shares a 1,000-token prefix.
Figures are output tokens per second, the median over rounds run in ABBA order with the spread
(min–max); a ratio is the median of each round's own ratio. Both systems run eagerly.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, abba, fmt, ratio_spread, spread, write_results  # noqa: E402
from ember.checkpoint import save_pretrained  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.cpu_inference import prepare_for_inference  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.model import CausalLM  # noqa: E402


def make_requests(n: int, vocab: int, seed: int, prompt_range=(16, 256), output_range=(16, 128)):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p = [rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_range))]
        reqs.append((p, rng.randint(*output_range)))
    return reqs


def run_ember(model, reqs, **engine_args) -> tuple[float, dict]:
    llm = LLM(model, **engine_args)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params)
    dt = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(m for _, m in reqs)
    return dt, {"prefix_hit_rate": llm.block_manager.hit_rate, "steps": llm.stats["steps"],
                "preemptions": llm.scheduler.num_preemptions}


def run_hf_static(hf, reqs, batch_size: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i:i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):  # left padding, as decoder-only generation needs
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        n = max(m for _, m in chunk)
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    return time.perf_counter() - t


def run_hf_one_by_one(hf, reqs) -> float:
    t = time.perf_counter()
    for p, m in reqs:
        with torch.no_grad():
            hf.generate(torch.tensor([p]), max_new_tokens=m, min_new_tokens=m, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    return time.perf_counter() - t


def measure_workload(model, plain, hf, n_requests: int, vocab: int, engine_args: dict, args) -> dict:
    """Time the four ways of serving `n_requests` random requests in ABBA rounds; ratios per round.
    `model` is prepared for CPU inference (as the engine prepares a model it loads itself);
    `plain` is the same model not prepared (PyTorch's kernels for every linear layer)."""
    reqs = make_requests(n_requests, vocab, args.seed)
    out_tokens = sum(m for _, m in reqs)
    # ABBA rounds (A B C D, D C B A, ...): the machine's speed drifts by several percent over a
    # minute, and the alternating order spreads that drift over every system alike.
    times: dict[str, list[float]] = {"ember": [], "ember_unprepared": [], "static": [], "one": []}
    sub = reqs[:args.one_by_one]
    one_tokens = sum(m for _, m in sub)
    info: dict = {}
    for rep, order in enumerate(abba(list(times), args.repeats)):
        for system in order:
            if system == "ember":
                dt, info = run_ember(model, reqs, **engine_args)
                times["ember"].append(dt)
            elif system == "ember_unprepared":
                times["ember_unprepared"].append(run_ember(plain, reqs, **engine_args)[0])
            elif system == "static":
                times["static"].append(run_hf_static(hf, reqs, args.static_batch))
            else:
                times["one"].append(run_hf_one_by_one(hf, sub))
        print(f"{n_requests} requests, round {rep + 1}/{args.repeats}: ember {out_tokens / times['ember'][-1]:.1f} "
              f"tok/s, not prepared {out_tokens / times['ember_unprepared'][-1]:.1f}, "
              f"static {out_tokens / times['static'][-1]:.1f}, 1-by-1 {one_tokens / times['one'][-1]:.1f}", flush=True)
    speed = {k: [(one_tokens if k == "one" else out_tokens) / t for t in v] for k, v in times.items()}
    rows = {
        "ember_engine": {"tokens_per_s": spread(speed["ember"]), **info},
        "ember_engine_unprepared": {"tokens_per_s": spread(speed["ember_unprepared"])},
        "hf_static_batches": {"tokens_per_s": spread(speed["static"]), "batch_size": args.static_batch},
        "hf_one_at_a_time": {"tokens_per_s": spread(speed["one"]), "requests_timed": len(sub)},
        "all_seconds": times,
    }
    ratios = {
        "engine_vs_hf_static": ratio_spread(speed["ember"], speed["static"]),
        "engine_vs_hf_one_at_a_time": ratio_spread(speed["ember"], speed["one"]),
        "prepared_for_inference_speedup": ratio_spread(speed["ember"], speed["ember_unprepared"]),
    }
    print(json.dumps({"requests": n_requests, **{k: v["median"] for k, v in ratios.items()}}), flush=True)
    return {"requests": n_requests, "output_tokens": out_tokens, "prompt_tokens": sum(len(p) for p, _ in reqs),
            "order": "ABBA", "results": rows, "ratios": ratios}


def workload_table(w: dict, static_batch: int) -> list[str]:
    rows, ratios = w["results"], w["ratios"]
    return ["| system | output tok/s | Ember's ratio |", "|---|---|---|",
            f"| Ember engine (paged KV, continuous batching) | {fmt(rows['ember_engine']['tokens_per_s'])} | 1.00 |",
            f"| Ember engine, model not prepared for CPU inference (no `prepare_for_inference`) | "
            f"{fmt(rows['ember_engine_unprepared']['tokens_per_s'])} | "
            f"{fmt(ratios['prepared_for_inference_speedup'], 2, 'x')} |",
            f"| transformers generate, static batches of {static_batch} | "
            f"{fmt(rows['hf_static_batches']['tokens_per_s'])} | {fmt(ratios['engine_vs_hf_static'], 2, 'x')} |",
            f"| transformers generate, one request at a time | {fmt(rows['hf_one_at_a_time']['tokens_per_s'])} | "
            f"{fmt(ratios['engine_vs_hf_one_at_a_time'], 2, 'x')} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-20m")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--requests", type=lambda v: [int(x) for x in v.split(",")], default=[32, 128],
                    help="comma-separated workload sizes, each timed on its own (default 32,128)")
    ap.add_argument("--one-by-one", type=int, default=8, help="requests timed one at a time (extrapolated)")
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="token budget a step (offline throughput: larger than the engine's serving default, 512)")
    ap.add_argument("--prefix-requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="rounds in ABBA order; the median counts")
    ap.add_argument("--out", default=None, help="results path without extension "
                    "(default results/engine_throughput, or engine_throughput_bf16 with --dtype bfloat16)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights, activations and KV cache of both systems (bfloat16 pays where the CPU "
                         "multiplies bf16 natively, e.g. AVX512-BF16 or AMX)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    import transformers

    torch.manual_seed(args.seed)
    cfg = preset(args.preset, vocab_size=args.vocab_size, max_position_embeddings=2048)
    model = CausalLM(cfg).eval()
    tmp = Path("/tmp/ember-bench-model")
    save_pretrained(model, None, tmp)
    model = model.to(dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    # The engine prepares a model it loads itself for CPU inference; this one is ours, so we do,
    # and keep the plain one for the comparison row.
    plain, model = model, prepare_for_inference(copy.deepcopy(model))
    engine_args = dict(block_size=16, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens)

    # Warm both systems up (first-call allocations, oneDNN weight packing) on a few requests,
    # so the timed runs measure steady-state serving.
    warm = make_requests(4, cfg.vocab_size, args.seed)
    run_ember(model, warm, **engine_args)
    run_hf_static(hf, warm, 4)

    workloads = [measure_workload(model, plain, hf, n, cfg.vocab_size, engine_args, args) for n in args.requests]

    # Shared 1,000-token prefix: prefix caching on vs off.
    rng = random.Random(args.seed + 1)
    prefix = [rng.randrange(1, cfg.vocab_size) for _ in range(1000)]
    shared = [(prefix + [rng.randrange(1, cfg.vocab_size) for _ in range(rng.randint(8, 32))], 16)
              for _ in range(args.prefix_requests)]
    caching: dict[str, list[float]] = {"on": [], "off": []}
    info_on: dict = {}
    for order in abba(["on", "off"], args.repeats):
        for mode in order:
            dt, info = run_ember(model, shared, enable_prefix_caching=mode == "on", **engine_args)
            caching[mode].append(dt)
            info_on = info if mode == "on" else info_on
    speedup = ratio_spread(caching["off"], caching["on"])
    print(f"shared 1000-token prefix: caching on / off -> {fmt(speedup, 2, 'x')}", flush=True)

    prefix = {"requests": args.prefix_requests, "prefix_tokens": 1000, "seconds_on": spread(caching["on"]),
              "seconds_off": spread(caching["off"]), "speedup": speedup, **info_on}
    result = {
        "benchmark": "engine_throughput", "model": {"preset": args.preset, "parameters": model.num_parameters(),
                                                    "vocab_size": cfg.vocab_size},
        "prompt_range": [16, 256], "output_range": [16, 128], "repeats": args.repeats, "order": "ABBA",
        "engine_args": engine_args, "workloads": workloads, "prefix_caching": prefix,
        "dtype": args.dtype, "transformers": transformers.__version__,
    }
    md = ["# Offline generation throughput (CPU)", "",
          f"Random-weight `{args.preset}` ({model.num_parameters() / 1e6:.1f}M parameters), random requests with "
          f"prompts of 16–256 tokens and outputs of 16–128 tokens (greedy, EOS ignored), {args.dtype} weights, "
          f"activations and KV cache in both systems, both eager, transformers {transformers.__version__}. "
          "The engine runs up to "
          f"{args.max_num_seqs} sequences at once with a budget of {args.max_num_batched_tokens} tokens a step. "
          f"{args.repeats} rounds in ABBA order: tok/s are medians (min–max), ratios the median of each round's "
          f"own ratio; one-at-a-time speed is timed on the first {args.one_by_one} requests.", ""]
    for w in workloads:
        md += [f"## {w['requests']} requests ({w['output_tokens']:,} output tokens, {w['prompt_tokens']:,} prompt "
               "tokens)", "", *workload_table(w, args.static_batch), ""]
    md += ["A short workload ends in a tail where only the longest requests are left, so the engine's batches "
           "shrink; a longer one keeps the batch full for most of its steps, which is what offline serving looks "
           "like.", "",
           f"Shared 1,000-token prefix, {args.prefix_requests} requests of 16 new tokens: prefix caching on "
           f"{fmt(prefix['seconds_on'])}s, off {fmt(prefix['seconds_off'])}s → **{fmt(speedup, 2, 'x')}** "
           f"(hit rate {info_on['prefix_hit_rate']:.2f}). "
           "Requests that start prefilling in the same step cannot yet hit the blocks the first of them is "
           "writing, so a larger step budget lowers the hit rate (and speeds up the run without caching)."]
    suffix = "" if args.dtype == "float32" else "_bf16"  # each dtype keeps its own results
    out = Path(args.out) if args.out else RESULTS / f"engine_throughput{suffix}"
    write_results(out.name, result, "\n".join(md), results_dir=out.parent)
    print(json.dumps({"workloads": [{"requests": w["requests"], **{k: v["median"] for k, v in w["ratios"].items()}}
                                    for w in workloads], "prefix_caching_speedup": speedup["median"]}, indent=2))


if __name__ == "__main__":
    main()
