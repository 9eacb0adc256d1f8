"""The engine against `transformers` greedy decoding, under prefix caching and preemption; its
outputs (whole, delta, final), stop strings and the sampler it shares with the generator."""

import dataclasses

import pytest
import torch

from ember.checkpoint import save_pretrained
from ember.config import preset
from ember.engine import LLM, SamplingParams
from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Sequence
from ember.errors import EmberError
from ember.model import CausalLM

VOCAB = 101


@pytest.fixture(scope="module")
def ember_model():
    """A random llama (GQA)."""
    torch.manual_seed(0)
    return CausalLM(preset("tiny", vocab_size=VOCAB, max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def pair(ember_model, tmp_path_factory):
    """The same random llama as an Ember model and as a transformers model (the greedy-decoding peer)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the greedy-decoding peer")
    path = tmp_path_factory.mktemp("engine") / "m"
    save_pretrained(ember_model, None, path)
    return ember_model, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 40, 9, 33, 64, 1, 25][:n]
    return [torch.randint(0, VOCAB, (L,), generator=g).tolist() for L in lengths]


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_checked(llm, ps, params):
    """generate(), checking the block allocator's invariant after every step."""
    ids = [llm.add_request(p, params) for p in ps]
    done = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
        llm.block_manager.check()
    assert llm.block_manager.num_used == 0  # everything returned at the end
    return [done[i] for i in ids]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_greedy_matches_transformers_per_prompt(pair, prefix_caching):
    model, hf = pair
    ps = prompts()
    ps.append(ps[2][:30] + [7, 8, 9])  # shares a 30-token prefix with another prompt
    llm = LLM(model, block_size=8, num_kv_blocks=128, max_num_batched_tokens=48,
              enable_prefix_caching=prefix_caching)
    outs = run_checked(llm, ps, SamplingParams(temperature=0, max_tokens=20))
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 20)
    if prefix_caching:
        assert llm.block_manager.prefix_hits > 0


def test_decodes_split_by_length_keep_greedy_output(pair, monkeypatch):
    """Free extra SDPA calls: every distinct context length becomes its own decode group, so the
    grouped path (rows picked out of and written back into the flat batch) is what runs."""
    import ember.engine.paged_cache as paged_cache

    monkeypatch.setattr(paged_cache, "GROUP_COST_SLOTS", 0)
    model, hf = pair
    ps = prompts()
    llm = LLM(model, block_size=8, num_kv_blocks=128, max_num_batched_tokens=256)
    seen = []
    original = paged_cache.split_by_length
    monkeypatch.setattr(paged_cache, "split_by_length", lambda d: seen.append(len(original(d))) or original(d))
    outs = run_checked(llm, ps, SamplingParams(temperature=0, max_tokens=12))
    assert max(seen) == len(ps)  # all six decodes in separate groups
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 12)


def test_split_by_length_is_the_cheapest_split():
    from itertools import combinations

    from ember.engine.paged_cache import GROUP_COST_SLOTS, split_by_length

    def cost(groups):
        return sum(len(g) * max(m[2] for m in g) + GROUP_COST_SLOTS for g in groups)

    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        lengths = torch.randint(1, 900, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        decodes = [(row, 1, L, []) for row, L in enumerate(lengths)]
        groups = split_by_length(decodes)
        assert sorted(m for grp in groups for m in grp) == sorted(decodes)  # each sequence exactly once
        order = sorted(decodes, key=lambda m: m[2])
        brute = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))])
                    for r in range(len(order)) for cuts in combinations(range(1, len(order)), r))
        assert cost(groups) == brute
    # short and long contexts apart; similar ones together
    groups = split_by_length([(i, 1, L, []) for i, L in enumerate([20] * 8 + [900] * 8)])
    assert sorted(len(grp) for grp in groups) == [8, 8]
    assert split_by_length([(i, 1, 100 + i, []) for i in range(8)]) == [[(i, 1, 100 + i, []) for i in range(8)]]


def test_preemption_under_a_small_pool_keeps_greedy_output(pair):
    model, hf = pair
    ps = prompts()
    llm = LLM(model, block_size=4, num_kv_blocks=40, max_num_batched_tokens=64)
    outs = run_checked(llm, ps, SamplingParams(temperature=0, max_tokens=24))
    assert llm.scheduler.num_preemptions > 0
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)


