"""Alignment: preference data, DPO (+ IPO, hinge), reward model, PPO, constitutional self-critique."""

import json
import math
import types
from collections import defaultdict

import pytest
import torch

from ember.config import preset
from ember.errors import EmberError
from ember.model import CausalLM
from ember.tokenizer import train_tokenizer
from ember.train.dpo import DPOConfig, dpo_loss, dpo_train, pair_logps, split_pairs
from ember.train.loop import TrainConfig
from ember.train.preference import collate_pairs, load_preferences, pairs_from_dicts, render_pairs

from conftest import need_module

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the shared 2-core machine stays usable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = ["apple", "river", "stone", "cloud", "green", "light", "music", "table", "paper", "tiger", "ocean",
         "plant", "bread", "chair", "dream", "field", "glass", "horse", "lemon", "money", "night", "piano"]


@pytest.fixture(scope="module")
def tok():
    texts = [f"say {w} good {w} bad {w} yes no " * 3 for w in WORDS] * 5
    return train_tokenizer(texts, vocab_size=300)


def tiny_model(tok, seed=0, vocab_size=320):
    torch.manual_seed(seed)
    cfg = preset("tiny", hidden_size=32, intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=128,
                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    return CausalLM(cfg)


def good_bad_pairs(words):
    """Chosen replies say 'good', rejected ones 'bad': a rule that generalises to unseen words."""
    return [{"prompt": f"say {w}", "chosen": f"good {w}", "rejected": f"bad {w}"} for w in words]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- preference data --------------------------------------------------------------------
def test_preference_rows_missing_field_name_file_line_and_field(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                         {"prompt": "a", "chosen": "b"}])
    with pytest.raises(EmberError, match=r"p\.jsonl line 2 has no 'rejected' field"):
        load_preferences(p)
    p.write_text('{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    with pytest.raises(EmberError, match=r"line 1: field 'chosen' must be a string"):
        load_preferences(p)


def test_identical_pairs_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": "a", "chosen": "same", "rejected": "same"}, {"prompt": "b", "chosen": "x", "rejected": "y"},
            {"prompt": [{"role": "user", "content": "c"}], "chosen": [{"role": "assistant", "content": "z"}],
             "rejected": [{"role": "assistant", "content": "z"}]}]
    data = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(data.pairs) == 1 and data.skipped_identical == 2


def test_rendered_pair_scores_the_reply_through_the_end_of_its_turn(tok):
    [pair] = pairs_from_dicts(good_bad_pairs(["apple"])).pairs
    [r], dropped = render_pairs(tok, [pair], 64)
    assert dropped == 0
    reply = tok.decode([t for t, m in zip(r.chosen_ids, r.chosen_mask) if m])
    assert reply.startswith("good apple<|im_end|>")
    # What TRL scores: the whole conversation's tokens after the prompt's generation prompt,
    # through the template's closing of the assistant turn.
    prompt = tok.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=True)
    full = tok.apply_chat_template(pair.prompt + pair.chosen, add_generation_prompt=False, tokenize=True)
    assert [t for t, m in zip(r.chosen_ids, r.chosen_mask) if m] == full[len(prompt):]
    # Same prompt tokens on both sides, different replies.
    first_c = r.chosen_mask.index(True)
    assert r.chosen_ids[:first_c] == r.rejected_ids[:first_c]


# --- DPO losses ---------------------------------------------------------------------------
def test_dpo_loss_is_ln2_when_policy_equals_reference(tok):
    model = tiny_model(tok)
    pairs, _ = render_pairs(tok, pairs_from_dicts(good_bad_pairs(WORDS[:4])).pairs, 64)
    lp = pair_logps(model, pairs, tok.pad_id, 4, torch.device("cpu"))
    losses, rc, rr = dpo_loss(lp[:, 0], lp[:, 1], lp[:, 0].clone(), lp[:, 1].clone(), beta=0.1)
    # The log-ratios are exactly 0, so each loss is float32's -logsigmoid(0): ln 2 within one
    # rounding (2^-24 relative, 4e-8); atol 1e-6 is that with room, far below any real log-ratio.
    assert torch.allclose(losses, torch.full((4,), math.log(2)), atol=1e-6)
    assert torch.all(rc == 0) and torch.all(rr == 0)


