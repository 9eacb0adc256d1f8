"""One timing of one case, in a fresh process, for benchmarks/redesign_ab.py.

    PYTHONPATH=<tree> python benchmarks/redesign_ab_child.py --side before|after --case CASE --model DIR

`ember` is imported from PYTHONPATH (the tree under test), so this script imports nothing from
benchmarks/ (common.py would put this checkout first on sys.path). Each side drives its own API
the way its own CLI and engine do:
- before (ecddf4a): `generate_ids(model, ids, max_new_tokens=, temperature=)`, which wraps its
  steps in `packed_linears` itself; `LLM(dir)` packs the weights of a model it loads (pack_weights
  defaults to on for a directory).
- after: `prepare_for_inference(model)` once after loading (as `ember generate` does), then
  `generate_ids(model, ids, SamplingParams(...))`; `LLM(dir)` prepares the model it loads.
Prints one JSON line: tokens/s, the greedy token ids, and for speculation the acceptance rate.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import ember
from ember.engine import LLM, SamplingParams
from ember.generation import generate_ids
from ember.quant import quantize_model

DECODE_CASES = ("decode-fp32-eager", "decode-fp32-compiled", "decode-int8-eager", "decode-int4-eager")
CASES = (*DECODE_CASES, "engine", "speculative-ngram")


def load(side: str, path: str):
    # The two trees name their loader's module differently; only the side's own exists.
    if side == "before":
        from ember.checkpoint import load_model
    else:
        from ember.load import load_model
    return load_model(path, device="cpu", dtype="float32").eval()


def decode_prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def decode(side: str, case: str, path: str, prompt_tokens: int, new_tokens: int, seed: int,
           warmup_tokens: int) -> dict:
    """Batch-1 greedy decode tokens/s from the first new token to the last (prefill excluded), after
    a warm-up generation on the prompt's first `warmup_tokens` tokens, or on all of it when 0
    (which compiles the step for the compiled case)."""
    model = load(side, path)
    method = case.split("-")[1]
    if method in ("int8", "int4"):
        model = quantize_model(model, method)
    compile = case.endswith("compiled")
    if side == "before":
        def gen(ids, n):
            return generate_ids(model, ids, max_new_tokens=n, temperature=0.0, compile=compile)
    else:
        from ember.cpu_inference import prepare_for_inference  # the after tree only

        model = prepare_for_inference(model)

        def gen(ids, n):
            return generate_ids(model, ids, SamplingParams(max_tokens=n, temperature=0.0), compile=compile)
    prompt = decode_prompt(model.config.vocab_size, prompt_tokens, seed)
    list(gen(prompt[:warmup_tokens or None], 4))  # its cache rounds to the same 256 slots as the timed run's
    stamps, ids = [], []
    for tok in gen(prompt, new_tokens):
        stamps.append(time.perf_counter())
        ids.append(tok)
    return {"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "ids": [ids]}


def engine_requests(vocab: int, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(32, 128))] for _ in range(n)]
    return prompts, [rng.randint(32, 64) for _ in range(n)]


def engine(path: str, requests: int, seed: int) -> dict:
    """Output tokens/s of `LLM(dir)` on `requests` random prompts submitted at once."""
    llm = LLM(path)
    vocab = llm.model.config.vocab_size
    prompts, lengths = engine_requests(vocab, requests, seed)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return {"tok_s": sum(map(len, ids)) / elapsed, "ids": ids}


def copy_prompt(vocab: int, seed: int) -> list[int]:
    """A 96-token passage, the passage again, then its first 16 tokens: prompt lookup finds
    matches wherever the output follows the passage."""
    rng = random.Random(seed + 1)
    passage = [rng.randrange(vocab) for _ in range(96)]
    return passage + passage + passage[:16]


def speculative(path: str, new_tokens: int, k: int, seed: int) -> dict:
    """Batch-1 tokens/s of `LLM(dir, speculative="ngram")` on the copy-heavy prompt, prefill included."""
    llm = LLM(path, speculative="ngram", num_speculative_tokens=k)
    prompt = copy_prompt(llm.model.config.vocab_size, seed)
    llm.generate([prompt[:16]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    before = dict(llm.stats)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([prompt], params)
    elapsed = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    proposed = llm.stats["spec_proposed_tokens"] - before["spec_proposed_tokens"]
    accepted = llm.stats["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    return {"tok_s": sum(map(len, ids)) / elapsed, "ids": ids, "proposed": proposed, "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("before", "after"), required=True)
    ap.add_argument("--case", choices=CASES, required=True)
    ap.add_argument("--model", required=True, help="the model directory both sides load")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-tokens", type=int, default=16, help="decode warm-up prompt length (0: the whole prompt)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.case in DECODE_CASES:
        out = decode(args.side, args.case, args.model, args.prompt_tokens, args.new_tokens, args.seed,
                     args.warmup_tokens)
    elif args.case == "engine":
        out = engine(args.model, args.requests, args.seed)
    else:
        out = speculative(args.model, args.new_tokens, args.k, args.seed)
    out["ember"] = str(Path(ember.__file__).resolve().parents[1])  # which tree was imported
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
