"""Speculative decoding in the batched engine: same greedy tokens, same sampling distribution."""

from __future__ import annotations

import math

import pytest
import torch

from ember.config import preset
from ember.engine import LLM, SamplingParams
from ember.engine.speculative import NgramProposer, verify
from ember.errors import EmberError
from ember.model import CausalLM
from ember.sampling import SamplingRows, seeded_generator

VOCAB = 64


def tiny(seed: int, layers: int = 2) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(preset("tiny", vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def target() -> CausalLM:
    return tiny(0)


def prompts() -> list[list[int]]:
    # Repetitive prompts give prompt lookup something to find; mixed lengths exercise the batch.
    return [[5, 6, 7, 8] * 6, [9, 10, 11] * 3 + [12], list(range(20, 50)), [3, 4] * 10 + [30, 31, 32]]


def greedy(llm: LLM, max_tokens: int = 24) -> list[list[int]]:
    outs = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_ngram_proposer_continues_the_most_recent_match():
    p = NgramProposer(max_n=3, min_n=1)
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3) == [7, 1, 2]  # latest match of (1, 2, 3)
    assert p.propose([1, 2, 3, 4], 2) == []  # nothing repeats
    assert p.propose([5, 1, 5], 4) == [1, 5]  # continuation runs to the end of the context
    assert p.propose([7, 8, 9, 7, 8, 7, 8], 3) == [9, 7, 8]  # the latest match has only 2 tokens after it


def test_verify_greedy_keeps_the_agreeing_prefix_and_adds_the_targets_token():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 1]):
        logits[row, best] = 5.0
    rows = SamplingRows([SamplingParams(temperature=0)] * 4)
    assert verify(logits, rows, [[3, 4, 5]]) == [[3, 4, 9]]  # third guess rejected, target says 9
    assert verify(logits, rows, [[3, 4, 9]]) == [[3, 4, 9, 1]]  # all accepted, plus a bonus token
    assert verify(logits, rows, [[0, 4, 9]]) == [[3]]


@pytest.mark.parametrize("method", ["ngram", "draft-other", "draft-self"])
def test_speculative_greedy_output_is_identical(target, method):
    reference = greedy(LLM(target, num_kv_blocks=64, block_size=8))
    spec = {"ngram": "ngram", "draft-other": tiny(1, layers=1), "draft-self": target}[method]
    llm = LLM(target, num_kv_blocks=64, block_size=8, speculative=spec, num_speculative_tokens=3)
    assert greedy(llm) == reference
    assert llm.stats["spec_proposed_tokens"] > 0
    if method == "draft-self":  # a perfect draft: every guess is accepted
        assert llm.spec_acceptance_rate == 1.0 and llm.spec_mean_accepted_length > 3.5
    llm.block_manager.check()
    assert llm.block_manager.num_used == 0


def test_speculative_greedy_survives_preemption_and_prefix_hits(target):
    reference = greedy(LLM(target, num_kv_blocks=64, block_size=4), max_tokens=30)
    llm = LLM(target, num_kv_blocks=24, block_size=4, speculative=target, num_speculative_tokens=4)
    assert greedy(llm, max_tokens=30) == reference
    assert llm.scheduler.num_preemptions > 0
    assert greedy(llm, max_tokens=30) == reference  # again, now through the prefix cache
    assert llm.block_manager.hit_rate > 0


def test_speculation_respects_stops_and_max_tokens(target):
    plain = LLM(target, num_kv_blocks=64, block_size=8)
    spec = LLM(target, num_kv_blocks=64, block_size=8, speculative=target, num_speculative_tokens=4)
    full = greedy(plain, max_tokens=12)
    stop_at = full[0][5]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at])
    a = [o.outputs[0].token_ids for o in plain.generate(prompts(), params)]
    b = [o.outputs[0].token_ids for o in spec.generate(prompts(), params)]
    assert a == b and len(a[0]) <= 5
    assert all(len(t) == 7 for t in greedy(spec, max_tokens=7))