FIXED = dict(pc=torch.tensor([-10.0, -4.0, -7.5]), pr=torch.tensor([-12.0, -3.0, -7.0]),
             rc=torch.tensor([-11.0, -4.5, -7.0]), rr=torch.tensor([-11.5, -3.5, -7.25]),
             nc=torch.tensor([5.0, 2.0, 4.0]), nr=torch.tensor([6.0, 2.0, 3.0]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_variants_match_the_paper_formulas(loss_type):
    f, beta = FIXED, 0.5
    losses, _, _ = dpo_loss(f["pc"], f["pr"], f["rc"], f["rr"], beta, loss_type, f["nc"], f["nr"])
    for i in range(3):
        h = (f["pc"][i] - f["rc"][i]) - (f["pr"][i] - f["rr"][i])
        if loss_type == "sigmoid":
            want = -math.log(1 / (1 + math.exp(-beta * h)))
        elif loss_type == "hinge":
            want = max(0.0, 1 - beta * h)
        else:
            h_avg = (f["pc"][i] - f["rc"][i]) / f["nc"][i] - (f["pr"][i] - f["rr"][i]) / f["nr"][i]
            want = (h_avg - 1 / (2 * beta)) ** 2
        # Float32 arithmetic on a handful of values of size ≤ 10 against float64: ~1e-7 relative.
        assert float(losses[i]) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_variants_match_trl(loss_type):
    """TRL computes its loss inside DPOTrainer._compute_loss; we drive that method with stubbed
    model outputs carrying the same per-token log-probs and precomputed reference log-probs."""
    trl = need_module("trl", "the DPO loss peer")
    f, beta = FIXED, 0.5
    B, T = 3, 8
    # Spread each summed log-prob evenly over its reply tokens (completion mask counts = nc / nr).
    counts = torch.cat([f["nc"], f["nr"]]).long()
    totals = torch.cat([f["pc"], f["pr"]])
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    per_token = torch.zeros(2 * B, T - 1)
    for i in range(2 * B):
        completion[i, T - int(counts[i]):] = 1
        per_token[i, T - 1 - int(counts[i]):] = totals[i] / counts[i]
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, T - 1),
                                    mean_logits=torch.zeros(2 * B, T - 1),
                                    is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool))
    identity = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=identity, aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0, _metrics=defaultdict(
            lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion, "ref_chosen_logps": f["rc"], "ref_rejected_logps": f["rr"]}
    theirs = trl.DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    ours, _, _ = dpo_loss(f["pc"], f["pr"], f["rc"], f["rr"], beta, loss_type, f["nc"], f["nr"])
    # TRL sums its per-token log-probs (up to 6 float32 terms) where Ember takes the sums given, and
    # forms the loss with other float32 ops: a few roundings of 2^-24 on values of size ~10.
    assert float(ours.mean()) == pytest.approx(float(theirs), rel=1e-5)


def test_unknown_dpo_loss_is_refused():
    with pytest.raises(EmberError, match="Unknown DPO loss 'kto'"):
        DPOConfig(loss_type="kto")


# --- DPO training -------------------------------------------------------------------------
def dpo_setup(tok, reference="precompute"):
    data = pairs_from_dicts(good_bad_pairs(WORDS))
    pairs, _ = render_pairs(tok, data.pairs, 64)
    train, held = pairs[:16], pairs[16:]
    cfg = TrainConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=0, save_every=0,
                      log_every=5, weight_decay=0.0)
    return train, held, cfg, DPOConfig(beta=0.5, reference=reference)


