"""GRPO: advantages and loss against hand computation and TRL's GRPOTrainer, exact resume,
reward rising on the synthetic arithmetic task, and `ember grpo` end to end."""

import argparse
import json
import math
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ember.config import preset
from ember.errors import EmberError
from ember.model import CausalLM
from ember.synth import synth_rows, task_pairs
from ember.tokenizer import train_tokenizer
from ember.train.grpo import (GRPOConfig, PromptRow, aggregate, answer_matches, group_advantages, grpo_loss,
                              grpo_train, load_prompt_rows, per_token_loss, policy_logps, rule)
from ember.train.loop import TrainConfig

from conftest import REPO, need_module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the shared 2-core machine stays usable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ARITHMETIC = task_pairs("arithmetic", 60, seed=0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"{p} {a}" for p, a in ARITHMETIC] * 3, vocab_size=300)


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny", hidden_size=32, intermediate_size=64, vocab_size=tok.vocab_size, max_position_embeddings=128,
                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    return CausalLM(cfg)


def rows(pairs):
    return [PromptRow(p, a) for p, a in pairs]


def train_cfg(**kw):
    base = dict(max_steps=4, batch_size=16, lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0,
                log_every=1, eval_every=0, save_every=0, seed=0)
    return TrainConfig(**{**base, **kw})


