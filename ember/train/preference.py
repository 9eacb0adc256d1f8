"""Preference pairs: JSONL rows `{"prompt", "chosen", "rejected"}` in, padded token batches out.

`prompt` is a string (one user turn) or a list of messages; `chosen` and `rejected` are
strings (one assistant reply) or lists of messages that continue the prompt. Each side
is rendered with the chat template by `ember.train.examples.render_messages`, so the loss
mask covers exactly the reply tokens (through their end-of-turn token). Rows missing a
field name the file, line and field; pairs whose chosen and rejected are identical teach
nothing and are skipped and counted.

`sequence_logps` is the quantity every preference objective is built on: the summed
log-probability of the masked (reply) tokens of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ember.errors import EmberError
from ember.train.examples import read_rows, render_messages

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class PreferencePair:
    prompt: Messages
    chosen: Messages  # the reply turn(s) that follow the prompt
    rejected: Messages


@dataclass
class RenderedPair:
    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int]
    rejected_mask: list[bool]


@dataclass
class PreferenceData:
    pairs: list[PreferencePair]
    skipped_identical: int = 0


def _messages(value: Any, field: str, where: str, default_role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise EmberError(f"{where}: field '{field}' must be a string or a non-empty list of messages.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise EmberError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise EmberError(f"{where}: {field}[{i}] has role '{m['role']}'; expected one of {', '.join(ROLES)}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def row_to_pair(row: Any, where: str) -> PreferencePair:
    """One JSONL row as a pair; `where` ("FILE line N") names the row in errors."""
    if not isinstance(row, dict):
        raise EmberError(f"{where} is not a JSON object.")
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            raise EmberError(f"{where} has no '{field}' field.")
    prompt = _messages(row["prompt"], "prompt", where, "user")
    chosen = _messages(row["chosen"], "chosen", where, "assistant")
    rejected = _messages(row["rejected"], "rejected", where, "assistant")
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in reply):
            raise EmberError(f"{where}: field '{field}' has no assistant message.")
    return PreferencePair(prompt, chosen, rejected)


def load_preferences(path: str | Path) -> PreferenceData:
    """Every usable pair of a preference JSONL file, plus how many identical pairs were skipped."""
    data = PreferenceData([])
    for n, row in read_rows(path):
        pair = row_to_pair(row, f"{path} line {n}")
        if pair.chosen == pair.rejected:
            data.skipped_identical += 1
            continue
        data.pairs.append(pair)
    if not data.pairs:
        raise EmberError(f"{path} has no usable preference pairs ({data.skipped_identical} had identical "
                         "chosen and rejected).")
    return data


def pairs_from_dicts(rows: Sequence[dict], where: str = "row") -> PreferenceData:
    """The same as `load_preferences` for rows already in memory (tests, synthetic data)."""
    data = PreferenceData([])
    for i, row in enumerate(rows):
        pair = row_to_pair(row, f"{where} {i}")
        if pair.chosen == pair.rejected:
            data.skipped_identical += 1
        else:
            data.pairs.append(pair)
    return data


def _to_turn_end(ids: list[int], mask: list[bool]) -> tuple[list[int], list[bool]]:
    """Score a reply through what the chat template writes after its end-of-turn token (the
    newline that closes a ChatML turn), as TRL's DPOTrainer does. Without those tokens DPO
    can widen the margin only through the reply itself, and on a small chat model it then
    pushes rejected replies down until the text breaks (benchmarks/align.py measures both)."""
    if any(mask):
        last = max(i for i, m in enumerate(mask) if m)
        mask = list(mask[:last + 1]) + [True] * (len(mask) - last - 1)
    return ids, mask


def render_pair(tok: Any, pair: PreferencePair, max_length: int) -> RenderedPair | None:
    """Both sides as (ids, mask), cut to `max_length`; None when a side has no reply token left."""
    c_ids, c_mask = _to_turn_end(*render_messages(tok, pair.prompt + pair.chosen))
    r_ids, r_mask = _to_turn_end(*render_messages(tok, pair.prompt + pair.rejected))
    c_ids, c_mask, r_ids, r_mask = c_ids[:max_length], c_mask[:max_length], r_ids[:max_length], r_mask[:max_length]
    if not any(c_mask[1:]) or not any(r_mask[1:]):
        return None
    return RenderedPair(c_ids, c_mask, r_ids, r_mask)


def render_pairs(tok: Any, pairs: Sequence[PreferencePair], max_length: int) -> tuple[list[RenderedPair], int]:
    """Render every pair; returns the rendered ones and how many were dropped for length."""
    out, dropped = [], 0
    for p in pairs:
        r = render_pair(tok, p, max_length)
        if r is None:
            dropped += 1
        else:
            out.append(r)
    if not out:
        raise EmberError(f"No preference pair fits in {max_length} tokens; raise --max-length.")
    return out, dropped


def collate_pairs(pairs: Sequence[RenderedPair], pad_id: int) -> dict[str, Tensor]:
    """Right-padded `input_ids`/`loss_mask` [2B, T]: the B chosen sequences, then the B rejected.

    Right padding needs no attention mask: causal attention never lets a real token see
    the pads after it. `last_index` is each sequence's last real token (reward heads read it).
    """
    seqs = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [(p.rejected_ids, p.rejected_mask) for p in pairs]
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (ids, mask) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        loss_mask[i, :len(mask)] = torch.tensor(mask)
    last_index = torch.tensor([len(ids) - 1 for ids, _ in seqs])
    return {"input_ids": input_ids, "loss_mask": loss_mask, "last_index": last_index}


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(token t | tokens < t) for t = 1..T-1, [B, T-1], in float32."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: torch.nn.Module, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each sequence's masked tokens, and how many there are ([N], [N])."""
    lp = token_logps(model(input_ids), input_ids)
    mask = loss_mask[:, 1:].to(lp.dtype)
    return (lp * mask).sum(-1), mask.sum(-1)