def test_dpo_raises_held_out_preference_accuracy(tok, tmp_path):
    train, held, tcfg, dcfg = dpo_setup(tok)
    model = tiny_model(tok)
    last = dpo_train(model, tok, train, held, tmp_path, tcfg, dcfg, progress=False)
    assert last["eval/accuracy"] >= 0.9 and last["eval/margin"] > 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] < math.log(2) + 1e-3  # first logged step: near ln 2 and falling
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"} <= lines[-1].keys()
    assert (tmp_path / "reference_logps.safetensors").is_file()


def test_dpo_live_reference_from_adapter_disabled_lora_base(tok, tmp_path):
    from ember.lora import LoraConfig, apply_lora

    train, held, tcfg, dcfg = dpo_setup(tok, reference="live")
    tcfg.max_steps, tcfg.lr = 20, 1e-2
    model = apply_lora(tiny_model(tok), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    last = dpo_train(model, tok, train, held, tmp_path, tcfg, dcfg, progress=False)
    assert last["eval/accuracy"] >= 0.9
    # The base stayed frozen: only the adapters moved.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())


def test_dpo_interrupted_and_resumed_matches_straight_run(tok, tmp_path):
    train, held, tcfg, dcfg = dpo_setup(tok)
    tcfg.max_steps, tcfg.save_every = 6, 3
    a = tiny_model(tok)
    dpo_train(a, tok, train, held, tmp_path / "a", tcfg, dcfg, progress=False)
    b = tiny_model(tok)
    tcfg.max_steps = 3
    dpo_train(b, tok, train, held, tmp_path / "b", tcfg, dcfg, progress=False)
    b = tiny_model(tok)  # a fresh process: the base again, then the checkpoint
    tcfg.max_steps = 6
    dpo_train(b, tok, train, held, tmp_path / "b", tcfg, dcfg, progress=False, resume=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_split_pairs_is_seeded_and_disjoint():
    a, b = split_pairs(list(range(20)), 0.25, seed=3)
    assert len(b) == 5 and not set(a) & set(b) and (a, b) == split_pairs(list(range(20)), 0.25, seed=3)


# --- reward model -------------------------------------------------------------------------
def concise_pairs(words):
    """Concise over rambling: the chosen reply says the word once, the rejected one repeats it."""
    return [{"prompt": f"say {w}", "chosen": w, "rejected": f"{w} {w} {w} {w}"} for w in words]


def test_reward_model_learns_a_rule_and_reloads(tok, tmp_path):
    from ember.train.reward import RewardModel, load_reward_model, pair_accuracy, reward_train, save_reward_model

    pairs, _ = render_pairs(tok, pairs_from_dicts(concise_pairs(WORDS)).pairs, 64)
    train, held = pairs[:14], pairs[14:]
    model = RewardModel(tiny_model(tok).config, backbone=tiny_model(tok))
    before = pair_accuracy(model, held, tok.pad_id, 8, torch.device("cpu"))["eval/accuracy"]
    cfg = TrainConfig(max_steps=25, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=0, save_every=0, log_every=5)
    last = reward_train(model, tok, train, held, tmp_path / "run", cfg, progress=False)
    assert last["eval/accuracy"] >= 0.9 and last["eval/accuracy"] > before
    save_reward_model(model, tok, tmp_path / "rm")
    again = load_reward_model(tmp_path / "rm", device="cpu")
    b = collate_pairs(held, tok.pad_id)
    # The same float32 weights; a loaded model may run the CPU fast path's kernels, which sum each dot
    # product (≤ 64 terms) in another order: ≤ 64 · 2^-24 ≈ 4e-6 relative, within allclose's rtol 1e-5.
    assert torch.allclose(model.eval()(b["input_ids"], b["last_index"]), again(b["input_ids"], b["last_index"]))


def test_reward_reads_the_last_real_token_not_padding(tok):
    from ember.train.reward import RewardModel

    # In float64: 4 and 6 positions go through differently blocked matmuls, which in float32 would
    # differ by rounding alone; in float64 that is ~1e-16 relative, so 1e-12 leaves only the question
    # whether the padding is read (which would change the reward by O(0.1)).
    model = RewardModel(tiny_model(tok).config).double().eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, tok.pad_id, tok.pad_id]])
    assert torch.allclose(model(ids), model(padded, torch.tensor([3])), atol=1e-12, rtol=0)


