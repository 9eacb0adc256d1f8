"""Constrained decoding (JSON schema, regex, choice, grammar) and logit_bias, through the engine.

Every constrained output is checked with an outside judge: `jsonschema` validates JSON, Python's
`re.fullmatch` checks regexes, and the choices are compared as strings. The models are a tiny
random llama with a freshly trained tokenizer (fast; its text is gibberish, so the grammar does
all the work) and SmolLM2 (the real model), at temperature 1 as well as greedy.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import need_module, smollm2_gguf
from ember.config import preset
from ember.engine import LLM, SamplingParams
from ember.errors import EmberError
from ember.model import CausalLM
from ember.structured import StructuredOutput, compile_constraint
from ember.tokenizer import train_tokenizer

jsonschema = need_module("jsonschema", "the validator every constrained JSON output is checked with")

CORPUS = ['{"name": "Ada", "age": 36, "tags": ["x", "y"]}\n', "def add(a, b):\n    return a + b\n",
          "hello world, this is a small test corpus of words and 123 numbers.\n"] * 40

# Bounded strings, numbers and arrays: a random model at temperature 1 finishes them in a few dozen tokens.
SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["person", "ok"],
               "properties": {"person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                                         "properties": {"name": {"type": "string", "maxLength": 6},
                                                        "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
                              "ok": {"type": "boolean"}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["xs"],
              "properties": {"xs": {"type": "array", "minItems": 2, "maxItems": 4,
                                    "items": {"type": "integer", "minimum": -5, "maximum": 5}}}},
    "enum": {"type": "object", "additionalProperties": False, "required": ["color", "size"],
             "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"const": 3}}},
    "anyOf": {"type": "array", "minItems": 1, "maxItems": 3,
              "items": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                  {"type": "string", "maxLength": 3}, {"type": "null"}]}},
    "pattern": {"type": "object", "additionalProperties": False, "required": ["id", "code"],
                "properties": {"id": {"type": "string", "pattern": "^[a-z]{2}-[0-9]{3}$"},
                               "code": {"type": "string", "pattern": "^(A|BB|CCC)$"}}},
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return CausalLM(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                           max_position_embeddings=1024)).eval()


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model, tokenizer=tok, num_kv_blocks=256)


def texts(llm, prompt, params):
    return [o.text for o in llm.generate([prompt], params)[0].outputs]


def completions(llm, prompts, params):
    return [o for out in llm.generate(prompts, params) for o in out.outputs]


# --- every output follows its constraint ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_outputs_validate_at_temperature_1_over_many_seeds(llm, name):
    schema = SCHEMAS[name]
    params = SamplingParams(temperature=1.0, seed=7, n=12, max_tokens=160, structured=StructuredOutput(json=schema))
    for out in completions(llm, ["hello", "def add"], params):
        assert out.finish_reason == "stop", out.text  # the grammar completed, not the token budget
        jsonschema.validate(json.loads(out.text), schema)


def test_greedy_json_and_json_object_outputs_parse(llm):
    for spec, check in ((StructuredOutput(json=SCHEMAS["nested"]), lambda v: jsonschema.validate(v, SCHEMAS["nested"])),
                        (StructuredOutput(json_object=True), lambda v: isinstance(v, dict))):
        for prompt in ("hello", "def add(a, b):", '{"name"'):
            out = completions(llm, [prompt], SamplingParams(temperature=0, max_tokens=200, structured=spec))[0]
            if out.finish_reason == "stop":
                assert check(json.loads(out.text)) is not False
            else:  # an unbounded object may run past the budget; what it wrote is still a prefix of JSON
                assert out.finish_reason == "length" and out.text.startswith("{")


def test_choice_output_is_always_one_of_the_choices(llm):
    choices = ["yes", "no", "maybe so", "n/a"]
    params = SamplingParams(temperature=1.0, seed=3, n=24, max_tokens=20, structured=StructuredOutput(choice=choices))
    got = texts(llm, "hello world", params)
    assert set(got) <= set(choices) and len(set(got)) > 1  # at temperature 1 more than one choice shows up


@pytest.mark.parametrize("regex", [r"[a-d]{3,6}-[0-9]{2}", r"(cat|dog)s? (and|or) [A-Z][a-z]{0,4}\.",
                                   r"-?[1-9][0-9]{0,3}(\.[0-9]{1,2})?"])
def test_regex_output_fully_matches(llm, regex):
    params = SamplingParams(temperature=1.0, seed=11, n=10, max_tokens=40, structured=StructuredOutput(regex=regex))
    for out in completions(llm, ["hello"], params):
        assert out.finish_reason == "stop"
        assert re.fullmatch(regex, out.text), out.text


def test_grammars_in_lark_with_embedded_json_and_in_gbnf(llm):
    lark = 'start: "answer: " (%json {"type": "integer", "minimum": 0, "maximum": 50} | "none")'
    for text in texts(llm, "hello", SamplingParams(temperature=1.0, seed=5, n=8, max_tokens=30,
                                                   structured=StructuredOutput(grammar=lark))):
        assert text == "answer: none" or 0 <= int(text.removeprefix("answer: ")) <= 50, text
    gbnf = 'root ::= greeting " " name\ngreeting ::= "hi" | "hello"\nname ::= [a-z]{2,5}'
    for text in texts(llm, "hello", SamplingParams(temperature=1.0, seed=5, n=8, max_tokens=30,
                                                   structured=StructuredOutput(grammar=gbnf))):
        assert re.fullmatch(r"(hi|hello) [a-z]{2,5}", text), text


# --- the constraint changes nothing it does not have to -------------------------------------------
def test_greedy_output_the_constraint_already_allows_is_unchanged(llm, tok):
    # Random weights pick stray bytes that are not UTF-8 text; a -100 bias on every non-ASCII token
    # (in both runs) keeps the free output text a regex can describe.
    ascii_only = {t: -100.0 for t in range(tok.vocab_size) if any(b >= 0x80 for b in tok.token_bytes(t))}
    base = dict(temperature=0, max_tokens=24, ignore_eos=True, logit_bias=ascii_only)
    free = completions(llm, ["def add(a, b):"], SamplingParams(**base))[0]
    assert free.text.isascii() and len(free.token_ids) == 24
    # regexes the free text satisfies: the text itself (so the constrained run also ends there), and
    # any text up to far longer
    for regex in (re.escape(free.text), r"(?s).{0,400}"):
        out = completions(llm, ["def add(a, b):"], SamplingParams(**base, structured=StructuredOutput(regex=regex)))[0]
        assert out.token_ids == free.token_ids


def test_free_rows_in_a_mixed_batch_equal_running_alone(llm):
    free = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            SamplingParams(temperature=0.8, seed=4, top_p=0.9, max_tokens=20, ignore_eos=True)]
    alone = [completions(llm, ["hello world"], p)[0].token_ids for p in free]
    constrained = [SamplingParams(temperature=1.0, seed=s, max_tokens=80,
                                  structured=StructuredOutput(json=SCHEMAS["enum"])) for s in range(3)]
    outs = completions(llm, ["def add", "hello world", "hello", "hello world", "x"],
                       [constrained[0], free[0], constrained[1], free[1], constrained[2]])
    assert [outs[1].token_ids, outs[3].token_ids] == alone
    for o in (outs[0], outs[2], outs[4]):
        jsonschema.validate(json.loads(o.text), SCHEMAS["enum"])


def test_seeded_constrained_output_is_the_same_alone_or_in_a_busy_batch(llm):
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=80, structured=StructuredOutput(json=SCHEMAS["array"]))
    alone = completions(llm, ["hello"], params)[0].text
    busy = completions(llm, ["def", "hello", "x y z"], [SamplingParams(temperature=1.0, seed=1, max_tokens=30),
                                                        params, SamplingParams(temperature=0, max_tokens=30)])
    assert busy[1].text == alone


# --- logit_bias (OpenAI semantics) ------------------------------------------------------------------
def reference_greedy(model, prompt_ids, steps, bias):
    """Greedy decoding with a full forward per step and the bias added to the last logits."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1].float()
            for t, b in bias.items():
                logits[t] += b
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def test_logit_bias_forces_bans_and_shifts_tokens_as_a_plain_forward_says(llm, model, tok):
    prompt = tok.encode("hello world")
    free = completions(llm, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids
    target = next(t for t in range(5, 300) if t not in free)
    cases = [{target: 100.0}, {free[0]: -100.0}, {free[1]: -100.0, target: 3.5}, {free[0]: -2.0, free[2]: 1.5}]
    for bias in cases:
        got = completions(llm, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                        logit_bias=bias))[0].token_ids
        assert got == reference_greedy(model, prompt, 6, bias), bias
    forced = completions(llm, [prompt], SamplingParams(temperature=1.0, seed=0, n=4, max_tokens=5, ignore_eos=True,
                                                       logit_bias={target: 100.0}))
    assert all(o.token_ids == [target] * 5 for o in forced)  # random logits span far less than 100


