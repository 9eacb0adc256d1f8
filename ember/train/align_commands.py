"""`ember dpo`, `ember reward-model`, `ember ppo`, `ember grpo`, `ember align constitutional` (argparse only at import)."""

from __future__ import annotations

import argparse

from ember.settings import add_command
from ember.train.commands import add_lora_flags, add_run_flags, add_training_flags


# Preference recipes start from a trained model: no weight decay unless asked for; a row is a
# prompt + reply pair, so its length flag keeps its older name --max-length beside --block-size.
PREFERENCE_DEFAULTS = {"max_steps": 200, "batch_size": 8, "warmup_steps": 10, "weight_decay": 0.0, "eval_every": 0,
                       "save_every": 200, "block_size": 512}
PREFERENCE_NAMES = {"block_size": ("--max-length", "--block-size")}
PREFERENCE_HELP = {"batch_size": "preference pairs per micro-batch",
                   "block_size": "tokens per prompt + reply; longer pairs are cut"}
# PPO's optimizer settings: a constant learning rate from the first step and no weight decay
# (it fine-tunes a good policy). Its batches are rollouts (PPOConfig), so TrainConfig's batch,
# length, logging, precision and time-budget settings do not apply and have no flag.
PPO_DEFAULTS = {"max_steps": 100, "lr": 1e-5, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                "beta2": 0.999, "save_every": 0, "eval_every": 0}
PPO_NOT_APPLICABLE = ("batch_size", "grad_accum", "block_size", "log_every", "mixed_precision", "time_budget_s",
                      "schedule_by_time")
PPO_FROM_TRAINING = {"iterations": "max_steps", "lr": "lr", "grad_clip": "grad_clip", "save_every": "save_every",
                     "eval_every": "eval_every", "seed": "seed"}


def _preference_flags(p: argparse.ArgumentParser, lr: float | None) -> None:
    g = p.add_argument_group("held-out pairs")
    g.add_argument("--eval-data", default=None, help="held-out preference JSONL (default: a split of --data)")
    g.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of --data held out when there is no --eval-data (default: 0.1)")
    lr_help = {"lr": "peak learning rate (default: 5e-5, or 5e-4 with --lora)"} if lr is None else {}
    add_training_flags(p, defaults={**PREFERENCE_DEFAULTS, "lr": lr}, names=PREFERENCE_NAMES,
                       help={**PREFERENCE_HELP, **lr_help})
    add_run_flags(p)


def _dpo_flags(d: argparse.ArgumentParser) -> None:
    from ember.settings import add_flags
    from ember.train.dpo import DPOConfig

    d.add_argument("--model", required=True, help="policy to start from (also the reference)")
    d.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected (strings or messages)")
    d.add_argument("--out", required=True, help="run directory")
    add_flags(d.add_argument_group("DPO"), DPOConfig, exclude=["max_length"])  # length: --max-length below
    g = d.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters; the reference is the base itself")
    add_lora_flags(g)
    _preference_flags(d, lr=None)


def _reward_model_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("--model", required=True, help="base model directory")
    r.add_argument("--data", required=True, help="preference JSONL")
    r.add_argument("--out", required=True, help="run directory")
    _preference_flags(r, lr=1e-4)


def _ppo_flags(p: argparse.ArgumentParser) -> None:
    from ember.settings import add_flags
    from ember.train.ppo import PPOConfig

    p.add_argument("--policy", required=True, help="policy model directory (also the reference)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reward-model", default=None, help="a directory written by `ember reward-model`")
    src.add_argument("--reward", default=None, help="rule:char=SET | rule:contains=TEXT | rule:concise | "
                     "rule:python=module:function")
    p.add_argument("--prompts", required=True, help="JSONL with 'prompt' (string or messages) or one prompt a line")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out (default: 0.1)")
    p.add_argument("--raw-prompts", action="store_true", help="feed prompts as plain text, not via the chat template")
    add_flags(p.add_argument_group("PPO"), PPOConfig, exclude=list(PPO_FROM_TRAINING))
    add_training_flags(p, defaults=PPO_DEFAULTS, exclude=PPO_NOT_APPLICABLE,
                       names={"max_steps": ("--iterations", "--max-steps")},
                       help={"max_steps": "rollout + update rounds",
                             "eval_every": "iterations between held-out evaluations (0 = start and end only)",
                             "save_every": "iterations between checkpoints (0 = only at the end)"})
    add_run_flags(p)


# GRPO's optimizer settings: a constant learning rate from the first step, no weight decay, a line in
# metrics.jsonl every step. Its batches are groups of sampled replies (--batch-size replies a micro-batch),
# so the token-length setting does not apply (--max-new-tokens bounds a reply).
GRPO_DEFAULTS = {"max_steps": 100, "batch_size": 16, "lr": 1e-5, "warmup_steps": 0, "schedule": "constant",
                 "weight_decay": 0.0, "beta2": 0.999, "save_every": 0, "eval_every": 0, "log_every": 1}