def test_load_reward_model_refuses_a_plain_lm(tok, tmp_path):
    from ember.checkpoint import save_pretrained
    from ember.train.reward import load_reward_model

    save_pretrained(tiny_model(tok), tok, tmp_path / "lm")
    with pytest.raises(EmberError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")


# --- PPO ------------------------------------------------------------------------------------
def test_gae_matches_a_hand_computed_example():
    from ember.train.ppo import gae

    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.4, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # row 2 ends after two tokens
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 1: d2 = 2 - 0.2 = 1.8; d1 = 0.9*0.2 - 1 = -0.82, A1 = -0.82 + 0.72*1.8 = 0.476;
    #        d0 = 1 + 0.9*1 - 0.5 = 1.4, A0 = 1.4 + 0.72*0.476 = 1.74272.
    # Row 2: the episode ends at t=1 (no bootstrap from the masked t=2): d1 = 1 - 0.4 = 0.6;
    #        d0 = 0.5 + 0.9*0.4 - 0.3 = 0.56, A0 = 0.56 + 0.72*0.6 = 0.992.
    # Float32 GAE (a few multiply-adds on values ≤ 5) against exact decimals: ≤ ~4e-7; atol 1e-6.
    assert torch.allclose(adv, torch.tensor([[1.74272, 0.476, 1.8], [0.992, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[2.24272, 1.476, 2.0], [1.292, 1.0, 0.0]]), atol=1e-6)


def test_ppo_clipped_objectives_on_fixed_numbers():
    from ember.train.ppo import policy_loss, value_loss

    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, clipfrac, _ = policy_loss(new, old, adv, mask, cliprange=0.2)
    # max(-A r, -A clip(r)): ratio 1.5 -> -1.2 (clipped), 0.5 -> -0.5, 1.1 -> 2.2.
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3, rel=1e-6)
    assert float(clipfrac) == pytest.approx(1 / 3)
    vloss, _ = value_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 2.0]]), torch.tensor([[2.0, 0.0]]),
                          torch.ones(1, 2, dtype=torch.bool), cliprange_value=0.2)
    assert float(vloss) == pytest.approx(0.5 * ((0.7 - 2.0) ** 2 + 4.0) / 2, rel=1e-6)


def test_kl_penalty_is_per_token_with_score_on_the_last_reply_token():
    from ember.train.ppo import kl_penalized_rewards

    lp = torch.tensor([[-1.0, -2.0, -1.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.5, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    rewards, kl = kl_penalized_rewards(torch.tensor([3.0]), lp, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.1, 3.0, 0.0]]))
    assert float(kl.sum()) == pytest.approx(-1.0)


