"""Tool calling: rendering tools into chat templates, reading calls out of model text, and
`tools`/`tool_choice` on `ember serve`'s chat endpoint through the official `openai` client.

Expected strings here are written by hand from the documented format (a call is
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`), never taken from Ember's output.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import need_module, smollm2_gguf
from ember.serve.protocol import ChatMessage
from ember.serve.tools import ToolCallParser, merge_deltas, parse_tool_calls
from ember.tokenizer import CHATML_TEMPLATE, Tokenizer, train_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
NAMES = {"get_weather", "add"}


# --- reading calls out of text ------------------------------------------------------------------
def streamed(text: str, cuts: list[int]) -> list[dict]:
    """The parser's deltas when `text` arrives in pieces cut at `cuts`."""
    parser, deltas, start = ToolCallParser(NAMES), [], 0
    for cut in sorted(cuts) + [len(text)]:
        deltas += parser.push(text[start:cut])
        start = cut
    return deltas + parser.finish()


def without_ids(merged: dict) -> dict:
    return {**merged, "tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in merged.get("tool_calls", [])]}


TEXTS = [
    "Plain answer, no tools.",
    "  Leading spaces, a < sign, a <tool tag that never completes and trailing newlines\n\n",
    "Ends in half a tag <tool_ca",
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 7}}\n</tool_call>\n'),
    '<tool_call>{"name": "add", "arguments": {"note": "a } b \\" { [", "nested": {"x": [1, {"y": 2}]}}}</tool_call>',
    '<tool_call>{"name": "nobody", "arguments": {}}</tool_call> unknown names stay text',
    '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call> broken JSON stays text',
]


@pytest.mark.parametrize("text", TEXTS[:-1])
def test_any_split_of_the_text_adds_up_to_the_whole_reading(text):
    whole = without_ids(merge_deltas(streamed(text, [])))
    rng = random.Random(0)
    for trial in range(20):
        cuts = list(range(1, len(text))) if trial == 0 else rng.sample(range(1, len(text)), rng.randint(1, 6))
        assert without_ids(merge_deltas(streamed(text, cuts))) == whole


def test_text_without_calls_comes_out_unchanged():
    for text in TEXTS[:3] + TEXTS[-2:]:
        assert parse_tool_calls(text, NAMES) == (text, [])


def test_calls_become_openai_tool_calls_and_text_before_them_content():
    content, calls = parse_tool_calls(TEXTS[3], NAMES)
    assert content == "Let me check."
    assert [(c["type"], c["function"]["name"]) for c in calls] == [("function", "get_weather")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert calls[0]["id"].startswith("call_")

    content, calls = parse_tool_calls(TEXTS[4], NAMES)
    assert content is None  # only calls
    assert [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1, "b": 2}, {"city": "Oslo", "days": 7}]
    assert len({c["id"] for c in calls}) == 2

    _, calls = parse_tool_calls(TEXTS[5], NAMES)
    assert json.loads(calls[0]["function"]["arguments"]) == {"note": 'a } b " { [', "nested": {"x": [1, {"y": 2}]}}


def test_arguments_written_before_the_name_are_read_too():
    _, calls = parse_tool_calls('<tool_call>{"arguments": {"a": 3, "b": 4}, "name": "add"}</tool_call>', NAMES)
    assert calls[0]["function"]["name"] == "add" and json.loads(calls[0]["function"]["arguments"]) == {"a": 3, "b": 4}


def test_streaming_sends_content_then_id_and_name_then_argument_pieces():
    parser = ToolCallParser(NAMES)
    assert parser.push("Sure <tool_ca") == [{"content": "Sure"}]  # the space and half tag wait
    assert parser.push('ll>\n{"name": "get_wea') == []  # the name is not complete yet
    first = parser.push('ther", "arguments": {"ci')
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first[0]["tool_calls"][0]["index"] == 0 and first[0]["tool_calls"][0]["id"].startswith("call_")
    assert first[1:] == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}]
    assert parser.push('ty": "Rome", "days": 1}') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Rome", "days": 1}'}}]}]
    assert parser.push("}\n</tool_call>") == []  # the call's own brace is not an argument
    assert parser.finish() == [] and parser.calls == 1