def test_seeded_sampling_is_the_same_alone_or_in_a_busy_batch(ember_model):
    model = ember_model
    target = prompts(1, seed=5)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=42)
    alone = LLM(model, block_size=8, num_kv_blocks=64).generate([target], params)[0].outputs[0].token_ids
    crowd = prompts(6, seed=9)
    others = [SamplingParams(temperature=0.7, max_tokens=10, seed=i) for i in range(len(crowd))]
    llm = LLM(model, block_size=8, num_kv_blocks=64, max_num_batched_tokens=32)
    outs = llm.generate(crowd[:3] + [target] + crowd[3:], others[:3] + [params] + others[3:])
    assert outs[3].outputs[0].token_ids == alone


def test_n_completions_and_logprobs(ember_model):
    model = ember_model
    llm = LLM(model, block_size=8, num_kv_blocks=64)
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=1.0, n=3, max_tokens=5, seed=1, logprobs=2))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # independent streams
    for o in out.outputs:
        assert len(o.logprobs) == 5
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and len(lp) <= 3 and all(v <= 0 for v in lp.values())


def test_n_completions_share_the_prompt_blocks(ember_model):
    model = ember_model
    prompt = prompts(6)[5][:40]  # 5 full blocks of 8
    llm = LLM(model, block_size=8, num_kv_blocks=64)
    params = SamplingParams(temperature=1.0, n=4, max_tokens=6, seed=3, ignore_eos=True)
    shared = llm.generate([prompt], params)[0]
    assert llm.block_manager.prefix_hits == 3 * 4  # each sibling reuses the first one's full blocks
    assert llm.stats["steps"] < 6 + 3  # and the siblings' short recompute rides along in the same steps
    # the same completions as when every sibling computes the prompt itself
    alone = LLM(model, block_size=8, num_kv_blocks=64, enable_prefix_caching=False).generate([prompt], params)[0]
    assert [o.token_ids for o in shared.outputs] == [o.token_ids for o in alone.outputs]


def test_prompt_logprobs_match_a_full_forward(ember_model):
    model = ember_model
    p = prompts(3)[2]
    llm = LLM(model, block_size=8, num_kv_blocks=64, max_num_batched_tokens=16)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p]))[0].float(), -1)
    # The second time, the prompt's blocks are in the prefix cache: scoring must not skip them.
    llm.generate([p], SamplingParams(temperature=0, max_tokens=1))
    for _ in range(2):
        out = llm.generate([p], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for i in range(1, len(p)):
            assert out.prompt_logprobs[i][p[i]] == pytest.approx(float(ref[i - 1, p[i]]), abs=1e-4)


def test_bad_requests_are_refused(ember_model):
    model = ember_model
    llm = LLM(model, block_size=8, num_kv_blocks=8)
    with pytest.raises(EmberError, match="context"):
        llm.add_request(list(range(1, 100)) * 3)
    with pytest.raises(EmberError, match="KV blocks"):
        llm.add_request([1, 2, 3], SamplingParams(max_tokens=200))
    with pytest.raises(EmberError, match="Unknown engine argument"):
        LLM(model, block_sise=8)


def test_block_manager_shares_prefix_and_evicts_lru_only_when_needed():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Sequence([1, 2, 3, 4, 5], SamplingParams())
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.commit(a)
    bm.free_sequence(a)
    bm.check()
    assert bm.num_free == 4 and len(bm.cached) == 2  # two full blocks kept for reuse
    c = Sequence([7] * 4, SamplingParams())
    bm.allocate(c, 4)  # two never-used blocks are taken first: nothing evicted
    assert len(bm.cached) == 2
    assert not bm.can_allocate(Sequence([8] * 8, SamplingParams()), 8)
    d = Sequence([8] * 2, SamplingParams())
    bm.allocate(d, 2)  # no free block left: evict the least recently used cached one (the tail)
    bm.check()
    assert len(bm.cached) == 1
    b = Sequence([1, 2, 3, 4, 9], SamplingParams())
    assert bm.match_prefix(b) == 2  # the shared head block survived
    bm.check()


@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_prefill_splits_long_prompts_across_steps(ember_model, chunked):
    model = ember_model
    long_prompt = prompts(6)[5]  # 64 tokens
    llm = LLM(model, block_size=8, num_kv_blocks=64, max_num_batched_tokens=16, enable_chunked_prefill=chunked)
    llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=30))
    llm.step()  # the short request is decoding
    llm.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=4))
    sizes = []
    schedule = llm.scheduler.schedule

    def recording_schedule():  # the engine's own step, with each step's token count noted
        sched = schedule()
        sizes.append(sum(n for _, n in sched))
        return sched

    llm.scheduler.schedule = recording_schedule
    while llm.has_unfinished():
        llm.step()
    if chunked:
        assert max(sizes) <= 16  # the budget holds: the long prompt went in chunks beside the decode
    else:
        assert max(sizes) >= 64  # the whole prompt in one step


