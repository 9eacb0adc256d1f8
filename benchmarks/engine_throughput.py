"""Offline generation throughput: Ember's engine vs `transformers` on the same requests.

    python benchmarks/engine_throughput.py [--requests 32,128] [--preset llama-20m]

Three ways to serve the same random-length requests with the same random-weight model:
  1. Ember `LLM.generate` (paged KV cache, continuous batching, token budget);
  2. `transformers` `generate()` on padded static batches (a batch runs until its longest
     request is done; only the tokens each request asked for count);
  3. `transformers` `generate()` one request at a time.
A second workload measures prefix caching: every prompt shares a 1,000-token prefix.
Figures are output tokens per second; ratios are what to read (the machines are noisy).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.checkpoint import save_pretrained  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.cpu_inference import prepare_for_inference  # noqa: E402
from ember.device import cpu_name  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.model import CausalLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
    """Time the four ways of serving `n_requests` random requests; ratios per interleaved repeat.
    `model` is prepared for CPU inference (as the engine prepares a model it loads itself);
    `plain` is the same model not prepared (PyTorch's kernels for every linear layer)."""
    reqs = make_requests(n_requests, vocab, args.seed)
    out_tokens = sum(m for _, m in reqs)
    # Interleaved repeats, median time per system: the machine's speed drifts by several
    # percent over a minute, and interleaving spreads that drift over every system alike.
    times: dict[str, list[float]] = {"ember": [], "ember_unprepared": [], "static": [], "one": []}
    sub = reqs[:args.one_by_one]
    one_tokens = sum(m for _, m in sub)
    info: dict = {}
    for rep in range(args.repeats):
        dt, info = run_ember(model, reqs, **engine_args)
        times["ember"].append(dt)
        times["ember_unprepared"].append(run_ember(plain, reqs, **engine_args)[0])
        times["static"].append(run_hf_static(hf, reqs, args.static_batch))
        times["one"].append(run_hf_one_by_one(hf, sub))
        print(f"{n_requests} requests, repeat {rep + 1}/{args.repeats}: ember {out_tokens / times['ember'][-1]:.1f} "
              f"tok/s, not prepared {out_tokens / times['ember_unprepared'][-1]:.1f}, "
              f"static {out_tokens / times['static'][-1]:.1f}, 1-by-1 {one_tokens / times['one'][-1]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {
        "ember_engine": {"seconds": med["ember"], "tokens_per_s": out_tokens / med["ember"], **info},
        "ember_engine_unprepared": {"seconds": med["ember_unprepared"],
                                    "tokens_per_s": out_tokens / med["ember_unprepared"]},
        "hf_static_batches": {"seconds": med["static"], "tokens_per_s": out_tokens / med["static"],
                              "batch_size": args.static_batch},
        "hf_one_at_a_time": {"seconds_for_subset": med["one"], "tokens_per_s": one_tokens / med["one"],
                             "requests_timed": len(sub)},
        "all_seconds": times,
    }

    # Each ratio is the median of the repeats' own ratios: within a repeat the systems run a
    # few seconds apart, so the machine's drift over the whole run cancels out.
    def per_repeat(f) -> float:
        return statistics.median(f(i) for i in range(args.repeats))

    ratios = {
        "engine_vs_hf_static": per_repeat(lambda i: times["static"][i] / times["ember"][i]),
        "engine_vs_hf_one_at_a_time": per_repeat(
            lambda i: (out_tokens / times["ember"][i]) / (one_tokens / times["one"][i])),
        "prepared_for_inference_speedup": per_repeat(lambda i: times["ember_unprepared"][i] / times["ember"][i]),
    }
    print(json.dumps({"requests": n_requests, **ratios}), flush=True)
    return {"requests": n_requests, "output_tokens": out_tokens, "prompt_tokens": sum(len(p) for p, _ in reqs),
            "results": rows, "ratios": ratios}


def workload_table(w: dict, static_batch: int) -> list[str]:
    rows, ratios = w["results"], w["ratios"]
    return ["| system | output tok/s | Ember's ratio |", "|---|---:|---:|",
            f"| Ember engine (paged KV, continuous batching) | {rows['ember_engine']['tokens_per_s']:.1f} | 1.00 |",
            f"| Ember engine, model not prepared for CPU inference (no `prepare_for_inference`) | "
            f"{rows['ember_engine_unprepared']['tokens_per_s']:.1f} | {ratios['prepared_for_inference_speedup']:.2f}x |",
            f"| transformers generate, static batches of {static_batch} | "
            f"{rows['hf_static_batches']['tokens_per_s']:.1f} | {ratios['engine_vs_hf_static']:.2f}x |",
            f"| transformers generate, one request at a time | {rows['hf_one_at_a_time']['tokens_per_s']:.1f} | "
            f"{ratios['engine_vs_hf_one_at_a_time']:.2f}x |"]


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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median time counts")
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
    on, info_on = run_ember(model, shared, enable_prefix_caching=True, **engine_args)
    off, _ = run_ember(model, shared, enable_prefix_caching=False, **engine_args)
    print(f"shared 1000-token prefix: caching on {on:.1f}s, off {off:.1f}s -> {off / on:.2f}x", flush=True)

    prefix = {"requests": args.prefix_requests, "prefix_tokens": 1000, "seconds_on": on, "seconds_off": off,
              "speedup": off / on, **info_on}
    result = {
        "benchmark": "engine_throughput", "model": {"preset": args.preset, "parameters": model.num_parameters(),
                                                    "vocab_size": cfg.vocab_size},
        "prompt_range": [16, 256], "output_range": [16, 128], "repeats": args.repeats,
        "engine_args": engine_args, "workloads": workloads, "prefix_caching": prefix,
        "dtype": args.dtype,
        "machine": {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.dtype == "float32" else "_bf16"  # each dtype keeps its own results
    (RESULTS / f"engine_throughput{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    sizes = ",".join(str(n) for n in args.requests)
    md = ["# Offline generation throughput (CPU)", "",
          f"Random-weight `{args.preset}` ({model.num_parameters() / 1e6:.1f}M parameters), random requests with "
          f"prompts of 16–256 tokens and outputs of 16–128 tokens (greedy, EOS ignored), {torch.get_num_threads()} "
          f"threads on {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {args.dtype} weights, activations "
          f"and KV cache in both systems, torch {torch.__version__}, transformers {transformers.__version__}. "
          "The engine runs up to "
          f"{args.max_num_seqs} sequences at once with a budget of {args.max_num_batched_tokens} tokens a step. "
          f"{args.repeats} interleaved repeats: tok/s are medians, ratios the median of each repeat's own ratio; "
          f"one-at-a-time speed is timed on the first {args.one_by_one} requests. "
          f"Command: `python benchmarks/engine_throughput.py --requests {sizes} --dtype {args.dtype}`.", ""]
    for w in workloads:
        md += [f"## {w['requests']} requests ({w['output_tokens']:,} output tokens, {w['prompt_tokens']:,} prompt "
               "tokens)", "", *workload_table(w, args.static_batch), ""]
    md += ["A short workload ends in a tail where only the longest requests are left, so the engine's batches "
           "shrink; a longer one keeps the batch full for most of its steps, which is what offline serving looks "
           "like.", "",
           f"Shared 1,000-token prefix, {args.prefix_requests} requests of 16 new tokens: prefix caching on "
           f"{on:.1f}s, off {off:.1f}s → **{off / on:.2f}x** (hit rate {info_on['prefix_hit_rate']:.2f}). "
           "Requests that start prefilling in the same step cannot yet hit the blocks the first of them is "
           "writing, so a larger step budget lowers the hit rate (and speeds up the run without caching).", ""]
    (RESULTS / f"engine_throughput{suffix}.md").write_text("\n".join(md))
    print(json.dumps({"workloads": [{"requests": w["requests"], **w["ratios"]} for w in workloads],
                      "prefix_caching_speedup": off / on}, indent=2))


if __name__ == "__main__":
    main()
