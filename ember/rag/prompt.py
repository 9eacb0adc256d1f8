"""Grounded prompts: a template (role, task, audience, style, examples) plus numbered sources.

A template is data. The built-in library below covers the usual cases; users add their
own in YAML (a mapping of name -> fields) or as a Jinja file whose text becomes the user
message, with `question`, `sources` (a list of {n, title, source, location, text}) and
`context` (the rendered source block) in scope.

The context budget: sources go in rank order (most relevant first, numbered [1], [2], ...)
until the prompt would leave fewer than `answer_tokens` of the model's window for the
answer; the last source that does not fit whole is cut at a token boundary if at least
`min_source_tokens` of it fit, else left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import jinja2
import yaml

from ember.errors import EmberError

GROUNDING = ("Answer only from the numbered sources below. Cite every claim with the number of the source "
             "that supports it, like [1] or [2][3], right after the sentence. If the sources do not contain the "
             "answer, say that you cannot answer from the sources. Do not use outside knowledge.")


@dataclass
class PromptTemplate:
    name: str
    role: str = "You are a careful research assistant."
    task: str = "Answer the question."
    audience: str = ""
    style: str = "Be concise and precise."
    instructions: str = GROUNDING
    examples: list[dict[str, str]] = field(default_factory=list)  # {question, context, answer}
    user_template: str | None = None  # Jinja source for the user message (optional)

    def system(self) -> str:
        parts = [self.role, self.task]
        if self.audience:
            parts.append(f"Your audience: {self.audience}.")
        parts += [self.style, self.instructions]
        return " ".join(p.strip() for p in parts if p and p.strip())

    def user(self, question: str, context: str, sources: Sequence[dict[str, Any]]) -> str:
        if self.user_template:
            env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
            return env.from_string(self.user_template).render(question=question, context=context, sources=sources)
        return f"Sources:\n{context}\n\nQuestion: {question}"

    def messages(self, question: str, context: str, sources: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
        """Chat messages: system, then each few-shot example as a user/assistant pair, then the question."""
        msgs = [{"role": "system", "content": self.system()}]
        for ex in self.examples:
            msgs.append({"role": "user", "content": self.user(ex["question"], ex["context"], [])})
            msgs.append({"role": "assistant", "content": ex["answer"]})
        msgs.append({"role": "user", "content": self.user(question, context, sources)})
        return msgs

    def text(self, question: str, context: str, sources: Sequence[dict[str, Any]]) -> str:
        """One plain prompt for completion models (no chat template)."""
        out = [self.system(), ""]
        for ex in self.examples:
            out += [self.user(ex["question"], ex["context"], []), f"Answer: {ex['answer']}", ""]
        out += [self.user(question, context, sources), "Answer:"]
        return "\n".join(out)


_EXAMPLE = {"question": "When did the bridge open?",
            "context": "[1] (city-history.md, lines 4-6)\nThe Harbour Bridge opened to traffic in March 1932.\n\n"
                       "[2] (engineering.md, line 12)\nIts arch spans 503 metres.",
            "answer": "The bridge opened in March 1932 [1]."}

LIBRARY: dict[str, PromptTemplate] = {
    "grounded-qa": PromptTemplate("grounded-qa", examples=[_EXAMPLE]),
    "concise": PromptTemplate("concise", style="Answer in one or two sentences."),
    "explain": PromptTemplate("explain", task="Explain the answer step by step.",
                              audience="a newcomer to the subject", style="Use plain words and short sentences.",
                              examples=[_EXAMPLE]),
    "code": PromptTemplate("code", role="You are a senior Python engineer.",
                           task="Answer the programming question, with a short code example when it helps.",
                           audience="a working programmer", style="Be exact about names and signatures."),
}


def load_templates(path: str | Path) -> dict[str, PromptTemplate]:
    """Templates from a YAML file ({name: {role, task, audience, style, examples, user_template}})
    or a Jinja file (.j2/.jinja: the user message; the template is named after the file)."""
    path = Path(path)
    if not path.exists():
        raise EmberError(f"Prompt template file {path} does not exist.")
    if path.suffix in (".j2", ".jinja", ".jinja2"):
        return {path.stem: PromptTemplate(path.stem, user_template=path.read_text(encoding="utf-8"))}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise EmberError(f"Prompt template file {path} is not valid YAML ({e}).") from e
    if not isinstance(data, dict):
        raise EmberError(f"Prompt template file {path} must map template names to their fields.")
    known = {f.name for f in fields(PromptTemplate)}
    out = {}
    for name, spec in data.items():
        spec = dict(spec or {})
        parent = spec.pop("extends", None)  # start from a built-in template and override fields
        bad = set(spec) - known
        if bad:
            raise EmberError(f"Template {name!r} in {path} has unknown fields: {', '.join(sorted(bad))}.")
        if parent is not None and parent not in LIBRARY:
            raise EmberError(f"Template {name!r} extends unknown template {parent!r}.")
        base = dict(LIBRARY[parent].__dict__) if parent else {}
        out[str(name)] = PromptTemplate(**{**base, **spec, "name": str(name)})
    return out


def get_template(name: str | PromptTemplate, extra: str | Path | None = None) -> PromptTemplate:
    if isinstance(name, PromptTemplate):
        return name
    lib = {**LIBRARY, **(load_templates(extra) if extra else {})}
    if name not in lib:
        raise EmberError(f"Unknown prompt template {name!r}; known: {', '.join(sorted(lib))}.")
    return lib[name]


def approx_tokens(text: str) -> int:
    """Token estimate when no tokenizer is at hand (about four characters a token in English)."""
    return max(1, (len(text) + 3) // 4)


def source_block(n: int, hit: Any, text: str) -> str:
    where = ", ".join(x for x in (hit.source, hit.location) if x)
    return f"[{n}] ({where})\n{text}"


def fit_context(hits: Sequence[Any], window: int, answer_tokens: int, overhead: str,
                count: Callable[[str], int] = approx_tokens, min_source_tokens: int = 32) -> tuple[str, list[Any]]:
    """Numbered source blocks, best first, within `window - answer_tokens - count(overhead)` tokens."""
    budget = window - answer_tokens - count(overhead)
    if budget <= 0:
        raise EmberError(f"The prompt leaves no room for sources: a {window}-token window minus "
                         f"{answer_tokens} answer tokens is already filled by the instructions.")
    blocks, used = [], []
    for hit in hits:
        block = source_block(len(used) + 1, hit, hit.text)
        cost = count(block) + 2
        if cost > budget:
            keep = budget - count(source_block(len(used) + 1, hit, "")) - 2
            if keep < min_source_tokens:
                break
            # Cut the text to fit: characters in proportion, then shrink until it counts right.
            text = hit.text[: max(1, len(hit.text) * keep // max(count(hit.text), 1))]
            while text and count(source_block(len(used) + 1, hit, text)) + 2 > budget:
                text = text[: int(len(text) * 0.9)]
            if not text:
                break
            block, cost = source_block(len(used) + 1, hit, text + " ..."), budget
        blocks.append(block)
        used.append(hit)
        budget -= cost
        if budget <= 0:
            break
    return "\n\n".join(blocks), used