def test_ppo_on_a_rule_reward_raises_mean_reward_with_bounded_kl(tok, tmp_path):
    from ember.train.ppo import PPOConfig, rule_reward
    from ember.train.rlhf import ppo_train

    policy = tiny_model(tok, vocab_size=tok.vocab_size)  # sampled ids must all decode
    cfg = PPOConfig(iterations=16, rollout_batch=16, minibatch=8, ppo_epochs=4, max_new_tokens=6, lr=1e-2,
                    kl_coef=0.05, target_kl=4.0, seed=0)
    last = ppo_train(policy, tok, [f"say {w}" for w in WORDS[:16]], tmp_path, cfg, reward_fn=rule_reward("char=aeiou"),
                     eval_prompts=[f"say {w}" for w in WORDS[16:]], progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before = lines[0]["eval/reward"]
    assert last["eval/reward"] > before + 0.05, (before, last["eval/reward"])
    assert last["eval/kl"] < 2 * cfg.target_kl
    assert {"reward", "kl", "entropy", "clipfrac", "pg_loss", "vf_loss"} <= lines[-1].keys()
    assert (tmp_path / "ppo.png").stat().st_size > 0
    assert (tmp_path / "checkpoint" / "value_head.safetensors").is_file()


def test_ppo_interrupted_and_resumed_matches_straight_run(tok, tmp_path):
    """A PPO run that dies after its step-2 checkpoint and resumes ends where an uninterrupted one
    does: the same policy and value head bit for bit, the same optimizer state, the same KL
    coefficient, and the same per-iteration metrics."""
    from safetensors.torch import load_file

    from ember.train.ppo import PPOConfig, rule_reward
    from ember.train.rlhf import ppo_train

    cfg = PPOConfig(iterations=4, rollout_batch=8, minibatch=4, ppo_epochs=2, max_new_tokens=5, lr=1e-2,
                    kl_coef=0.05, target_kl=1.0, save_every=2, seed=0)  # target_kl: the coefficient moves
    prompts = [f"say {w}" for w in WORDS[:12]]
    reward = rule_reward("char=aeiou")
    straight = tiny_model(tok, vocab_size=tok.vocab_size)
    ppo_train(straight, tok, prompts, tmp_path / "straight", cfg, reward_fn=reward, progress=False)

    calls = {"n": 0}

    def reward_then_die(prompts_text, replies):
        calls["n"] += 1
        if calls["n"] == 3:  # iteration 3 scores its rollout: the process dies after the step-2 checkpoint
            raise KeyboardInterrupt
        return reward(prompts_text, replies)

    with pytest.raises(KeyboardInterrupt):
        ppo_train(tiny_model(tok, vocab_size=tok.vocab_size), tok, prompts, tmp_path / "resumed", cfg,
                  reward_fn=reward_then_die, progress=False)
    saved = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["step"] == 2
    # As a kill between the commit's two renames leaves it: the only complete copy set aside.
    (tmp_path / "resumed" / "checkpoint").rename(tmp_path / "resumed" / ".checkpoint.old")
    # A fresh process: the policy loaded from its directory again (the reference), then the checkpoint.
    resumed = tiny_model(tok, vocab_size=tok.vocab_size)
    ppo_train(resumed, tok, prompts, tmp_path / "resumed", cfg, reward_fn=reward, resume=True, progress=False)

    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt_a, ckpt_b = tmp_path / "straight" / "checkpoint", tmp_path / "resumed" / "checkpoint"
    head_a, head_b = load_file(ckpt_a / "value_head.safetensors"), load_file(ckpt_b / "value_head.safetensors")
    assert head_a.keys() == head_b.keys() and all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    opt_a = torch.load(ckpt_a / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(ckpt_b / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name, v in opt_a[i].items():
            assert torch.equal(v, opt_b[i][name]), (i, name)
    state_a = json.loads((ckpt_a / "trainer_state.json").read_text())
    state_b = json.loads((ckpt_b / "trainer_state.json").read_text())
    assert state_a["step"] == state_b["step"] == 4 and state_a["kl_coef"] == state_b["kl_coef"] != cfg.kl_coef

    def metrics(run):  # everything but the wall-clock time
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]

    assert [m["step"] for m in metrics("resumed")] == [1, 2, 3, 4]
    assert metrics("resumed") == metrics("straight")


def test_missing_eos_penalty_hits_only_cut_off_replies():
    from ember.train.ppo import PPOConfig, penalize_unfinished

    scores = torch.tensor([0.5, 0.5, -1.0])
    ended = torch.tensor([True, False, False])
    assert penalize_unfinished(scores, ended, 1.0).tolist() == [0.5, -0.5, -2.0]
    assert penalize_unfinished(scores, ended, 0.0).tolist() == scores.tolist()
    with pytest.raises(EmberError, match="missing_eos_penalty"):
        PPOConfig(missing_eos_penalty=-1.0)


def test_chat_rollout_stops_at_end_of_turn_and_trains_on_it(tok):
    """A chat reply ends at the template's end-of-turn token (EOS alone does not stop it); the
    stop token is kept in the sequence so the policy learns to end, and `ended` says which
    replies did before max_new_tokens."""
    from ember.train.ppo import PPOConfig, rollout

    seen = {}

    def out(ids, reason):
        return types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, finish_reason=reason)])

    class FakeLLM:
        model = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_id=tok.eos_id))

        def generate(self, prompts, params):
            seen["params"] = params
            return [out([7, 8], "stop"), out([9, 9, 9], "length")]

    eot = 5
    ro = rollout(FakeLLM(), tok, [[1, 2], [1, 2, 3]], PPOConfig(max_new_tokens=3), seed=0, stop_id=eot)
    assert all(p.stop_token_ids == [eot] and p.ignore_eos for p in seen["params"])
    assert ro.ended.tolist() == [True, False]
    assert ro.input_ids[0, :5].tolist() == [1, 2, 7, 8, eot]  # the end-of-turn token is part of the reply
    assert ro.input_ids[1].tolist() == [1, 2, 3, 9, 9, 9]  # cut off: nothing appended
    assert ro.mask[0].tolist() == [False, True, True, True, False]
    assert ro.last_index.tolist() == [4, 5]
    plain = rollout(FakeLLM(), tok, [[1, 2], [1, 2, 3]], PPOConfig(max_new_tokens=3), seed=0)
    assert seen["params"][0].stop_token_ids == [tok.eos_id] and not seen["params"][0].ignore_eos
    assert plain.input_ids[0, 4].item() == tok.eos_id


