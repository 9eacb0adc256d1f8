"""Tokenizer: byte-level BPE over the Hugging Face `tokenizers` engine.

The engine does the fast work (training, encoding, decoding); this file adds what an LLM
system needs around it:

- training with a GPT-2 or Llama-3 split regex and the full 256-byte alphabet, so every
  string is encodable and nothing maps to <unk>;
- HF-layout files (`tokenizer.json` + `tokenizer_config.json`) that `transformers` opens;
- special tokens that user text cannot inject: `<|im_end|>` typed by a user encodes as
  plain text unless the caller allows it (tiktoken's `allowed_special` semantics);
- HF-compatible Jinja chat templates, with tools (`tools=`, assistant `tool_calls`, `role: "tool"`
  messages) passed to templates that read them and rendered in the ChatML/Hermes format
  (`<tools>`, `<tool_call>`, `<tool_response>`) for templates that do not;
- incremental detokenization for streaming that never emits half a UTF-8 character.

Ember-trained tokenizers put their special tokens at the FIRST ids, in the order given
(default: 0 `<|endoftext|>` = EOS and PAD, 1 `<|begin_of_text|>` = BOS, 2 `<|im_start|>`,
3 `<|im_end|>`), then the 256 byte tokens, then merges. First ids keep the special ids
fixed whatever the vocab size, and `vocab_size` counts them.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Engine

from ember.errors import EmberError
from ember.files import read_json

# Split regexes (applied before byte-level mapping): GPT-2's and Llama-3's (= cl100k's).
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

EOS, BOS, IM_START, IM_END = "<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = [EOS, BOS, IM_START, IM_END]

# ChatML, the default template for Ember-trained tokenizers that have the chat tokens.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The tool-call format of templates that have none (ChatML/Hermes style): the system turn lists
# the tools' schemas between TOOLS_OPEN/TOOLS_CLOSE, the model calls one by writing
# TOOL_CALL_OPEN {"name": ..., "arguments": {...}} TOOL_CALL_CLOSE, and each result comes back
# between TOOL_RESPONSE_OPEN/TOOL_RESPONSE_CLOSE in a user turn.
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
# The system-turn section for such templates; SCHEMAS becomes one tool's JSON per line.
DEFAULT_TOOLS_PROMPT = """You can call the functions whose JSON schemas are listed between <tools> and </tools>:
<tools>
SCHEMAS
</tools>