GRPO_EPILOG = """example (a checked answer plus a format reward on synthetic arithmetic):
  ember data synth --task arithmetic --shape prompt --n 500 --out arith.jsonl
  ember grpo --model SmolLM2-135M-Instruct.Q4_1.gguf --prompts arith.jsonl --out runs/grpo \\
      --reward answer --reward 'format=-?[0-9]+' --reward-weight 1 --reward-weight 0.2 \\
      --num-generations 8 --batch-size 16 --max-new-tokens 16 --max-steps 50
Each step samples --batch-size x --grad-accum replies (G = --num-generations per prompt) with the
engine, scores them, standardises each reward within its group (the advantage), and takes
--num-iterations optimizer steps on the clipped objective with beta x KL to the starting model.
Writes OUT/model, metrics.jsonl (reward, kl, clipfrac, loss, ...), grpo.png; --resume continues exactly."""


def _grpo_flags(p: argparse.ArgumentParser) -> None:
    from ember.settings import add_flags
    from ember.train.grpo import GRPOConfig

    p.add_argument("--model", required=True, help="policy to start from, a directory or a .gguf file "
                   "(also the KL reference)")
    p.add_argument("--prompts", required=True, help="JSONL with 'prompt' (string or messages) and, for the answer "
                   "reward, 'answer'; or one prompt a line")
    p.add_argument("--out", required=True, help="run directory")
    r = p.add_argument_group("rewards", "summed, each times its --reward-weight")
    r.add_argument("--reward", action="append", default=[], metavar="RULE",
                   help="answer (the reply's last number, or the whole reply, equals the row's 'answer') | "
                   "format=REGEX (the whole reply matches) | char=SET | contains=TEXT | concise | "
                   "python=module:function; repeat for several")
    r.add_argument("--reward-model", default=None, help="a directory written by `ember reward-model`")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out (default: 0.1)")
    p.add_argument("--raw-prompts", action="store_true", help="feed prompts as plain text, not via the chat template")
    add_flags(p.add_argument_group("GRPO"), GRPOConfig)
    add_training_flags(p, defaults=GRPO_DEFAULTS, exclude=("block_size",),
                       help={"batch_size": "sampled replies per micro-batch (G of each prompt)",
                             "eval_every": "steps between held-out evaluations (0 = start and end only)"})
    add_run_flags(p)


def add_commands(sub: argparse._SubParsersAction) -> dict:
    add_command(sub, "dpo", _dpo_flags, help="Direct Preference Optimization on {prompt, chosen, rejected} JSONL",
                description="DPO (sigmoid), IPO or hinge loss against the starting model as reference. "
                "Writes OUT/model (or OUT/adapter with --lora), metrics.jsonl (reward accuracy, margins, "
                "chosen/rejected log-probs) and held-out preference accuracy.")
    add_command(sub, "reward-model", _reward_model_flags,
                help="train a reward model (transformer + scalar head, Bradley-Terry)",
                description="Writes OUT/model, a reward-model directory (safetensors + JSON) that "
                "`ember ppo --reward-model` loads, and reports held-out pair accuracy.")
    add_command(sub, "ppo", _ppo_flags, help="RLHF with PPO against a reward model or a rule",
                description="Rollouts with the engine, per-token KL penalty to the frozen starting policy, "
                "GAE, clipped policy and value losses. Writes OUT/model, metrics.jsonl and ppo.png.")
    add_command(sub, "grpo", _grpo_flags, help="RL with GRPO: group-relative advantages, no value model",
                description="Group Relative Policy Optimization (DeepSeekMath): G sampled replies per prompt, "
                "rewards from rules (a checked answer, a format) or a reward model standardised within each "
                "group, the clipped policy objective with a k3 KL penalty to the starting model.",
                epilog=GRPO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    a = sub.add_parser("align", help="alignment data tools").add_subparsers(dest="action", required=True)
    c = a.add_parser("constitutional", help="critique and revise answers against principles",
                     description="Writes OUT/sft.jsonl (revisions), OUT/preferences.jsonl (revised over original), "
                     "OUT/trace.jsonl and OUT/summary.json.")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", default=None, help="local model directory")
    who.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    c.add_argument("--served-model", default=None, help="model name to send to the endpoint")
    c.add_argument("--api-key", default=None, help="bearer token for the endpoint (or OPENAI_API_KEY)")
    c.add_argument("--prompts", required=True)
    c.add_argument("--principles", required=True, help="text (one a line), JSON or JSONL constitution")
    c.add_argument("--out", required=True)
    c.add_argument("--rounds", type=int, default=1, help="critique/revise rounds per prompt")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default=None)
    c.add_argument("--no-progress", action="store_true")
    return {"dpo": cmd_dpo, "reward-model": cmd_reward_model, "ppo": cmd_ppo, "grpo": cmd_grpo,
            ("align", "constitutional"): cmd_constitutional}


