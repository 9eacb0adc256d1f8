"""Alignment benchmark: DPO on synthetic preferences and PPO on a rule reward, from a pretrained base.

    ember quickstart --minutes 4 --out /tmp/align_base      # once: a small pretrained base
    python benchmarks/align.py [--base /tmp/align_base/model] [--no-peer]

DPO. Preference pairs from `ember.synth` ("concise-over-rambling" over arithmetic prompts:
the bare answer is chosen over the same answer wrapped in filler); held-out pairs have
prompts never seen in training. Reported: held-out preference accuracy (the implicit
reward beta * log pi/ref ranks chosen above rejected), and the behaviour itself: the share
of greedy replies to held-out prompts that are concise (end their turn within
`--concise-tokens` tokens), before and after. The peer is TRL's DPOTrainer on the same
checkpoint opened by `transformers`, the same pairs and hyperparameters; its trained model
is loaded back into Ember and measured by the same code, so the columns compare like with like.

Reward model + PPO. A reward model (the SFT model with a scalar head, Bradley-Terry loss)
learns the same preference from the DPO training pairs; PPO then optimises the SFT model
against it on the training prompts, with the adaptive KL controller aiming at `--target-kl`
and `--missing-eos-penalty` for replies cut off at `--max-new-tokens`. Reported on held-out
prompts before and after: mean reward of sampled replies, the share that end their turn,
the greedy concise rate, and the KL to the SFT model. Curves: benchmarks/results/align.ppo.png.

Results: benchmarks/results/align.json and align.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import stamp, write_results  # noqa: E402

from ember.load import load_model  # noqa: E402
from ember.synth import synth_rows  # noqa: E402
from ember.tokenizer import load_tokenizer  # noqa: E402
from ember.train.dpo import DPOConfig, dpo_train, pair_logps, preference_accuracy  # noqa: E402
from ember.train.examples import end_of_turn_id  # noqa: E402
from ember.train.loop import TrainConfig  # noqa: E402
from ember.train.preference import pairs_from_dicts, render_pairs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def greedy_concise_rate(model, tok, prompts: list[str], max_new: int, concise_tokens: int) -> tuple[float, list]:
    """Share of greedy replies that end their turn within `concise_tokens` tokens."""
    from ember.generation import generate_ids
    from ember.sampling import SamplingParams

    stop = {end_of_turn_id(tok)} | ({tok.eos_id} if tok.eos_id is not None else set())
    hits, samples = 0, []
    model.eval()
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        out = list(generate_ids(model, ids, SamplingParams(max_tokens=max_new, temperature=0.0), stop_ids=stop))
        ended = bool(out) and out[-1] in stop
        reply = [t for t in out if t not in stop]
        ok = ended and len(reply) <= concise_tokens
        hits += ok
        if len(samples) < 4:
            samples.append({"prompt": p, "reply": tok.decode(reply), "concise": ok})
    return hits / len(prompts), samples


def dpo_data(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    train = synth_rows("concise-over-rambling", n_train, seed=1, base_task="arithmetic")
    held = synth_rows("concise-over-rambling", n_eval, seed=2, base_task="arithmetic",
                      exclude={r["prompt"] for r in train})
    strip = lambda rows: [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]  # noqa: E731
    return strip(train), strip(held)


def measure_dpo_model(model, tok, held_pairs, ref, beta, prompts, a) -> dict:
    acc = preference_accuracy(model, held_pairs, ref, tok.pad_id, beta, 16, torch.device("cpu"))
    rate, samples = greedy_concise_rate(model, tok, prompts, a.max_new_tokens, a.concise_tokens)
    return {"held_out_accuracy": acc["eval/accuracy"], "held_out_margin": acc["eval/margin"],
            "greedy_concise_rate": rate, "samples": samples}


def run_ember_dpo(a, tok, train_pairs, held_pairs, ref_held, prompts) -> dict:
    model = load_model(a.base, device="cpu", dtype=torch.float32)
    cfg = TrainConfig(max_steps=a.dpo_steps, batch_size=a.batch_size, lr=a.dpo_lr, warmup_steps=a.dpo_steps // 10,
                      weight_decay=0.0, eval_every=0, save_every=0, log_every=5, schedule="cosine")
    run = Path(a.work) / "dpo"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    dpo_train(model, tok, train_pairs, [], run, cfg, DPOConfig(beta=a.beta, max_length=128), progress=False)
    seconds = time.perf_counter() - t0
    out = measure_dpo_model(model, tok, held_pairs, ref_held, a.beta, prompts, a)
    out["train_seconds"] = seconds
    return out


def run_trl_dpo(a, train_rows, tok, held_pairs, ref_held, prompts) -> dict:
    """TRL's DPOTrainer on the same checkpoint, pairs and hyperparameters; measured by Ember.

    fp32 like Ember (TRL turns bf16 autocast on by default, on the CPU too)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig, DPOTrainer

    hf_tok = AutoTokenizer.from_pretrained(a.base)
    hf = AutoModelForCausalLM.from_pretrained(a.base, torch_dtype=torch.float32)
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in train_rows]
    out_dir = Path(a.work) / "trl"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = TRLConfig(output_dir=str(out_dir), per_device_train_batch_size=a.batch_size, max_steps=a.dpo_steps,
                     learning_rate=a.dpo_lr, lr_scheduler_type="cosine", warmup_steps=a.dpo_steps // 10,
                     weight_decay=0.0, beta=a.beta, loss_type=["sigmoid"], max_length=128, report_to="none",
                     use_cpu=True, bf16=False, save_strategy="no", logging_steps=10, seed=1337, adam_beta2=0.95,
                     max_grad_norm=1.0, dataloader_num_workers=0, gradient_checkpointing=False)
    trainer = DPOTrainer(model=hf, args=args, train_dataset=Dataset.from_list(conv), processing_class=hf_tok)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    saved = out_dir / "final"
    trainer.save_model(str(saved))
    tok.save(saved)  # Ember's own tokenizer files beside the weights
    model = load_model(saved, device="cpu", dtype=torch.float32)
    out = measure_dpo_model(model, tok, held_pairs, ref_held, a.beta, prompts, a)
    out["train_seconds"] = seconds
    return out


