"""`ember eval perplexity|run|diff|compare|judge|groundedness|consistency|safety|report ...`: thin handlers over ember.eval's library functions.

Only argparse, the standard library and Ember's torch-free leaves (errors, files) are imported at module
level, so `ember --help` stays fast; each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.files import read_jsonl


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="an Ember or Hugging Face checkpoint directory or a .gguf file (llama.cpp's format; Q4_0/Q4_1 blocks kept as int4, Q8_0 as int8, F16 as fp16, other types decoded to float), scored in this process")
    p.add_argument("--endpoint", help="an OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1); log-likelihood "
                                      "tasks need echo + logprobs on /v1/completions and /tokenize (Ember's, "
                                      "vLLM's), generation tasks only completions or, with --apply-chat-template, "
                                      "chat completions (llama-server, hosted APIs)")
    p.add_argument("--tokenizer", help="(with --endpoint) the served model's DIR or .gguf, to render its chat "
                                       "template on this side; log-likelihood tasks with --apply-chat-template need it")
    p.add_argument("--served-model", help="the model name to send to --endpoint")
    p.add_argument("--api-key", help="bearer key for --endpoint")
    p.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")


def _lm(args: argparse.Namespace) -> Any:
    from ember.eval.lm import open_lm

    if args.tokenizer and not args.endpoint:
        raise EmberError("--tokenizer goes with --endpoint; with --model the model's own tokenizer is used.")
    return open_lm(args.model, args.endpoint, served_model=args.served_model, api_key=args.api_key,
                   device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)


def _rows(path: str) -> list[Any]:
    """The objects of a JSONL file, one a non-blank line."""
    return [row for _, row in read_jsonl(path)]


def _dump(obj: Any, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)


def cmd_perplexity(args: argparse.Namespace) -> None:
    from ember.eval.perplexity import perplexity

    res = perplexity(_lm(args), args.files, window=args.window, stride=args.stride, use_prefix=not args.no_prefix)
    if args.json:
        print(json.dumps(res))
        return
    o = res["overall"]
    print(f"window {res['window']}, stride {res['stride']}")
    for path, r in res["files"].items():
        print(f"{path}: {r['tokens']} tokens, perplexity {r['perplexity']:.4f}, bits/byte {r['bits_per_byte']:.4f}")
    print(f"overall: {o['tokens']} tokens, {o['bytes']} bytes, perplexity {o['perplexity']:.4f}, "
          f"bits/byte {o['bits_per_byte']:.4f}, word perplexity {o['word_perplexity']:.4f}")


def cmd_run(args: argparse.Namespace) -> None:
    from ember.eval.tasks import PromptFormat, TaskConfig, run_task

    fmt = PromptFormat(apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction,
                       fewshot_as_multiturn=args.fewshot_as_multiturn)
    lm = _lm(args)
    if args.cache:  # resumable: answers already in the cache are not asked again
        from ember.eval.report import CachedLM

        ident = str(Path(args.model).resolve()) if args.model else f"{args.endpoint}|{args.served_model}"
        lm = CachedLM(lm, args.cache, ident)
    summary = {}
    for name in args.task:
        cfg = TaskConfig.load(name)
        res = run_task(lm, cfg, limit=args.limit, num_fewshot=args.num_fewshot,
                       data_dir=Path(args.data) if args.data else None, bootstrap_iters=args.bootstrap_iters,
                       prompt_format=fmt)
        summary[cfg.task] = {k: v for k, v in res.items() if k != "samples"}
        if args.out:
            out = Path(args.out)
            _dump(summary[cfg.task], out / f"{cfg.task}.json")
            with open(out / f"{cfg.task}.samples.jsonl", "w", encoding="utf-8") as f:
                for s in res["samples"]:
                    f.write(json.dumps(s, default=str) + "\n")
        if not args.json:
            for metric, v in res["results"].items():
                print(f"{cfg.task:<20} {metric:<16} {v['value']:.4f} ± {v['stderr']:.4f}  (n={v['n']})")
    if args.json:
        print(json.dumps(summary))


def cmd_diff(args: argparse.Namespace) -> None:
    from ember.eval.diff import diff_runs, format_diff

    res = diff_runs(args.run_a, args.run_b, iters=args.bootstrap_iters, seed=args.seed)
    if args.out:
        _dump(res, Path(args.out))
    print(json.dumps(res) if args.json else format_diff(res))


def cmd_compare(args: argparse.Namespace) -> None:
    from ember.eval.compare import compare_files

    res = compare_files(args.files, judge=args.judge, bootstrap=args.bootstrap, seed=args.seed)
    if args.out:
        _dump(res, Path(args.out))
    if args.json:
        print(json.dumps(res))
        return
    print(f"{'system':<28} {'BT rating':>10} {'95% CI':>20} {'Elo':>8} {'win rate':>9}")
    for name, r in sorted(res["systems"].items(), key=lambda kv: -kv[1]["bt"]):
        lo, hi = r["bt_ci"]
        print(f"{name:<28} {r['bt']:>10.1f} {f'[{lo:.1f}, {hi:.1f}]':>20} {r['elo']:>8.1f} {r['win_rate']:>9.3f}")


def cmd_judge(args: argparse.Namespace) -> None:
    from ember.eval.judge import DEFAULT_RUBRIC, Judge, Rubric, agreement
    from ember.eval.metrics import bootstrap_stderr

    rubric = Rubric.load(args.rubric) if args.rubric else Rubric.from_dict(DEFAULT_RUBRIC)
    items = _rows(args.input)
    judge = Judge(_lm(args), rubric, mode=args.mode)
    rows = [judge.score(it) for it in items]
    summary: dict[str, Any] = {"rubric": rubric.name, "n": len(rows), "criteria": {}}
    for c in rubric.criteria + [None]:
        name = c.name if c else "overall"
        vals = [r["scores"][name] if c else r["overall"] for r in rows]
        entry = {"mean": sum(vals) / max(len(vals), 1), "stderr": bootstrap_stderr(vals)}
        human = [it.get("human", {}).get(name) if isinstance(it.get("human"), dict)
                 else (it.get("human") if name == "overall" else None) for it in items]
        pairs = [(v, h) for v, h in zip(vals, human) if h is not None]
        if len(pairs) >= 2:
            lo, hi = (c.low, c.high) if c else (rubric.criteria[0].low, rubric.criteria[0].high)
            entry["agreement"] = agreement([p for p, _ in pairs], [h for _, h in pairs], lo, hi)
        summary["criteria"][name] = entry
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for it, r in zip(items, rows):
                f.write(json.dumps(it | {"judge": r}, default=str) + "\n")
    if args.json:
        print(json.dumps(summary))
        return
    for name, e in summary["criteria"].items():
        extra = f"  spearman {e['agreement']['spearman']:.3f}" if "agreement" in e else ""
        print(f"{name:<16} {e['mean']:.3f} ± {e['stderr']:.3f}{extra}")


def cmd_groundedness(args: argparse.Namespace) -> None:
    from ember.eval.groundedness import auroc, check, synthetic_set

    if not args.synthetic and not args.input:
        raise EmberError("Give --input FILE.jsonl or --synthetic N.")
    items = synthetic_set(args.synthetic) if args.synthetic else _rows(args.input)
    rows = []
    for it in items:
        if "answer" not in it or "context" not in it:
            raise EmberError("Every line needs 'answer' and 'context' (a text or a list of passages).")
        rows.append(check(it["answer"], it["context"], args.threshold).as_dict())
    res: dict[str, Any] = {"n": len(rows), "mean_score": sum(r["score"] for r in rows) / max(len(rows), 1),
                           "grounded_rate": sum(r["score"] >= args.threshold for r in rows) / max(len(rows), 1)}
    labelled = [(r["score"], it["supported"]) for r, it in zip(rows, items) if "supported" in it]
    pos, neg = [s for s, y in labelled if y], [s for s, y in labelled if not y]
    if pos and neg:
        res["auroc"] = auroc(pos, neg)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for it, r in zip(items, rows):
                f.write(json.dumps(it | {"groundedness": r}) + "\n")
    print(json.dumps(res) if args.json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in res.items()))


def cmd_report(args: argparse.Namespace) -> None:
    from ember.eval.report import write_report

    paths = write_report(args.runs, args.out)
    print(f"wrote {paths['markdown']} and {paths['html']}")


def cmd_safety(args: argparse.Namespace) -> None:
    from ember.eval.safety import bias_probe, run_suite

    lm = _lm(args)
    res = run_suite(lm, max_tokens=args.max_tokens)
    res["bias_log_odds_gap"] = bias_probe(lm)
    if args.out:
        _dump(res, Path(args.out))
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "samples"}))
        return
    for fam, r in res["families"].items():
        name = "refusal rate" if "refusal_rate" in r else "attack success"
        v = r.get("refusal_rate", r.get("attack_success_rate"))
        print(f"{fam:<20} {name:<15} {v:.3f}  95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  (n={r['n']})")
    for axis, gap in res["bias_log_odds_gap"].items():
        print(f"bias {axis:<15} mean max log-odds gap {gap:.4f}")


def cmd_consistency(args: argparse.Namespace) -> None:
    from ember.eval.consistency import maj_at_k, paraphrase_agreement

    if args.questions:
        return _consistency_sampled(args)
    if not args.input:
        raise EmberError("Give --input samples.jsonl, or --questions FILE with --model DIR or --endpoint URL.")
    rows = _rows(args.input)
    if not rows or not all(isinstance(r.get("samples"), list) and r["samples"] for r in rows):
        raise EmberError("Every line needs 'samples' (a non-empty list of answers) and, for maj@k, 'reference'.")
    res: dict[str, Any] = {}
    scored = [r for r in rows if r.get("reference") is not None]  # maj@k over the questions that have answers
    if scored:
        toks = [r["tokens"] for r in scored] if all("tokens" in r for r in scored) else None
        for k in sorted({1, args.k}):
            res[f"k={k}"] = maj_at_k([r["samples"] for r in scored], [str(r["reference"]) for r in scored], k, toks)
    groups: dict[str, list[str]] = {}
    for r in rows:
        if "group" in r:  # paraphrases of one question share a group id; compare their first answers
            groups.setdefault(str(r["group"]), []).append(r["samples"][0])
    if groups:
        res["paraphrases"] = paraphrase_agreement(list(groups.values()))
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))


def _consistency_sampled(args: argparse.Namespace) -> None:
    """Draw k answers per question with the model, then agreement, maj@k and token cost."""
    from ember.eval.consistency import draw_samples, self_consistency

    rows = _rows(args.questions)
    if not rows or not all(isinstance(r.get("question"), str) for r in rows):
        raise EmberError("Every line of --questions needs 'question' (text) and optionally 'answer'.")
    try:
        prompts = [args.template.format(question=r["question"]) for r in rows]
    except (KeyError, IndexError, ValueError):
        raise EmberError("--template may only use the {question} placeholder.") from None
    samples, tokens = draw_samples(_lm(args), prompts, args.k, temperature=args.temperature,
                                   max_tokens=args.max_tokens, until=args.until, seed=args.seed)
    refs = [None if r.get("answer") is None else str(r["answer"]) for r in rows]
    res = self_consistency(samples, tokens, refs)
    if args.out:  # the same shape --input reads, so a run can be rescored later
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for r, s, t, ref in zip(rows, samples, tokens, refs):
                f.write(json.dumps({"question": r["question"], "samples": s, "tokens": t}
                                   | ({"reference": ref} if ref is not None else {})
                                   | ({"group": r["group"]} if "group" in r else {})) + "\n")
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))


def add_commands(sub: argparse._SubParsersAction) -> dict:
    ev = sub.add_parser("eval", help="evaluate models: perplexity, benchmark tasks, pairwise comparison",
                        description="Evaluate a checkpoint (--model DIR) or any OpenAI-compatible server "
                                    "(--endpoint URL).")
    acts = ev.add_subparsers(dest="action", metavar="ACTION")
    acts.required = True

    p = acts.add_parser("perplexity", help="rolling-window perplexity and bits per byte of text files")
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    _add_target(p)
    p.add_argument("--window", type=int, help="tokens a window holds (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens scored per window after the first (default: window, i.e. "
                                              "lm-eval's disjoint windows; smaller gives more context)")
    p.add_argument("--no-prefix", action="store_true", help="do not prepend BOS/EOS; the first token goes unscored")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")

    p = acts.add_parser("run", help="run benchmark tasks (lm-eval YAML subset, or a ready task name)")
    p.add_argument("--task", nargs="+", required=True,
                   help="FILE.yaml or a ready task: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, "
                        "openbookqa, truthfulqa_mc2, lambada_openai, gsm8k, nq_open (files and formats: "
                        "docs/eval_tasks.md)")
    _add_target(p)
    p.add_argument("--data", help="directory holding the task's data files (default: ../shared/data/eval, or "
                                  "$EMBER_SHARED_DATA/eval)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render each prompt through the model's chat template, as lm-eval does for chat models "
                        "(a multiple-choice answer then follows the assistant header directly)")
    p.add_argument("--system-instruction", help="a system turn before the prompt (joined to the task's "
                                                "description); plain text when no template is applied")
    p.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction, default=None,
                   help="(with --apply-chat-template) each solved example as its own user and assistant turns "
                        "(the default with a template, as in lm-eval); --no-fewshot-as-multiturn puts them all in "
                        "one user turn")
    p.add_argument("--limit", type=int, help="only the first N documents")
    p.add_argument("--num-fewshot", type=int, help="override the task's number of solved examples")
    p.add_argument("--bootstrap-iters", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print results as one JSON object")
    p.add_argument("--out", help="directory for <task>.json and per-sample <task>.samples.jsonl")
    p.add_argument("--cache", help="SQLite response cache; a rerun after an interruption repeats no call")

    p = acts.add_parser("diff", help="did my change help? two runs compared item by item: paired bootstrap CI, "
                                     "McNemar's test",
                        description="Compare two directories written by `ember eval run --out` on the tasks both "
                                    "hold. For each metric: the means of A and B over the items both scored, the "
                                    "difference B - A with a paired bootstrap 95% interval (the same resampled "
                                    "items in both runs), and for 0/1 metrics the items right only in A, right "
                                    "only in B, and McNemar's exact p-value on those discordant items.")
    p.add_argument("run_a", help="the baseline run directory")
    p.add_argument("run_b", help="the changed run directory")
    p.add_argument("--bootstrap-iters", type=int, default=10000, help="paired bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the bootstrap resampling")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.add_argument("--out", help="also write the comparison JSON here")

    p = acts.add_parser("compare", help="pairwise battles -> win rates, Bradley-Terry and Elo with bootstrap CIs")
    p.add_argument("files", nargs="+", help="battles JSONL ({model_a, model_b, winner: a|b|tie}) or two or more "
                                            "systems' outputs JSONL ({instruction, output}) to judge")
    p.add_argument("--judge", help="(with outputs files, one per system) the judge: a model DIR or an endpoint URL; "
                                   "every pair is judged twice with positions swapped")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="write the results JSON here")

    p = acts.add_parser("judge", help="score answers on a rubric with a judge model (never NaN)")
    p.add_argument("--input", required=True, help="JSONL: {question, answer[, reference, context, human]}")
    p.add_argument("--rubric", help="rubric YAML ({name, criteria: [{name, description, scale: [1, 5], weight}]}); "
                                    "default: correctness, completeness, clarity, tone")
    _add_target(p)
    p.add_argument("--mode", choices=["loglikelihood", "generate"], default="loglikelihood",
                   help="loglikelihood: expected score over the scale (constrained); generate: JSON reply, parsed, "
                        "with fallbacks")
    p.add_argument("--out", help="per-item JSONL with the judge's scores")
    p.add_argument("--json", action="store_true")

    p = acts.add_parser("groundedness", help="check each claim of an answer against its context and citations")
    p.add_argument("--input", help="JSONL: {answer, context: text or [passages]} (citations [k] are 1-based)")
    p.add_argument("--synthetic", type=int, help="instead, N generated contexts x 4 answers (supported, swapped "
                                                 "number, swapped entity, misattributed citation); prints AUROC")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--out", help="per-item JSONL with claim checks")
    p.add_argument("--json", action="store_true")

    p = acts.add_parser("report", help="Markdown + HTML report of run directories (tables, error bars, win rates)")
    p.add_argument("runs", nargs="+", help="directories written by `ember eval run --out`, or compare results JSON")
    p.add_argument("--out", required=True, help="directory for report.md and report.html")

    p = acts.add_parser("safety", help="probe suite: attack success per family, over-refusal, counterfactual bias")
    _add_target(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", help="write results and every reply as JSON here")
    p.add_argument("--json", action="store_true")

    p = acts.add_parser("consistency", help="self-consistency: maj@k, agreement across samples and paraphrases")
    p.add_argument("--input", help="score samples you provide, JSONL: {samples: [answers...], reference[, tokens, "
                                   "group]}")
    p.add_argument("--questions", help="instead, draw the samples: JSONL {question[, answer]}; needs --model or "
                                       "--endpoint")
    _add_target(p)
    p.add_argument("--k", type=int, default=5, help="samples per question")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sample j of a question uses seed + j (in process)")
    p.add_argument("--until", nargs="*", default=["\n\n"], help="stop strings")
    p.add_argument("--template", default="Question: {question}\nAnswer:", help="prompt; {question} is replaced")
    p.add_argument("--out", help="(with --questions) write the drawn samples as JSONL that --input reads")
    p.add_argument("--json", action="store_true")

    return {("eval", "consistency"): cmd_consistency, ("eval", "safety"): cmd_safety, ("eval", "report"): cmd_report, ("eval", "perplexity"): cmd_perplexity, ("eval", "run"): cmd_run, ("eval", "diff"): cmd_diff, ("eval", "compare"): cmd_compare,
            ("eval", "judge"): cmd_judge, ("eval", "groundedness"): cmd_groundedness}


if __name__ == "__main__":  # python -m ember.eval.commands ... for quick checks
    parser = argparse.ArgumentParser(prog="ember")
    handlers = add_commands(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(sys.argv[1:])
    handlers[(ns.command, ns.action)](ns)