def test_bad_logit_bias_is_refused(llm):
    with pytest.raises(EmberError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101.0})
    with pytest.raises(EmberError, match="logit_bias"):
        llm.add_request("hello", SamplingParams(logit_bias={10 ** 6: 1.0}))


# --- bad constraints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    (dict(json={"type": "frobnicate"}), "json"),
    (dict(json="{not json"), "json"),
    (dict(json=[1, 2]), "json"),
    (dict(regex="a(b"), "regex"),
    (dict(choice=[]), "choice"),
    (dict(grammar="start: foo"), "grammar"),
    (dict(grammar="root ::= ("), "grammar"),
])
def test_invalid_constraints_name_the_parameter(kwargs, name):
    with pytest.raises(EmberError, match=f"^Invalid {name}: "):
        StructuredOutput(**kwargs)


def test_exactly_one_constraint():
    with pytest.raises(EmberError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(EmberError, match="exactly one"):
        StructuredOutput(regex="a", choice=["a"])


def test_compiled_once_per_constraint_and_tokenizer(tok):
    spec = StructuredOutput(json=SCHEMAS["nested"])
    a, b = compile_constraint(spec, tok, tok.vocab_size), compile_constraint(spec, tok, tok.vocab_size)
    assert a.matcher is not b.matcher  # each sequence its own matcher
    from ember.structured import _start_state
    hits = _start_state.cache_info().hits
    compile_constraint(StructuredOutput(json=json.dumps(SCHEMAS["nested"])), tok, tok.vocab_size)
    compile_constraint(spec, tok, tok.vocab_size)
    assert _start_state.cache_info().hits == hits + 1


def test_matcher_advances_and_rolls_back(tok):
    m = compile_constraint(StructuredOutput(choice=["hello world", "help"]), tok, tok.vocab_size)
    ids = tok.encode("hello world")
    start = m.allowed_mask()
    assert start[ids[0]] and not start[-1]  # the first token is allowed; the text may not end yet
    for t in ids:
        assert m.advance(t)
    assert m.is_finished and m.is_accepting
    m.rollback(len(ids))
    assert torch.equal(m.allowed_mask(), start) and not m.is_finished