To call one, answer with a JSON object holding its name and its arguments between <tool_call> and </tool_call>, one such block per call:
<tool_call>
{"name": "<function name>", "arguments": {<arguments as a JSON object>}}
</tool_call>
The results come back between <tool_response> and </tool_response>."""

# transformers writes this for "no limit"; writing null instead breaks its loader.
NO_MAX_LENGTH = int(1e30)

# Private-use markers that fence off special-token strings that came from chat messages,
# so the tokenizer can encode them as text after the template is rendered.
_TEXT_START, _TEXT_END = "\U000f0000", "\U000f0001"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes go to 256, 257, ... in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A byte-level BPE tokenizer with special tokens and a chat template."""

    def __init__(
        self,
        engine: _Engine,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        add_bos_token: bool = False,
        unk_token: str | None = None,
    ):
        self.engine = engine
        # Specials inside text are plain text by default; encode() re-inserts allowed ones.
        self.engine.encode_special_tokens = True
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.unk_token = unk_token  # byte-level BPE never needs one; kept for loaded vocabs
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.add_bos_token = add_bos_token
        added = engine.get_added_tokens_decoder()
        self._special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._added_ids = set(added)
        # How the engine matches each special (HF AddedToken flags), mirrored by _splitter.
        self._match = {t.content: (t.lstrip, t.rstrip, t.single_word) for t in added.values() if t.special}
        self._byte_level = _has_byte_level_decoder(engine.decoder)
        self._native: _Engine | None = None
        self._split_cache: dict[frozenset[str], tuple[re.Pattern, list[str]]] = {}
        for name in (bos_token, eos_token, pad_token, unk_token):
            if name is not None and engine.token_to_id(name) is None:
                raise EmberError(f"Special token {name!r} is not in the tokenizer's vocabulary.")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")

    # ----------------------------------------------------------------- loading / saving

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` (+ optional `tokenizer_config.json`) from an HF-layout dir."""
        path = Path(path)
        if not path.is_dir():
            raise EmberError(f"Tokenizer directory {path} does not exist.")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise EmberError(f"{path} has no tokenizer.json.")
        try:
            engine = _Engine.from_file(str(tok_file))
        except Exception as e:
            read_json(tok_file, "Tokenizer file")  # names malformed JSON plainly, if that is the cause
            raise EmberError(f"{tok_file} is not a tokenizer the `tokenizers` library can read ({e}).") from None

        cfg_file = path / "tokenizer_config.json"
        cfg = read_json(cfg_file, "Tokenizer config") if cfg_file.is_file() else {}
        if not isinstance(cfg, dict):
            raise EmberError(f"{cfg_file} must hold a JSON object.")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # older multi-template form: [{"name", "template"}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"  # newer transformers save it beside the config
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        if not cfg and engine.token_to_id(EOS) is not None:
            cfg = {"eos_token": EOS}  # a bare tokenizer.json: assume the common end-of-text name

        def known(key: str) -> str | None:
            # transformers would grow the vocab for a name it lacks; we keep the vocab fixed.
            name = _token_name(cfg.get(key))
            return name if name is not None and engine.token_to_id(name) is not None else None

        max_len = cfg.get("model_max_length")
        return cls(
            engine,
            bos_token=known("bos_token"),
            eos_token=known("eos_token"),
            pad_token=known("pad_token"),
            chat_template=template if isinstance(template, str) else None,
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) else None,
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            unk_token=known("unk_token"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "unk_token": self.unk_token}
        config = {
            # transformers 5 maps this name to its tokenizers-backed class, which reads
            # tokenizer.json as-is (no vocab/merges rebuild that could change the split).
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "unk_token": self.unk_token,
            "chat_template": self.chat_template,
            "model_max_length": self.model_max_length or NO_MAX_LENGTH,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        # The engine's flag is runtime state, not serialized; write the file as plain HF.
        files = {
            "tokenizer.json": self.engine.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(
                {k: v for k, v in specials.items() if v is not None}, indent=2, ensure_ascii=False
            ),
        }
        stale = path / "chat_template.jinja"  # it would override the config's template on load
        if stale.is_file():
            stale.unlink()
        for name, text in files.items():  # temp file + rename: never a half-written file
            tmp = path / f".{name}.tmp"
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, path / name)

    # ----------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self.engine.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.engine.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.engine.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.engine.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int | None:
        return self.engine.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.engine.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (may be part of a UTF-8 character)."""
        tok = self.engine.id_to_token(token_id)
        if tok is None:
            raise EmberError(f"Token id {token_id} is outside the vocabulary of size {self.vocab_size}.")
        if token_id in self._added_ids:  # added tokens are stored as their text
            return tok.encode()
        if self._byte_level:
            return bytes(_UNICODE_TO_BYTE[c] for c in tok)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):  # sentencepiece byte fallback
            return bytes([int(tok[3:5], 16)])
        return tok.replace("\u2581", " ").encode()

    # ----------------------------------------------------------------- encode / decode

    def _allowed(self, allowed_special: str | set[str]) -> set[str]:
        if allowed_special == "all":
            return set(self._special_tokens)
        if allowed_special == "none":
            return set()
        if isinstance(allowed_special, str):
            allowed_special = {allowed_special}
        unknown = set(allowed_special) - set(self._special_tokens)
        if unknown:
            raise EmberError(f"Not special tokens of this tokenizer: {sorted(unknown)}.")
        return set(allowed_special)

    def _splitter(self, allowed: set[str]) -> tuple[re.Pattern, list[str]]:
        """A regex matching any allowed special; group k (1-based) is special k-1 of the list."""
        key = frozenset(allowed)
        if key not in self._split_cache:
            # Longest first, so a special that is a prefix of another never wins.
            order = sorted(allowed, key=len, reverse=True)
            alts = []
            for s in order:
                lstrip, rstrip, single_word = self._match[s]
                core = "(" + re.escape(s) + ")"
                if single_word:  # only where it is not glued to a word
                    core = r"(?<!\w)" + core + r"(?!\w)"
                # lstrip/rstrip: the special swallows the whitespace on that side
                alts.append((r"\s*" if lstrip else "") + core + (r"\s*" if rstrip else ""))
            self._split_cache[key] = (re.compile("|".join(alts)), order)
        return self._split_cache[key]

    def encode(self, text: str, allowed_special: str | set[str] = "none", add_bos: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` are plain text unless allowed."""
        ids = [self._require_bos()] if add_bos else []
        allowed = self._allowed(allowed_special)
        if not allowed:
            return ids + self.engine.encode(text, add_special_tokens=False).ids
        if allowed == set(self._special_tokens):
            # All allowed: the engine's own matching, exactly as transformers encodes.
            return ids + self._native_engine().encode(text, add_special_tokens=False).ids
        # Some allowed: split on those ourselves. Exact for byte-level BPE; tokenizers whose
        # normalizer prepends "▁" (sentencepiece style) get it at each piece's start.
        pattern, order = self._splitter(allowed)
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                ids += self.engine.encode(text[start : m.start()], add_special_tokens=False).ids
            ids.append(self._special_tokens[order[m.lastindex - 1]])
            start = m.end()
        if start < len(text):
            ids += self.engine.encode(text[start:], add_special_tokens=False).ids
        return ids

    def _native_engine(self) -> _Engine:
        # A second engine with specials active; the main one's flag stays put, so
        # concurrent encodes never race on a toggled setting.
        if self._native is None:
            self._native = _Engine.from_str(self.engine.to_str())
            self._native.encode_special_tokens = False
        return self._native

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """Many texts -> ids in parallel (data preparation); specials are plain text."""
        out = self.engine.encode_batch_fast(list(texts), add_special_tokens=False)
        bos = [self._require_bos()] if add_bos else []
        return [bos + e.ids for e in out]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.engine.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _require_bos(self) -> int:
        if self.bos_id is None:
            raise EmberError("This tokenizer has no BOS token, so add_bos cannot be used.")
        return self.bos_id

    def describe(self, text: str, allowed_special: str | set[str] = "none") -> dict[str, Any]:
        """What `ember tokens` prints: readable pieces, ids and count for `text`."""
        ids = self.encode(text, allowed_special=allowed_special)
        # backslashreplace shows a token holding part of a character as e.g. '\xf0\x9f'
        pieces = [self.token_bytes(i).decode("utf-8", errors="backslashreplace") for i in ids]
        return {"pieces": pieces, "ids": ids, "count": len(ids)}

    # ----------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        sanitize_control_tokens: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template, like transformers does.

        With tokenize=True the specials the template writes become control tokens, while
        special-token strings inside the messages stay plain text (sanitize_control_tokens),
        so a user cannot close a turn by typing `<|im_end|>`.

        `tools` (JSON schemas `{"type": "function", "function": {...}}`), assistant messages'
        `tool_calls` and `role: "tool"` messages reach a template that reads `tools` exactly as
        transformers passes them. A template that does not read `tools` gets them in the
        ChatML/Hermes format instead (`default_tool_messages`).
        """
        if self.chat_template is None:
            raise EmberError("This tokenizer has no chat template; set one in tokenizer_config.json.")
        if not all(isinstance(m, dict) for m in messages):
            raise EmberError("Chat messages must be dicts like {'role': 'user', 'content': '...'}.")
        # As transformers: drop None-valued keys (e.g. OpenAI's content=None).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if not template_reads_tools(self.chat_template) and (
                tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)):
            messages, tools = default_tool_messages(messages, tools or []), None
        fence = tokenize and sanitize_control_tokens and self._special_tokens
        if fence:
            exact = re.compile("|".join(re.escape(s) for s in sorted(self._special_tokens, key=len, reverse=True)))
            messages, kwargs = _fence_specials(messages, exact), _fence_specials(kwargs, exact)
            tools = _fence_specials(tools, exact)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                     "unk_token": self.unk_token}
        variables = {k: v for k, v in variables.items() if v is not None}
        try:
            text = _compile_template(self.chat_template).render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                **{**variables, **kwargs}
            )
        except jinja2.TemplateError as e:
            raise EmberError(f"The chat template failed to render: {e}") from None
        if not tokenize:
            return text
        ids: list[int] = []
        # Fenced pieces are message text (plain); the rest is template text (specials allowed).
        for i, part in enumerate(re.split(f"{_TEXT_START}(.*?){_TEXT_END}", text, flags=re.S)):
            ids += self.encode(part, allowed_special="none" if i % 2 else "all")
        return ids


