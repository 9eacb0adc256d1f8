"""Fine-tuning benchmark: full SFT vs LoRA vs QLoRA on a synthetic task, and LoRA speed vs peft.

    python benchmarks/finetune.py [--base DIR] [--task format] [--minutes 5]

1. Takes a small pretrained Ember model (`--base`; default /tmp/ember_ft_base/model, pretrained
   with `ember pretrain` on the default corpus when missing: see BASE_RECIPE, ~45 min once).
2. Writes a synthetic instruction set and a disjoint held-out set (`ember.synth`).
3. Fine-tunes full / LoRA / QLoRA, each within the same time budget, and scores greedy
   exact match on the held-out prompts; reports the trainable-parameter share.
4. With --token-rows-ablation, LoRA and QLoRA once more without the chat template's token rows.
5. Times LoRA training steps (forward, backward, AdamW) in Ember and in peft + transformers on
   the same base, LoRA config and batches, in ABBA rounds, and reports tokens/s: the median over
   rounds with the spread.

Writes benchmarks/results/finetune.json and .md; every number in them comes from this one command
(`--methods none` times the LoRA steps alone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from common import fmt, ratio_spread, run_rounds, spread, stamp, write_results  # noqa: E402

from ember.load import load_model  # noqa: E402
from ember.lora import ALL_LINEAR, LoraConfig, apply_lora, trainable_summary  # noqa: E402
from ember.synth import exact_match, synth_rows  # noqa: E402
from ember.tokenizer import load_tokenizer  # noqa: E402
from ember.train.examples import collate, load_sft_examples  # noqa: E402
from ember.train.loop import TrainConfig, lm_loss, make_optimizer  # noqa: E402
from ember.train.sft import load_finetuned, rows_for, sft  # noqa: E402


# The default base: the `mini` preset pretrained on the default corpus (the standard library) for
# 50,000 steps of 2 x 128 tokens (12.8M tokens, ~45 min on 2 cores). Induction heads, the
# circuit that copies from the context, form after ~10^5.7 * sqrt(2 * 128) = 8M tokens at this
# batch and context (Aoyama et al. 2025); LoRA can reuse that circuit, not build it.
BASE_RECIPE = ["--preset", "mini", "--batch-size", "2", "--block-size", "128", "--lr", "1.5e-3", "--schedule", "wsd",
               "--max-steps", "50000", "--warmup-steps", "500", "--eval-every", "2500", "--save-every", "2500"]


def ensure_base(base: Path) -> Path:
    """Build the default base with Ember's own CLI when it is missing (resumes a stopped build)."""
    if (base / "config.json").is_file():
        return base
    run = base.parent

    def ember(*argv: str) -> None:
        subprocess.run([sys.executable, "-m", "ember.cli", *argv], check=True)

    print(f"no base model at {base}; pretraining one in {run} (~45 min on 2 cores; once)")
    if not (run / "tokenizer" / "tokenizer.json").is_file():
        ember("tokenizer", "train", "--input", "stdlib", "--vocab-size", "4096", "--max-mb", "12",
              "--out", str(run / "tokenizer"))
    if not (run / "data" / "meta.json").is_file():
        ember("data", "prepare", "--input", "stdlib", "--tokenizer", str(run / "tokenizer"), "--out", str(run / "data"))
    resume = ["--resume"] if (run / "checkpoint").is_dir() else []
    ember("pretrain", *BASE_RECIPE, "--data", str(run / "data"), "--out", str(run), "--no-progress", *resume)
    return base


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def targets(args) -> list[str] | str:
    return ALL_LINEAR if args.lora_targets == ALL_LINEAR else args.lora_targets.split(",")


def run_method(method: str, base: Path, train_file: Path, held: list[dict], work: Path, args,
               token_rows: bool = True) -> dict:
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, target_modules=targets(args))
    cfg = TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, block_size=args.block_size,
                      lr=args.lr_full if method == "full" else args.lr_lora, warmup_steps=20, weight_decay=0.0,
                      save_every=0, eval_every=0, log_every=10, seed=args.seed, time_budget_s=args.minutes * 60,
                      schedule_by_time=True)
    t0 = time.time()
    run = work / (method if token_rows else f"{method}-no-token-rows")
    last = sft(base, train_file, run, method=method, lora=lora, train_config=cfg, pack=args.pack,
               progress=False, train_template_tokens=token_rows)
    train_s = time.time() - t0
    model, tok = load_finetuned(run, device="cpu")
    if method == "full":
        trainable, total = trainable_summary(model)
        share = 1.0
    else:
        trainable, total = trainable_summary(model)
        share = trainable / total
    t1 = time.time()
    em = exact_match(model, tok, held, max_new_tokens=args.max_new_tokens)
    result = {"method": method, "exact_match": em["exact_match"], "n_eval": em["n"], "steps": last["step"],
              "final_loss": last["loss"], "train_s": round(train_s, 1), "eval_s": round(time.time() - t1, 1),
              "trainable": trainable, "total": total, "trainable_share": share, "samples": em["samples"][:3]}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return result


