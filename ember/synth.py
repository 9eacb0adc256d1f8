"""Synthetic fine-tuning data with checkable answers, so learning is measured without a hub.

Instruction tasks (each prompt has exactly one right answer):
  arithmetic  "What is 37 + 58?" -> "95"            (+, - and * of numbers below 100)
  reverse     "Reverse the string: lamp" -> "pmal"
  sort        "Sort ascending: 7 2 9 4" -> "2 4 7 9"
  format      "Convert to JSON: name=ada; age=36" -> '{"name": "ada", "age": 36}'
Preference tasks (rows {"prompt", "chosen", "rejected"}, over one instruction task):
  correct-over-wrong      the right answer over a near miss
  concise-over-rambling   the bare answer over the same answer buried in filler

`write_synth` writes JSONL in the SFT shapes `ember.train.examples` reads (each row also
keeps its `answer`), and `exact_match` scores a model by greedy generation on held-out
prompts against those answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import torch

from ember.errors import EmberError
from ember.generation import generate_ids
from ember.sampling import SamplingParams
from ember.train.examples import end_of_turn_id

WORDS = ("ada alan anna bob carl dora eve finn gus hana ivan jade kai lena max nora omar pia quinn rosa sam tara "
         "uma vera walt xena yuri zoe").split()
CITIES = "paris oslo lima rome kyiv quito baku doha riga bern cairo delhi tokyo seoul".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b, op = rng.randrange(100), rng.randrange(100), rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", str(value)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    return f"Reverse the string: {word}", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randrange(10) for _ in range(rng.randint(3, 7))]
    return f"Sort ascending: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))


def _format(rng: random.Random) -> tuple[str, str]:
    fields = [("name", rng.choice(WORDS)), ("age", rng.randint(18, 90)), ("city", rng.choice(CITIES))]
    rng.shuffle(fields)
    fields = fields[:rng.randint(2, 3)]
    kv = "; ".join(f"{k}={v}" for k, v in fields)
    return f"Convert to JSON: {kv}", json.dumps(dict(fields))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic, "reverse": _reverse, "sort": _sort, "format": _format}
PREFERENCE_TASKS = ("correct-over-wrong", "concise-over-rambling")
SHAPES = ("messages", "prompt", "alpaca")


def _near_miss(rng: random.Random, task: str, answer: str) -> str:
    """A plausible wrong answer: what a model that almost learned the task would say."""
    if task == "arithmetic":
        return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    if task == "reverse" or task == "sort":
        sep = "" if task == "reverse" else " "
        items = answer.split(sep) if sep else list(answer)
        i = rng.randrange(len(items) - 1)
        if items[i] == items[i + 1]:  # swapping equal neighbours changes nothing: drop one instead
            return sep.join(items[:i] + items[i + 1:])
        items[i], items[i + 1] = items[i + 1], items[i]
        return sep.join(items)
    data = json.loads(answer)
    key = rng.choice(list(data))
    data[key] = data[key] + 1 if isinstance(data[key], int) else data[key][::-1] + "x"
    return json.dumps(data)


RAMBLES = ("Great question! Let me think about this carefully, step by step, before I answer. ",
           "Well, there are a few ways to look at this, and it is worth being thorough. ",
           "Sure! I am happy to help with that. This is an interesting little problem. ")
CODAS = (" I hope this helps, and let me know if you have any other questions!",
         " That should be it, although it never hurts to double-check the result yourself.",
         " Thanks for asking; problems like this one are always fun to work through.")


def _ramble(rng: random.Random, answer: str) -> str:
    return f"{rng.choice(RAMBLES)}After working through it, the answer is {answer}.{rng.choice(CODAS)}"


def task_pairs(task: str, n: int, seed: int = 0, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """`n` distinct (prompt, answer) pairs of an instruction task, none of whose prompts is in `exclude`."""
    if task not in TASKS:
        raise EmberError(f"Unknown synthetic task '{task}'; choose one of {', '.join(TASKS)}.")
    rng, seen, out = random.Random(f"{task}:{seed}"), set(exclude or ()), []
    tries = 0
    while len(out) < n:
        prompt, answer = TASKS[task](rng)
        tries += 1
        if tries > 50 * n + 1000:
            raise EmberError(f"Task '{task}' has fewer than {n} distinct prompts left; ask for fewer rows.")
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


def instruction_row(prompt: str, answer: str, shape: str = "messages") -> dict[str, Any]:
    if shape == "messages":
        row: dict[str, Any] = {"messages": [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": answer}]}
    elif shape == "prompt":
        row = {"prompt": prompt, "completion": answer}
    elif shape == "alpaca":
        row = {"instruction": prompt, "input": "", "output": answer}
    else:
        raise EmberError(f"Unknown row shape '{shape}'; choose one of {', '.join(SHAPES)}.")
    row["answer"] = answer
    return row


def synth_rows(task: str, n: int, seed: int = 0, shape: str = "messages", base_task: str = "arithmetic",
               exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """Rows of an instruction task, or preference pairs over `base_task` for a preference task."""
    if n < 1:
        raise EmberError("The number of rows must be at least 1.")
    if task in PREFERENCE_TASKS:
        rng = random.Random(f"{task}:{base_task}:{seed}")
        rows = []
        for prompt, answer in task_pairs(base_task, n, seed, exclude):
            rejected = _near_miss(rng, base_task, answer) if task == "correct-over-wrong" else _ramble(rng, answer)
            rows.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "answer": answer})
        return rows
    if task not in TASKS:
        raise EmberError(f"Unknown synthetic task '{task}'; choose one of "
                         f"{', '.join(list(TASKS) + list(PREFERENCE_TASKS))}.")
    return [instruction_row(p, a, shape) for p, a in task_pairs(task, n, seed, exclude)]


def write_synth(task: str, out: str | Path, n: int = 1000, seed: int = 0, shape: str = "messages",
                base_task: str = "arithmetic", exclude: set[str] | None = None) -> Path:
    """Write synthetic rows as JSONL (temp file, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in synth_rows(task, n, seed, shape, base_task, exclude):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def row_prompt_answer(row: dict[str, Any]) -> tuple[str, str]:
    """The user prompt and checkable answer of a synthetic row of any shape."""
    if "messages" in row:
        prompt = next(m["content"] for m in row["messages"] if m["role"] == "user")
    else:
        prompt = row.get("prompt", row.get("instruction"))
    if prompt is None or "answer" not in row:
        raise EmberError("Exact-match rows need a user prompt and an 'answer' field (as `ember synth` writes).")
    return prompt, row["answer"]


def exact_match(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int = 48,
                keep: int = 5) -> dict[str, Any]:
    """Greedy answers to each row's prompt, compared to its answer after stripping whitespace."""
    stop = {end_of_turn_id(tokenizer)} | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    was_training = model.training
    model.eval()
    hits, samples = 0, []
    with torch.no_grad():
        for row in rows:
            prompt, answer = row_prompt_answer(row)
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=True)
            out = [t for t in generate_ids(model, ids, SamplingParams(max_tokens=max_new_tokens, temperature=0.0), stop_ids=stop)
                   if t not in stop]
            text = tokenizer.decode(out).strip()
            ok = text == answer.strip()
            hits += ok
            if len(samples) < keep:
                samples.append({"prompt": prompt, "answer": answer, "output": text, "correct": ok})
    model.train(was_training)
    return {"exact_match": hits / max(1, len(rows)), "n": len(rows), "samples": samples}
