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

from ember.errors import EmberError
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


def draw_samples(lm: Any, prompts: Sequence[str], k: int, temperature: float = 0.7, max_tokens: int = 256,
                 until: Sequence[str] = ("\n\n",), seed: int = 0) -> tuple[list[list[str]], list[list[int]]]:
    """k answers per prompt and the completion tokens each took.

    In process (`LocalLM`), every (prompt, j) is one engine request seeded with seed + j, all
    in one batch, so a rerun draws the same answers. Against an endpoint, one
    `/v1/completions` call per prompt asks for n=k choices; each choice's token count comes
    from its logprobs when the server returns them, else `usage.completion_tokens` is split
    evenly over the k choices (the total per question stays exact).
    """
    if k < 1:
        raise EmberError("--k must be at least 1.")
    stop = [u for u in until if u]
    if hasattr(lm, "http") and hasattr(lm, "_post"):  # EndpointLM
        texts, counts = [], []
        for p in prompts:
            body: dict[str, Any] = {"prompt": p, "n": k, "max_tokens": max_tokens, "temperature": temperature,
                                    "seed": seed, "logprobs": 1}
            if stop:
                body["stop"] = stop[:4]
            reply = lm._post("/v1/completions", body)
            choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != k:
                raise EmberError(f"The endpoint returned {len(choices)} choices for n={k}; it must honour n.")
            texts.append([c["text"] for c in choices])
            per = [len((c.get("logprobs") or {}).get("tokens") or []) for c in choices]
            total = int((reply.get("usage") or {}).get("completion_tokens", 0))
            if not all(per) and total:
                per = [total // k + (1 if j < total % k else 0) for j in range(k)]
            counts.append(per)
        return texts, counts
    if not hasattr(lm, "sample"):
        raise EmberError("Sampling needs a local model (--model DIR) or an endpoint (--endpoint URL).")
    outs = lm.sample(list(prompts), stop, max_tokens, temperature, [seed + j for j in range(k)])
    texts = [[outs[q * k + j].outputs[0].text for j in range(k)] for q in range(len(prompts))]
    counts = [[len(outs[q * k + j].outputs[0].token_ids) for j in range(k)] for q in range(len(prompts))]
    return texts, counts


def self_consistency(samples: Sequence[Sequence[str]], tokens: Sequence[Sequence[int]],
                     references: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Agreement rate over all k samples, maj@k and pass@1 where references exist, and token cost."""
    k = min((len(s) for s in samples), default=0)
    agree = [majority(s[:k])[1] for s in samples]
    n = max(len(samples), 1)
    spent = sum(sum(t[:k]) for t in tokens)
    res: dict[str, Any] = {"k": k, "n": len(samples), "agreement": sum(agree) / n,
                           "all_agree": sum(float(a == 1.0) for a in agree) / n, "tokens": spent,
                           "tokens_per_question": spent / n}
    if references is not None:
        have = [i for i, r in enumerate(references) if r is not None]
        if have:
            sub = [samples[i] for i in have]
            toks = [tokens[i] for i in have]
            refs = [str(references[i]) for i in have]
            res["with_answers"] = len(have)
            res[f"k={k}"] = maj_at_k(sub, refs, k, toks)
            if k > 1:
                res["k=1"] = maj_at_k(sub, refs, 1, toks)
    return res


def sample_answers(lm: Any, prompts: Sequence[str], k: int, temperature: float = 0.7, max_tokens: int = 256,
                   until: Sequence[str] = ("\n\n",), seed: int = 0) -> list[list[str]]:
    """k samples per prompt (seeded: sample j uses seed + j)."""
    out: list[list[str]] = [[] for _ in prompts]
    for j in range(k):
        for i, text in enumerate(lm.generate(list(prompts), list(until), max_tokens=max_tokens,
                                             temperature=temperature, seed=seed + j)):
            out[i].append(text)
    return out