def speed(base: Path, train_file: Path, args) -> dict:
    """Tokens/s of LoRA training steps, Ember vs peft + transformers, same batches, alternating."""
    import peft
    import transformers

    torch.manual_seed(0)
    tok = load_tokenizer(base)
    rows, _ = rows_for(tok, load_sft_examples(train_file), args.block_size, False, False)
    batches = [collate(rows[i:i + args.batch_size], tok.pad_id or 0)
               for i in range(0, args.batch_size * args.speed_steps, args.batch_size)]
    tokens = sum(b["input_ids"].numel() for b in batches)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.0)

    ours = apply_lora(load_model(base, device="cpu", dtype=torch.float32),
                      LoraConfig(r=args.lora_r, alpha=args.lora_alpha, target_modules=targets(args))).train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                     target_modules=targets(args), task_type="CAUSAL_LM")).train()

    def step_fn(model, forward):
        opt = make_optimizer(model, cfg)

        def run() -> float:
            t = time.perf_counter()
            for b in batches:
                loss, n = lm_loss(forward(model, b["input_ids"]), b["labels"])
                (loss / n).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return tokens / (time.perf_counter() - t)
        return run

    run_ours = step_fn(ours, lambda m, x: m(x))
    run_theirs = step_fn(theirs, lambda m, x: m(input_ids=x).logits)
    run_ours(), run_theirs()  # warm-up
    speeds = run_rounds({"ember": run_ours, "peft": run_theirs}, args.speed_rounds)
    result = {"ember_tokens_per_s": spread(speeds["ember"]), "peft_tokens_per_s": spread(speeds["peft"]),
              "ratio": ratio_spread(speeds["ember"], speeds["peft"]), "order": "ABBA", "rounds": speeds,
              "steps_per_round": len(batches), "tokens_per_round": tokens,
              "ember_trainable": trainable_summary(ours)[0],
              "peft_trainable": sum(p.numel() for p in theirs.parameters() if p.requires_grad)}
    print(json.dumps(result))
    return result


@torch.no_grad()
def copy_score(model_dir: Path, length: int = 40, rows: int = 8, seed: int = 0) -> dict:
    """Can the base copy from its context at all? Mean loss on a random token sequence and on
    its exact repeat: a model with induction heads predicts the repeat almost perfectly; one
    without them does no better the second time. Low-rank adapters have to reuse such
    circuits; full fine-tuning can build them."""
    import torch.nn.functional as F
    model = load_model(model_dir, device="cpu", dtype=torch.float32).eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(100, V, (rows, length), generator=g)
    x = torch.cat([x, x], 1)
    loss = F.cross_entropy(model(x)[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1), reduction="none").view(rows, -1)
    return {"first_pass_loss": round(float(loss[:, :length - 1].mean()), 3),
            "repeat_loss": round(float(loss[:, length:].mean()), 3)}


def pretraining_tokens(base: Path) -> dict | None:
    """How much pretraining the base had, read from the run beside it (`ember pretrain`/`quickstart`),
    and where Aoyama et al. (2025, arXiv:2511.16893) put induction-head formation for its batch and context:
    about 10^5.7 * sqrt(batch * context) tokens."""
    run, metrics = base.parent / "run.json", base.parent / "metrics.jsonl"
    if not (run.is_file() and metrics.is_file()):
        return None
    cfg = json.loads(run.read_text())["train_config"]
    steps = max((json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()),
                default=0)
    batch, context = cfg["batch_size"] * cfg.get("grad_accum", 1), cfg["block_size"]
    return {"steps": steps, "tokens": steps * batch * context, "batch": batch, "context": context,
            "induction_heads_expected_at_tokens": round(10 ** 5.7 * (batch * context) ** 0.5)}


