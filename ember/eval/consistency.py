"""Self-consistency: agreement across k sampled answers and across paraphrased questions; maj@k.

An answer is reduced to a comparable key first: the number after GSM8K's "####" or the
last number in the text when there is one, else the SQuAD-normalised text. maj@k takes
the most common key among the first k samples (ties go to the earliest sample, so the
result is deterministic) and scores it against the reference; its cost is the tokens the
k samples took.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from ember.eval.metrics import squad_normalize

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_key(text: str) -> str:
    m = re.search(r"####\s*(-?[\d,.]+)", text)
    nums = [m.group(1)] if m else _NUMBER.findall(text)
    if nums:
        v = nums[-1].replace(",", "").rstrip(".")
        try:
            f = float(v)
            return str(int(f)) if f == int(f) else str(f)
        except ValueError:
            pass
    return squad_normalize(text)


def majority(answers: Sequence[str]) -> tuple[str, float]:
    """(the most common key, share of answers that agree with it); earliest wins ties."""
    keys = [answer_key(a) for a in answers]
    if not keys:
        return "", 0.0
    counts = Counter(keys)
    best = max(counts.values())
    winner = next(k for k in keys if counts[k] == best)
    return winner, best / len(keys)


def maj_at_k(samples: Sequence[Sequence[str]], references: Sequence[str], k: int,
             tokens: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """maj@k accuracy, pass@1 (first sample), mean agreement and token cost over questions."""
    hits, first, agree, cost = [], [], [], 0
    for i, (answers, ref) in enumerate(zip(samples, references)):
        pick, share = majority(answers[:k])
        hits.append(float(pick == answer_key(ref)))
        first.append(float(answer_key(answers[0]) == answer_key(ref)) if answers else 0.0)
        agree.append(share)
        if tokens is not None:
            cost += sum(tokens[i][:k])
    n = max(len(hits), 1)
    return {"k": k, f"maj@{k}": sum(hits) / n, "pass@1": sum(first) / n, "agreement": sum(agree) / n,
            "tokens": cost, "n": len(hits)}


def paraphrase_agreement(groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Each group holds answers to paraphrases of one question: how often do they agree with the group's majority?"""
    shares = [majority(g)[1] for g in groups if g]
    all_same = [float(s == 1.0) for s in shares]
    n = max(len(shares), 1)
    return {"agreement": sum(shares) / n, "all_agree": sum(all_same) / n, "n": len(shares)}


def sample_answers(lm: Any, prompts: Sequence[str], k: int, temperature: float = 0.7, max_tokens: int = 256,
                   until: Sequence[str] = ("\n\n",), seed: int = 0) -> list[list[str]]:
    """k samples per prompt (seeded: sample j uses seed + j)."""
    out: list[list[str]] = [[] for _ in prompts]
    for j in range(k):
        for i, text in enumerate(lm.generate(list(prompts), list(until), max_tokens=max_tokens,
                                             temperature=temperature, seed=seed + j)):
            out[i].append(text)
    return out
