"""`ember finetune` and `ember data synth`: the fine-tuning commands (argparse only at import time)."""

from __future__ import annotations

import argparse

from ember.errors import EmberError

LR_DEFAULTS = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3}


def add_commands(sub: argparse._SubParsersAction) -> dict:
    p = sub.add_parser("finetune", help="supervised fine-tuning: full, LoRA or QLoRA",
                       description="Fine-tune a model directory on chat/instruction JSONL ({'messages'}, "
                       "{'prompt','completion'} or Alpaca {'instruction','input','output'}) with its chat template. "
                       "Writes OUT/model (full) or OUT/adapter (LoRA/QLoRA, PEFT format), run.json and metrics.jsonl.")
    p.add_argument("--model", required=True, help="base model directory (HF layout, with tokenizer)")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--val-data", default=None, help="validation JSONL (val_loss in metrics)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="lora")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8, help="rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="scaling numerator: update x alpha/r (default 16)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated module names (q_proj,v_proj,...) or all-linear (default)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    g.add_argument("--trainable-tokens", default="template",
                   help="token-table rows that train beside the adapters (PEFT's trainable_token_indices): "
                        "'template' (default) = the chat template's special tokens, e.g. <|im_start|> and "
                        "<|im_end|>, which a base pretrained on plain text never learned and adapters cannot "
                        "move; 'none'; or comma-separated token ids")
    t = p.add_argument_group("training")
    t.add_argument("--max-steps", type=int, default=500)
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4 full, 2e-3 LoRA)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--block-size", type=int, default=256, help="tokens per row; longer examples are cut")
    t.add_argument("--warmup-steps", type=int, default=20)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--schedule", default="cosine", choices=["cosine", "constant", "wsd"])
    t.add_argument("--pack", action="store_true", help="pack short examples into full rows (block-diagonal mask)")
    t.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--time-budget", type=float, default=None, help="stop (and save) after this many minutes")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")

    return {"finetune": cmd_finetune}


def add_synth_parser(sub: argparse._SubParsersAction) -> None:
    """`ember data synth`: lives in the `data` group of ember/cli.py."""
    s = sub.add_parser("synth", help="write a synthetic instruction or preference set with checkable answers",
                       description="Instruction tasks: arithmetic, reverse, sort, format. Preference tasks (over "
                       "--base-task): correct-over-wrong, concise-over-rambling. Writes JSONL.")
    s.add_argument("--task", required=True)
    s.add_argument("--out", required=True, help="output .jsonl")
    s.add_argument("--n", type=int, default=1000, help="rows (default 1000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", default="messages", choices=["messages", "prompt", "alpaca"],
                   help="row shape of instruction tasks (default messages)")
    s.add_argument("--base-task", default="arithmetic", help="instruction task under a preference task")
    s.add_argument("--exclude", default=None, help="JSONL whose prompts must not appear (a held-out split)")


def cmd_finetune(a: argparse.Namespace) -> None:
    from ember.lora import ALL_LINEAR, LoraConfig
    from ember.train.loop import TrainConfig
    from ember.train.sft import sft

    targets = ALL_LINEAR if a.lora_targets == ALL_LINEAR else [t.strip() for t in a.lora_targets.split(",") if t]
    tokens = a.trainable_tokens.strip().lower()
    if tokens not in ("template", "none"):
        try:
            tokens = [int(t) for t in tokens.split(",") if t.strip()]
        except ValueError:
            raise EmberError(f"--trainable-tokens takes 'template', 'none' or comma-separated token ids, "
                             f"not {a.trainable_tokens!r}.") from None
    lora = LoraConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, target_modules=targets,
                      use_rslora=a.rslora, trainable_token_indices=tokens if isinstance(tokens, list) else None)
    cfg = TrainConfig(max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                      block_size=a.block_size, lr=a.lr or LR_DEFAULTS[a.method], warmup_steps=a.warmup_steps,
                      weight_decay=a.weight_decay, schedule=a.schedule, eval_every=a.eval_every,
                      save_every=a.save_every, log_every=a.log_every, seed=a.seed, time_budget_s=a.time_budget * 60 if a.time_budget else None)
    last = sft(a.model, a.data, a.out, method=a.method, lora=lora, train_config=cfg, pack=a.pack,
               train_template_tokens=tokens == "template",
               train_on_prompt=a.train_on_prompt, val_file=a.val_data, device=a.device, resume=a.resume,
               progress=not a.no_progress)
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "val_loss") if k in last)
    where = "model" if last["method"] == "full" else "adapter"  # on --resume, the run's own method
    print(f"done at step {last['step']}: {shown}; {where} in {a.out}/{where}")


def cmd_synth(a: argparse.Namespace) -> None:
    from ember.synth import row_prompt_answer, write_synth
    from ember.files import read_jsonl

    exclude = None
    if a.exclude:
        exclude = {row_prompt_answer(r)[0] if "answer" in r else r.get("prompt") for _, r in read_jsonl(a.exclude)}
    out = write_synth(a.task, a.out, n=a.n, seed=a.seed, shape=a.shape, base_task=a.base_task, exclude=exclude)
    print(f"wrote {a.n} rows of '{a.task}' to {out}")