def test_a_streamed_call_is_a_call_once_its_name_went_out():
    """A broken block read whole is text; streamed, its name and arguments went out before the
    break could be seen (constrained decoding, with "required", never writes one)."""
    assert parse_tool_calls(TEXTS[-1], NAMES) == (TEXTS[-1], [])
    merged = merge_deltas(streamed(TEXTS[-1], list(range(1, len(TEXTS[-1])))))
    assert merged["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1,}'}
    assert merged["content"] == "broken JSON stays text"


def test_a_call_cut_off_by_max_tokens_keeps_what_it_got():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1', NAMES)
    assert content is None and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1'}


# --- rendering tools into chat templates -------------------------------------------------------
# A template that renders tools itself (written for this test in the style of tool-aware Hub
# templates): tool schemas through tojson, an assistant's tool_calls, tool results by id.
TOOL_TEMPLATE = (
    "{% if tools is not none %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>tool {{ m.tool_call_id }}\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Paris for 2 days, and 2+3?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
]


@pytest.fixture(scope="module")
def chat_tok() -> Tokenizer:
    texts = ["hello world, the weather in Paris is sunny.\n", '{"name": "add", "arguments": {"a": 1}}\n'] * 40
    return train_tokenizer(texts, vocab_size=320)


@pytest.mark.parametrize("tools", [[WEATHER, ADD], None])
def test_a_template_that_reads_tools_gets_them_as_transformers_passes_them(chat_tok, tmp_path, tools):
    transformers = need_module("transformers", "the chat-template peer")
    tok = Tokenizer(chat_tok.engine, chat_tok.bos_token, chat_tok.eos_token, chat_tok.pad_token,
                    chat_template=TOOL_TEMPLATE)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    theirs = hf.apply_chat_template(CONVERSATION, tools=tools, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(CONVERSATION, tools=tools) == theirs
    assert "[call get_weather {\"city\": \"Paris\", \"days\": 2}]" in theirs  # the template did see the calls
    assert tok.apply_chat_template(CONVERSATION, tools=tools, tokenize=True) == hf.apply_chat_template(
        CONVERSATION, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_openai_shaped_messages_reach_the_template_as_transformers_expects(chat_tok):
    """The server's messages carry arguments as a JSON string (OpenAI); templates get an object."""
    tok = Tokenizer(chat_tok.engine, chat_tok.bos_token, chat_tok.eos_token, chat_tok.pad_token,
                    chat_template=TOOL_TEMPLATE)
    wire = json.loads(json.dumps(CONVERSATION))
    for call in wire[2]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    rendered = tok.apply_chat_template([ChatMessage(**m).as_template_dict() for m in wire], tools=[WEATHER, ADD])
    assert rendered == tok.apply_chat_template(CONVERSATION, tools=[WEATHER, ADD])


def test_a_template_without_tools_gets_the_chatml_hermes_default(chat_tok):
    tok = Tokenizer(chat_tok.engine, chat_tok.bos_token, chat_tok.eos_token, chat_tok.pad_token,
                    chat_template=CHATML_TEMPLATE)
    text = tok.apply_chat_template(CONVERSATION, tools=[WEATHER, ADD])
    system, user, assistant, results, prompt = text.split("<|im_start|>")[1:]
    assert system.startswith("system\nYou help.\n\n")
    schemas = system.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in schemas.splitlines()] == [WEATHER, ADD]
    assert "<tool_call>" in system and "<tool_response>" in system  # the format is explained
    assert user == "user\nWeather in Paris for 2 days, and 2+3?<|im_end|>\n"
    assert assistant == ('assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                         '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
                         '</tool_call><|im_end|>\n')
    assert results == "user\n<tool_response>\nSunny, 18 C\n</tool_response>\n<tool_response>\n5\n</tool_response>" \
                      "<|im_end|>\n"
    assert prompt == "assistant\n"
    # Without a system message the tools get one of their own; without tools, no section at all.
    assert tok.apply_chat_template(CONVERSATION[1:], tools=[ADD]).startswith("<|im_start|>system\nYou can call")
    assert "<tools>" not in tok.apply_chat_template(CONVERSATION)


# --- the server ----------------------------------------------------------------------------------
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from test_serve import NAME, Server  # the same subprocess harness as the serve tests

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ember.checkpoint import save_pretrained
    from ember.config import preset
    from ember.model import CausalLM

    texts = ['the weather in Paris is sunny.\n', '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n'] * 50
    tok = train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tools") / "model"
    save_pretrained(CausalLM(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                    max_position_embeddings=1024)), tok, path)
    return path


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = Server(tiny_dir, tmp_path_factory.mktemp("log") / "serve.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


CHAT = {"model": NAME, "messages": MESSAGES, "max_tokens": 4}


def bad_tool(**function) -> dict:
    return {"tools": [{"type": "function", "function": {"name": "f"} | function}]}


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    (bad_tool(parameters={"type": "object", "properties": {"x": {"type": "banana"}}}), "tools.0.function.parameters"),
    (bad_tool(parameters={"type": "object", "properties": {"x": {"type": "string", "minLength": "two"}}}),
     "tools.0.function.parameters"),
    (bad_tool(parameters={"type": "string"}), "tools.0.function.parameters"),
    (bad_tool(parameters=[1, 2]), "tools.0.function.parameters"),
    (bad_tool(name="get weather"), "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"messages": MESSAGES + [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
])
def test_bad_tools_and_tool_choice_get_a_400_naming_the_parameter(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=CHAT | body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error", err


def test_tool_choice_none_hides_the_tools_and_auto_shows_them(server, client):
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    none = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                          tools=[WEATHER], tool_choice="none", extra_body={"ignore_eos": True})
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    auto = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                          tools=[WEATHER], extra_body={"ignore_eos": True})
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the schemas are in the prompt


