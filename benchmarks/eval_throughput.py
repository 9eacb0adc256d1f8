"""Multiple-choice evaluation throughput: Ember's in-process scorer vs lm-evaluation-harness's `hf` backend.

    python benchmarks/eval_throughput.py [--preset small] [--docs 60] [--tasks arc_easy hellaswag]

The same random-weight model (saved once, opened by both), the same documents, the same
(context, continuation) strings from Ember's task YAMLs. lm-eval's `HFLM.loglikelihood`
gets the requests as `Instance`s (its own tokenization, sorting, batching and one-token
continuation cache); Ember's `LocalLM` packs each context once with all its choices
(tree mask) and runs the LM head only where a choice token is predicted. Reported: choices
per second each (the median over ABBA rounds with the spread), the ratio (the median of each
round's own), and the largest per-choice log-likelihood difference and the accuracies of both
(they must agree). Both run eagerly. Needs `lm_eval` (pip install lm_eval).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, fmt, ratio_spread, run_rounds, spread, write_results  # noqa: E402
from ember.checkpoint import save_pretrained  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.eval.lm import LocalLM  # noqa: E402
from ember.eval.tasks import TaskConfig, build_context, encode_pair, load_split, render  # noqa: E402
from ember.model import CausalLM  # noqa: E402
from ember.tokenizer import train_tokenizer  # noqa: E402


def make_model(out: Path, name: str, vocab: int) -> Path:
    root = Path(__file__).resolve().parents[1]
    texts = [p.read_text(encoding="utf-8") for p in sorted((root / "ember").rglob("*.py"))] + [
        (root / "README.md").read_text(encoding="utf-8")]
    tok = train_tokenizer(texts, vocab_size=vocab)
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_position_embeddings=1024)
    save_pretrained(CausalLM(cfg), tok, out)
    return out


def task_requests(task: str, docs: int) -> tuple[list[tuple[str, str]], list[tuple[int, int, int]]]:
    cfg = TaskConfig.load(task)
    items = load_split(cfg, cfg.test_split)[:docs]
    pairs, spans = [], []
    for d in items:
        ctx = build_context(cfg, d, items, 0, random.Random(0))
        choices = [str(c) for c in render(cfg.doc_to_choice, d)]
        spans.append((len(pairs), len(pairs) + len(choices), int(render(cfg.doc_to_target, d))))
        pairs += [(ctx, cfg.target_delimiter + c) for c in choices]
    return pairs, spans


def accuracy(lls: list[float], spans: list[tuple[int, int, int]]) -> float:
    return sum(max(range(a, b), key=lambda i: lls[i]) - a == g for a, b, g in spans) / len(spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag"])
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per task, ABBA order")
    ap.add_argument("--work", default="/tmp/ember_eval_bench")
    ap.add_argument("--out", default=str(RESULTS / "eval_throughput"), help="results path without extension")
    args = ap.parse_args()

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model_dir = make_model(Path(args.work) / "model", args.preset, args.vocab)
    torch.set_grad_enabled(False)
    ours = LocalLM(model_dir)
    peer = HFLM(pretrained=str(model_dir), batch_size=args.hf_batch_size, device="cpu", dtype="float32")
    rows = []
    for task in args.tasks:
        pairs, spans = task_requests(task, args.docs)
        ours.loglikelihood([encode_pair(ours, *pairs[0])])  # warm-up, both sides
        peer.loglikelihood([Instance("loglikelihood", {}, pairs[0], 0)], disable_tqdm=True)
        scores: dict[str, list[float]] = {}

        def timed(name, score):
            def run() -> float:
                t = time.perf_counter()
                scores[name] = score()
                return len(pairs) / (time.perf_counter() - t)
            return run

        speeds = run_rounds({
            "ember": timed("ember", lambda: [r.logprob for r in ours.loglikelihood(
                [encode_pair(ours, c, x) for c, x in pairs])]),
            "lm_eval": timed("lm_eval", lambda: [r[0] for r in peer.loglikelihood(
                [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)]),
        }, args.rounds)
        mine, theirs = scores["ember"], scores["lm_eval"]
        row = {"task": task, "docs": len(spans), "choices": len(pairs), "order": "ABBA",
               "ember_choices_per_s": spread(speeds["ember"]), "lm_eval_hf_choices_per_s": spread(speeds["lm_eval"]),
               "ratio": ratio_spread(speeds["ember"], speeds["lm_eval"]),
               "max_abs_ll_diff": max(abs(a - b) for a, b in zip(mine, theirs)),
               "ember_acc": accuracy(mine, spans), "lm_eval_acc": accuracy(theirs, spans)}
        rows.append(row)
        print(json.dumps(row))

    meta = {"preset": args.preset, "vocab": args.vocab, "hf_batch_size": args.hf_batch_size, "rounds": args.rounds}
    lines = ["# Multiple-choice evaluation throughput: Ember in-process vs lm-eval `hf`", "",
             f"Model: random-weight preset `{args.preset}` (vocab {args.vocab}), float32 on CPU, both eager; "
             f"lm-eval `HFLM` batch size {args.hf_batch_size}. Same documents, same context/continuation strings. "
             f"{args.rounds} rounds in ABBA order: choices/s are medians (min–max), the ratio the median of each "
             "round's own.", "",
             "| task | docs | choices | Ember choices/s | lm-eval hf choices/s | Ember / lm-eval | max abs Δ ll "
             "| acc Ember | acc lm-eval |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['docs']} | {r['choices']} | {fmt(r['ember_choices_per_s'])} | "
                     f"{fmt(r['lm_eval_hf_choices_per_s'])} | {fmt(r['ratio'], 2, 'x')} | {r['max_abs_ll_diff']:.1e} | "
                     f"{r['ember_acc']:.3f} | {r['lm_eval_acc']:.3f} |")
    out = Path(args.out)
    write_results(out.name, {"meta": meta, "rows": rows}, "\n".join(lines), results_dir=out.parent)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
