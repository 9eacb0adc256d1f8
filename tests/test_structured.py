"""Constrained decoding (JSON schema, regex, choice, grammar) and logit_bias, through the engine.

Every constrained output is checked with an outside judge: `jsonschema` validates JSON, Python's
`re.fullmatch` checks regexes, and the choices are compared as strings. The models are a tiny
random llama with a freshly trained tokenizer (fast; its text is gibberish, so the grammar does
all the work) and SmolLM2 (the real model), at temperature 1 as well as greedy.
"""

from __future__ import annotations

import dataclasses
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


# --- with the rest of the engine: speculation, preemption, n > 1, stop strings, streaming ---------------
CONSTRAINED = [StructuredOutput(json=SCHEMAS["nested"]), StructuredOutput(json=SCHEMAS["anyOf"]),
               StructuredOutput(regex=r"(ab|cd)+[0-9]{1,3}"), StructuredOutput(choice=["hello world", "help me"])]
# Prompts that repeat themselves, so prompt lookup has guesses to make.
SPEC_PROMPTS = ['{"person": {"name": "ab", "age": 3}, "ok": true} {"person": {"name": "ab", "age": 3}, "ok": ',
                "[1, 2, null, 1, 2, null, 1, 2", "abcdabcdab12 abcdab", "hello world hello world hel"]


def constrained_runs(llm, temperature=0.0, n=1):
    params = [SamplingParams(temperature=temperature, seed=9, n=n, max_tokens=60, structured=spec)
              for spec in CONSTRAINED]
    return completions(llm, SPEC_PROMPTS, params)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_greedy_output_equals_plain_decoding(model, tok, method):
    reference = [o.token_ids for o in constrained_runs(LLM(model, tokenizer=tok, num_kv_blocks=128))]
    # The target itself as its draft guesses its unconstrained choices: the grammar rejects some of them.
    spec = LLM(model, tokenizer=tok, num_kv_blocks=128, num_speculative_tokens=3,
               speculative="ngram" if method == "ngram" else model)
    assert [o.token_ids for o in constrained_runs(spec)] == reference
    assert spec.stats["spec_proposed_tokens"] > 0 and spec.stats["spec_accepted_tokens"] > 0


def test_speculative_sampling_outputs_still_follow_the_constraint(model, tok):
    spec = LLM(model, tokenizer=tok, num_kv_blocks=128, speculative="ngram", num_speculative_tokens=3)
    outs = constrained_runs(spec, temperature=1.0)
    jsonschema.validate(json.loads(outs[0].text), SCHEMAS["nested"])
    jsonschema.validate(json.loads(outs[1].text), SCHEMAS["anyOf"])
    assert re.fullmatch(r"(ab|cd)+[0-9]{1,3}", outs[2].text) and outs[3].text in ("hello world", "help me")
    assert spec.stats["spec_proposed_tokens"] > 0


def test_preemption_keeps_constrained_output(model, tok):
    roomy = constrained_runs(LLM(model, tokenizer=tok, num_kv_blocks=256), temperature=1.0, n=3)
    tight = LLM(model, tokenizer=tok, block_size=4, num_kv_blocks=36, max_num_batched_tokens=64)
    outs = constrained_runs(tight, temperature=1.0, n=3)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]


def run_outputs(llm, prompt, params):
    rid = llm.add_request(prompt, params)
    outs = []
    while llm.has_unfinished():
        outs += [o for o in llm.step() if o.request_id == rid]
    return outs


def test_n_completions_stream_and_stop_strings(llm):
    base = SamplingParams(temperature=1.0, seed=2, n=3, max_tokens=120, structured=StructuredOutput(json=SCHEMAS["nested"]))
    final = run_outputs(llm, "hello", dataclasses.replace(base, output_kind="final"))[-1]
    assert len({o.text for o in final.outputs}) > 1  # siblings draw their own completions
    for o in final.outputs:
        jsonschema.validate(json.loads(o.text), SCHEMAS["nested"])
    deltas = run_outputs(llm, "hello", dataclasses.replace(base, output_kind="delta"))
    for o in final.outputs:
        mine = [c for d in deltas for c in d.outputs if c.index == o.index]
        assert "".join(c.text for c in mine) == o.text and [t for c in mine for t in c.token_ids] == o.token_ids
    # a stop string ends a constrained completion like any other: cut before it
    cut = run_outputs(llm, "hello", dataclasses.replace(base, stop=['"age"'], output_kind="final"))[-1]
    for o, whole in zip(cut.outputs, final.outputs):
        assert o.finish_reason == "stop" and o.text == whole.text[:whole.text.index('"age"')]