def validates(call, tools=(WEATHER, ADD)) -> dict:
    """A call's arguments parsed and checked against its tool's parameters schema (jsonschema)."""
    jsonschema = need_module("jsonschema", "the JSON-schema validator the tool-call tests check arguments with")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    return arguments


def test_required_calls_validate_against_their_tool_at_any_temperature(client):
    for seed in range(4):
        out = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[WEATHER, ADD], n=2, seed=seed,
                                             tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                             max_tokens=200)
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_")
            validates(call)


def test_a_named_function_is_the_one_called(client):
    for seed in range(3):
        out = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[WEATHER, ADD], seed=seed,
                                             tool_choice={"type": "function", "function": {"name": "add"}},
                                             temperature=1.0, max_tokens=200)
        (call,) = out.choices[0].message.tool_calls
        assert call.function.name == "add" and out.choices[0].finish_reason == "tool_calls"
        assert set(validates(call)) == {"a", "b"}
    # A function declared without parameters takes none: its arguments are an empty object.
    now = {"type": "function", "function": {"name": "now", "description": "The time."}}
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[now, ADD], temperature=1.0, seed=0,
                                         tool_choice={"type": "function", "function": {"name": "now"}})
    assert [(c.function.name, c.function.arguments) for c in out.choices[0].message.tool_calls] == [("now", "{}")]


def test_parallel_required_calls_that_finish_all_validate(client):
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[WEATHER, ADD], seed=7, n=3,
                                         tool_choice="required", temperature=1.0, max_tokens=120)
    for choice in out.choices:
        calls = choice.message.tool_calls
        finished = calls if choice.finish_reason == "tool_calls" else calls[:-1]  # the last may be cut off
        assert calls and choice.finish_reason in ("tool_calls", "length")
        for call in finished:
            validates(call)


