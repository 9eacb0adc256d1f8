"""GRPO beside PPO on a task with a checkable answer: the synthetic arithmetic task.

    python benchmarks/grpo.py            # full run: a 0.9M-parameter base (3000 steps), 800 RL steps each
    python benchmarks/grpo.py --quick    # small settings: a 0.4M-parameter base (1200 steps), 40 RL steps

Most of the time is the starting policy's supervised training (about 20 min for the full base on a
busy 2-core machine, 4 for the quick one); it is kept in --work and reused, and then each RL run
takes a minute or two.

The policy is a small model Ember trains here from scratch (its own byte-level BPE tokenizer
and the shared training loop, `--sft-steps` of supervised steps on "What is 37 + 58?" -> "95"
with the loss on the answer): a model that has the format and gets some answers right,
so that sampled groups disagree and reinforcement learning has something to move. It is
saved once in `--work` and reused (`--base` names another).

Both trainers then start from that model, on the same training prompts, with the same reward
(1 when the reply's number is the right answer, `ember.train.grpo.answer_reward`), the same
reply length and sampling temperature, the same learning rate and optimizer, and the same
budget: `--steps` optimizer steps, each on `--replies` sampled replies (GRPO: `--replies /
--generations` prompts x `--generations` replies; PPO: `--replies` prompts x 1 reply, one
PPO epoch on one minibatch, so one optimizer step per rollout like GRPO's mu = 1). GRPO has a
KL penalty beta to the start (k3, in the loss); PPO its per-token KL penalty in the reward
(`--kl-coef`) and a value head.

Reported, on held-out prompts never trained on, before and after each run and at every
`--eval-every` steps: the mean reward of sampled replies (one per prompt, fixed seeds), the
greedy accuracy, and the KL to the starting model per reply (sum over the reply's tokens of
log pi - log ref on the sampled replies, the same estimator for both), checked against
`--kl-bound`. Curves: benchmarks/results/grpo.png. Results: benchmarks/results/grpo.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, stamp, write_results  # noqa: E402

from ember.checkpoint import save_pretrained  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.engine import LLM  # noqa: E402
from ember.load import load_model, load_tokenizer  # noqa: E402
from ember.model import CausalLM  # noqa: E402
from ember.synth import task_pairs  # noqa: E402
from ember.tokenizer import train_tokenizer  # noqa: E402
from ember.train.grpo import GRPOConfig, PromptRow, answer_reward, grpo_train, rule  # noqa: E402
from ember.train.loop import TrainConfig, lm_loss, train  # noqa: E402
from ember.train.ppo import PPOConfig, rollout  # noqa: E402
from ember.train.preference import token_logps  # noqa: E402
from ember.train.rlhf import ppo_train  # noqa: E402


# --- the starting policy ---------------------------------------------------------------------
DIGIT_PATTERN = r" ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+"


def encode(tok, prompt: str) -> list[int]:
    return tok.encode(prompt, add_bos=bool(getattr(tok, "add_bos_token", False)))


def make_base(a, pairs: list[tuple[str, str]], out: Path) -> Path:
    """A small model trained from scratch on prompt -> answer with the shared loop (loss on the answer
    and the EOS that ends it). `pairs` must not include the RL or held-out prompts."""
    # One token per digit (as small arithmetic models are usually given): a number's digits stay visible.
    tok = train_tokenizer([f"{p} {ans}" for p, ans in pairs], vocab_size=a.vocab_size, pattern=DIGIT_PATTERN)
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_size=a.hidden, intermediate_size=a.hidden * 3, num_hidden_layers=a.layers,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=tok.vocab_size, max_position_embeddings=64,
                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    model = CausalLM(cfg)
    rows = []
    for p, ans in pairs:
        prompt = encode(tok, p)
        reply = tok.encode(" " + ans, add_bos=False) + [tok.eos_id]
        rows.append((prompt + reply, len(prompt)))
    pad = tok.pad_id if tok.pad_id is not None else 0

    def get_batch(step: int, micro: int):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(len(rows), (a.sft_batch,), generator=g).tolist()
        L = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), L), pad)
        labels = torch.full((len(idx), L), -100)
        for r, i in enumerate(idx):
            seq, start = rows[i]
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, start - 1:len(seq) - 1] = torch.tensor(seq[start:])
        return ids, labels

    def loss_fn(m, batch):
        ids, labels = batch
        loss, n = lm_loss(m(ids), labels)
        return loss, n, {}

    tcfg = TrainConfig(max_steps=a.sft_steps, batch_size=a.sft_batch, lr=3e-3, warmup_steps=20, weight_decay=0.0,
                       eval_every=0, save_every=0, log_every=50, seed=0)
    t0 = time.perf_counter()
    last = train(model, tcfg, get_batch, loss_fn, out / "sft_run", progress=False)
    save_pretrained(model, tok, out / "base")
    print(f"base: {a.sft_steps} supervised steps, answer loss {last['loss']:.3f}, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return out / "base"


# --- the shared measure --------------------------------------------------------------------------
@torch.no_grad()
def measure(model, ref, tok, prompts: list[PromptRow], a) -> dict:
    """Held-out prompts: sampled-reply reward and KL to `ref` per reply (fixed seeds), greedy accuracy."""
    model.eval()
    ids = [encode(tok, p.prompt) for p in prompts]
    llm = LLM(model, tokenizer=tok, enable_prefix_caching=False, block_size=16,
              num_kv_blocks=len(ids) * 4, max_num_seqs=len(ids))
    sampling = GRPOConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature)
    ro = rollout(llm, tok, ids, sampling, seed=10 ** 9)
    texts, answers = [p.prompt for p in prompts], [p.answer for p in prompts]
    reward = answer_reward(texts, ro.replies, answers)
    kl = ((token_logps(model(ro.input_ids), ro.input_ids) - token_logps(ref(ro.input_ids), ro.input_ids))
          * ro.mask).sum(-1)
    greedy = rollout(llm, tok, ids, SimpleNamespace(max_new_tokens=a.max_new_tokens, temperature=0.0), seed=0)
    correct = answer_reward(texts, greedy.replies, answers)
    return {"reward": sum(reward) / len(reward), "kl": float(kl.mean()), "greedy_accuracy": sum(correct) / len(correct),
            "samples": [{"prompt": p.prompt, "answer": p.answer, "greedy": r}
                        for p, r in zip(prompts[:4], greedy.replies[:4])]}


# --- the two trainers -------------------------------------------------------------------------------
def run_grpo(a, base: Path, train_rows, eval_rows, work: Path) -> dict:
    tok = load_tokenizer(base)
    policy = load_model(base, device="cpu", dtype=torch.float32)
    tcfg = TrainConfig(max_steps=a.steps, batch_size=a.replies, lr=a.lr, warmup_steps=0, schedule="constant",
                       weight_decay=0.0, beta2=0.999, eval_every=a.eval_every, save_every=0, log_every=1, seed=0)
    cfg = GRPOConfig(num_generations=a.generations, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                     beta=a.beta)
    run = work / "grpo"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    grpo_train(policy, tok, train_rows, run, tcfg, cfg, [rule("answer")], eval_prompts=eval_rows, chat=False,
               progress=False)
    seconds = time.perf_counter() - t0
    start = json.loads((run / "eval_start.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": 0, "reward": start["eval/reward"], "kl": start["eval/kl"]}] + [
        {"step": x["step"], "reward": x["eval/reward"], "kl": x["eval/kl"]} for x in lines if "eval/reward" in x]
    return {"model": policy, "seconds": seconds, "eval_curve": curve,
            "train_reward": [x["reward"] for x in lines], "train_kl_per_token": [x.get("kl") for x in lines],
            "clipfrac": [x["clipfrac"] for x in lines]}


def run_ppo(a, base: Path, train_rows, eval_rows, work: Path) -> dict:
    tok = load_tokenizer(base)
    policy = load_model(base, device="cpu", dtype=torch.float32)
    answers = {p.prompt: p.answer for p in list(train_rows) + list(eval_rows)}

    def reward_fn(prompts, replies):
        return answer_reward(prompts, replies, [answers[p] for p in prompts])

    cfg = PPOConfig(iterations=a.steps, rollout_batch=a.replies, minibatch=a.replies, ppo_epochs=1,
                    max_new_tokens=a.max_new_tokens, temperature=a.temperature, lr=a.lr, kl_coef=a.kl_coef,
                    eval_every=a.eval_every, seed=0)
    run = work / "ppo"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    ppo_train(policy, tok, [p.prompt for p in train_rows], run, cfg, reward_fn=reward_fn,
              eval_prompts=[p.prompt for p in eval_rows], chat=False, progress=False)
    seconds = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": x["step"], "reward": x["eval/reward"], "kl": x["eval/kl"]} for x in lines if "eval/reward" in x]
    return {"model": policy, "seconds": seconds, "eval_curve": curve,
            "train_reward": [x["reward"] for x in lines if "reward" in x],
            "clipfrac": [x["clipfrac"] for x in lines if "clipfrac" in x]}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    for name, r in res["runs"].items():
        steps = list(range(1, len(r["train_reward"]) + 1))
        axes[0].plot(steps, r["train_reward"], lw=1, alpha=0.8, label=f"{name}: training replies")
        ev = r["eval_curve"]
        axes[1].plot([x["step"] for x in ev], [x["reward"] for x in ev], "o-", label=name)
        axes[2].plot([x["step"] for x in ev], [x["kl"] for x in ev], "o-", label=name)
    axes[2].axhline(res["kl_bound"], color="gray", ls="--", lw=1, label="KL bound")
    for ax, title in zip(axes, ("mean reward of the training replies", "held-out reward (sampled replies)",
                                "held-out KL to the start (nats/reply)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def window(res: dict) -> int:
    return max(1, res["steps"] // 4)


def first_last(rewards: list[float], n: int) -> str:
    first, last = rewards[:n], rewards[-n:]
    return f"{sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f}"


def markdown(res: dict) -> str:
    b = res["before"]
    lines = ["# GRPO beside PPO: synthetic arithmetic, a checked answer", "",
             f"Policy: a {res['base']['parameters'] / 1e6:.2f}M-parameter model Ember trained from scratch here "
             f"({res['base']['sft_steps']} supervised steps on {res['base']['sft_pairs']} arithmetic pairs). "
             f"Reward: 1 when the reply's last number is the answer. Budget for each trainer: {res['steps']} "
             f"optimizer steps x {res['replies']} sampled replies (GRPO: {res['replies'] // res['generations']} "
             f"prompts x G = {res['generations']}; PPO: {res['replies']} prompts x 1), lr {res['lr']}, "
             f"{res['max_new_tokens']} reply tokens at most, temperature {res['temperature']}; GRPO beta "
             f"{res['beta']} (k3), PPO kl_coef {res['kl_coef']} (per-token penalty in the reward) and a value head.",
             "", f"| {res['eval_prompts']} held-out prompts | start | GRPO | PPO |", "|---|---|---|---|"]
    g, p = res["runs"]["GRPO"]["after"], res["runs"].get("PPO", {}).get("after")
    cell = lambda d, k, f: f.format(d[k]) if d else "—"  # noqa: E731
    lines += [f"| mean reward, sampled replies | {b['reward']:.3f} | {g['reward']:.3f} | "
              f"{cell(p, 'reward', '{:.3f}')} |",
              f"| greedy accuracy | {b['greedy_accuracy']:.1%} | {g['greedy_accuracy']:.1%} | "
              f"{cell(p, 'greedy_accuracy', '{:.1%}')} |",
              f"| KL to the start (nats/reply, bound {res['kl_bound']}) | 0 | {g['kl']:.3f} | {cell(p, 'kl', '{:.3f}')} |",
              f"| training replies' mean reward, first -> last {window(res)} steps | | "
              + " | ".join(first_last(res["runs"][n]["train_reward"], window(res)) for n in ("GRPO", "PPO") if n in res["runs"])
              + " |",
              f"| training time (s) | | {res['runs']['GRPO']['seconds']:.0f} | "
              f"{res['runs']['PPO']['seconds']:.0f} |" if "PPO" in res["runs"] else "",
              "", "![GRPO and PPO curves](grpo.png)", "", "Verdict:"]
    for name, r in res["runs"].items():
        rise = r["after"]["reward"] - b["reward"]
        within = r["after"]["kl"] <= res["kl_bound"]
        lines.append(f"- {name}: the reward of its training replies went {first_last(r['train_reward'], window(res))} "
                     f"(mean of the first and last {window(res)} steps); the held-out reward "
                     f"{'rose' if rise > 0 else 'did not rise'} ({b['reward']:.3f} -> {r['after']['reward']:.3f}, "
                     f"{rise:+.3f}); the KL stayed {'within' if within else 'past'} the bound "
                     f"({r['after']['kl']:.3f} vs {res['kl_bound']} nats/reply).")
    lines += ["", "Notes:",
              "- The held-out measures use the same code for both runs (`measure` in benchmarks/grpo.py): one "
              "reply per prompt sampled with fixed seeds, and greedy replies for accuracy.",
              f"- The starting policy ({res['base']['path']}) is trained by this script (`make_base`) on first use "
              "and reused from --work afterwards; its supervised training is not part of either trainer's budget.",
              "- The KL is the Monte-Carlo estimate sum(log pi - log ref) over sampled replies; near zero it can "
              "come out slightly negative.",
              "- One seed, a small model, a short budget: differences of a few points are within the noise of "
              f"{res['eval_prompts']} held-out prompts (one sampled reply each).",
              f"- Same replies, different prompt coverage: GRPO's {res['steps']} steps visit "
              f"{res['steps'] * res['replies'] // res['generations']} prompts ({res['steps'] * res['replies'] / res['generations'] / res['train_prompts']:.1f} "
              f"passes over the {res['train_prompts']} training prompts), PPO's {res['steps'] * res['replies']} "
              f"({res['steps'] * res['replies'] / res['train_prompts']:.0f} passes); what either gains on the training "
              "prompts does not carry to the held-out ones at this scale.",
              "- In separate runs of this script with --lr 2e-4 (60 steps), both trainers lowered the held-out reward "
              "of this base, GRPO more (its update concentrates on replies / G prompts a step); 5e-5 is the "
              "default here. DeepSeekMath's GRPO "
              "ran 1024 replies a step (G = 64) on a 7B model; a CPU budget of some 25,000 replies on a "
              "1M-parameter model is a check that the machinery runs, not a reproduction of its gains."]
    return "\n".join(x for x in lines if x is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/grpo_bench")
    ap.add_argument("--base", default=None, help="starting policy (default: train one in --work, or reuse it)")
    ap.add_argument("--quick", action="store_true", help="small settings: a few minutes in all")
    ap.add_argument("--sft-steps", type=int, default=3000)
    ap.add_argument("--sft-batch", type=int, default=64)
    ap.add_argument("--sft-pairs", type=int, default=4000)
    ap.add_argument("--vocab-size", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-prompts", type=int, default=500)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--replies", type=int, default=32, help="sampled replies per optimizer step")
    ap.add_argument("--generations", type=int, default=8, help="GRPO's G")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of every reply")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--kl-bound", type=float, default=1.0, help="nats per reply")
    ap.add_argument("--no-ppo", dest="ppo", action="store_false")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a tiny model gains nothing from more)")
    ap.add_argument("--out", default=str(RESULTS / "grpo"), help="results path without extension")
    a = ap.parse_args()
    if a.quick:
        a.sft_steps, a.hidden, a.layers, a.steps, a.eval_prompts, a.eval_every = 1200, 96, 3, 40, 100, 10
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    # Disjoint prompt sets: supervised pairs, RL training prompts, held-out prompts.
    held = task_pairs("arithmetic", a.eval_prompts, seed=2)
    rl = task_pairs("arithmetic", a.train_prompts, seed=1, exclude={p for p, _ in held})
    sft_pairs = task_pairs("arithmetic", a.sft_pairs, seed=0, exclude={p for p, _ in held + rl})
    base = Path(a.base) if a.base else work / f"base_{a.sft_steps}_{a.hidden}x{a.layers}"
    if not (base / "base" / "config.json").is_file() and not (base / "config.json").is_file():
        make_base(a, sft_pairs, base)
    base = base / "base" if (base / "base" / "config.json").is_file() else base
    train_rows = [PromptRow(p, ans) for p, ans in rl]
    eval_rows = [PromptRow(p, ans) for p, ans in held]

    tok = load_tokenizer(base)
    ref = load_model(base, device="cpu", dtype=torch.float32).eval()
    before = measure(copy.deepcopy(ref), ref, tok, eval_rows, a)
    print(f"start: held-out reward {before['reward']:.3f}, greedy accuracy {before['greedy_accuracy']:.1%}", flush=True)
    res = stamp({"task": "synthetic arithmetic (ember.synth), reward = checked answer", "base": {
        "path": str(base), "parameters": sum(p.numel() for p in ref.parameters()), "sft_steps": a.sft_steps,
        "sft_pairs": len(sft_pairs)}, "train_prompts": len(train_rows), "eval_prompts": len(eval_rows),
        "steps": a.steps, "replies": a.replies, "generations": a.generations, "lr": a.lr, "beta": a.beta,
        "kl_coef": a.kl_coef, "kl_bound": a.kl_bound, "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature, "before": before, "runs": {}})
    trainers = {"GRPO": run_grpo} | ({"PPO": run_ppo} if a.ppo else {})
    for name, fn in trainers.items():
        r = fn(a, base, train_rows, eval_rows, work)
        r["after"] = measure(r.pop("model"), ref, tok, eval_rows, a)
        r["reward_rose_within_kl_bound"] = r["after"]["reward"] > before["reward"] and r["after"]["kl"] <= a.kl_bound
        res["runs"][name] = r
        print(f"{name}: held-out reward {before['reward']:.3f} -> {r['after']['reward']:.3f}, greedy accuracy "
              f"{r['after']['greedy_accuracy']:.1%}, KL {r['after']['kl']:.3f} nats/reply, {r['seconds']:.0f}s",
              flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(res, out.with_suffix(".png"))
    write_results(out.name, res, markdown(res), results_dir=out.parent)
    print(markdown(res))


if __name__ == "__main__":
    main()
