"""The HTTP routes: OpenAI completions, chat and models; health, metrics, tokenize, embeddings.

Routes are module-level functions on two routers (`api`, which needs the API key when one
is set, and `open_routes`); each reads the server's state (the `AsyncEngine`, the tokenizer,
the settings) from `request.app.state.server`, which `create_app` sets. Handlers validate
and tokenize on the event loop, hand prompt ids to the `AsyncEngine`, then either wait for
the final outputs or forward the engine's deltas as server-sent events. Every failure a
client can cause is OpenAI's error JSON with a 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine import LLM, CompletionOutput, RequestOutput, SamplingParams
from ember.errors import EmberError
from ember.lora.batched import AdapterInUse, UnknownAdapter
from ember.rag.encoder import load_encoder
from ember.serve.async_engine import AsyncEngine, RequestStream, ServerBusy
from ember.serve.auth import exposure_warning
from ember.serve.protocol import (APIError, ChatMessage, ChatRequest, CompletionRequest, DetokenizeRequest,
                                  EmbeddingRequest, LoadLoraRequest, TokenizeRequest, UnloadLoraRequest, chat_logprobs,
                                  completion_logprobs, now,
                                  reject_unsupported, resolve_max_tokens, sampling_params, usage)
from ember.serve.tools import ToolCallParser, merge_deltas, parse_tool_calls, plan_tools

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left


@dataclass
class ServerState:
    """What the routes need, kept on `app.state.server`."""

    engine: AsyncEngine
    served_model_name: str
    api_key: str | None = None
    embedding_model: str | None = "default"  # None: no /v1/embeddings; "default": Ember's default encoder
    encoders: dict[str, Any] = field(default_factory=dict)  # the embedding model, loaded on first use
    lora_dirs: list[Path] = field(default_factory=list)  # where /v1/load_lora_adapter may read adapters

    @property
    def llm(self) -> LLM:
        return self.engine.llm

    @property
    def tokenizer(self) -> Any:
        return self.engine.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.llm.max_model_len

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` picks (None: the base); 404 for a name not served here."""
        if name is None or name == self.served_model_name:
            return None
        if name in self.llm.lora_adapters:
            return name
        served = ", ".join(f"'{n}'" for n in [self.served_model_name, *sorted(self.llm.lora_adapters)])
        raise APIError(404, f"The model '{name}' does not exist; this server serves {served}.",
                       param="model", code="model_not_found")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A raw prompt's ids. Special-token text in it becomes the special ids (as transformers,
        vLLM and llama.cpp tokenize a prompt): a completion prompt is the caller's own, template
        markers included. Chat message content is fenced instead (`chat_ids`)."""
        tok = self.tokenizer
        return tok.encode(text, allowed_special="all",
                          add_bos=add_special_tokens and bool(getattr(tok, "add_bos_token", False)))

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not messages:
            raise APIError(400, "'messages' must contain at least one message.", param="messages")
        try:
            return self.tokenizer.apply_chat_template([m.as_template_dict() for m in messages],
                                                      add_generation_prompt=add_generation_prompt, tokenize=True,
                                                      tools=tools)
        except EmberError as e:
            raise APIError(400, str(e), param="messages") from None


# The dependencies are coroutines: FastAPI runs a plain function dependency in a worker thread,
# two thread hand-offs a request for what is an attribute read.
async def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def require_key(request: Request, authorization: str | None = Header(None)) -> None:
    api_key = request.app.state.server.api_key
    if api_key is None:
        return
    # compare_digest: the time taken does not reveal how much of the key matched
    if authorization is None or not hmac.compare_digest(authorization.encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "Missing or wrong API key; send 'Authorization: Bearer <key>'.",
                       type="authentication_error", code="invalid_api_key")


api = APIRouter(dependencies=[Depends(require_key)])
open_routes = APIRouter()  # liveness and scraping carry no data worth a key


# --- the request's life: submit, then collect the final outputs or stream the deltas ------------
async def start(server: ServerState, prompts: list[list[int]], params: list[SamplingParams],
                lora_name: str | None = None) -> RequestStream:
    try:
        stream = server.engine.submit(prompts, params, lora_name)
    except ServerBusy as e:
        raise APIError(429, str(e), type="server_busy_error", code="server_busy") from None
    try:
        await stream.accepted()
    except UnknownAdapter as e:  # unloaded between the model check and the engine taking the request
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    except EmberError as e:  # e.g. token ids out of range, or a request bigger than the KV pool
        raise APIError(400, str(e), param="prompt") from None
    return stream


async def collect(server: ServerState, stream: RequestStream, request: Request) -> dict[str, RequestOutput]:
    """The final output of every request; aborts them if the client goes away first."""
    finals: dict[str, RequestOutput] = {}

    async def consume() -> None:
        async for out in stream:
            if out.finished:
                finals[out.request_id] = out

    task = asyncio.ensure_future(consume())
    try:
        while not (await asyncio.wait({task}, timeout=0.25))[0]:
            if await request.is_disconnected():
                raise APIError(400, "The client disconnected.", code="client_disconnected")
        task.result()
    finally:
        task.cancel()
        server.engine.abort(stream)
    return finals


def sse(server: ServerState, events: AsyncIterator[dict[str, Any]], stream: RequestStream) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # the status line is gone; report in-band, as OpenAI does
            error = e if isinstance(e, APIError) else APIError(500, str(e), type="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:  # also on cancellation, when the client disconnects: free its KV blocks now
            server.engine.abort(stream)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream_choices(stream: RequestStream, n: int, chunk: Callable[[int, CompletionOutput], dict | None],
                         include_usage: bool, usage_chunk: Callable[[dict], dict]) -> AsyncIterator[dict]:
    """The engine's deltas -> one chunk per completion that has news (choice index: prompt * n + completion)."""
    prompt_tokens = completion_tokens = 0
    async for out in stream:
        p = stream.request_ids.index(out.request_id)
        for o in out.outputs:
            completion_tokens += len(o.token_ids)
            event = chunk(p * n + o.index, o)
            if event is not None:
                yield event
        if out.finished:
            prompt_tokens += len(out.prompt_token_ids)
    if include_usage:
        yield usage_chunk(usage(prompt_tokens, completion_tokens))


