"""`ember dpo`, `ember reward-model`, `ember ppo`, `ember align constitutional` (argparse only at import)."""

from __future__ import annotations

import argparse


def _training_flags(p: argparse.ArgumentParser, steps: int, lr: float | None, batch: int) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--max-steps", type=int, default=steps)
    t.add_argument("--lr", type=float, default=lr,
                   help=f"peak learning rate (default {lr:g})" if lr else "peak learning rate (default 5e-5, "
                   "or 5e-4 with --lora)")
    t.add_argument("--batch-size", type=int, default=batch, help="pairs per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--warmup-steps", type=int, default=10)
    t.add_argument("--schedule", default="cosine", choices=["cosine", "constant", "wsd"])
    t.add_argument("--max-length", type=int, default=512, help="tokens per prompt + reply; longer ones are cut")
    t.add_argument("--eval-data", default=None, help="held-out preference JSONL (default: a split of --data)")
    t.add_argument("--eval-fraction", type=float, default=0.1, help="share held out when no --eval-data")
    t.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0 = at the end)")
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")


def _train_config(a: argparse.Namespace):
    from ember.train.loop import TrainConfig

    lr = a.lr or (5e-4 if getattr(a, "lora", False) else 5e-5)
    return TrainConfig(max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=lr,
                       warmup_steps=a.warmup_steps, schedule=a.schedule, weight_decay=0.0,
                       eval_every=a.eval_every, save_every=a.save_every, log_every=a.log_every, seed=a.seed,
                       block_size=a.max_length)


def add_commands(sub: argparse._SubParsersAction) -> dict:
    d = sub.add_parser("dpo", help="Direct Preference Optimization on {prompt, chosen, rejected} JSONL",
                       description="DPO (sigmoid), IPO or hinge loss against the starting model as reference. "
                       "Writes OUT/model (or OUT/adapter with --lora), metrics.jsonl (reward accuracy, margins, "
                       "chosen/rejected log-probs) and held-out preference accuracy.")
    d.add_argument("--model", required=True, help="policy to start from (also the reference)")
    d.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected (strings or messages)")
    d.add_argument("--out", required=True, help="run directory")
    d.add_argument("--beta", type=float, default=0.1, help="strength of the pull toward the reference (default 0.1)")
    d.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge"])
    d.add_argument("--reference", default="precompute", choices=["precompute", "live"],
                   help="reference log-probs computed once and cached (default) or each step (a frozen copy, "
                   "or the adapter-disabled base with --lora)")
    g = d.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters; the reference is the base itself")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="all-linear", help="comma-separated module names or all-linear")
    _training_flags(d, steps=200, lr=None, batch=8)

    r = sub.add_parser("reward-model", help="train a reward model (transformer + scalar head, Bradley-Terry)",
                       description="Writes OUT/model, a reward-model directory (safetensors + JSON) that "
                       "`ember ppo --reward-model` loads, and reports held-out pair accuracy.")
    r.add_argument("--model", required=True, help="base model directory")
    r.add_argument("--data", required=True, help="preference JSONL")
    r.add_argument("--out", required=True, help="run directory")
    _training_flags(r, steps=200, lr=1e-4, batch=8)

    p = sub.add_parser("ppo", help="RLHF with PPO against a reward model or a rule",
                       description="Rollouts with the engine, per-token KL penalty to the frozen starting policy, "
                       "GAE, clipped policy and value losses. Writes OUT/model, metrics.jsonl and ppo.png.")
    p.add_argument("--policy", required=True, help="policy model directory (also the reference)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reward-model", default=None, help="a directory written by `ember reward-model`")
    src.add_argument("--reward", default=None, help="rule:char=SET | rule:contains=TEXT | rule:concise | "
                     "rule:python=module:function")
    p.add_argument("--prompts", required=True, help="JSONL with 'prompt' (string or messages) or one prompt a line")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--iterations", type=int, default=100, help="rollout + update rounds")
    p.add_argument("--rollout-batch", type=int, default=16, help="prompts per rollout")
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.05, help="initial per-token KL penalty")
    p.add_argument("--target-kl", type=float, default=None, help="adapt kl-coef to keep the reply KL near this")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--cliprange", type=float, default=0.2)
    p.add_argument("--cliprange-value", type=float, default=0.2)
    p.add_argument("--vf-coef", type=float, default=0.1)
    p.add_argument("--missing-eos-penalty", type=float, default=0.0,
                   help="subtract this from the reward of a reply cut off at --max-new-tokens (a reward model "
                   "never saw cut-off replies; 1.0 is a common choice)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--raw-prompts", action="store_true", help="feed prompts as plain text, not via the chat template")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default=None)

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
    return {"dpo": cmd_dpo, "reward-model": cmd_reward_model, "ppo": cmd_ppo,
            ("align", "constitutional"): cmd_constitutional}