def sft_mixed_base(a) -> Path:
    """SFT the pretrained base into a chat model that does both behaviours: it answers the
    arithmetic prompts of its training set concisely for `--sft-concise-share` of them and
    with the rambling reply otherwise (prompts disjoint from the DPO and held-out ones). DPO
    then has a behaviour to move: the first step of the usual SFT -> preference pipeline."""
    import random

    from ember.train.sft import sft

    rng = random.Random(3)
    train, held = dpo_data(a.dpo_pairs, a.eval_pairs)
    used = {r["prompt"] for r in train + held}
    rows = synth_rows("concise-over-rambling", a.sft_rows, seed=7, base_task="arithmetic", exclude=used)
    data = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["chosen"] if rng.random() < a.sft_concise_share
                           else r["rejected"]}]} for r in rows]
    run = Path(a.work) / "sft_mix"
    if a.reuse_sft and (run / "out" / "model" / "config.json").is_file():
        print(f"SFT (mixed behaviour) base: reusing {run / 'out' / 'model'}", flush=True)
        return run / "out" / "model"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = TrainConfig(max_steps=100000, batch_size=16, block_size=96, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                      save_every=0, eval_every=0, log_every=20, time_budget_s=a.sft_minutes * 60,
                      schedule_by_time=True)
    last = sft(a.base, run / "data.jsonl", run / "out", method="full", train_config=cfg, progress=False)
    print(f"SFT (mixed behaviour) base: {last['step']} steps, loss {last['loss']:.3f}", flush=True)
    return run / "out" / "model"


