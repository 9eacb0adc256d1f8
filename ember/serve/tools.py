"""Tool calling on `/v1/chat/completions`: the request's tools checked, the grammar that makes
a required call well-formed, and the model's text read back as OpenAI `tool_calls`.

The wire format between the model and Ember is ChatML/Hermes (`ember.tokenizer`): a call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. What a request asks for:

- `tool_choice: "none"`: the tools are not shown to the model and its text is not read for calls;
- `"auto"` (the default when `tools` are given): the model may answer in text or call tools;
  well-formed calls of known functions become `tool_calls`, anything else stays text;
- `"required"`, or `{"type": "function", "function": {"name": ...}}`: decoding is constrained by
  a grammar (`tool_call_grammar`) to one call of the named function, or to one or more calls
  (one with `parallel_tool_calls: false`) of any of the tools, each call's arguments matching
  that tool's `parameters` schema, so every call that finishes parses and validates.

`ToolCallParser` reads a completion delta by delta, as OpenAI streams calls: text before a call
streams as `content` (text that may be the start of `<tool_call>` held back until it is not),
a call's first delta carries its id and name, the next ones pieces of its arguments. Reading
the whole text at once (`parse_tool_calls`) is the same parser given one delta, so a streamed
answer adds up to the plain one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError
from ember.serve.protocol import APIError
from ember.structured import StructuredOutput
from ember.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# OpenAI's rule for a function's name.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# A call's opening, up to the first character of its arguments: name first, as the grammar
# writes it and the prompt asks. A call written otherwise is read once it is complete.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')

# Compact JSON with json.dumps' separators, as the default tool prompt shows calls: a fixed
# layout also keeps a small model from padding a constrained call with whitespace.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# The arguments of a function declared without `parameters`: an empty object.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolPlan:
    """What a chat request's `tools` and `tool_choice` ask of the prompt, the decoding and the reply."""

    tools: list[dict[str, Any]]  # as the chat template receives them
    names: set[str]
    structured: StructuredOutput | None  # the constraint on the reply, for "required" or a named function


def plan_tools(tools: list[Any] | None, tool_choice: str | dict[str, Any] | None,
               parallel_tool_calls: bool | None) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (a 400 naming the parameter when wrong); None when no tools are in play."""
    schemas = [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else t for t in tools or []]
    names: list[str] = []
    for i, tool in enumerate(schemas):
        function = tool["function"]
        name = function["name"]
        if not FUNCTION_NAME.fullmatch(name):
            raise APIError(400, f"Function names must be 1 to 64 letters, digits, '_' or '-'; got {name!r}.",
                           param=f"tools.{i}.function.name")
        if name in names:
            raise APIError(400, f"Two tools are named {name!r}; names must be unique.",
                           param=f"tools.{i}.function.name")
        names.append(name)
        if "parameters" in function:
            problem = parameters_problem(function["parameters"])
            if problem:
                raise APIError(400, f"The parameters of tool {name!r} are not a valid JSON schema: {problem}",
                               param=f"tools.{i}.function.parameters")

    choice = "auto" if tool_choice is None else tool_choice
    named: str | None = None
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str) or set(choice) != {"type", "function"}:
            raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                           '{"type": "function", "function": {"name": "..."}}.', param="tool_choice")
        named = function["name"]
        if named not in names:
            raise APIError(400, f"'tool_choice' names the function {named!r}, which is not among 'tools' "
                           f"({', '.join(names) or 'none given'}).", param="tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise APIError(400, f"'tool_choice' must be \"none\", \"auto\", \"required\" or a named function, "
                       f"not {choice!r}.", param="tool_choice")
    elif choice == "required" and not names:
        raise APIError(400, "'tool_choice' is \"required\" but no 'tools' are given.", param="tool_choice")

    if not names or choice == "none":
        return None
    structured = None
    if named is not None or choice == "required":
        chosen = [t for t in schemas if named is None or t["function"]["name"] == named]
        grammar = tool_call_grammar(chosen, several=named is None and parallel_tool_calls is not False)
        try:
            structured = StructuredOutput(grammar=grammar)
        except EmberError as e:  # each schema compiled alone above; together they should too
            raise APIError(400, f"The tools cannot be made into a grammar: {e}", param="tools") from None
    return ToolPlan(tools=schemas, names=set(names), structured=structured)


def parameters_problem(schema: Any) -> str | None:
    """Why a tool's `parameters` is not a JSON schema of an object, or None when it is one."""
    if not isinstance(schema, dict):
        return "it must be a JSON object."
    if schema.get("type", "object") != "object":
        return f"arguments are a JSON object, so its type must be \"object\", not {schema['type']!r}."
    try:  # compiled as a response_format schema would be: what the grammar engine cannot use is refused
        StructuredOutput(json=schema)
    except EmberError as e:
        return str(e).removeprefix("Invalid json: ")
    return None


