"""Constitutional self-critique (Bai et al., 2022, "Constitutional AI", the supervised stage).

For each prompt: the model answers; it is asked to critique its answer against a principle
drawn from the constitution; it is asked to revise the answer in the light of that
critique (optionally for several rounds, a fresh principle each round). The final
revisions become SFT data (`sft.jsonl`, `{"messages"}`), and (revision, original) become
preference pairs (`preferences.jsonl`, `{"prompt", "chosen", "rejected"}`) for DPO or a
reward model; `trace.jsonl` keeps every step. The model is any `Chat`: the local model
through its chat template, or any OpenAI-compatible endpoint (`ember serve` included).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ember.errors import EmberError
from ember.files import atomic_write_text
from ember.generation import context_length, stream_text
from ember.sampling import SamplingParams

Messages = list[dict[str, str]]
Chat = Callable[[Messages], str]  # a conversation in, the assistant's next reply out

CRITIQUE = ("Identify specific ways in which your last response does not follow this principle: {principle} "
            "Be concrete.")
REVISION = ("Rewrite your last response so that it follows this principle: {principle} "
            "Reply with the rewritten response only.")


@dataclass
class Principle:
    name: str
    critique: str  # the critique request shown to the model
    revision: str  # the revision request


def principle_from_text(text: str, name: str) -> Principle:
    return Principle(name, CRITIQUE.format(principle=text), REVISION.format(principle=text))


def load_principles(path: str | Path) -> list[Principle]:
    """A constitution: JSON/JSONL of {"critique", "revision"} (Anthropic's layout, with an optional
    "name") or {"principle": TEXT}, or a text file with one principle a line."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"Principles file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl"):
        try:
            rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise EmberError(f"Principles file {path} is not valid JSON ({e.msg}).") from None
        if isinstance(rows, dict):
            rows = list(rows.values())
        out = []
        for i, row in enumerate(rows, 1):
            where = f"{path} entry {i}"
            if isinstance(row, str):
                out.append(principle_from_text(row, f"p{i}"))
            elif isinstance(row, dict) and isinstance(row.get("principle"), str):
                out.append(principle_from_text(row["principle"], str(row.get("name", f"p{i}"))))
            elif isinstance(row, dict) and isinstance(row.get("critique"), str) and isinstance(row.get("revision"), str):
                out.append(Principle(str(row.get("name", f"p{i}")), row["critique"], row["revision"]))
            else:
                raise EmberError(f"{where} needs a 'principle' string, or 'critique' and 'revision' strings.")
    else:
        out = [principle_from_text(line.strip(), f"p{i}") for i, line in enumerate(text.splitlines(), 1)
               if line.strip()]
    if not out:
        raise EmberError(f"Principles file {path} has no principles.")
    return out


# --- chat backends -------------------------------------------------------------------------
class LocalChat:
    """The local model, through its own chat template."""

    def __init__(self, model: Any, tokenizer: Any, max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> None:
        if tokenizer.chat_template is None:
            raise EmberError("The model's tokenizer has no chat template; give one or use --endpoint.")
        self.model, self.tok, self.max_tokens, self.temperature, self.seed = model, tokenizer, max_tokens, temperature, seed

    def __call__(self, messages: Messages) -> str:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        room = context_length(self.model) - len(ids)
        if room < 1:
            raise EmberError(f"The conversation has {len(ids)} tokens, more than the model's context; "
                             "shorten the prompts or lower --max-tokens.")
        return "".join(stream_text(self.model, self.tok, ids, SamplingParams(
            max_tokens=min(self.max_tokens, room), temperature=self.temperature, seed=self.seed))).strip()


class EndpointChat:
    """Any OpenAI-compatible server's /v1/chat/completions (httpx; `client` lets tests inject a transport)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, timeout: float = 120.0, client: Any = None) -> None:
        import httpx  # an optional extra: only a chat with a server needs it

        base = url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client if client is not None else httpx.Client(timeout=timeout)
        self.headers = headers

    def __call__(self, messages: Messages) -> str:
        import httpx  # an optional extra, as above

        body: dict[str, Any] = {"messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.model:
            body["model"] = self.model
        try:
            r = self.client.post(self.url, json=body, headers=self.headers)
        except httpx.HTTPError as e:
            raise EmberError(f"Could not reach {self.url}: {e}.") from None
        if r.status_code != 200:
            try:
                detail = r.json().get("error", {}).get("message", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            raise EmberError(f"{self.url} answered {r.status_code}: {str(detail)[:300]}")
        try:
            return (r.json()["choices"][0]["message"]["content"] or "").strip()
        except (ValueError, KeyError, IndexError, TypeError):
            raise EmberError(f"{self.url} did not answer in the chat-completions format.") from None


# --- the loop --------------------------------------------------------------------------------
@dataclass
class Revision:
    prompt: str | Messages
    response: str
    steps: list[dict[str, str]] = field(default_factory=list)  # principle, critique, revision per round

    @property
    def final(self) -> str:
        return self.steps[-1]["revision"] if self.steps else self.response


def critique_and_revise(chat: Chat, prompt: str | Messages, principles: Sequence[Principle], rounds: int = 1,
                        rng: random.Random | None = None) -> Revision:
    """Answer, then `rounds` times: critique against a sampled principle and revise."""
    rng = rng or random.Random(0)
    conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    record = Revision(prompt, chat(conv))
    current = record.response
    for _ in range(rounds):
        p = rng.choice(list(principles))
        talk = conv + [{"role": "assistant", "content": current}, {"role": "user", "content": p.critique}]
        critique = chat(talk)
        talk += [{"role": "assistant", "content": critique}, {"role": "user", "content": p.revision}]
        current = chat(talk)
        record.steps.append({"principle": p.name, "critique": critique, "revision": current})
    return record


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_constitutional(chat: Chat, prompts: Sequence[str | Messages], principles: Sequence[Principle],
                       out_dir: str | Path, rounds: int = 1, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Critique and revise every prompt; write sft.jsonl, preferences.jsonl and trace.jsonl."""
    if rounds < 1:
        raise EmberError("rounds must be at least 1.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sft, prefs, trace, unchanged = [], [], [], 0
    for prompt in tqdm(prompts, disable=not progress, unit="prompt"):
        rec = critique_and_revise(chat, prompt, principles, rounds, rng)
        trace.append(asdict(rec))
        conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not rec.final:
            unchanged += 1
            continue
        sft.append({"messages": conv + [{"role": "assistant", "content": rec.final}]})
        if rec.final == rec.response:
            unchanged += 1  # nothing to prefer: the pair would be identical
        else:
            prefs.append({"prompt": prompt, "chosen": rec.final, "rejected": rec.response})
    _write_jsonl(out / "sft.jsonl", sft)
    _write_jsonl(out / "preferences.jsonl", prefs)
    _write_jsonl(out / "trace.jsonl", trace)
    summary = {"prompts": len(prompts), "sft_rows": len(sft), "preference_pairs": len(prefs),
               "unchanged_or_empty": unchanged, "rounds": rounds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
