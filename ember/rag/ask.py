"""Grounded answers: retrieve, prompt, generate, then check every citation.

    answer = index.ask("How do I read a gzip file?", endpoint="http://localhost:8000")
    print(answer.render())

Generation goes to any OpenAI-compatible server (`/v1/chat/completions`, or
`/v1/completions` with `api="completions"`), `ember serve` included, or to a local Ember
checkpoint through the engine (`ember.LLM`).

Relevance gate: a retrieved chunk counts as relevant when its cosine to the question is
at least `min_similarity` (or, in an index without vectors, its BM25 score at least
`min_bm25`). With none relevant, the answer says so and no model is called.

Citation check: the answer is split into sentences; a sentence citing [n] is supported
when every quoted span in it appears in source n and at least `min_support` of its
content words (stemmed, stopwords out) occur in source n. Citations of numbers that
were never given are flagged too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ember.engine import LLM
from ember.errors import EmberError
from ember.rag.bm25 import Analyzer
from ember.rag.prompt import approx_tokens, fit_context, get_template
from ember.sampling import SamplingParams

NOTHING_RELEVANT = "I could not find anything relevant to this question in the index, so I cannot answer it from the sources."
_CITE = re.compile(r"\[(\d+)\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)|\n+")
_QUOTE = re.compile(r"[\"\u201c]([^\"\u201d]{8,})[\"\u201d]")


@dataclass
class Citation:
    number: int
    sentence: str
    supported: bool
    support: float  # share of the sentence's content words found in the cited source
    reason: str = ""


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Any] = field(default_factory=list)  # the Hits given to the model, numbered from 1
    citations: list[Citation] = field(default_factory=list)
    answered: bool = True  # False when nothing relevant was retrieved
    prompt: Any = None

    @property
    def unsupported(self) -> list[Citation]:
        return [c for c in self.citations if not c.supported]

    def render(self) -> str:
        out = [self.text.strip()]
        if self.sources:
            out += ["", "Sources:"]
            out += [f"[{i}] {h.source}" + (f" ({h.location})" if h.location else "") for i, h in
                    enumerate(self.sources, 1)]
        for c in self.unsupported:
            out.append(f"warning: citation [{c.number}] is not supported by its source ({c.reason}): "
                       f"{c.sentence.strip()[:160]}")
        return "\n".join(out)


def check_citations(answer: str, sources: list[str], analyzer: Analyzer | None = None,
                    min_support: float = 0.5) -> list[Citation]:
    """One Citation per (sentence, cited number), judged against the cited source text."""
    analyzer = analyzer or Analyzer()
    out = []
    for sentence in _SENTENCE.split(answer):
        nums = [int(n) for n in _CITE.findall(sentence)]
        if not nums:
            continue
        claim = _CITE.sub(" ", sentence)
        words = set(analyzer(claim))
        for n in dict.fromkeys(nums):
            if not 1 <= n <= len(sources):
                out.append(Citation(n, sentence, False, 0.0, f"there is no source [{n}]"))
                continue
            src = sources[n - 1]
            terms = set(analyzer(src))
            support = len(words & terms) / len(words) if words else 1.0
            flat = " ".join(src.lower().split())
            missing = [q for q in _QUOTE.findall(claim) if " ".join(q.lower().split()) not in flat]
            if missing:
                out.append(Citation(n, sentence, False, support, f"quote not in source: {missing[0][:60]!r}"))
            elif support < min_support:
                out.append(Citation(n, sentence, False, support, f"only {support:.0%} of its words are in the source"))
            else:
                out.append(Citation(n, sentence, True, support))
    return out


def _relevant(hits: list[Any], min_similarity: float, min_bm25: float) -> list[Any]:
    keep = []
    for h in hits:
        dense = h.scores.get("dense")
        if dense is not None:
            if dense >= min_similarity:
                keep.append(h)
        elif h.scores.get("bm25", 0.0) >= min_bm25:
            keep.append(h)
    return keep


def complete_endpoint(url: str, messages: list[dict], prompt_text: str, max_tokens: int, api: str = "chat",
                      model: str | None = None, api_key: str | None = None, client: Any = None,
                      timeout: float = 120.0) -> str:
    """One greedy completion from an OpenAI-compatible server."""
    import httpx  # an optional extra: only answers from a server need it

    base = url.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body: dict[str, Any] = {"model": model or "default", "max_tokens": max_tokens, "temperature": 0}
    if api == "chat":
        body["messages"] = messages
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt_text
        path = "/v1/completions"
    own = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        r = client.post(base + path, json=body, headers=headers)
    except httpx.HTTPError as e:
        raise EmberError(f"Could not reach the endpoint {url} ({e}).") from e
    finally:
        if own:
            client.close()
    if r.status_code >= 400:
        raise EmberError(f"The endpoint {url} answered {r.status_code}: {r.text[:200]}")
    try:
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if api == "chat" else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise EmberError(f"The endpoint {url} did not return an OpenAI-style completion.") from e


def complete_local(model: Any, messages: list[dict], prompt_text: str, max_tokens: int) -> str:
    """Greedy completion with a local Ember checkpoint (a path or an `ember.LLM`)."""
    llm = model if isinstance(model, LLM) else LLM(str(model))
    tok = llm.tokenizer
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True) if getattr(
        tok, "chat_template", None) else prompt_text
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
    return out[0].outputs[0].text


def _window(model: Any, endpoint: str | None, context_tokens: int | None) -> tuple[int, Any]:
    if context_tokens:
        return context_tokens, approx_tokens
    if model is not None and endpoint is None:
        llm = model if isinstance(model, LLM) else LLM(str(model))
        return llm.max_model_len, lambda s: len(llm.tokenizer.encode(s))
    return 4096, approx_tokens


def ask(index: Any, question: str, model: Any = None, endpoint: str | None = None, k: int = 5,
        mode: str | None = None, where: dict | None = None, template: Any = "grounded-qa",
        templates_file: str | None = None, max_tokens: int = 256, context_tokens: int | None = None,
        min_similarity: float = 0.3, min_bm25: float = 1.0, api: str = "chat", endpoint_model: str | None = None,
        api_key: str | None = None, client: Any = None) -> Any:
    """Answer `question` from the index with numbered, checked citations."""
    if model is None and endpoint is None:
        raise EmberError("ask needs a model directory (--model) or an OpenAI-compatible endpoint (--endpoint).")
    hits = _relevant(index.search(question, k=k, mode=mode, where=where), min_similarity, min_bm25)
    if not hits:
        return Answer(question, NOTHING_RELEVANT, answered=False)
    tpl = get_template(template, templates_file)
    if model is not None and endpoint is None:
        model = model if isinstance(model, LLM) else LLM(str(model))
    window, count = _window(model, endpoint, context_tokens)
    overhead = tpl.text(question, "", [])
    context, used = fit_context(hits, window, max_tokens, overhead, count)
    sources = [{"n": i, "title": h.title, "source": h.source, "location": h.location, "text": h.text}
               for i, h in enumerate(used, 1)]
    messages, text = tpl.messages(question, context, sources), tpl.text(question, context, sources)
    if endpoint is not None:
        reply = complete_endpoint(endpoint, messages, text, max_tokens, api, endpoint_model, api_key, client)
    else:
        reply = complete_local(model, messages, text, max_tokens)
    cites = check_citations(reply, [h.text for h in used], index.analyzer)
    return Answer(question, reply, used, cites, True, messages if api == "chat" else text)