def template_reads_tools(source: str) -> bool:
    """Whether a chat template renders tools itself: it reads the `tools` variable."""
    if source not in _READS_TOOLS:
        try:
            _READS_TOOLS[source] = "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise EmberError(f"The chat template is not valid Jinja: {e.message} (line {e.lineno}).") from None
    return _READS_TOOLS[source]


_READS_TOOLS: dict[str, bool] = {}


def default_tool_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Tools, tool calls and tool results as plain chat turns, for templates that know no tools.

    The ChatML/Hermes convention: the tools' schemas go into the system turn (appended to the
    caller's system message, or as a new first message) with DEFAULT_TOOLS_PROMPT; an
    assistant's `tool_calls` become `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    blocks after its text; consecutive `role: "tool"` messages become one user turn of
    `<tool_response>...</tool_response>` blocks.
    """
    out: list[dict] = []
    responses_open = False  # the last message of `out` is a user turn of tool responses
    for m in messages:
        if m.get("role") == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{_text(m.get('content'))}\n{TOOL_RESPONSE_CLOSE}"
            if responses_open:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            responses_open = True
            continue
        responses_open = False
        calls = m.get("tool_calls") or []
        m = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        if calls:
            text = _text(m.get("content"))
            m["content"] = "\n".join(([text] if text else []) + [tool_call_text(c) for c in calls])
        out.append(m)
    if tools:
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        section = DEFAULT_TOOLS_PROMPT.replace("SCHEMAS", schemas)
        if out and out[0].get("role") == "system":
            system = _text(out[0].get("content"))
            out[0] = out[0] | {"content": f"{system}\n\n{section}" if system else section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def tool_call_text(call: dict) -> str:
    """One tool call (OpenAI's `{"function": {"name", "arguments"}}` or transformers' `{"name",
    "arguments"}`, arguments a JSON string or an object) as a `<tool_call>` block."""
    function = call.get("function", call) if isinstance(call, dict) else {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:  # not JSON: kept as the string the caller gave
            pass
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _text(content: Any) -> str:
    """A message's content as text (OpenAI's list of text parts joined)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _fence_specials(obj: Any, specials: re.Pattern) -> Any:
    """Wrap special-token strings in user data with private markers (recursively)."""
    if isinstance(obj, str):
        obj = obj.replace(_TEXT_START, "").replace(_TEXT_END, "")
        return specials.sub(lambda m: _TEXT_START + m.group(0) + _TEXT_END, obj)
    if isinstance(obj, dict):
        return {k: _fence_specials(v, specials) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_fence_specials(v, specials) for v in obj]
    return obj


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in HF templates): render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def _environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment transformers renders chat templates in (made once)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        _ENVIRONMENT = env
    return _ENVIRONMENT