def markdown(res: dict) -> str:
    lines = [f"# Fine-tuning: {res['task']} ({res['n_train']} train, {res['n_eval']} held-out prompts)", "",
             f"Base: `{res['base']}` ({res['base_params']:,} parameters). Each method gets {res['minutes']} min "
             "of training.", "",
             "| method | held-out exact match | trainable params | share | steps | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["methods"]:
        lines.append(f"| {r['method']} | {100 * r['exact_match']:.1f}% | {r['trainable']:,} | "
                     f"{100 * r['trainable_share']:.2f}% | {r['steps']} | {r['train_s']} |")
    a = res["args"]
    rows = ("" if a.get("no_token_rows") else ", plus the rows of the chat template's special tokens (`<|im_start|>`, "
            "`<|im_end|>`; PEFT's `trainable_token_indices`), which pretraining on plain text never trained and "
            "adapters cannot move")
    lines += ["", f"LoRA and QLoRA: r={a['lora_r']}, alpha={a['lora_alpha']:g} on {a['lora_targets']}, lr "
              f"{a['lr_lora']:g}{rows}; full SFT: lr {a['lr_full']:g}. Steps stop at {a['max_steps']} or the time "
              "budget."]
    if res.get("base_copy"):
        c = res["base_copy"]
        lines += ["", f"In-context copying of the base: loss {c['first_pass_loss']} on random tokens, "
                  f"{c['repeat_loss']} on their exact repeat (without induction heads the repeat is no easier; a "
                  "strong copier drops near 0). The task copies names, cities and ages from the prompt into the "
                  "reply: full fine-tuning can build that circuit, low-rank adapters have to reuse one."]
    for r in res.get("without_token_rows", []):
        sample = r["samples"][0]["output"] if r.get("samples") and "output" in r["samples"][0] else None
        lines += ["", "Without the token rows (`--token-rows-ablation`; `--trainable-tokens none` in `ember finetune`; "
                  f"same base and settings) {r['method']} scored {100 * r['exact_match']:.1f}% exact match after "
                  f"{r['steps']} steps (final loss {r['final_loss']:.4f})"
                  + (f"; a held-out reply: `{sample[:120]}`" if sample else "") + "."]
    pre = res.get("base_pretraining")
    if pre:
        need = pre["induction_heads_expected_at_tokens"]
        share = (f"{need / max(pre['tokens'], 1):.0f}x more than this base had" if pre["tokens"] < need else
                 f"this base had {pre['tokens'] / need:.1f}x that")
        lines += ["", f"The base saw {pre['tokens']:,} pretraining tokens ({pre['steps']} steps of {pre['batch']} x "
                  f"{pre['context']}). Aoyama et al. (2025, arXiv:2511.16893) find induction heads form after about "
                  f"10^5.7 x sqrt(batch x context) tokens, {need:,} here: {share}."]
    if res.get("qlora_memory"):
        m = res["qlora_memory"]
        lines += ["", f"QLoRA frozen base: {m['nf4_bytes']:,} bytes in NF4 vs {m['bf16_bytes']:,} in bf16 "
                  f"({100 * m['ratio']:.1f}%)."]
    s = res.get("speed")
    if s:
        lines += ["", "| LoRA training (fwd+bwd+AdamW) | tokens/s, median (min–max) |", "|---|---|",
                  f"| Ember | {fmt(s['ember_tokens_per_s'], 0)} |",
                  f"| peft + transformers | {fmt(s['peft_tokens_per_s'], 0)} |",
                  f"| ratio Ember / peft | **{fmt(s['ratio'], 2)}** |", "",
                  f"Median over {s['ratio']['rounds']} rounds in ABBA order (Ember, peft; peft, Ember; ...) of "
                  f"{s['steps_per_round']} steps ({s['tokens_per_round']:,} tokens each), the ratio the median of "
                  f"each round's own; same batches, r and targets ({res['args']['lora_targets']})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="/tmp/ember_ft_base/model",
                   help="a pretrained Ember model (pretrained with BASE_RECIPE, ~45 min, when missing)")
    p.add_argument("--task", default="format")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--methods", default="full,lora,qlora", help="comma-separated, or none (LoRA speed only)")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per method")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=96)
    p.add_argument("--pack", action="store_true")
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj",
                   help="comma-separated names or all-linear")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--speed-steps", type=int, default=8)
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-token-rows", action="store_true",
                   help="LoRA/QLoRA without the chat template's token rows in the main rows")
    p.add_argument("--token-rows-ablation", action="store_true",
                   help="also train LoRA/QLoRA without the chat template's token rows, in the same results")
    p.add_argument("--work", default="/tmp/ft_bench")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (1 is faster on a machine shared with other jobs)")
    p.add_argument("--out", default=str(ROOT / "results" / "finetune"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    base = ensure_base(Path(args.base))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_rows = synth_rows(args.task, args.n_train, seed=0)
    held = synth_rows(args.task, args.n_eval, seed=1, exclude={r["messages"][0]["content"] for r in train_rows})
    train_file = write_rows(work / "train.jsonl", train_rows)

    methods = [m for m in args.methods.split(",") if m and m != "none"]
    res = stamp({"task": args.task, "n_train": args.n_train, "n_eval": args.n_eval, "base": str(base),
                 "base_params": load_model(base, device="cpu").num_parameters(), "minutes": args.minutes,
                 "methods": [], "args": vars(args)})
    if methods:
        res["base_pretraining"] = pretraining_tokens(base)
        res["base_copy"] = copy_score(base)
        print("base in-context copying:", res["base_copy"])
    for method in methods:
        res["methods"].append(run_method(method, base, train_file, held, work, args, not args.no_token_rows))
        if method == "qlora":
            from ember.lora import base_weight_bytes, quantize_base
            m = apply_lora(load_model(base, device="cpu", dtype=torch.float32), LoraConfig(target_modules=ALL_LINEAR))
            bf16 = base_weight_bytes(m)[1]
            now = base_weight_bytes(quantize_base(m))[0]
            res["qlora_memory"] = {"nf4_bytes": now, "bf16_bytes": bf16, "ratio": now / bf16}
    if args.token_rows_ablation and not args.no_token_rows:
        res["without_token_rows"] = [run_method(m, base, train_file, held, work, args, token_rows=False)
                                     for m in methods if m in ("lora", "qlora")]
    if not args.no_speed:
        res["speed"] = speed(base, train_file, args)
    out = Path(args.out)
    write_results(out.name, res, markdown(res), results_dir=out.parent)
    print(markdown(res))


if __name__ == "__main__":
    main()