def completion_prompts(server: ServerState, prompt: str | list[Any]) -> list[list[int]]:
    if isinstance(prompt, str):
        return [server.encode(prompt)]
    if not prompt:
        raise APIError(400, "'prompt' must not be empty.", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [server.encode(p) if isinstance(p, str) else list(p) for p in prompt]


# --- OpenAI routes ---------------------------------------------------------------------------
@api.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, server: ServerState = Depends(server_state)) -> Any:
    lora_name = server.check_model(req.model)
    reject_unsupported(req)
    if req.echo and req.stream:
        raise APIError(400, "'echo' cannot be combined with 'stream' on this server.", param="echo",
                       code="unsupported_parameter")
    # echo + max_tokens 0 scores the prompt alone (lm-eval's loglikelihood); the engine always
    # samples at least one token, so ask for one and drop it.
    score_only = req.echo and req.max_tokens == 0
    prompts = completion_prompts(server, req.prompt)
    k = req.logprobs
    params = []
    for p in prompts:
        max_tokens = resolve_max_tokens(None if score_only else req.max_tokens, len(p), server.max_model_len,
                                        COMPLETION_DEFAULT_MAX_TOKENS, "max_tokens", "prompt")
        params.append(sampling_params(req, 1 if score_only else max_tokens, k,
                                      prompt_logprobs=k if req.echo and k is not None else None,
                                      vocab_size=server.llm.model.config.vocab_size))
    stream = await start(server, prompts, params, lora_name)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": now(),
            "model": lora_name or server.served_model_name}  # the adapter a request named, as vLLM answers
    tok = server.tokenizer

    if req.stream:
        text_offset: dict[int, int] = {}  # per choice: where its next token's text starts (legacy logprobs)

        def chunk(index: int, o: CompletionOutput) -> dict | None:
            if not o.text and o.finish_reason is None:
                return None
            logprobs = None
            if k is not None:
                logprobs = completion_logprobs(tok, o.token_ids, o.logprobs or [], k, text_offset.get(index, 0))
                text_offset[index] = text_offset.get(index, 0) + sum(map(len, logprobs["tokens"]))
            return head | {"choices": [{"index": index, "text": o.text, "logprobs": logprobs,
                                        "finish_reason": o.finish_reason}]}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return sse(server, stream_choices(stream, req.n, chunk, include,
                                          lambda u: head | {"choices": [], "usage": u}), stream)

    finals = await collect(server, stream, request)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, rid in enumerate(stream.request_ids):
        out = finals[rid]
        prompt_tokens += len(out.prompt_token_ids)
        for o in out.outputs:
            ids, lps, text = o.token_ids, o.logprobs or [], o.text
            if score_only:
                ids, lps, text, finish = [], [], "", "length"
            else:
                finish = o.finish_reason
            if req.echo:
                prompt_text = req.prompt if isinstance(req.prompt, str) else (
                    req.prompt[p] if isinstance(req.prompt[0], str) else tok.decode(out.prompt_token_ids))
                text = prompt_text + text
                if k is not None:
                    prompt_lps = out.prompt_logprobs or []
                    if len(prompt_lps) != len(out.prompt_token_ids):
                        raise APIError(500, "The engine returned incomplete prompt logprobs.",
                                       type="server_error")
                    ids, lps = list(out.prompt_token_ids) + list(ids), list(prompt_lps) + list(lps)
            completion_tokens += 0 if score_only else len(o.token_ids)
            logprobs = completion_logprobs(tok, ids, lps, k) if k is not None else None
            choices.append({"index": p * req.n + o.index, "text": text, "logprobs": logprobs,
                            "finish_reason": finish})
    return head | {"choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


@api.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, server: ServerState = Depends(server_state)) -> Any:
    lora_name = server.check_model(req.model)
    reject_unsupported(req)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)  # None: no tools in play
    ids = server.chat_ids(req.messages, tools=plan.tools if plan else None)
    requested, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens
                        is not None else (req.max_tokens, "max_tokens"))
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, resolve_max_tokens(requested, len(ids), server.max_model_len, None, param,
                                                     "messages"), k, vocab_size=server.llm.model.config.vocab_size)
    if plan is not None and plan.structured is not None:  # "required" or a named function: calls only
        if params.structured is not None:
            raise APIError(400, "'tool_choice' \"required\" or a named function constrains the reply to tool "
                           "calls, so it cannot be combined with response_format or guided_* parameters.",
                           param="tool_choice")
        params = dataclasses.replace(params, structured=plan.structured)
    stream = await start(server, [ids], [params], lora_name)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": now(),
            "model": lora_name or server.served_model_name}  # the adapter a request named, as vLLM answers
    tok = server.tokenizer

    if req.stream:
        head["object"] = "chat.completion.chunk"
        started: set[int] = set()
        parsers: dict[int, ToolCallParser] = {}  # per choice, when tools are in play

        def chunk(index: int, o: CompletionOutput) -> dict | None:
            delta: dict[str, Any] = {}
            if index not in started:  # the first chunk of each choice names the role
                started.add(index)
                delta["role"] = "assistant"
            finish_reason = o.finish_reason
            if plan is None:
                if o.text or "role" in delta:
                    delta["content"] = o.text
            else:  # text before a call streams as content, a call as its id, name and argument pieces
                parser = parsers.setdefault(index, ToolCallParser(plan.names))
                delta |= merge_deltas(parser.push(o.text) + (parser.finish() if finish_reason else []))
                if delta == {"role": "assistant"}:
                    delta["content"] = ""  # the role's chunk has the shape it has without tools
                if parser.calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            if not delta and finish_reason is None:
                return None
            logprobs = chat_logprobs(tok, o.token_ids, o.logprobs, k) if k is not None and o.token_ids else None
            return head | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return sse(server, stream_choices(stream, req.n, chunk, include,
                                          lambda u: head | {"choices": [], "usage": u}), stream)

    out = (await collect(server, stream, request))[stream.request_ids[0]]
    choices = []
    for o in out.outputs:
        message, finish_reason = {"role": "assistant", "content": o.text}, o.finish_reason
        if plan is not None:
            message["content"], calls = parse_tool_calls(o.text, plan.names)
            if calls:
                message["tool_calls"] = calls
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        choices.append({"index": o.index, "message": message,
                        "logprobs": chat_logprobs(tok, o.token_ids, o.logprobs or [], k) if k is not None else None,
                        "finish_reason": finish_reason})
    return head | {"choices": choices,
                   "usage": usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))}