def dpo_section(a) -> dict:
    if a.sft_minutes > 0:
        a.pretrained_base, a.base = a.base, str(sft_mixed_base(a))
    tok = load_tokenizer(a.base)
    train_rows, held_rows = dpo_data(a.dpo_pairs, a.eval_pairs)
    train_pairs, _ = render_pairs(tok, pairs_from_dicts(train_rows).pairs, 128)
    held_pairs, _ = render_pairs(tok, pairs_from_dicts(held_rows).pairs, 128)
    base = load_model(a.base, device="cpu", dtype=torch.float32)
    ref_held = pair_logps(base, held_pairs, tok.pad_id, 16, torch.device("cpu"))
    prompts = [r["prompt"] for r in held_rows[:a.greedy_prompts]]
    rate, samples = greedy_concise_rate(base, tok, prompts, a.max_new_tokens, a.concise_tokens)
    before = {"held_out_accuracy": 0.0, "greedy_concise_rate": rate, "samples": samples,
              "note": "policy == reference: every implicit reward is 0, so no pair is ranked"}
    print(f"DPO before: greedy concise rate {rate:.1%}", flush=True)
    ember = run_ember_dpo(a, tok, train_pairs, held_pairs, ref_held, prompts)
    print(f"DPO Ember: accuracy {ember['held_out_accuracy']:.1%}, concise {ember['greedy_concise_rate']:.1%}, "
          f"{ember['train_seconds']:.1f}s", flush=True)
    result = {"task": "concise-over-rambling (arithmetic prompts)", "train_pairs": len(train_pairs),
              "dpo_base": str(a.base), "sft_mix": {"minutes": a.sft_minutes, "rows": a.sft_rows,
                                                   "concise_share": a.sft_concise_share},
              "held_out_pairs": len(held_pairs), "greedy_prompts": len(prompts), "beta": a.beta, "lr": a.dpo_lr,
              "steps": a.dpo_steps, "batch_pairs": a.batch_size, "before": before, "ember": ember}
    if a.peer:
        try:
            trl = run_trl_dpo(a, train_rows, tok, held_pairs, ref_held, prompts)
            result["trl"] = trl
            print(f"DPO TRL: accuracy {trl['held_out_accuracy']:.1%}, concise {trl['greedy_concise_rate']:.1%}, "
                  f"{trl['train_seconds']:.1f}s", flush=True)
        except ImportError as e:
            result["trl"] = {"skipped": f"trl not installed ({e})"}
    return result


def ppo_section(a) -> dict:
    """RLHF the classic way: a reward model learns the preference from pairs, then PPO
    optimises the SFT policy against it under a KL bound to the SFT model."""
    from ember.train.ppo import PPOConfig, reward_model_fn
    from ember.train.reward import RewardModel, reward_train
    from ember.train.rlhf import ppo_train

    if getattr(a, "pretrained_base", None):  # the DPO section already made the SFT model
        base = a.base
    else:
        base = str(sft_mixed_base(a)) if a.sft_minutes > 0 else a.base
    tok = load_tokenizer(base)
    train_rows, held_rows = dpo_data(a.dpo_pairs, a.eval_pairs)
    train_pairs, _ = render_pairs(tok, pairs_from_dicts(train_rows).pairs, 128)
    held_pairs, _ = render_pairs(tok, pairs_from_dicts(held_rows).pairs, 128)

    torch.manual_seed(0)
    backbone = load_model(base, device="cpu", dtype=torch.float32)
    rm = RewardModel(backbone.config, backbone=backbone)
    rm_run = Path(a.work) / "reward_model"
    shutil.rmtree(rm_run, ignore_errors=True)
    t0 = time.perf_counter()
    rm_last = reward_train(rm, tok, train_pairs, held_pairs, rm_run,
                           TrainConfig(max_steps=a.rm_steps, batch_size=a.batch_size, lr=a.rm_lr, warmup_steps=5,
                                       weight_decay=0.0, eval_every=0, save_every=0, log_every=10), progress=False)
    rm_seconds = time.perf_counter() - t0
    rm.eval().requires_grad_(False)
    print(f"Reward model: held-out pair accuracy {rm_last['eval/accuracy']:.1%}, {rm_seconds:.0f}s", flush=True)

    policy = load_model(base, device="cpu", dtype=torch.float32)
    prompts = [r["prompt"] for r in held_rows[:a.greedy_prompts]]
    rate_before, samples_before = greedy_concise_rate(policy, tok, prompts, a.max_new_tokens, a.concise_tokens)
    cfg = PPOConfig(iterations=a.ppo_iterations, rollout_batch=16, minibatch=8, ppo_epochs=4,
                    max_new_tokens=a.max_new_tokens, lr=a.ppo_lr, kl_coef=0.05, target_kl=a.target_kl,
                    missing_eos_penalty=a.missing_eos_penalty, eval_every=5, seed=0)
    run = Path(a.work) / "ppo"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    last = ppo_train(policy, tok, [r["prompt"] for r in train_rows], run, cfg,
                     reward_model=reward_model_fn(rm, tok, tok), eval_prompts=prompts, progress=False)
    seconds = time.perf_counter() - t0
    rate_after, samples_after = greedy_concise_rate(policy, tok, prompts, a.max_new_tokens, a.concise_tokens)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "ppo.png", RESULTS / "align.ppo.png")
    out = {"reward": "reward model trained on the DPO training pairs", "policy": base,
           "reward_model": {"steps": a.rm_steps, "lr": a.rm_lr, "held_out_accuracy": rm_last["eval/accuracy"],
                            "train_seconds": rm_seconds},
           "iterations": a.ppo_iterations, "target_kl": a.target_kl, "lr": a.ppo_lr,
           "missing_eos_penalty": a.missing_eos_penalty, "held_out_prompts": len(prompts),
           "held_out_reward_before": lines[0]["eval/reward"], "held_out_reward_after": last["eval/reward"],
           "held_out_ended_before": lines[0]["eval/ended"], "held_out_ended_after": last["eval/ended"],
           "held_out_kl_after": last["eval/kl"], "rollout_kl_last": last["kl"], "kl_coef_last": last["kl_coef"],
           "greedy_concise_before": rate_before, "greedy_concise_after": rate_after,
           "samples_before": samples_before, "samples_after": samples_after,
           "train_seconds": seconds, "curves": "benchmarks/results/align.ppo.png"}
    print(f"PPO: held-out reward {out['held_out_reward_before']:.3f} -> {out['held_out_reward_after']:.3f}, "
          f"KL {out['held_out_kl_after']:.2f} (target {a.target_kl}), greedy concise {rate_before:.0%} -> "
          f"{rate_after:.0%}, {seconds:.0f}s", flush=True)
    return out


