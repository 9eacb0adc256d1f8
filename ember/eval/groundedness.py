"""Groundedness: is each claim of an answer supported by its context? A deterministic lexical check.

An answer is split into claims (sentences). A claim is compared with every sentence of
the context (or of the passage it cites): the share of its numbers found there, of its
named entities (capitalised spans), and of its content words (stop words dropped, light
prefix matching). A claim's support is the best sentence's product of those shares, so a
swapped number or entity sinks it even when the rest of the words match. A claim citing
`[k]` is checked against passage k only: supported elsewhere but not there is a
misattributed citation. The answer's score is its weakest claim's support.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

_SENT = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_NUM = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?%?")
_CITE = re.compile(r"\[(\d+)\]")
_ENTITY = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:of|de|the|van|von)?\s*[A-Z][\w'-]*)*")
_WORD = re.compile(r"[a-z][a-z'-]+")
STOP = frozenset("""a an the and or but if then so of to in on at by for with from as is are was were be been being
it its this that these those there here he she they them his her their we our you your i me my not no do does did
has have had will would can could should may might must than also into about over after before during which who
whom whose what when where why how all any each some such only very more most other same own both few""".split())


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text.strip()) if s.strip()]


def _numbers(text: str) -> set[str]:
    out = set()
    for m in _NUM.findall(text):
        v = m.replace(",", "").rstrip("%").lstrip("+")
        try:
            out.add(repr(float(v)))  # "1,200", "1200" and "1200.0" are one number
        except ValueError:
            continue
    return out


def _content(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOP}


def _entities(text: str) -> set[str]:
    """Capitalised spans, except a lone sentence-initial word (capitalised by grammar, not meaning)."""
    out = set()
    for m in _ENTITY.finditer(_CITE.sub("", text)):
        span = m.group(0)
        first = m.start() == 0 or re.match(r"[.!?]\s*$", text[:m.start()]) is not None
        if first and " " not in span:  # "According", "Today", "It": capitalised by position
            continue
        out.add(span.lower())
    return out


def _share(needed: set[str], present: set[str] | str) -> float:
    if not needed:
        return 1.0
    if isinstance(present, str):
        return sum(1 for x in needed if x in present) / len(needed)
    return len(needed & present) / len(needed)


def _word_share(claim_words: set[str], source_words: set[str]) -> float:
    """Share of claim words with a source word sharing a 5-letter prefix ("employees" ~ "employs")."""
    if not claim_words:
        return 1.0
    prefixes = {w[:5] for w in source_words}
    return sum(1 for w in claim_words if w in source_words or (len(w) >= 5 and w[:5] in prefixes)) / len(claim_words)


def sentence_support(claim: str, source: str) -> float:
    """Shares of the claim's numbers and entities found in `source`, times a softer content-word term.

    Numbers and names are the facts a hallucination gets wrong, so each missing one costs its
    full share; wording differs in honest paraphrase, so content words weigh half.
    """
    c = _CITE.sub("", claim)
    nums = _share(_numbers(c), _numbers(source))
    ents = _share(_entities(c), source.lower())
    words = _word_share(_content(c), _content(source))
    return nums * ents * (0.5 + 0.5 * words)


@dataclass
class ClaimCheck:
    claim: str
    support: float
    citations: list[int] = field(default_factory=list)
    best_source: int | None = None  # passage index (1-based) that supports it best
    misattributed: bool = False


@dataclass
class Groundedness:
    score: float  # the weakest claim's support (1 = every claim found in the context)
    mean_support: float
    claims: list[ClaimCheck]
    citation_precision: float | None  # share of citations whose passage supports the claim

    def as_dict(self) -> dict:
        return {"score": self.score, "mean_support": self.mean_support, "citation_precision": self.citation_precision,
                "claims": [c.__dict__ for c in self.claims]}


def check(answer: str, context: str | Sequence[str], threshold: float = 0.5) -> Groundedness:
    """Claims of `answer` against `context` (one text, or passages that `[k]` citations name, 1-based)."""
    passages = [context] if isinstance(context, str) else list(context)
    sents = [[s for s in split_sentences(p)] or [p] for p in passages]
    checks = []
    cited_ok, cited_all = 0, 0
    for claim in split_sentences(answer):
        if not _content(_CITE.sub("", claim)) and not _numbers(claim):
            continue  # "Sure." or a bare citation: nothing to check
        per_passage = [max(sentence_support(claim, s) for s in ss) for ss in sents]
        best = max(range(len(passages)), key=lambda i: per_passage[i])
        cites = [int(k) for k in _CITE.findall(claim) if 1 <= int(k) <= len(passages)]
        if cites:
            support = max(per_passage[k - 1] for k in cites)
            mis = support < threshold <= per_passage[best]
            cited_all += len(cites)
            cited_ok += sum(per_passage[k - 1] >= threshold for k in cites)
        else:
            support, mis = per_passage[best], False
        checks.append(ClaimCheck(claim, support, cites, best + 1, mis))
    if not checks:
        return Groundedness(1.0, 1.0, [], None)
    supports = [c.support for c in checks]
    return Groundedness(min(supports), sum(supports) / len(supports), checks,
                        cited_ok / cited_all if cited_all else None)


def auroc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann–Whitney)."""
    wins = 0.0
    for p in scores_pos:
        for n in scores_neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(scores_pos) * len(scores_neg))