@api.get("/v1/models")
async def models(server: ServerState = Depends(server_state)) -> dict[str, Any]:
    base = {"id": server.served_model_name, "object": "model", "created": now(), "owned_by": "ember",
            "root": server.served_model_name, "parent": None, "max_model_len": server.max_model_len}
    # Each LoRA adapter as vLLM lists it: its own id, its directory as root, the base as parent.
    adapters = [base | {"id": name, "root": str(a.path), "parent": server.served_model_name}
                for name, a in sorted(server.llm.lora_adapters.items())]
    return {"object": "list", "data": [base, *adapters]}


# --- LoRA adapters at run time (vLLM's routes and bodies) ----------------------------------------
def allowed_adapter_path(server: ServerState, lora_path: str) -> Path:
    """The adapter directory `lora_path` names, which must lie under one of the --lora-dir
    directories (a relative path is taken under the first that holds it)."""
    if not server.lora_dirs:
        raise APIError(403, "This server loads no adapters at run time; start it with --lora-dir DIR.",
                       param="lora_path", type="permission_error")
    roots = [d.resolve() for d in server.lora_dirs]
    given = Path(lora_path).expanduser()
    if given.is_absolute():
        path = given.resolve()
    else:
        options = [(r / given).resolve() for r in roots]
        path = next((p for p in options if p.exists()), options[0])
    # Resolved before the check: neither '..' nor a symbolic link leads outside.
    if any(path.is_relative_to(r) for r in roots):
        return path
    raise APIError(403, f"The adapter path '{lora_path}' is outside the adapter directories this server reads "
                   f"({', '.join(str(r) for r in roots)}).", param="lora_path", type="permission_error")