def test_rule_reward_names_and_errors():
    from ember.train.ppo import rule_reward

    assert rule_reward("char=ab")(["p"], ["abcd"]) == [0.5]
    assert rule_reward("contains=yes")(["p", "p"], ["oh yes", "no"]) == [1.0, 0.0]
    assert rule_reward("python=math:fsum") is math.fsum
    with pytest.raises(EmberError, match="Unknown reward rule 'length'"):
        rule_reward("length")


# --- constitutional self-critique ------------------------------------------------------------
def fake_endpoint(calls):
    """An OpenAI-compatible chat endpoint as an httpx transport: answers by the last user turn."""
    import httpx

    def handler(request):
        body = json.loads(request.content)
        calls.append(body)
        assert request.url.path == "/v1/chat/completions"
        last = body["messages"][-1]["content"]
        if last.startswith("Identify"):
            text = "The answer is rude."
        elif last.startswith("Rewrite"):
            text = "Please find the answer: 4." if "2+2" in body["messages"][0]["content"] else "Kind reply."
        else:
            text = "It's 4, obviously, you fool." if "2+2" in last else "Same."
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                      "finish_reason": "stop"}]})
    return httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fake")


def test_constitutional_loop_writes_sft_and_preference_files(tmp_path):
    from ember.align.constitutional import EndpointChat, load_principles, run_constitutional

    (tmp_path / "principles.txt").write_text("Be polite.\nBe honest.\n")
    principles = load_principles(tmp_path / "principles.txt")
    calls = []
    chat = EndpointChat("http://fake", model="m", client=fake_endpoint(calls))
    summary = run_constitutional(chat, ["What is 2+2?", "Hello"], principles, tmp_path / "out", progress=False)
    assert summary == {"prompts": 2, "sft_rows": 2, "preference_pairs": 2, "unchanged_or_empty": 0, "rounds": 1}
    assert len(calls) == 6 and calls[1]["messages"][1] == {"role": "assistant", "content": "It's 4, obviously, you fool."}
    sft = [json.loads(x) for x in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert sft[0]["messages"] == [{"role": "user", "content": "What is 2+2?"},
                                  {"role": "assistant", "content": "Please find the answer: 4."}]
    prefs = load_preferences(tmp_path / "out" / "preferences.jsonl")  # readable by DPO as it is
    assert prefs.pairs[0].chosen[0]["content"] == "Please find the answer: 4."
    assert prefs.pairs[0].rejected[0]["content"] == "It's 4, obviously, you fool."


def test_endpoint_errors_are_one_sentence():
    import httpx
    from ember.align.constitutional import EndpointChat

    client = httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(401, json={"error": {"message": "bad key"}})))
    with pytest.raises(EmberError, match="answered 401: bad key"):
        EndpointChat("http://x/v1", client=client)([{"role": "user", "content": "hi"}])


