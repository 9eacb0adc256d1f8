"""OpenAI request models, the errors we answer with, and the response shapes we build.

Requests forbid unknown fields so a parameter we do not implement is a 400, not silently
ignored; a few OpenAI parameters are accepted only at their no-op values (`best_of=1`,
empty `suffix`, ...). `echo` with `logprobs` scores the prompt too (what lm-eval's
loglikelihood requests need), with `max_tokens: 0` allowed to score the prompt alone. vLLM-style extras (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `stop_token_ids`, `ignore_eos`) ride in the body (`extra_body` in openai).

Structured output on both completion endpoints: OpenAI's `response_format` (`text`, `json_object`,
`json_schema`) and vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark
or GBNF/EBNF), at most one per request; a constraint the grammar engine refuses is a 400 naming
the parameter that carried it. `logit_bias` maps token-id strings to a bias in [-100, 100].

Chat takes OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` (ember.serve.tools), and
messages carrying an assistant's `tool_calls` or a tool's result (`role: "tool"`, `tool_call_id`).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.errors import EmberError
from ember.sampling import SamplingParams
from ember.structured import StructuredOutput


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- requests ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI allows
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    # vLLM-style extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unsupported(self) -> dict[str, bool]:
        """Parameter -> whether it is set to something we do not implement."""
        return {}


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, bool]:
        return {**super().unsupported(), "best_of": self.best_of not in (None, 1, self.n),
                "suffix": bool(self.suffix)}


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_dict(self) -> dict[str, Any]:
        """transformers' convention: templates get the arguments as an object (a JSON string
        that is not one is passed on as it is)."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            arguments = self.function.arguments
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back with the results
    tool_call_id: str | None = None  # a tool message: the call it answers
    # What the openai client's `message.model_dump()` carries back; accepted only as null.
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [c.as_template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message | ({"name": self.name} if self.name else {})


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # accepted; with tool_choice "required" or a named function, always strict


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked by ember.serve.tools.plan_tools
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # BOS for text prompts, as the engine would add it
    add_generation_prompt: bool = True


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # only the model's own size
    user: str | None = None


class LoadLoraRequest(_Strict):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Strict):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's clients may send it; the name alone picks the adapter


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def reject_unsupported(req: _Sampling) -> None:
    for name, is_set in req.unsupported().items():
        if is_set:
            raise APIError(400, f"The parameter '{name}' is not supported by this server.", param=name,
                           code="unsupported_parameter")


def _response_format(value: dict[str, Any]) -> StructuredOutput | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise EmberError("Invalid response_format: 'json_schema' must hold an object with the schema under "
                             "'schema'.")
        schema = spec.get("schema")
        return StructuredOutput(json_object=True) if schema is None else StructuredOutput(json=schema)
    raise EmberError(f"Invalid response_format: its type must be 'text', 'json_object' or 'json_schema', "
                     f"not {kind!r}.")


def structured_output(req: _Sampling) -> StructuredOutput | None:
    """The request's output constraint (at most one of response_format and guided_*), or None;
    a constraint the grammar engine refuses is a 400 naming its parameter."""
    given = [(name, getattr(req, name)) for name in ("response_format", "guided_json", "guided_regex",
                                                     "guided_choice", "guided_grammar")
             if getattr(req, name) is not None and getattr(req, name) != {"type": "text"}]
    if len(given) > 1:
        raise APIError(400, f"Send one output constraint, not both '{given[0][0]}' and '{given[1][0]}'.",
                       param=given[1][0])
    if not given:
        return None
    name, value = given[0]
    try:
        if name == "response_format":
            return _response_format(value)
        field = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}[name]
        return StructuredOutput(**{field: value})
    except EmberError as e:
        message = str(e)
        for kind in ("json", "regex", "choice", "grammar", "json_object"):  # name the request's parameter
            if message.startswith(f"Invalid {kind}: "):
                message = f"Invalid {name}: " + message[len(f"Invalid {kind}: "):]
        raise APIError(400, message, param=name) from None


def logit_bias(req: _Sampling, vocab_size: int | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: token-id strings -> a bias in [-100, 100], each id inside the vocabulary."""
    if not req.logit_bias:
        return None
    bias = {}
    for key, value in req.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys are token ids; {key!r} is not one.", param="logit_bias") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise APIError(400, f"logit_bias names token id {token}, outside this model's vocabulary of "
                           f"{vocab_size}.", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100]; token {token} has {value}.",
                           param="logit_bias")
        bias[token] = value
    return bias


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None, vocab_size: int | None = None) -> SamplingParams:
    """OpenAI fields -> engine SamplingParams; out-of-range values become a 400. A streamed
    request asks the engine for deltas, any other for its final output only. `vocab_size`
    bounds the token ids logit_bias may name."""
    structured, bias = structured_output(req), logit_bias(req, vocab_size)
    given = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                 presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                 repetition_penalty=req.repetition_penalty)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, seed=req.seed,
                              max_tokens=max_tokens, min_tokens=req.min_tokens, stop=[s for s in stop if s],
                              stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs, n=req.n,
                              output_kind="delta" if req.stream else "final", structured=structured,
                              logit_bias=bias)
    except EmberError as e:
        raise APIError(400, str(e)) from None


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, default: int | None,
                       param: str, prompt_param: str) -> int:
    """The engine stops at the context, so prompt + max_tokens must fit in it."""
    if prompt_len >= max_model_len:
        raise APIError(400, f"The prompt has {prompt_len} tokens but this model's context is {max_model_len} "
                       "tokens; shorten it.", param=prompt_param,
                       code="context_length_exceeded")
    room = max_model_len - prompt_len
    if requested is None:
        return min(default, room) if default else room
    if requested > room:
        raise APIError(400, f"This model's context is {max_model_len} tokens, but the prompt ({prompt_len}) plus "
                       f"{param} ({requested}) needs {prompt_len + requested}; lower {param}.", param=param,
                       code="context_length_exceeded")
    return requested


# --- responses -----------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one step (the engine's dict also holds the chosen one)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float] | None], k: int,
                        offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs, text_offset.

    An entry of `logprobs` may be None (the first prompt token under `echo`: nothing
    predicts it), which becomes null in both `token_logprobs` and `top_logprobs`.
    """
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(token_ids, logprobs)],
            "top_logprobs": [None if lp is None else {tokenizer.decode([i]): v for i, v in _top(lp, k)}
                             for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> dict[str, Any]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def item(t: int, v: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([t]), "logprob": v, "bytes": list(tokenizer.token_bytes(t))}

    return {"content": [item(t, lp[t]) | {"top_logprobs": [item(i, v) for i, v in _top(lp, k)]}
                        for t, lp in zip(token_ids, logprobs)]}