# --- through the server: response_format, guided_*, logit_bias, logprobs, and the 400s -----------------
@pytest.fixture(scope="module")
def client(model, tok):
    testclient = pytest.importorskip("fastapi.testclient")
    openai = need_module("openai", "the official client the server is driven with")
    from ember.serve.app import create_app

    app = create_app(LLM(model, tokenizer=tok, num_kv_blocks=256), "tiny", embedding_model=None)
    with testclient.TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0), http


def test_server_response_format_json_schema_on_chat_streamed_or_not(client):
    oai, _ = client
    schema = SCHEMAS["nested"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Who is Ada?"}]
    whole = oai.chat.completions.create(model="tiny", messages=messages, response_format=fmt, max_tokens=150,
                                        temperature=1.0, seed=4)
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    chunks = oai.chat.completions.create(model="tiny", messages=messages, response_format=fmt, max_tokens=150,
                                         temperature=1.0, seed=4, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    obj = oai.chat.completions.create(model="tiny", messages=messages, response_format={"type": "json_object"},
                                      max_tokens=150, temperature=0)
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)


def test_server_guided_parameters_on_completions(client):
    oai, _ = client
    def text(**extra):
        return oai.completions.create(model="tiny", prompt="hello", max_tokens=60, temperature=1.0, seed=8, n=4,
                                      extra_body=extra).choices
    assert {c.text for c in text(guided_choice=["left", "right"])} <= {"left", "right"}
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) for c in text(guided_regex=r"[0-9]{3}-[a-z]{2}"))
    for c in text(guided_json=SCHEMAS["enum"]) + text(response_format={"type": "json_schema", "json_schema": {
            "name": "e", "schema": SCHEMAS["enum"]}}):
        jsonschema.validate(json.loads(c.text), SCHEMAS["enum"])
    assert all(c.text in ("yes", "no") for c in text(guided_grammar='root ::= "yes" | "no"'))


def test_server_logit_bias_and_top_logprobs(client, tok):
    oai, _ = client
    target = tok.encode(" world")[0]
    piece = tok.decode([target])
    out = oai.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0,
                                 logit_bias={str(target): 100}, extra_body={"ignore_eos": True}, logprobs=3)
    assert out.choices[0].text == piece * 5
    tops = out.choices[0].logprobs.top_logprobs
    # the legacy shape keys alternatives by text, so two stray bytes that both show as U+FFFD share a key
    assert all(1 < len(t) <= 3 and max(t.values()) == t[piece] == 0.0 for t in tops)
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"guided_choice": ["left", "right"]})
    content = chat.choices[0].logprobs.content
    assert chat.choices[0].message.content in ("left", "right")
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    # the first token is forced to start one of the choices: the grammar leaves at most 2 alternatives finite
    assert content[0].top_logprobs[1].logprob < -1e29 or content[0].top_logprobs[1].token[:1] in "lr"