def metrics(run_dir):
    """Each logged line without its wall-clock fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("elapsed_s", "tokens_per_s")} for x in lines]


# --- advantages -------------------------------------------------------------------------------
def test_advantages_are_rewards_standardised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    expected = {"group": [], "none": []}
    for g in range(3):
        group = [float(x) for x in rewards[4 * g:4 * g + 4]]
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)  # Bessel's correction, as TRL's nanstd
        expected["group"] += [(r - mean) / (std + 1e-4) for r in group]
        expected["none"] += [r - mean for r in group]
    everything = [float(x) for x in rewards]
    overall = sum(everything) / 12
    batch_std = math.sqrt(sum((r - overall) ** 2 for r in everything) / 11)
    expected["batch"] = [c / (batch_std + 1e-4) for c in expected["none"]]
    for scale, want in expected.items():
        got = group_advantages(rewards, 4, scale)
        # float64 means and square roots of a dozen small numbers: equal to ~1e-15 relative.
        assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12), scale
    # A group whose replies all scored the same teaches nothing: its advantages are exactly 0.
    assert group_advantages(rewards, 4)[4:8].abs().max() == 0


def test_advantages_refuse_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)


# --- the loss by hand -------------------------------------------------------------------------
LOGPS = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
OLD = [[-1.2, -0.5, -2.0], [-0.3, -0.9, -0.75]]
REF = [[-1.1, -0.6, -1.0], [-0.2, -1.0, -0.6]]
ADV = [1.5, -0.8]
MASK = [[1, 1, 0], [0, 1, 1]]


def hand_loss(loss_type, beta=0.1, eps=0.2, max_new_tokens=4):
    """The paper's objective, written out token by token in Python floats."""
    per_token = [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        for t in range(3):
            ratio = math.exp(LOGPS[i][t] - OLD[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            surrogate = min(ratio * ADV[i], clipped * ADV[i])
            d = REF[i][t] - LOGPS[i][t]
            per_token[i][t] = -surrogate + beta * (math.exp(d) - d - 1)
    masked = [[per_token[i][t] * MASK[i][t] for t in range(3)] for i in range(2)]
    tokens = [sum(MASK[i]) for i in range(2)]
    if loss_type == "grpo":
        return sum(sum(masked[i]) / tokens[i] for i in range(2)) / 2
    if loss_type in ("bnpo", "dapo"):  # one micro-batch: its tokens are the step's
        return sum(map(sum, masked)) / sum(tokens)
    return sum(map(sum, masked)) / (2 * max_new_tokens)  # dr_grpo


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_matches_the_paper_written_out_by_hand(loss_type):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    logps = t(LOGPS).requires_grad_()
    cfg = GRPOConfig(beta=0.1, epsilon=0.2, loss_type=loss_type, max_new_tokens=4)
    loss, stats = grpo_loss(logps, t(OLD), t(REF), t(ADV), t(MASK).bool(), cfg)
    # float64 exp/min on a handful of O(1) numbers against the same in Python floats: ~1e-16 apart.
    assert float(loss.detach()) == pytest.approx(hand_loss(loss_type), rel=1e-12)
    loss.backward()
    # Clipping stops the policy gradient where the ratio is past the clip in the advantage's favour
    # (row 0 token 0: ratio e^0.2 > 1.2 with A > 0; row 1 token 1: e^-0.3 < 0.8 with A < 0); only
    # the KL term's gradient, beta * (1 - e^(ref - logp)), is left there.
    for i, j in ((0, 0), (1, 1)):
        kl_grad = 0.1 * (1 - math.exp(REF[i][j] - LOGPS[i][j]))
        per_token_share = {"grpo": 1 / (2 * sum(MASK[i])), "bnpo": 1 / 4, "dapo": 1 / 4, "dr_grpo": 1 / 8}[loss_type]
        assert float(logps.grad[i, j]) == pytest.approx(kl_grad * per_token_share, rel=1e-12)
    assert logps.grad[0, 2] == 0 and logps.grad[1, 0] == 0  # outside the mask
    assert stats["clipfrac"] == pytest.approx(2 / 4)


def test_on_policy_loss_without_kl_is_minus_the_mean_advantage():
    """mu = 1: old log-probs are the policy's own (detached), every ratio is 1, and the "grpo"
    loss is -mean(A) whatever the log-probs; the gradient is -A_i / |o_i| / B per token."""
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor(ADV, dtype=torch.float64)
    loss, stats = grpo_loss(logps, None, None, adv, torch.tensor(MASK).bool(), GRPOConfig(beta=0.0))
    assert float(loss.detach()) == pytest.approx(-(1.5 - 0.8) / 2, rel=1e-12)
    loss.backward()
    want = [-1.5 / 4, -1.5 / 4, 0.0, 0.0, 0.8 / 4, 0.8 / 4]
    assert logps.grad.flatten().tolist() == pytest.approx(want, rel=1e-12)
    assert stats["clipfrac"] == 0 and "kl" not in stats


# --- the loss against TRL -----------------------------------------------------------------------
def trl_loss(logps, old, ref, adv, mask, cfg, grad_accum=1, num_items=None):
    """TRL's own `GRPOTrainer._compute_loss` on these log-probs: a stand-in trainer object carries the
    settings it reads, and its log-prob function returns `logps` (the policy's, with their graph)."""
    need_module("trl", "the GRPO reference whose loss Ember's is compared with")
    from trl.trainer.grpo_trainer import GRPOTrainer

    same = lambda x, **kw: x  # noqa: E731  (one process: gather and reduce are the identity)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=cfg.beta, loss_type=cfg.loss_type, epsilon_low=cfg.epsilon, epsilon_high=cfg.clip_high,
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=grad_accum,
        max_completion_length=cfg.max_new_tokens, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=cfg.kl_importance_weight, delta=None,
                             steps_per_generation=grad_accum),
        accelerator=SimpleNamespace(gather=same, reduce=same, gather_for_metrics=same, num_processes=1),
        _metrics={"train": defaultdict(list)})
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


def random_batch(seed, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # far enough that clipping bites
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    starts = torch.randint(0, T, (B,), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):  # a reply somewhere in the row (a prompt before it, padding after it)
        mask[i, min(starts[i], T - lengths[i]):min(starts[i], T - lengths[i]) + lengths[i]] = True
    return logps, old, ref, adv, mask


SETTINGS = [dict(loss_type=lt, beta=beta, kl_importance_weight=iw, epsilon_high=eh)
            for lt in ("grpo", "bnpo", "dapo", "dr_grpo") for beta, iw in ((0.04, False), (0.04, True), (0.0, False))
            for eh in (None, 0.28)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_loss_gradient_and_statistics_equal_trls_grpo_trainer(settings):
    cfg = GRPOConfig(max_new_tokens=7, **settings)
    logps, old, ref, adv, mask = random_batch(seed=len(str(settings)))
    ours_in = logps.clone().requires_grad_()
    theirs_in = logps.clone().requires_grad_()
    ours, stats = grpo_loss(ours_in, old, ref, adv, mask, cfg)
    theirs, trl_metrics = trl_loss(theirs_in, old, ref if cfg.beta else None, adv, mask, cfg)
    ours.backward()
    theirs.backward()
    # Both in float64, the same formula in a different order of operations: ~1e-16 apart.
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12, abs=1e-14)
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=1e-12, atol=1e-14)
    # TRL counts clipped tokens in float32: a ratio of two small exact counts, rounded to ~6e-8.
    assert stats["clipfrac"] == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], rel=1e-6)
    assert stats["clipfrac"] > 0  # the batch exercises clipping
    if cfg.beta:
        assert stats["kl"] == pytest.approx(trl_metrics["kl"][0], rel=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_aggregates_as_trl_does(loss_type):
    """Two micro-batches through the loop's rule (summed numerators / summed denominators) equal TRL's
    two accumulated micro-batch losses (each divided by the accumulation steps; dapo by the step's tokens)."""
    cfg = GRPOConfig(loss_type=loss_type, beta=0.04, max_new_tokens=7)
    logps, old, ref, adv, mask = random_batch(seed=11, B=8)
    halves = [slice(0, 4), slice(4, 8)]
    nums, dens, trl_total = [], [], 0.0
    for h in halves:
        token_loss, _, _ = per_token_loss(logps[h], old[h], ref[h], adv[h], cfg)
        num, den = aggregate(token_loss, mask[h], loss_type, cfg.max_new_tokens)
        nums.append(num)
        dens.append(den)
        theirs, _ = trl_loss(logps[h], old[h], ref[h], adv[h], mask[h], cfg, grad_accum=2, num_items=mask.sum())
        trl_total += float(theirs)
    # float64, a few dozen operations: ~1e-16 apart.
    assert float(sum(nums) / sum(dens)) == pytest.approx(trl_total, rel=1e-12)


def test_policy_log_probs_are_trls_of_the_tempered_logits(tok):
    need_module("trl", "the GRPO reference whose log-prob function Ember's is compared with")
    from trl.trainer.utils import selective_log_softmax

    model = tiny_model(tok).eval()
    ids = torch.randint(0, tok.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = policy_logps(model, ids, temperature=0.7)
        theirs = selective_log_softmax(model(ids)[:, :-1].float() / 0.7, ids[:, 1:])
    # The same float32 log-softmax reached by two routes (logsumexp vs log_softmax): within 1e-5.
    assert torch.allclose(ours, theirs, atol=1e-5)


# --- rewards ---------------------------------------------------------------------------------------
def test_answer_and_format_rules():
    assert answer_matches("The answer is 95.", "95") and answer_matches("37 + 58 = 95", "95")
    assert answer_matches("-21", "-21") and answer_matches("1,250", "1250")
    assert not answer_matches("95 or maybe 96", "95") and not answer_matches("no idea", "95")
    assert answer_matches(" pmal. ", "pmal") and not answer_matches("pmal!", "pmal")
    score = rule("answer").score
    assert score(["q", "q"], ["it is 4", "5"], ["4", "4"], None) == [1.0, 0.0]
    fmt = rule("rule:format=-?[0-9]+").score
    assert fmt(["q"] * 3, [" 42 ", "42.", "x 42"], [None] * 3, None) == [1.0, 0.0, 0.0]
    assert rule("char=ab").score(["q"], ["abcd"], [None], None) == [0.5]  # PPO's rules carry over
    with pytest.raises(EmberError, match="needs an 'answer' field"):
        score(["q"], ["4"], [None], None)
    with pytest.raises(EmberError, match="not a valid regular expression"):
        rule("format=(")
    with pytest.raises(EmberError, match="needs a pattern"):
        rule("format")
    with pytest.raises(EmberError, match="Unknown reward rule"):
        rule("nonsense")


def test_prompt_rows_keep_answers_and_name_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in synth_rows("arithmetic", 3, seed=1, shape="prompt")))
    loaded = load_prompt_rows(good)
    assert [r.answer for r in loaded] == [a for _, a in task_pairs("arithmetic", 3, seed=1)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(EmberError, match="line 2 has no 'prompt'"):
        load_prompt_rows(bad)
    plain = tmp_path / "p.txt"
    plain.write_text("one\ntwo\n")
    assert [(r.prompt, r.answer) for r in load_prompt_rows(plain)] == [("one", None), ("two", None)]


def test_settings_refuse_what_grpo_cannot_use():
    for bad in (dict(num_generations=1), dict(loss_type="ppo"), dict(scale_rewards="rank"), dict(beta=-1.0),
                dict(temperature=0.0), dict(num_iterations=0)):
        with pytest.raises(EmberError):
            GRPOConfig(**bad)


# --- training -------------------------------------------------------------------------------------
def test_reward_rises_on_arithmetic_within_a_kl_bound(tok, tmp_path):
    """Arithmetic prompts, a format reward (the share of the reply that is digits): 20 steps of 2 prompts
    x 8 replies raise the held-out reward with the KL to the start kept small by beta; with mu = 2 the
    first update on each batch is on-policy (ratio 1, nothing clipped) and the second is not."""
    cfg = GRPOConfig(num_generations=8, max_new_tokens=6, beta=0.04, num_iterations=2)
    policy = tiny_model(tok)
    last = grpo_train(policy, tok, rows(ARITHMETIC[:50]), tmp_path, train_cfg(max_steps=20), cfg,
                      [rule("char=0123456789")], eval_prompts=rows(ARITHMETIC[50:]), progress=False)
    start = json.loads((tmp_path / "eval_start.json").read_text())
    lines = metrics(tmp_path)
    assert last["eval/reward"] > start["eval/reward"] + 0.2, (start, last)
    assert sum(x["reward"] for x in lines[-4:]) > sum(x["reward"] for x in lines[:4]) + 0.4
    assert 0 < last["eval/kl"] < 5.0
    assert all(x["clipfrac"] == 0 for x in lines[0::2]) and any(x["clipfrac"] > 0 for x in lines[1::2])
    assert {"reward", "reward_std", "reward/char", "kl", "clipfrac", "loss", "entropy"} <= lines[-1].keys()
    assert (tmp_path / "grpo.png").stat().st_size > 0


def test_interrupted_inside_a_batch_and_resumed_matches_a_straight_run(tok, tmp_path):
    """mu = 2 with a checkpoint at step 3, halfway through the second batch's two updates: the run
    dies sampling the third batch, resumes on the saved replies of the second, and ends with the same
    weights, optimizer state and metrics as an uninterrupted run."""
    cfg = GRPOConfig(num_generations=4, max_new_tokens=5, beta=0.04, num_iterations=2)
    tcfg = train_cfg(max_steps=6, batch_size=8, save_every=3)
    prompts = rows(ARITHMETIC[:20])
    reward = rule("char=0123456789")
    straight = tiny_model(tok)
    grpo_train(straight, tok, prompts, tmp_path / "straight", tcfg, cfg, [reward], progress=False)

    calls = {"n": 0}

    def score_then_die(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch is sampled at step 4, after the step-3 checkpoint
            raise KeyboardInterrupt
        return reward.score(*args)

    dying = type(reward)("char", score_then_die)
    with pytest.raises(KeyboardInterrupt):
        grpo_train(tiny_model(tok), tok, prompts, tmp_path / "resumed", tcfg, cfg, [dying], progress=False)
    saved = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["step"] == 3
    resumed = tiny_model(tok)  # a fresh process: the starting model again (the reference), then the checkpoint
    grpo_train(resumed, tok, prompts, tmp_path / "resumed", tcfg, cfg, [reward], resume=True, progress=False)

    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    opt = [torch.load(tmp_path / run / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
           for run in ("straight", "resumed")]
    assert opt[0].keys() == opt[1].keys()
    for i in opt[0]:
        for name, v in opt[0][i].items():
            assert torch.equal(v, opt[1][i][name]), (i, name)
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def test_a_step_must_hold_whole_groups(tok, tmp_path):
    with pytest.raises(EmberError, match="do not split into groups of --num-generations 8"):
        grpo_train(tiny_model(tok), tok, rows(ARITHMETIC[:8]), tmp_path, train_cfg(batch_size=12),
                   GRPOConfig(num_generations=8), [rule("answer")], progress=False)


# --- the command ---------------------------------------------------------------------------------
def run_cli(*argv):
    from ember.train.align_commands import add_commands

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    handlers = add_commands(sub)
    args = parser.parse_args([str(a) for a in argv])
    handlers[args.command](args)


def test_cli_grpo_end_to_end_with_resume(tok, tmp_path, capsys):
    from ember.checkpoint import save_pretrained
    from ember.load import load_model

    save_pretrained(tiny_model(tok), tok, tmp_path / "base")
    prompts = tmp_path / "arith.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in synth_rows("arithmetic", 20, seed=3, shape="prompt")))
    common = ["--model", tmp_path / "base", "--prompts", prompts, "--out", tmp_path / "run", "--reward", "answer",
              "--reward", "format=-?[0-9]+", "--reward-weight", 1, "--reward-weight", 0.5, "--num-generations", 4,
              "--batch-size", 8, "--max-new-tokens", 4, "--no-progress", "--device", "cpu", "--eval-fraction", 0.2]
    run_cli("grpo", *common, "--max-steps", 2)
    out = capsys.readouterr().out
    assert "GRPO (grpo): 16 training prompts, 4 held out; 4 replies a prompt, 2 prompts a step" in out
    assert "done at step 2" in out
    assert (tmp_path / "run" / "grpo.png").is_file()
    load_model(tmp_path / "run" / "model")
    run_cli("grpo", *common, "--max-steps", 3, "--resume")  # extends the finished run by one step
    lines = metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert {"reward/answer", "reward/format", "eval/reward", "eval/kl"} <= lines[-1].keys()


def test_cli_grpo_takes_a_gguf_file(tok, tmp_path, capsys):
    from ember.checkpoint import save_pretrained
    from ember.gguf.convert import checkpoint_to_gguf

    save_pretrained(tiny_model(tok), tok, tmp_path / "base")
    gguf = checkpoint_to_gguf(tmp_path / "base", tmp_path / "base.gguf", "f32")
    prompts = tmp_path / "arith.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in synth_rows("arithmetic", 6, seed=3, shape="prompt")))
    run_cli("grpo", "--model", gguf, "--prompts", prompts, "--out", tmp_path / "run", "--reward", "answer",
            "--num-generations", 2, "--batch-size", 4, "--max-new-tokens", 3, "--max-steps", 1, "--no-progress",
            "--device", "cpu", "--eval-fraction", 0)
    assert "done at step 1" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_cli_bad_input_is_one_sentence_and_a_nonzero_exit(tok, tmp_path):
    from ember.checkpoint import save_pretrained

    save_pretrained(tiny_model(tok), tok, tmp_path / "base")
    plain = tmp_path / "p.txt"
    plain.write_text("What is 1 + 1?\nWhat is 2 + 2?\n")
    base = ["--model", tmp_path / "base", "--prompts", plain, "--out", tmp_path / "run", "--no-progress",
            "--device", "cpu", "--num-generations", 2, "--batch-size", 2, "--max-new-tokens", 2, "--max-steps", 1]
    with pytest.raises(EmberError, match="Give at least one reward"):
        run_cli("grpo", *base)
    with pytest.raises(EmberError, match="needs an 'answer' field"):
        run_cli("grpo", *base, "--reward", "answer", "--eval-fraction", 0)
    with pytest.raises(EmberError, match="2 reward weights for 1 rewards"):
        run_cli("grpo", *base, "--reward", "concise", "--reward-weight", 1, "--reward-weight", 2)
    r = subprocess.run([sys.executable, "-m", "ember.cli", "grpo", *map(str, base), "--reward", "format=("],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0
    assert "not a valid regular expression" in r.stderr and "Traceback" not in r.stderr


def test_help_teaches_grpo():
    from ember.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["grpo"].format_help().split())
    for phrase in ("--num-generations", "--beta", "k3", "--loss-type {grpo,bnpo,dapo,dr_grpo}", "--scale-rewards",
                   "--num-iterations", "--reward RULE", "--reward-model", "--resume", "ember data synth --task arithmetic",
                   "sampled replies per micro-batch"):
        assert phrase in text, phrase
    by_flag = {s: a for a in sub.choices["grpo"]._actions for s in a.option_strings}
    for flag in ("--beta", "--epsilon", "--num-generations", "--lr", "--max-steps", "--temperature"):
        assert "default" in by_flag[flag].help, flag