def tool_call_grammar(tools: list[dict[str, Any]], several: bool) -> str:
    """A Lark grammar (llguidance's dialect) for one `<tool_call>` block, or one or more blocks
    on separate lines when `several`, each calling one of `tools` with arguments its schema accepts."""
    rules = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        call = {"x-guidance": _JSON_LAYOUT, "type": "object",
                "properties": {"name": {"const": function["name"]},
                               "arguments": function.get("parameters", _NO_PARAMETERS)},
                "required": ["name", "arguments"], "additionalProperties": False}
        rules.append(f"call_{i}: %json {json.dumps(call)}")
    start = 'start: call ("\\n" call)*' if several else "start: call"
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    call = f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} ({alternatives}) {json.dumps(chr(10) + TOOL_CALL_CLOSE)}"
    return "\n".join([start, call, *rules])


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _ObjectEnd:
    """Finds where a JSON object written from a given position ends, reading it as it grows."""

    def __init__(self, start: int) -> None:
        self.pos, self.depth, self.in_string, self.escaped = start, 0, False, False
        self.end: int | None = None  # index just past the closing brace, once seen

    def scan(self, text: str) -> int | None:
        while self.end is None and self.pos < len(text):
            c = text[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = self.pos
        return self.end


class ToolCallParser:
    """One completion's text, pushed delta by delta, as OpenAI chat deltas: `{"content": ...}`
    and `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}`.

    Rules: a block `<tool_call>{"name": N, "arguments": {...}}</tool_call>` with N one of `names`
    is a call, and whitespace around it is dropped; any other block is text. A call streams once
    its name and the brace opening its arguments are read (then its arguments as they grow): it
    is a call from then on, and one still open at the end stays as far as it got. Text with no
    calls comes out unchanged.
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.buffer = ""  # text read but not yet given out
        self.in_call = False  # the buffer starts inside a block, just after its opening tag
        self.gap = ""  # whitespace before the open block: text again if the block is not a call
        self.after_call = False  # whitespace now follows a call, and is dropped
        self.calls = 0  # calls given out so far (the next one's index)
        self.streaming = False  # the open block's name went out: it is a call, come what may
        self.sent_arguments = ""
        self.arguments_start = 0
        self.arguments_end = _ObjectEnd(0)  # where the streaming call's arguments end

    def push(self, text: str) -> list[dict[str, Any]]:
        self.buffer += text
        out: list[dict[str, Any]] = []
        while True:
            if not self.in_call:
                i = self.buffer.find(TOOL_CALL_OPEN)
                if i < 0:
                    # Hold back what may yet become an opening tag, and trailing whitespace
                    # (dropped if a call follows).
                    held = _partial_tag_length(self.buffer, TOOL_CALL_OPEN)
                    ready = self.buffer[:len(self.buffer) - held]
                    text = ready.rstrip()
                    self._text(text, out)
                    self.buffer = self.buffer[len(text):]
                    return out
                text = self.buffer[:i]
                self._text(text.rstrip(), out)
                self.gap = text[len(text.rstrip()):]
                self.buffer, self.in_call = self.buffer[i + len(TOOL_CALL_OPEN):], True
                continue
            j = self.buffer.find(TOOL_CALL_CLOSE)
            if j < 0:
                self._stream_call(out)
                return out
            self._close_call(self.buffer[:j], out)
            self.buffer, self.in_call = self.buffer[j + len(TOOL_CALL_CLOSE):], False

    def finish(self) -> list[dict[str, Any]]:
        """The end of the text: whatever was held back, as text (an open call stays as far as it got)."""
        out: list[dict[str, Any]] = []
        if self.in_call and not self.streaming:
            self._text(self.gap + TOOL_CALL_OPEN + self.buffer, out)
        elif not self.in_call:
            self._text(self.buffer, out)
        self.buffer = ""
        return out

    def _text(self, text: str, out: list[dict[str, Any]]) -> None:
        if self.after_call:
            text = text.lstrip()
        if text:
            self.after_call = False
            out.append({"content": text})

    def _stream_call(self, out: list[dict[str, Any]]) -> None:
        if not self.streaming:
            head = _CALL_HEAD.match(self.buffer)
            if not head or self.buffer[head.end()] != "{" or _json_string(head.group(1)) not in self.names:
                return  # not yet known to be a call: wait for the block to close
            self._start_call(_json_string(head.group(1)), out)
            self.arguments_start = head.end()
            self.arguments_end = _ObjectEnd(head.end())
        # The arguments stream until their object closes (what follows is the call's own brace).
        end = self.arguments_end.scan(self.buffer) or len(self.buffer)
        self._send_arguments(self.buffer[self.arguments_start:end], out)

    def _close_call(self, body: str, out: list[dict[str, Any]]) -> None:
        try:
            call = json.loads(body)
        except ValueError:
            call = None
        valid = (isinstance(call, dict) and set(call) <= {"name", "arguments"} and call.get("name") in self.names
                 and isinstance(call.get("arguments", {}), dict))
        if valid:
            if not self.streaming:
                self._start_call(call["name"], out)
            self._send_arguments(_arguments_text(body, call.get("arguments", {})), out)
        elif not self.streaming:
            self._text(self.gap + TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE, out)
            self.gap = ""
            return
        self.streaming, self.sent_arguments = False, ""
        self.after_call, self.gap = True, ""

    def _start_call(self, name: str, out: list[dict[str, Any]]) -> None:
        out.append({"tool_calls": [{"index": self.calls, "id": new_call_id(), "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        self.calls += 1
        self.streaming = True

    def _send_arguments(self, arguments: str, out: list[dict[str, Any]]) -> None:
        # What went out is a prefix of the arguments (both read from the same text); a call
        # that broke its layout after streaming began gets nothing more.
        if arguments.startswith(self.sent_arguments) and len(arguments) > len(self.sent_arguments):
            out.append({"tool_calls": [{"index": self.calls - 1,
                                        "function": {"arguments": arguments[len(self.sent_arguments):]}}]})
            self.sent_arguments = arguments


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _json_string(body: str) -> str | None:
    try:
        return json.loads(f'"{body}"')
    except ValueError:
        return None


def _arguments_text(body: str, arguments: dict[str, Any]) -> str:
    """A call's arguments as the JSON text the model wrote (name-first layout), else re-serialized."""
    head = _CALL_HEAD.match(body)
    if head and body[head.end()] == "{":
        end = _ObjectEnd(head.end()).scan(body)
        if end is not None and body[end:].strip() == "}":
            return body[head.end():end]
    return json.dumps(arguments, ensure_ascii=False)


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Deltas added up: content joined, each call's pieces joined (in order of index)."""
    content = "".join(d["content"] for d in deltas if "content" in d)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for piece in d.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"index": piece["index"], "function": {"arguments": ""}})
            call.update({k: v for k, v in piece.items() if k not in ("function", "index")})
            for k, v in piece["function"].items():
                call["function"][k] = call["function"].get(k, "") + v if k == "arguments" else v
    merged: dict[str, Any] = {}
    if content:
        merged["content"] = content
    if calls:
        merged["tool_calls"] = [calls[i] for i in sorted(calls)]
    return merged


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole completion -> (content, tool_calls in OpenAI's message shape). Content is None
    when the text held only calls."""
    parser = ToolCallParser(names)
    merged = merge_deltas(parser.push(text) + parser.finish())
    calls = [{"id": c["id"], "type": "function", "function": c["function"]} for c in merged.get("tool_calls", [])]
    content = merged.get("content", "")
    return (content or None) if calls else content, calls