@api.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadLoraRequest, server: ServerState = Depends(server_state)) -> PlainTextResponse:
    if req.lora_name == server.served_model_name or req.lora_name in server.llm.lora_adapters:
        raise APIError(400, f"The name '{req.lora_name}' is already served; unload it first or pick another.",
                       param="lora_name")
    path = allowed_adapter_path(server, req.lora_path)
    try:
        await asyncio.to_thread(server.llm.load_lora, req.lora_name, path)
    except EmberError as e:
        raise APIError(400, str(e), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@api.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoraRequest, server: ServerState = Depends(server_state)) -> PlainTextResponse:
    try:
        await asyncio.to_thread(server.llm.unload_lora, req.lora_name)
    except UnknownAdapter as e:
        raise APIError(404, str(e), param="lora_name", code="model_not_found") from None
    except AdapterInUse as e:
        raise APIError(409, str(e), param="lora_name", code="adapter_in_use") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


# --- tokenizer routes (vLLM's shape) -----------------------------------------------------------
@api.post("/tokenize")
async def tokenize(req: TokenizeRequest, server: ServerState = Depends(server_state)) -> dict[str, Any]:
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Send exactly one of 'prompt' or 'messages'.", param="prompt")
    # Special-token strings in the text become their ids here (as a completion prompt's do), so
    # a client can find e.g. the EOS id by tokenizing `eos_token` from /tokenizer_info.
    ids = (server.encode(req.prompt, req.add_special_tokens)
           if req.prompt is not None else server.chat_ids(req.messages, req.add_generation_prompt))
    return {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len}


@api.get("/tokenizer_info")
async def tokenizer_info(server: ServerState = Depends(server_state)) -> dict[str, Any]:
    """The tokenizer's config (vLLM's route), enough for lm-eval's remote tokenizer."""
    tok, ctx = server.tokenizer, server.max_model_len

    def name(i: int | None) -> str | None:
        return tok.id_to_token(i) if i is not None else None

    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ctx, "max_model_len": ctx,
            "vocab_size": server.llm.model.config.vocab_size,
            "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
            "chat_template": getattr(tok, "chat_template", None)}