def collect_stream(chunks) -> tuple[str | None, list[dict], str]:
    """A streamed answer added up the way OpenAI's clients do: content, calls by index, finish reason."""
    content, calls, finish, first = None, {}, None, True
    for chunk in chunks:
        choice = chunk.choices[0]
        if first:
            assert choice.delta.role == "assistant"
            first = False
        if choice.delta.content:
            content = (content or "") + choice.delta.content
        for piece in choice.delta.tool_calls or []:
            if piece.index not in calls:  # a call's first delta names it
                assert piece.id.startswith("call_") and piece.function.name and piece.type == "function"
                calls[piece.index] = {"id": piece.id, "type": "function",
                                      "function": {"name": piece.function.name, "arguments": ""}}
            else:
                assert piece.id is None and piece.function.name is None
            calls[piece.index]["function"]["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_streamed_calls_add_up_to_the_plain_answer(client):
    kwargs = {"model": NAME, "messages": MESSAGES, "tools": [WEATHER, ADD], "tool_choice": "required",
              "temperature": 0, "max_tokens": 150}
    plain = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = collect_stream(client.chat.completions.create(**kwargs, stream=True))
    assert (content, finish) == (plain.message.content, plain.finish_reason)
    assert [c["function"] for c in calls] == [c.function.model_dump() for c in plain.message.tool_calls]


@pytest.mark.parametrize("stream", [False, True])
def test_a_two_turn_tool_conversation_round_trips(server, client, stream):
    tools = [WEATHER, ADD]
    first = {"model": NAME, "messages": MESSAGES, "tools": tools, "temperature": 0, "max_tokens": 150,
             "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    if stream:
        content, calls, finish = collect_stream(client.chat.completions.create(**first, stream=True))
        assistant = {"role": "assistant", "content": content, "tool_calls": calls}
        call_id, arguments = calls[0]["id"], json.loads(calls[0]["function"]["arguments"])
    else:
        reply = client.chat.completions.create(**first).choices[0]
        finish, assistant = reply.finish_reason, reply.message  # sent back as the client returned it
        call_id, arguments = reply.message.tool_calls[0].id, validates(reply.message.tool_calls[0])
    assert finish == "tool_calls"
    result = {"role": "tool", "tool_call_id": call_id, "content": f"Sunny in {arguments['city']}"}
    messages = MESSAGES + [assistant, result]

    second = client.chat.completions.create(model=NAME, messages=messages, tools=tools, tool_choice="auto",
                                            temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
    assert second.choices[0].finish_reason in ("length", "tool_calls")
    # The second prompt carries the call and its result in the ChatML/Hermes format.
    wire = [m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else m for m in messages]
    ids = httpx.post(server.url + "/tokenize", json={"messages": wire}, timeout=30).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    expected_call = json.dumps({"name": "get_weather", "arguments": arguments})
    assert f"<|im_start|>assistant\n<tool_call>\n{expected_call}\n</tool_call><|im_end|>" in prompt
    assert f"<|im_start|>user\n<tool_response>\nSunny in {arguments['city']}\n</tool_response><|im_end|>" in prompt
    assert second.usage.prompt_tokens > len(ids) + 50  # and the tools' schemas, which /tokenize does not take


def test_a_message_dumped_by_the_openai_client_is_accepted_back(client):
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[ADD], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=100).choices[0]
    dumped = reply.message.model_dump()  # with refusal, audio, annotations, function_call: None
    result = {"role": "tool", "tool_call_id": reply.message.tool_calls[0].id, "content": "3"}
    again = client.chat.completions.create(model=NAME, messages=MESSAGES + [dumped, result], max_tokens=2)
    assert again.choices[0].message.role == "assistant"


# --- the real model ------------------------------------------------------------------------------
def test_smollm2_required_and_named_calls_validate():
    from ember.engine import LLM, SamplingParams
    from ember.serve.protocol import ToolDefinition
    from ember.serve.tools import plan_tools

    llm = LLM(str(smollm2_gguf()), max_model_len=1024)
    messages = [{"role": "user", "content": "What will the weather be in Rome over the next 3 days?"}]
    tools = [ToolDefinition(**WEATHER), ToolDefinition(**ADD)]
    # "required" greedy and a named function sampled, in one batch (the prompt is the same).
    plans = [plan_tools(tools, "required", parallel_tool_calls=False),
             plan_tools(tools, {"type": "function", "function": {"name": "add"}}, parallel_tool_calls=None)]
    ids = llm.tokenizer.apply_chat_template(messages, tools=plans[0].tools, tokenize=True)
    params = [SamplingParams(temperature=t, seed=0, max_tokens=40, structured=p.structured)
              for t, p in zip((0.0, 1.0), plans)]
    outs = llm.generate([ids, ids], params)
    for out, plan in zip(outs, plans):
        o = out.outputs[0]
        content, calls = parse_tool_calls(o.text, plan.names)
        assert o.finish_reason == "stop" and content is None and len(calls) == 1, o.text
        call = openai.types.chat.ChatCompletionMessageToolCall(**calls[0])
        validates(call)
    assert call.function.name == "add"