class CharTokenizer:
    """Each id is one character: every stop string longer than one character spans tokens."""
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def run_outputs(llm, prompt, params):
    """Every output of one request, step by step."""
    rid = llm.add_request(prompt, params)
    outs = []
    while llm.has_unfinished():
        outs += [o for o in llm.step() if o.request_id == rid]
    return outs


@pytest.mark.parametrize("stop", [False, True])
def test_delta_outputs_concatenate_to_the_final_output(ember_model, stop):
    model = ember_model
    llm = LLM(model, tokenizer=CharTokenizer(), block_size=8, num_kv_blocks=64)
    prompt = prompts(3)[2]
    base = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=24, logprobs=1, ignore_eos=True)
    final = run_outputs(llm, prompt, dataclasses.replace(base, output_kind="final"))
    assert len(final) == 1 and final[0].finished
    if stop:  # a stop string from the middle of the first completion: text is cut inside a step
        text = final[0].outputs[0].text
        base = dataclasses.replace(base, stop=[text[8:11]])
        final = run_outputs(llm, prompt, dataclasses.replace(base, output_kind="final"))
        assert final[0].outputs[0].finish_reason == "stop"
    cumulative = run_outputs(llm, prompt, base)
    deltas = run_outputs(llm, prompt, dataclasses.replace(base, output_kind="delta"))
    assert cumulative[-1].outputs == final[0].outputs
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    for o in final[0].outputs:
        mine = [c for d in deltas for c in d.outputs if c.index == o.index]
        assert "".join(c.text for c in mine) == o.text
        assert [t for c in mine for t in c.token_ids] == o.token_ids
        assert [lp for c in mine for lp in c.logprobs] == o.logprobs
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + [o.finish_reason]  # once, at its end
        assert all(c.text or c.finish_reason for c in mine)  # tokens travel with the text they make


def test_a_stop_string_across_tokens_is_cut_the_same_in_the_generator_and_the_engine(ember_model):
    from ember.generation import stream_text

    model, tok = ember_model, CharTokenizer()
    prompt = prompts(3)[1]
    free = "".join(stream_text(model, tok, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    stop = free[12:15]  # three tokens
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    pieces = list(stream_text(model, tok, prompt, params))
    llm = LLM(model, tokenizer=tok, block_size=8, num_kv_blocks=64)
    deltas = run_outputs(llm, prompt, dataclasses.replace(params, output_kind="delta"))
    out = llm.generate([prompt], params)[0].outputs[0]
    expected = free[:free.index(stop)]
    assert "".join(pieces) == expected == out.text == "".join(c.text for d in deltas for c in d.outputs)
    assert out.finish_reason == "stop" and tok.decode(out.token_ids) == expected + stop  # the last token completed it
    for shown in (pieces, [c.text for d in deltas for c in d.outputs]):  # no piece shows a stop's beginning early
        seen = ""
        for piece in shown:  # never a character past the cut, even while the stop was incomplete
            seen += piece
            assert expected.startswith(seen)


def test_engine_depends_on_neither_the_generator_nor_itself_in_a_cycle():
    import ast
    import pathlib

    import ember.engine

    folder = pathlib.Path(ember.engine.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "ember.generation" not in imports[path.stem], path.name
        nested = [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not nested, f"{path.name} imports inside a function"

    def reach(start, seen):
        for m in imports.get(start, ()):
            name = m.rsplit(".", 1)[-1]
            if m.startswith("ember.engine.") and name not in seen:
                seen.add(name)
                reach(name, seen)
        return seen

    for module in imports:
        if module != "__init__":
            assert module not in reach(module, set()), f"ember.engine.{module} imports itself through a cycle"
