"""Multiple-choice evaluation throughput: Ember's in-process scorer vs lm-evaluation-harness's `hf` backend.

    python benchmarks/eval_throughput.py [--preset small] [--docs 60] [--tasks arc_easy hellaswag]

The same random-weight model (saved once, opened by both), the same documents, the same
(context, continuation) strings from Ember's task YAMLs. lm-eval's `HFLM.loglikelihood`
gets the requests as `Instance`s (its own tokenization, sorting, batching and one-token
continuation cache); Ember's `LocalLM` packs each context once with all its choices
(tree mask) and runs the LM head only where a choice token is predicted. Reported: choices
per second each, the ratio, and the largest per-choice log-likelihood difference and the
accuracies of both (they must agree). Needs `lm_eval` (pip install lm_eval).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.checkpoint import save_pretrained  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.eval.lm import LocalLM  # noqa: E402
from ember.eval.tasks import TaskConfig, build_context, encode_pair, load_split, render  # noqa: E402
from ember.model import CausalLM  # noqa: E402
from ember.tokenizer import train_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
    ap.add_argument("--work", default="/tmp/ember_eval_bench")
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
        t = time.perf_counter()
        mine = [r.logprob for r in ours.loglikelihood([encode_pair(ours, c, x) for c, x in pairs])]
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        theirs = [r[0] for r in peer.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                                   disable_tqdm=True)]
        t_peer = time.perf_counter() - t
        row = {"task": task, "docs": len(spans), "choices": len(pairs),
               "ember_choices_per_s": len(pairs) / t_ours, "lm_eval_hf_choices_per_s": len(pairs) / t_peer,
               "ratio": t_peer / t_ours, "max_abs_ll_diff": max(abs(a - b) for a, b in zip(mine, theirs)),
               "ember_acc": accuracy(mine, spans), "lm_eval_acc": accuracy(theirs, spans)}
        rows.append(row)
        print(json.dumps(row))

    meta = {"preset": args.preset, "vocab": args.vocab, "hf_batch_size": args.hf_batch_size,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Multiple-choice evaluation throughput: Ember in-process vs lm-eval `hf`", "",
             f"Model: random-weight preset `{args.preset}` (vocab {args.vocab}), float32 on CPU "
             f"({meta['threads']} threads); lm-eval `HFLM` batch size {args.hf_batch_size}. "
             "Same documents, same context/continuation strings. Command: `python benchmarks/eval_throughput.py`.", "",
             "| task | docs | choices | Ember choices/s | lm-eval hf choices/s | Ember / lm-eval | max abs Δ ll "
             "| acc Ember | acc lm-eval |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['docs']} | {r['choices']} | {r['ember_choices_per_s']:.1f} | "
                     f"{r['lm_eval_hf_choices_per_s']:.1f} | {r['ratio']:.2f}x | {r['max_abs_ll_diff']:.1e} | "
                     f"{r['ember_acc']:.3f} | {r['lm_eval_acc']:.3f} |")
    (RESULTS / "eval_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