# --- a generated test set: supported answers and perturbed ones ------------------------------
_FIRST = ["Ada", "Boris", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
_LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Silva", "Kowalski", "Mbeki", "Rossi"]
_CITY = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Windhoek", "Hobart", "Krakow", "Bergen", "Cusco"]
_ORG = ["Veltro Labs", "Norsk Optics", "Amberline", "Kestrel Foods", "Orbis Freight", "Halden Bank",
        "Tamarind Health", "Quillon Press"]


def synthetic_set(n: int = 60, seed: int = 0) -> list[dict]:
    """Items {context: [3 passages], answer, supported: bool, kind}: one supported answer and
    three perturbations (swapped number, swapped entity, misattributed citation) per context."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        people = rng.sample([f"{f} {l}" for f in _FIRST for l in _LAST], 3)
        cities, orgs = rng.sample(_CITY, 3), rng.sample(_ORG, 3)
        years = rng.sample(range(1950, 2020), 3)
        staff = [rng.randrange(120, 60000) for _ in range(3)]
        passages = [f"{people[i]} founded {orgs[i]} in {cities[i]} in {years[i]}. "
                    f"Today {orgs[i]} employs {staff[i]:,} people across several countries." for i in range(3)]
        i = rng.randrange(3)
        j = (i + rng.randrange(1, 3)) % 3

        style = rng.randrange(3)

        def answer(person: str, org: str, city: str, year: int, count: int, cite: int) -> str:
            if style == 0:
                return (f"{org} was founded by {person} in {year}, in the city of {city} [{cite}]. "
                        f"It has {count} employees [{cite}].")
            if style == 1:
                return f"{person} started {org} back in {year}; the company is based in {city} [{cite}]."
            return (f"According to the sources, {org} has about {count:,} staff [{cite}]. "
                    f"The firm began in {city} under {person} [{cite}].")

        good = answer(people[i], orgs[i], cities[i], years[i], staff[i], i + 1)
        wrong_year = years[i] + rng.choice([-2, -1, 1, 2])  # near misses, not random numbers
        wrong_count = staff[i] + rng.choice([-1, 1]) * rng.randrange(1, max(2, staff[i] // 10))
        number = (answer(people[i], orgs[i], cities[i], wrong_year, staff[i], i + 1) if style == 1
                  else answer(people[i], orgs[i], cities[i], years[i], wrong_count, i + 1))
        # the swapped entity is one the context does mention, in another passage
        entity = (answer(people[j], orgs[i], cities[i], years[i], staff[i], i + 1) if rng.random() < 0.5
                  else answer(people[i], orgs[i], cities[j], years[i], staff[i], i + 1))
        items.append({"context": passages, "answer": good, "supported": True, "kind": "supported"})
        items.append({"context": passages, "supported": False, "kind": "number", "answer": number})
        items.append({"context": passages, "supported": False, "kind": "entity", "answer": entity})
        items.append({"context": passages, "supported": False, "kind": "citation",
                      "answer": answer(people[i], orgs[i], cities[i], years[i], staff[i], j + 1)})
    return items
