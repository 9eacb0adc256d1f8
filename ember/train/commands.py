"""`ember finetune` and `ember data synth`: the fine-tuning commands (argparse only at import time)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ember.errors import EmberError
from ember.settings import add_command

LR_DEFAULTS = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3}
# Finetune starts from a trained model: fewer steps, a short warmup, no weight decay.
FINETUNE_DEFAULTS = {"max_steps": 500, "lr": None, "warmup_steps": 20, "weight_decay": 0.0, "eval_every": 0,
                     "save_every": 200}

# The command line takes module names or all-linear (LoraConfig itself also takes a regex).
LORA_HELP = {"target_modules": "comma-separated module names (q_proj,v_proj,...) or all-linear"}
LORA_NAMES = {"target_modules": "--lora-targets", "use_rslora": "--rslora"}


def lora_targets(text: str) -> list[str] | str:
    """`--lora-targets`: 'all-linear' or comma-separated module names."""
    from ember.lora import ALL_LINEAR

    if text.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give all-linear or comma-separated module names")
    return names


def add_lora_flags(g: argparse._ActionsContainer) -> None:
    """`--lora-r`, `--lora-alpha`, `--lora-dropout`, `--lora-targets`, `--rslora` from LoraConfig
    (dests `lora_<field>`; `values(LoraConfig, args, prefix="lora_")` reads them back)."""
    from ember.lora import ALL_LINEAR, LoraConfig
    from ember.settings import add_flags

    add_flags(g, LoraConfig, prefix="lora_", exclude=["trainable_token_indices"], help=LORA_HELP, names=LORA_NAMES,
              parsers={"target_modules": lora_targets}, defaults={"target_modules": ALL_LINEAR})


def add_training_flags(p: argparse.ArgumentParser, *, defaults: dict | None = None, exclude: tuple = (),
                       names: dict | None = None, help: dict | None = None) -> None:
    """Every TrainConfig field as a flag, in a "training" group: the one place recipes get them."""
    from ember.settings import add_flags
    from ember.train.loop import TrainConfig

    g = p.add_argument_group("training", "optimizer, schedule, batches, checkpoints (ember.train.loop.TrainConfig)")
    add_flags(g, TrainConfig, defaults=defaults, exclude=exclude, names=names, help=help)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where a training run happens and how it reports: --resume, --device, --no-progress."""
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint with the run's own settings (OUT/run.json); "
                        "only --max-steps, --time-budget, --eval-every, --save-every and --log-every may be "
                        "given to change them")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def resume_changes(a: argparse.Namespace) -> dict:
    """The training settings typed on a `--resume` command line: changes to the run, not its defaults."""
    from ember.settings import given_flags, kwargs_of
    from ember.train.loop import TrainConfig

    typed = given_flags(a)
    return {k: v for k, v in kwargs_of(TrainConfig, a).items() if k in typed}


def add_commands(sub: argparse._SubParsersAction) -> dict:
    add_command(sub, "finetune", _finetune_flags, help="supervised fine-tuning: full, LoRA or QLoRA",
                description="Fine-tune a model directory on chat/instruction JSONL ({'messages'}, "
                "{'prompt','completion'} or Alpaca {'instruction','input','output'}) with its chat template. "
                "Writes OUT/model (full) or OUT/adapter (LoRA/QLoRA, PEFT format), run.json and metrics.jsonl.")
    return {"finetune": cmd_finetune}


def _finetune_flags(p: argparse.ArgumentParser) -> None:
    from ember.settings import add_flags
    from ember.train.sft import SFTOptions

    p.add_argument("--model", required=True, help="base model: a directory (HF layout, with tokenizer) or a .gguf file (every tensor decoded to float32 to train)")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--val-data", default=None, help="validation JSONL (val_loss in metrics)")
    p.add_argument("--out", required=True, help="run directory")
    add_flags(p.add_argument_group("fine-tuning"), SFTOptions, defaults={"method": "lora"})
    g = p.add_argument_group("LoRA")
    add_lora_flags(g)
    g.add_argument("--trainable-tokens", default="template",
                   help="token-table rows that train beside the adapters (PEFT's trainable_token_indices): "
                        "'template' (default) = the chat template's special tokens, e.g. <|im_start|> and "
                        "<|im_end|>, which a base pretrained on plain text never learned and adapters cannot "
                        "move; 'none'; or comma-separated token ids")
    add_training_flags(p, defaults=FINETUNE_DEFAULTS,
                       help={"lr": "peak learning rate (default: 3e-4 full, 2e-3 LoRA and QLoRA)"})
    add_run_flags(p)


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
    from ember.lora import LoraConfig
    from ember.settings import values
    from ember.train.loop import TrainConfig
    from ember.train.sft import SFTOptions, sft

    tokens = a.trainable_tokens.strip().lower()
    if tokens not in ("template", "none"):
        try:
            tokens = [int(t) for t in tokens.split(",") if t.strip()]
        except ValueError:
            raise EmberError(f"--trainable-tokens takes 'template', 'none' or comma-separated token ids, "
                             f"not {a.trainable_tokens!r}.") from None
    lora = values(LoraConfig, a, prefix="lora_", trainable_token_indices=tokens if isinstance(tokens, list) else None)
    options = values(SFTOptions, a)
    cfg = values(TrainConfig, a, lr=a.lr if a.lr is not None else LR_DEFAULTS[options.method])
    if a.resume:
        cfg = resume_changes(a)  # the run's own settings, changed only where a flag was typed
    last = sft(a.model, a.data, a.out, lora=lora, train_config=cfg, train_template_tokens=tokens == "template",
               val_file=a.val_data, device=a.device, resume=a.resume, progress=not a.no_progress, **asdict(options))
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