def cmd_dpo(a: argparse.Namespace) -> None:
    from ember.settings import values
    from ember.train.dpo import DPOConfig, run_dpo
    from ember.train.loop import TrainConfig

    lora = None
    if a.lora:
        from ember.lora import LoraConfig

        lora = values(LoraConfig, a, prefix="lora_")
    train_cfg = values(TrainConfig, a, lr=a.lr if a.lr is not None else 5e-4 if a.lora else 5e-5)
    cfg = values(DPOConfig, a, max_length=train_cfg.block_size)
    last = run_dpo(a.model, a.data, a.out, train_cfg, cfg, lora_cfg=lora, eval_data=a.eval_data,
                   eval_fraction=a.eval_fraction, device=a.device, resume=a.resume, progress=not a.no_progress)
    acc = f", held-out preference accuracy {last['eval/accuracy']:.1%}" if "eval/accuracy" in last else ""
    print(f"done at step {last['step']}: loss {last['loss']:.4g}{acc}; {'adapter' if a.lora else 'model'} in "
          f"{a.out}/{'adapter' if a.lora else 'model'}")


def cmd_reward_model(a: argparse.Namespace) -> None:
    from ember.settings import values
    from ember.train.loop import TrainConfig
    from ember.train.reward import run_reward_model

    train_cfg = values(TrainConfig, a)
    last = run_reward_model(a.model, a.data, a.out, train_cfg, max_length=train_cfg.block_size,
                            eval_data=a.eval_data, eval_fraction=a.eval_fraction, device=a.device, resume=a.resume,
                            progress=not a.no_progress)
    print(f"done at step {last['step']}: loss {last['loss']:.4g}; reward model in {a.out}/model")


def cmd_ppo(a: argparse.Namespace) -> None:
    from ember.errors import EmberError
    from ember.settings import values
    from ember.train.loop import TrainConfig
    from ember.train.ppo import PPOConfig
    from ember.train.rlhf import run_ppo

    rule = None
    if a.reward is not None:
        if not a.reward.startswith("rule:"):
            raise EmberError(f"--reward takes rule:NAME (e.g. rule:concise), got '{a.reward}'.")
        rule = a.reward.removeprefix("rule:")
    train_cfg = values(TrainConfig, a)
    cfg = values(PPOConfig, a, **{name: getattr(train_cfg, same) for name, same in PPO_FROM_TRAINING.items()})
    last = run_ppo(a.policy, a.prompts, a.out, cfg, reward_model_dir=a.reward_model, reward_rule=rule,
                   eval_fraction=a.eval_fraction, chat=False if a.raw_prompts else None, device=a.device,
                   resume=a.resume, progress=not a.no_progress, train_cfg=train_cfg)
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("reward", "kl", "eval/reward", "eval/kl") if k in last)
    print(f"done after {last['step']} iterations: {shown}; policy in {a.out}/model, curves in {a.out}/ppo.png")


def cmd_grpo(a: argparse.Namespace) -> None:
    from ember.settings import values
    from ember.train.grpo import GRPOConfig, run_grpo
    from ember.train.loop import TrainConfig

    last = run_grpo(a.model, a.prompts, a.out, values(TrainConfig, a), values(GRPOConfig, a), reward_rules=a.reward,
                    reward_model_dir=a.reward_model, eval_fraction=a.eval_fraction,
                    chat=False if a.raw_prompts else None, device=a.device, resume=a.resume,
                    progress=not a.no_progress)
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("reward", "kl", "eval/reward", "eval/kl") if k in last)
    print(f"done at step {last['step']}: {shown}; policy in {a.out}/model, curves in {a.out}/grpo.png")


def cmd_constitutional(a: argparse.Namespace) -> None:
    import os

    from ember.align.constitutional import EndpointChat, LocalChat, load_principles, run_constitutional
    from ember.train.ppo import load_prompts

    principles = load_principles(a.principles)
    prompts = load_prompts(a.prompts)
    if a.endpoint:
        chat = EndpointChat(a.endpoint, model=a.served_model, api_key=a.api_key or os.environ.get("OPENAI_API_KEY"),
                            max_tokens=a.max_tokens, temperature=a.temperature)
    else:
        from ember.load import load_model, load_tokenizer

        chat = LocalChat(load_model(a.model, device=a.device), load_tokenizer(a.model), max_tokens=a.max_tokens,
                         temperature=a.temperature, seed=a.seed)
    s = run_constitutional(chat, prompts, principles, a.out, rounds=a.rounds, seed=a.seed,
                           progress=not a.no_progress)
    print(f"{s['sft_rows']} SFT rows and {s['preference_pairs']} preference pairs from {s['prompts']} prompts "
          f"({s['unchanged_or_empty']} unchanged or empty) in {a.out}")