def test_bad_principles_file_is_refused(tmp_path):
    from ember.align.constitutional import load_principles

    (tmp_path / "p.json").write_text('[{"critique": "x"}]')
    with pytest.raises(EmberError, match="entry 1 needs a 'principle' string"):
        load_principles(tmp_path / "p.json")


# --- the commands ----------------------------------------------------------------------------
def run_cli(*argv):
    import argparse

    from ember.train.align_commands import add_commands

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    handlers = add_commands(sub)
    args = parser.parse_args([str(a) for a in argv])
    key = (args.command, args.action) if getattr(args, "action", None) else args.command
    handlers[key](args)


def test_cli_dpo_reward_model_and_ppo_end_to_end(tok, tmp_path, capsys):
    from ember.checkpoint import save_pretrained
    from ember.load import load_model

    save_pretrained(tiny_model(tok), tok, tmp_path / "base")
    data = write_jsonl(tmp_path / "prefs.jsonl", good_bad_pairs(WORDS) + [{"prompt": "x", "chosen": "y", "rejected": "y"}])
    common = ["--max-steps", 4, "--batch-size", 4, "--no-progress", "--device", "cpu", "--max-length", 64]
    run_cli("dpo", "--model", tmp_path / "base", "--data", data, "--out", tmp_path / "dpo", "--loss", "ipo", *common)
    out = capsys.readouterr().out
    assert "skipped 1 with identical chosen and rejected" in out and "held-out preference accuracy" in out
    load_model(tmp_path / "dpo" / "model")
    run_cli("dpo", "--model", tmp_path / "base", "--data", data, "--out", tmp_path / "dpo_lora", "--lora",
            "--lora-r", 2, *common)
    assert (tmp_path / "dpo_lora" / "adapter" / "adapter_model.safetensors").is_file()
    run_cli("reward-model", "--model", tmp_path / "base", "--data", data, "--out", tmp_path / "rm", *common)
    assert "Held-out pair accuracy" in capsys.readouterr().out
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS[:8]])
    run_cli("ppo", "--policy", tmp_path / "base", "--reward-model", tmp_path / "rm" / "model", "--prompts", prompts,
            "--out", tmp_path / "ppo", "--iterations", 2, "--rollout-batch", 4, "--minibatch", 2, "--ppo-epochs", 1,
            "--max-new-tokens", 4, "--no-progress", "--device", "cpu", "--eval-fraction", 0.25,
            "--missing-eos-penalty", 1.0)
    assert (tmp_path / "ppo" / "ppo.png").is_file() and (tmp_path / "ppo" / "model" / "config.json").is_file()