_ENVIRONMENT: ImmutableSandboxedEnvironment | None = None


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    if source not in _TEMPLATE_CACHE:
        try:
            _TEMPLATE_CACHE[source] = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise EmberError(f"The chat template is not valid Jinja: {e.message} (line {e.lineno}).") from None
    return _TEMPLATE_CACHE[source]


def _has_byte_level_decoder(decoder: Any) -> bool:
    if decoder is None:
        return False
    state = json.loads(decoder.__getstate__())
    return "ByteLevel" in [state.get("type")] + [d.get("type") for d in state.get("decoders", [])]


# --------------------------------------------------------------------- streaming


class IncrementalDecoder:
    """Turn a stream of token ids into text, emitting only complete characters.

    Byte-level BPE can split one UTF-8 character over several tokens, and decoders like
    sentencepiece's strip a leading space depending on context. So we decode a small
    window: text from `prefix` to the end, minus text from `prefix` to `read` (what was
    already emitted), and hold everything back while the window ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids or [])
        # A few prompt tokens of context so the first new token decodes as a continuation.
        self.prefix = max(len(self.ids) - 4, 0)
        self.read = len(self.ids)

    def _diff(self) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        seen = decode(self.ids[self.prefix : self.read])
        return decode(self.ids[self.prefix :])[len(seen) :]

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        new = self._diff()
        if not new or new.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """Emit whatever is held back (at end of stream); incomplete bytes become U+FFFD."""
        new = self._diff()
        self.prefix = self.read = len(self.ids)
        return new


# --------------------------------------------------------------------- training / loading


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "llama3",
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train byte-level BPE on `texts`. `vocab_size` counts the 256 bytes and the specials.

    `pattern` is "gpt2", "llama3" or a regex of your own. Specials get ids 0..n-1; the
    first is EOS (and PAD), `<|begin_of_text|>` is BOS when present, and a ChatML template
    is attached when `<|im_start|>` and `<|im_end|>` are present.
    """
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials):
        raise EmberError(f"Special tokens must be distinct, got {specials}.")
    if vocab_size < 256 + len(specials):
        raise EmberError(f"vocab_size must be at least {256 + len(specials)} (256 bytes + specials), got {vocab_size}.")
    regex = PATTERNS.get(pattern, pattern)
    engine = _Engine(models.BPE())
    engine.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    engine.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=show_progress,
    )
    engine.train_from_iterator(texts, trainer=trainer)
    chat = IM_START in specials and IM_END in specials
    eos = specials[0] if specials else None
    return Tokenizer(
        engine,
        bos_token=BOS if BOS in specials else None,
        eos_token=eos,
        pad_token=eos,
        chat_template=CHATML_TEMPLATE if chat else None,
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from an HF-layout directory (Ember's own or one from the Hub)."""
    return Tokenizer.from_dir(path)