def chi_square_upper(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.999 (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, rare bins (expected < 5) pooled into one."""
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if not big.all():
        obs, exp = torch.cat([obs, counts[~big].sum()[None]]), torch.cat([exp, expected[~big].sum()[None]])
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


@pytest.mark.parametrize("drafted", ["one-hot", "sampled"])
def test_rejection_rule_reproduces_the_target_distribution(drafted):
    # The rule alone, many times over: target p, a draft that guesses from q (or always 2).
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0] * 6])
    p = torch.softmax(logits[0], dim=-1)
    q = torch.softmax(torch.tensor([0.0, 2.0, 2.5, 0.0, 1.0, -1.0]), dim=-1)
    rows = SamplingRows([SamplingParams(temperature=1.0)] * 2, [gen] * 2)
    n, counts = 3000, torch.zeros(6, dtype=torch.float64)
    for _ in range(n):
        if drafted == "one-hot":
            token = verify(logits, rows, [[2]])[0][0]
        else:
            guess = int(torch.multinomial(q, 1, generator=gen))
            token = verify(logits, rows, [[guess]], draft_probs=[q[None]])[0][0]
        counts[token] += 1
    stat, df = chi_square(counts, p.double() * n)
    assert stat < chi_square_upper(df), stat


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_sampling_matches_the_target_distribution(target, method):
    # The first new token comes from the prompt's own step; the second is the first one
    # verified against a guess. Its exact law mixes p(. | prompt + t1) over t1 ~ p(. | prompt).
    order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3)).tolist()
    prompt = order + order[:8]  # every token occurs, so prompt lookup always has a guess
    temperature = 0.7
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1].double() / temperature, dim=-1)
        after = target(torch.tensor([prompt + [t] for t in range(VOCAB)]))[:, -1].double()
        p2 = p1 @ torch.softmax(after / temperature, dim=-1)
    n = 1500
    spec = "ngram" if method == "ngram" else tiny(2, layers=1)
    llm = LLM(target, num_kv_blocks=2048, block_size=8, max_num_seqs=256, max_num_batched_tokens=4096,
              speculative=spec, num_speculative_tokens=2)
    params = [SamplingParams(temperature=temperature, max_tokens=3, seed=s, ignore_eos=True) for s in range(n)]
    second = [o.outputs[0].token_ids[1] for o in llm.generate([prompt] * n, params)]
    assert llm.stats["spec_verify_steps"] >= n  # every request verified guesses
    assert 0 < llm.stats["spec_accepted_tokens"] < llm.stats["spec_proposed_tokens"]  # both branches ran
    stat, df = chi_square(torch.bincount(torch.tensor(second), minlength=VOCAB).double(), p2 * n)
    assert stat < chi_square_upper(df), stat


def test_bad_speculative_settings_are_refused(target):
    with pytest.raises(EmberError, match="speculative"):
        LLM(target, num_kv_blocks=16, speculative="magic")
    with pytest.raises(EmberError, match="vocabulary"):
        LLM(target, num_kv_blocks=16, speculative=CausalLM(preset("tiny", vocab_size=VOCAB * 2)))
    with pytest.raises(EmberError, match="num_speculative_tokens"):
        LLM(target, num_kv_blocks=16, speculative="ngram", num_speculative_tokens=0)


@pytest.mark.slow  # compiles the draft's one-token step (about half a minute the first time)
def test_compiled_draft_steps_guess_exactly_what_the_paged_draft_guesses(target, monkeypatch):
    """A lone sequence drafts through the compiled step on its own static cache. Its guesses
    (so the accepted counts, with rejections rolling its cache back) and its seeded samples must
    be those of the paged draft, and greedy output that of plain decoding."""
    import ember.engine.speculative as speculative

    draft = tiny(1, layers=1)
    calls = []
    real = speculative.compiled_decode_step
    monkeypatch.setattr(speculative, "compiled_decode_step", lambda *a: calls.append(1) or real(*a))
    prompt = [[5, 6, 7, 8] * 6]
    runs = {}
    for compiled in (False, True):
        llm = LLM(target, num_kv_blocks=64, block_size=8, speculative=draft, num_speculative_tokens=3,
                  compile_draft=compiled)
        greedy_ids = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        sampled = llm.generate(prompt, SamplingParams(temperature=0.8, max_tokens=24, seed=7, ignore_eos=True))
        runs[compiled] = (greedy_ids[0].outputs[0].token_ids, sampled[0].outputs[0].token_ids,
                          llm.stats["spec_proposed_tokens"], llm.stats["spec_accepted_tokens"])
        llm.block_manager.check()
    assert calls and runs[True] == runs[False]
    assert 0 < runs[True][3] < runs[True][2]  # guesses were both accepted and rejected
    plain = LLM(target, num_kv_blocks=64, block_size=8)
    assert runs[True][0] == plain.generate(prompt, SamplingParams(temperature=0, max_tokens=24,
                                                                 ignore_eos=True))[0].outputs[0].token_ids


@pytest.mark.slow  # compiles the draft's one-token step (shares the compile with the test above)
def test_compiled_draft_distributions_follow_the_context_through_rollbacks(target):
    """The compiled draft's distributions equal a full forward over the context plus its guesses,
    after every kind of verification: all guesses accepted, none, and some."""
    from ember.engine.sequence import Sequence, SpecState

    draft = tiny(1, layers=1)
    llm = LLM(target, num_kv_blocks=64, block_size=8, speculative=draft, num_speculative_tokens=3,
              compile_draft=True)
    seq = Sequence([5, 6, 7, 8] * 6, SamplingParams(temperature=1.0, seed=0, max_tokens=40), spec=SpecState(),
                   generator=seeded_generator(0))  # as LLM.add_request gives a seeded request
    for accepted in (3, 0, 1, 2):
        (guesses,), (dist,) = llm.proposer.propose([seq], [3])
        assert seq.spec.draft_cache is not None and len(guesses) == 3
        n = len(seq.token_ids)
        with torch.no_grad():
            logits = draft(torch.tensor([seq.token_ids + guesses]))[0, n - 1:n + 2].float()
        torch.testing.assert_close(dist, torch.softmax(logits, dim=-1), atol=1e-5, rtol=1e-4)
        # The target keeps `accepted` guesses and adds a token of its own; the draft forgets the rest,
        # as the engine's settling does.
        own = (guesses[accepted] + 1) % VOCAB if accepted < 3 else 9
        for token in guesses[:accepted] + [own]:
            seq.append(token)
        seq.spec.settle(n + accepted)


class CharTokenizer:
    """Each id is one character, so a stop string spans several (verified) tokens."""
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_a_stop_string_inside_accepted_guesses_drops_the_guesses_after_it(target):
    """Several guesses are accepted in one step; when a stop string completes among them, the
    completion ends at its token, as it does without speculation."""
    tok = CharTokenizer()
    plain = LLM(target, tokenizer=tok, num_kv_blocks=64, block_size=8)
    spec = LLM(target, tokenizer=tok, num_kv_blocks=64, block_size=8, speculative=target, num_speculative_tokens=4)
    free = plain.generate(prompts(), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for p, out in zip(prompts(), free):
        text = out.outputs[0].text
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[text[9:11]])
        a = plain.generate([p], params)[0].outputs[0]
        b = spec.generate([p], params)[0].outputs[0]
        assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
        assert a.finish_reason == "stop" and a.text == text[:text.index(text[9:11])]
    assert spec.spec_acceptance_rate == 1.0 and spec.spec_mean_accepted_length > 3  # whole steps of guesses
    spec.block_manager.check()
    assert spec.block_manager.num_used == 0