def test_cli_bad_input_is_one_sentence(tok, tmp_path):
    from ember.checkpoint import save_pretrained

    save_pretrained(tiny_model(tok), tok, tmp_path / "base")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": "no prompt field"}])
    with pytest.raises(EmberError, match=r"p\.jsonl line 1 has no 'prompt' field"):
        run_cli("ppo", "--policy", tmp_path / "base", "--reward", "rule:concise", "--prompts", prompts,
                "--out", tmp_path / "o", "--device", "cpu")
    write_jsonl(prompts, [{"prompt": "hi"}, {"prompt": "there"}])
    with pytest.raises(EmberError, match="takes rule:NAME"):
        run_cli("ppo", "--policy", tmp_path / "base", "--reward", "concise", "--prompts", prompts,
                "--out", tmp_path / "o", "--device", "cpu")
    with pytest.raises(EmberError, match="not a reward model"):
        run_cli("ppo", "--policy", tmp_path / "base", "--reward-model", tmp_path / "base", "--prompts", prompts,
                "--out", tmp_path / "o", "--device", "cpu")
    with pytest.raises(EmberError, match="Data file .* does not exist"):
        run_cli("dpo", "--model", tmp_path / "base", "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "o")


def test_cli_constitutional_with_local_model(tok, tmp_path):
    from ember.checkpoint import save_pretrained

    save_pretrained(tiny_model(tok), tok, tmp_path / "base")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "say apple"}, {"prompt": "say river"}])
    (tmp_path / "c.jsonl").write_text(json.dumps({"name": "polite", "critique": "Critique it.",
                                                  "revision": "Revise it."}) + "\n")
    run_cli("align", "constitutional", "--model", tmp_path / "base", "--prompts", prompts, "--principles",
            tmp_path / "c.jsonl", "--out", tmp_path / "cai", "--max-tokens", 4, "--no-progress", "--device", "cpu")
    trace = [json.loads(x) for x in (tmp_path / "cai" / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == 2 and trace[0]["steps"][0]["principle"] == "polite"
    summary = json.loads((tmp_path / "cai" / "summary.json").read_text())
    assert summary["prompts"] == 2 and (tmp_path / "cai" / "preferences.jsonl").is_file()


def test_reward_model_opens_in_transformers_with_the_same_scores(tok, tmp_path):
    transformers = need_module("transformers", "the peer that opens the reward model")
    from ember.train.reward import RewardModel, save_reward_model

    model = RewardModel(tiny_model(tok).config).eval()
    save_reward_model(model, tok, tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])  # no pad token: both read the last position
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits[:, 0]
    # Two float32 implementations of one network (2 layers, 32 wide) on a reward of size ~1: their
    # different summation orders differ by ~1e-6; a misnamed weight changes the score by far more.
    assert torch.allclose(model(ids), theirs, atol=1e-5)


class _OptimizerMade(Exception):
    pass


def _weight_decays_dpo_trains_with(tok, tmp_path, monkeypatch, *flags):
    """The weight decays of the optimizer `ember dpo` builds (the run stops there)."""
    from ember.checkpoint import save_pretrained
    from ember.train import loop

    made = loop.make_optimizer
    seen = []

    def recording(model, cfg):
        seen.extend(g["weight_decay"] for g in made(model, cfg).param_groups)
        raise _OptimizerMade
    save_pretrained(tiny_model(tok), tok, tmp_path / "base")
    data = write_jsonl(tmp_path / "prefs.jsonl", good_bad_pairs(WORDS[:6]))
    with monkeypatch.context() as patch, pytest.raises(_OptimizerMade):
        patch.setattr(loop, "make_optimizer", recording)
        run_cli("dpo", "--model", tmp_path / "base", "--data", data, "--out", tmp_path / "o", "--max-length", 32,
                "--batch-size", 2, "--no-progress", "--device", "cpu", *flags)
    return seen


def test_cli_dpo_weight_decay_flag_reaches_the_optimizer(tok, tmp_path, monkeypatch):
    # matrices decay, norms and biases never do; DPO's default stays no decay at all
    assert _weight_decays_dpo_trains_with(tok, tmp_path / "a", monkeypatch, "--weight-decay", 0.05) == [0.05, 0.0]
    assert _weight_decays_dpo_trains_with(tok, tmp_path / "b", monkeypatch) == [0.0, 0.0]