@api.post("/detokenize")
async def detokenize(req: DetokenizeRequest, server: ServerState = Depends(server_state)) -> dict[str, Any]:
    server.check_model(req.model)
    vocab = server.llm.model.config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"Token ids must be in [0, {vocab}).", param="tokens")
    return {"prompt": server.tokenizer.decode(req.tokens)}


# --- embeddings: a sentence encoder beside the LLM, loaded on first use -------------------------
def encoder(server: ServerState) -> Any:
    if server.embedding_model is None:
        raise APIError(404, "This server has no embedding model; start it with --embedding-model.",
                       param="model", code="model_not_found")
    if "model" not in server.encoders:
        try:
            server.encoders["model"] = load_encoder(None if server.embedding_model == "default"
                                                    else server.embedding_model)
        except EmberError as e:
            raise APIError(404, f"No embedding model available: {e}", param="model",
                           code="model_not_found") from None
    return server.encoders["model"]


@api.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, server: ServerState = Depends(server_state)) -> dict[str, Any]:
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise APIError(400, "'input' must hold at least one text.", param="input")
    enc = await asyncio.to_thread(encoder, server)
    if req.model is not None and req.model not in (enc.name, enc.name.split("@")[0], server.served_model_name):
        raise APIError(404, f"The embedding model here is '{enc.name.split('@')[0]}', not '{req.model}'.",
                       param="model", code="model_not_found")
    if req.dimensions not in (None, enc.dim):
        raise APIError(400, f"This model's embeddings have {enc.dim} dimensions; 'dimensions' cannot change "
                       "that.", param="dimensions")
    vectors = await asyncio.to_thread(enc.encode, texts)
    tokens = sum(min(len(e.ids), enc.max_length) for e in enc.tokenizer.encode_batch(texts))

    def encoded(v: Any) -> Any:
        return base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" \
            else v.tolist()

    return {"object": "list", "model": enc.name.split("@")[0],
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# --- open routes ---------------------------------------------------------------------------------
@open_routes.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@open_routes.get("/metrics")
async def metrics(server: ServerState = Depends(server_state)) -> PlainTextResponse:
    engine = server.engine
    return PlainTextResponse(engine.metrics.render(engine.gauges), media_type="text/plain; version=0.0.4")


# --- the application -----------------------------------------------------------------------------
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine thread runs while the application does."""
    engine = app.state.server.engine
    engine.start()
    yield
    engine.stop()


def create_app(llm: LLM, served_model_name: str, api_key: str | None = None,
               max_waiting: int | None = None, embedding_model: str | None = "default",
               lora_dirs: list[str | Path] | None = None) -> FastAPI:
    app = FastAPI(title="Ember", lifespan=lifespan)
    app.state.server = ServerState(AsyncEngine(llm, max_waiting), served_model_name, api_key, embedding_model,
                                   lora_dirs=[Path(d) for d in lora_dirs or []])
    app.state.engine = app.state.server.engine
    _install_error_handlers(app)
    app.include_router(api)
    app.include_router(open_routes)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    def reply(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return reply(e, {"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI says 422 with a list of errors; OpenAI clients expect 400 and one sentence.
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            message, param = f"The request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}.", None
        elif err.get("type") == "extra_forbidden":
            message = f"Unsupported parameter: '{param}'."
        elif not loc:  # no body, or a body that is not an object
            message = "The request body must be a JSON object."
        else:
            message = f"Invalid value for '{param}': {err['msg']}." if param else f"Invalid request: {err['msg']}."
        return reply(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return reply(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(EmberError)
    async def ember_error(request: Request, e: EmberError) -> JSONResponse:
        return reply(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:  # ours, not the client's; still JSON
        return reply(APIError(500, f"Internal error: {e}", type="server_error"))


def serve(llm: LLM, served_model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_waiting: int | None = None, log_level: str = "info", embedding_model: str | None = "default",
          lora_dirs: list[str | Path] | None = None) -> None:
    """Run the server until interrupted."""
    app = create_app(llm, served_model_name, api_key, max_waiting, embedding_model, lora_dirs)
    print(llm.pool_size.describe(), flush=True)
    if (warning := exposure_warning(host, api_key)) is not None:  # beyond loopback without a key
        print(warning, file=sys.stderr, flush=True)
    print(f"Serving '{served_model_name}' (context {llm.max_model_len} tokens) at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