@pytest.mark.parametrize("body, param", [
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json"),
    ({"guided_json": "{oops"}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"logit_bias": {"5000": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_bad_constraints_get_a_400_naming_the_parameter(client, body, param, path):
    _, http = client
    base = ({"prompt": "hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = http.post(path, json={"model": "tiny", "max_tokens": 4, **base, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_server_bad_requests_leave_the_others_alone(client):
    oai, http = client
    def free():
        return oai.completions.create(model="tiny", prompt="def add", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    before = free()
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "guided_regex": "("}).status_code == 400
    assert free() == before


# --- ember generate ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    from ember.checkpoint import save_pretrained

    path = tmp_path_factory.mktemp("structured") / "model"
    save_pretrained(model, tok, path)
    return path


def test_cli_generate_follows_a_json_schema_a_regex_or_choices(model_dir, tmp_path, capsys):
    from ember.cli import main

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["pattern"]))
    runs = [(["--json-schema", schema_file], lambda t: jsonschema.validate(json.loads(t), SCHEMAS["pattern"]) or True),
            (["--regex", "[xyz]{2,4}!"], lambda t: re.fullmatch("[xyz]{2,4}!", t)),
            (["--choice", "alpha,beta"], lambda t: t in ("alpha", "beta"))]
    for flags, check in runs:
        assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--seed", "3", "--max-tokens", "80",
                     *map(str, flags)]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("hello") and check(printed[len("hello"):].rstrip("\n")), printed
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--regex", "a("]) == 1
    assert "Invalid regex" in capsys.readouterr().err


# --- the real model ----------------------------------------------------------------------------------
PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 150}}}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"enum": ["yes", "no"]}}}
SMOL_SCHEMAS = [
    ("Give a JSON object with the name and age of a person named Bob who is 30.", PERSON),
    ('Reply with JSON {"answer": <yes or no>}: is the sky blue?', ANSWER),
    ("Return JSON with a list of two or three colors under the key colors, and whether you like them.",
     {"type": "object", "additionalProperties": False, "required": ["colors", "like"],
      "properties": {"colors": {"type": "array", "minItems": 2, "maxItems": 3,
                                "items": {"type": "string", "pattern": "^[a-z]{3,10}$"}},
                     "like": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}}),
]


@pytest.fixture(scope="module")
def smollm2():
    return LLM(str(smollm2_gguf()), max_model_len=512, kv_cache_memory="32MB")


def chat_ids(llm, text):
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)


def test_smollm2_greedy_json_it_already_writes_is_unchanged(smollm2):
    # SmolLM2's own greedy answers to these two prompts are JSON that their schemas accept.
    prompts = [chat_ids(smollm2, text) for text, _ in SMOL_SCHEMAS[:2]]
    free = completions(smollm2, prompts, SamplingParams(temperature=0, max_tokens=40))
    for out, (_, schema) in zip(free, SMOL_SCHEMAS[:2]):
        jsonschema.validate(json.loads(out.text), schema)
    constrained = completions(smollm2, prompts, [SamplingParams(temperature=0, max_tokens=40,
                                                                structured=StructuredOutput(json=schema))
                                                 for _, schema in SMOL_SCHEMAS[:2]])
    assert [o.token_ids for o in constrained] == [o.token_ids for o in free]


def test_smollm2_json_outputs_validate_at_temperature_1(smollm2):
    prompts = [chat_ids(smollm2, text) for text, _ in SMOL_SCHEMAS]
    params = [SamplingParams(temperature=1.0, seed=13, n=3, max_tokens=80, structured=StructuredOutput(json=schema))
              for _, schema in SMOL_SCHEMAS]
    outs = smollm2.generate(prompts, params)
    for out, (_, schema) in zip(outs, SMOL_SCHEMAS):
        for o in out.outputs:
            assert o.finish_reason == "stop", o.text
            jsonschema.validate(json.loads(o.text), schema)


def test_token_mask_touches_only_the_rows_it_constrains():
    from ember.sampling import FORBIDDEN, SamplingRows, TokenMask, sample

    logits = torch.randn(4, 50)
    allowed = torch.zeros(2, 50, dtype=torch.bool)
    allowed[0, [3, 7]] = True
    allowed[1, 40:] = True
    out = SamplingRows([SamplingParams()] * 4).allowed(logits, TokenMask(allowed, torch.tensor([1, 3])))
    assert torch.equal(out[[0, 2]], logits[[0, 2]])  # free rows bit for bit
    assert torch.equal(out[[1, 3]][allowed], logits[[1, 3]][allowed])
    assert (out[[1, 3]][~allowed] <= FORBIDDEN / 2).all()
    rows = SamplingRows([SamplingParams(temperature=1.0, seed=s) for s in range(4)])
    for _ in range(20):
        drawn = sample(logits * 10, rows, mask=TokenMask(allowed, torch.tensor([1, 3]))).token_ids
        assert drawn[1] in (3, 7) and drawn[3] >= 40