def dpo_base_note(res: dict, d: dict) -> str:
    mix = d.get("sft_mix") or {}
    if mix.get("minutes"):
        return (f"- DPO base: the pretrained {res.get('pretrained_base', res['base'])} after {mix['minutes']:g} min of "
                f"SFT on {mix['rows']} arithmetic chats answered concisely {mix['concise_share']:.0%} of the time and "
                "with the rambling reply otherwise (prompts disjoint from the DPO and held-out ones): a chat model "
                "with both behaviours, so the greedy column shows which one DPO moves it to. 'before' is that "
                "SFT model.")
    return (f"- Base: {res['base']}. On a weak base (a few minutes of pretraining) greedy replies never end "
            "their turn within the concise limit, before or after; the held-out preference accuracy is the "
            "target metric.")


def write_markdown(res: dict) -> str:
    if "dpo" not in res or "ppo" not in res:
        return json.dumps(res, indent=2)
    d, p = res["dpo"], res["ppo"]
    rows = [("held-out preference accuracy", "held_out_accuracy"), ("greedy replies concise", "greedy_concise_rate"),
            ("training time (s)", "train_seconds")]
    peer = "trl" in d and "skipped" not in d["trl"]
    lines = ["# Alignment benchmark", "",
             f"## DPO: {d['task']}, {d['train_pairs']} training pairs, {d['held_out_pairs']} held out, "
             f"beta {d['beta']}, lr {d['lr']}, {d['steps']} steps x {d['batch_pairs']} pairs", "",
             "| | before | Ember DPO |" + (" TRL DPOTrainer |" if peer else ""),
             "|---|---|---|" + ("---|" if peer else "")]
    for label, key in rows:
        def f(x):
            v = x.get(key)
            return "-" if v is None else (f"{v:.1f}" if key == "train_seconds" else f"{v:.1%}")
        lines.append(f"| {label} | {f(d['before'])} | {f(d['ember'])} |" + (f" {f(d['trl'])} |" if peer else ""))
    if peer:
        lines += ["", f"Ember / TRL training time: {d['ember']['train_seconds'] / d['trl']['train_seconds']:.2f}x "
                  "(one training run each in this run: a rough figure, not a speed benchmark)."]
    elif "trl" in d:
        lines += ["", f"TRL: {d['trl']['skipped']}"]
    rm = p.get("reward_model", {})
    lines += ["", f"## Reward model + PPO: {p['iterations']} iterations, target KL {p['target_kl']}, lr {p['lr']}", "",
              f"Reward model: the SFT model with a scalar head, Bradley-Terry loss on the {d['train_pairs']} DPO "
              f"training pairs, {rm.get('steps')} steps; held-out pair accuracy "
              f"{rm.get('held_out_accuracy', float('nan')):.1%}. PPO starts from the same SFT model; its reward is "
              f"the reward model's score minus {p.get('missing_eos_penalty', 0)} for a reply cut off at "
              "--max-new-tokens.", "",
              "| on held-out prompts | before PPO | after PPO |", "|---|---|---|",
              f"| mean reward (sampled replies) | {p['held_out_reward_before']:.3f} | {p['held_out_reward_after']:.3f} |",
              f"| replies that end their turn | {p['held_out_ended_before']:.1%} | {p['held_out_ended_after']:.1%} |",
              f"| greedy replies concise | {p['greedy_concise_before']:.1%} | {p['greedy_concise_after']:.1%} |",
              f"| KL to the SFT model (nats/reply) | 0 | {p['held_out_kl_after']:.2f} (bound {p['target_kl']}) |",
              "", "![PPO curves](align.ppo.png)", "", "Notes:",
              "- TRL's DPOTrainer (defaults) runs the reference model every step; Ember computes reference "
              "log-probs once and caches them, which is most of the time difference. TRL runs in fp32 here "
              "(`bf16=False`; its default on the CPU is bf16 autocast).",
              "- Ember and TRL score each reply through the chat template's closing of the turn (the "
              "newline after the end-of-turn token). When Ember stopped at the end-of-turn token, its DPO "
              "reached the same accuracy but only 15% concise greedy replies: it pushed `logps/rejected` "
              "down until the text broke, while TRL's run raised `logps/chosen`.",
              "- The KL column is the Monte-Carlo estimate sum(log pi - log ref) over sampled replies; "
              "near zero it can come out slightly negative.",
              dpo_base_note(res, d), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="/tmp/align_base/model", help="pretrained base (ember quickstart)")
    ap.add_argument("--work", default="/tmp/align_bench")
    ap.add_argument("--dpo-pairs", type=int, default=400)
    ap.add_argument("--eval-pairs", type=int, default=100)
    ap.add_argument("--greedy-prompts", type=int, default=40)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--sft-minutes", type=float, default=4.0,
                    help="first SFT the base on a concise/rambling mix for this long (0: DPO the base directly)")
    ap.add_argument("--sft-rows", type=int, default=2000)
    ap.add_argument("--reuse-sft", action="store_true", help="reuse the mixed-behaviour SFT model of a previous run")
    ap.add_argument("--sft-concise-share", type=float, default=0.3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dpo-lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--concise-tokens", type=int, default=8)
    ap.add_argument("--ppo-iterations", type=int, default=40)
    ap.add_argument("--ppo-lr", type=float, default=3e-5)
    ap.add_argument("--missing-eos-penalty", type=float, default=1.0,
                    help="subtracted from the reward of a reply cut off at --max-new-tokens")
    ap.add_argument("--rm-steps", type=int, default=40, help="reward-model training steps")
    ap.add_argument("--rm-lr", type=float, default=5e-5)
    ap.add_argument("--target-kl", type=float, default=3.0)
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip TRL's DPOTrainer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "align"), help="results path without extension")
    a = ap.parse_args()
    if not Path(a.base, "config.json").is_file():
        sys.exit(f"No model in {a.base}; make one with: ember quickstart --minutes 4 --out /tmp/align_base")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    res = stamp({"base": str(a.base)})
    res["dpo"] = dpo_section(a)
    if getattr(a, "pretrained_base", None):
        res["pretrained_base"] = a.pretrained_base
    res["ppo"] = ppo_section(a)
    out = Path(a.out)
    write_results(out.name, res, write_markdown(res), results_dir=out.parent)
    print(write_markdown(res))


if __name__ == "__main__":
    main()