def cmd_dpo(a: argparse.Namespace) -> None:
    from ember.train.dpo import DPOConfig, run_dpo

    lora = None
    if a.lora:
        from ember.lora import ALL_LINEAR, LoraConfig

        targets = ALL_LINEAR if a.lora_targets == ALL_LINEAR else [t.strip() for t in a.lora_targets.split(",") if t]
        lora = LoraConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, target_modules=targets)
    cfg = DPOConfig(beta=a.beta, loss_type=a.loss, max_length=a.max_length, reference=a.reference)
    last = run_dpo(a.model, a.data, a.out, _train_config(a), cfg, lora_cfg=lora, eval_data=a.eval_data,
                   eval_fraction=a.eval_fraction, device=a.device, resume=a.resume, progress=not a.no_progress)
    acc = f", held-out preference accuracy {last['eval/accuracy']:.1%}" if "eval/accuracy" in last else ""
    print(f"done at step {last['step']}: loss {last['loss']:.4g}{acc}; {'adapter' if a.lora else 'model'} in "
          f"{a.out}/{'adapter' if a.lora else 'model'}")


def cmd_reward_model(a: argparse.Namespace) -> None:
    from ember.train.reward import run_reward_model

    last = run_reward_model(a.model, a.data, a.out, _train_config(a), max_length=a.max_length,
                            eval_data=a.eval_data, eval_fraction=a.eval_fraction, device=a.device, resume=a.resume,
                            progress=not a.no_progress)
    print(f"done at step {last['step']}: loss {last['loss']:.4g}; reward model in {a.out}/model")


def cmd_ppo(a: argparse.Namespace) -> None:
    from ember.errors import EmberError
    from ember.train.ppo import PPOConfig
    from ember.train.rlhf import run_ppo

    rule = None
    if a.reward is not None:
        if not a.reward.startswith("rule:"):
            raise EmberError(f"--reward takes rule:NAME (e.g. rule:concise), got '{a.reward}'.")
        rule = a.reward.removeprefix("rule:")
    cfg = PPOConfig(iterations=a.iterations, rollout_batch=a.rollout_batch, minibatch=a.minibatch,
                    ppo_epochs=a.ppo_epochs, max_new_tokens=a.max_new_tokens, temperature=a.temperature, lr=a.lr,
                    kl_coef=a.kl_coef, target_kl=a.target_kl, gamma=a.gamma, lam=a.lam, cliprange=a.cliprange,
                    cliprange_value=a.cliprange_value, vf_coef=a.vf_coef, missing_eos_penalty=a.missing_eos_penalty,
                    save_every=a.save_every,
                    eval_every=a.eval_every, seed=a.seed)
    last = run_ppo(a.policy, a.prompts, a.out, cfg, reward_model_dir=a.reward_model, reward_rule=rule,
                   eval_fraction=a.eval_fraction, chat=False if a.raw_prompts else None, device=a.device,
                   resume=a.resume, progress=not a.no_progress)
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("reward", "kl", "eval/reward", "eval/kl") if k in last)
    print(f"done after {last['step']} iterations: {shown}; policy in {a.out}/model, curves in {a.out}/ppo.png")


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
        from ember.load import load_model
        from ember.tokenizer import load_tokenizer

        chat = LocalChat(load_model(a.model, device=a.device), load_tokenizer(a.model), max_tokens=a.max_tokens,
                         temperature=a.temperature, seed=a.seed)
    s = run_constitutional(chat, prompts, principles, a.out, rounds=a.rounds, seed=a.seed,
                           progress=not a.no_progress)
    print(f"{s['sft_rows']} SFT rows and {s['preference_pairs']} preference pairs from {s['prompts']} prompts "
          f"({s['unchanged_or_empty']} unchanged or empty) in {a.out}")
