"""Supervised fine-tuning examples: JSONL rows in, token ids plus a loss mask out, packed.

- Three row shapes are read, all normalised to a chat (a list of role/content messages):
  `{"messages": [...]}`, `{"prompt", "completion"}` and Alpaca's `{"instruction", "input",
  "output"}`. A row that lacks a field names the file, the line and the field.
- `render_messages` renders a chat with the tokenizer's own chat template, so a fine-tuned
  model sees at training time exactly the prompt it will see when served. The loss mask
  covers the assistant replies (and their end-of-turn token) unless prompts are trained too.
- `pack_examples` fills fixed-length rows with several short examples. Each example keeps
  its own positions (restarting at 0) and `block_diagonal_mask` lets a token attend only
  within its example, so a packed row gives every example the logits it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ember.errors import EmberError
from ember.files import read_jsonl

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant", "tool")
# End-of-turn tokens of the common chat formats, most specific first; EOS is the fallback.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


# --- reading rows ------------------------------------------------------------------------
def _field(row: dict, name: str, where: str, kinds: tuple[type, ...] = (str,)) -> Any:
    if name not in row:
        raise EmberError(f"{where} has no '{name}' field.")
    value = row[name]
    if not isinstance(value, kinds):
        kind = " or ".join("a list" if k is list else "a string" for k in kinds)
        raise EmberError(f"{where}: field '{name}' must be {kind}, got {type(value).__name__}.")
    return value


def _check_messages(messages: list, where: str, field: str = "messages", need_reply: bool = True) -> Messages:
    if not messages:
        raise EmberError(f"{where}: field '{field}' is an empty list.")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise EmberError(f"{at} must be an object with 'role' and 'content'.")
        role, content = _field(m, "role", at), _field(m, "content", at)
        if role not in ROLES:
            raise EmberError(f"{at} has role '{role}'; expected one of {', '.join(ROLES)}.")
        out.append({"role": role, "content": content})
    if need_reply and not any(m["role"] == "assistant" for m in out):
        raise EmberError(f"{where}: field '{field}' has no assistant message to learn from.")
    return out


def row_to_messages(row: Any, where: str) -> Messages:
    """One JSONL row (any of the three shapes) as a chat; `where` names the row in errors."""
    if not isinstance(row, dict):
        raise EmberError(f"{where} is not a JSON object.")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise EmberError(f"{where}: field 'system' must be a string.")
    head = [{"role": "system", "content": system}] if system else []
    if "messages" in row:
        return _check_messages(_field(row, "messages", where, (list,)), where)
    if "instruction" in row or "output" in row:  # Alpaca; its 'input' is optional context
        instruction, output = _field(row, "instruction", where), _field(row, "output", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise EmberError(f"{where}: field 'input' must be a string.")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return head + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if "prompt" in row or "completion" in row:
        prompt = _field(row, "prompt", where, (str, list))
        completion = _field(row, "completion", where, (str, list))
        prompt_msgs = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                       else _check_messages(prompt, where, "prompt", need_reply=False))
        reply = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                 else _check_messages(completion, where, "completion"))
        return head + prompt_msgs + reply
    raise EmberError(f"{where} has none of the fields 'messages', 'prompt'/'completion' or "
                     "'instruction'/'output'.")


def read_rows(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) for each row of a training JSONL file; a file without rows is an error."""
    rows = read_jsonl(path, "Data file")
    if not rows:
        raise EmberError(f"Data file {path} has no rows.")
    return rows


def load_sft_examples(path: str | Path) -> list[Messages]:
    """Every row of an SFT JSONL file as a chat."""
    return [row_to_messages(row, f"{path} line {n}") for n, row in read_rows(path)]


# --- rendering ---------------------------------------------------------------------------
def end_of_turn_id(tok: Any) -> int:
    """The token that closes an assistant turn in this tokenizer's chat format."""
    for name in END_OF_TURN:
        i = tok.token_to_id(name)
        if i is not None and tok.chat_template and name in tok.chat_template:
            return i
    if tok.eos_id is None:
        raise EmberError("The tokenizer has no end-of-turn or EOS token, so replies cannot be taught to end.")
    return tok.eos_id


def _chat_ids(tok: Any, messages: Messages, generation_prompt: bool) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if getattr(tok, "add_bos_token", False) and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids  # what transformers does for add_bos_token tokenizers
    return ids


def render_messages(tok: Any, messages: Messages, *, train_on_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a chat and a mask: mask[i] is True when token i is a training target.

    Each assistant reply is found by rendering the chat up to it twice, with the generation
    prompt and with the reply, so the trained span is exactly what the model must produce
    after the prompt it is served; it ends with the end-of-turn token, which is trained.
    """
    if tok.chat_template is None:
        raise EmberError("The tokenizer has no chat template; SFT needs one (set chat_template in "
                         "tokenizer_config.json).")
    eot = end_of_turn_id(tok)
    ids: list[int] = []
    mask: list[bool] = []

    def extend(full: list[int], trained: bool, what: str) -> None:
        if full[:len(ids)] != ids:
            raise EmberError(f"The chat template renders {what} differently from the shorter conversation "
                             "before it, so the assistant tokens cannot be located.")
        mask.extend([trained] * (len(full) - len(ids)))
        ids.extend(full[len(ids):])

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        extend(_chat_ids(tok, messages[:i], True), train_on_prompt, f"message {i}'s prompt")
        start = len(ids)
        extend(_chat_ids(tok, messages[:i + 1], False), True, f"assistant message {i}")
        # Train the reply through its end-of-turn token; template text after it is prompt.
        reply = ids[start:]
        if eot not in reply:
            raise EmberError(f"The chat template does not close assistant message {i} with "
                             f"{tok.id_to_token(eot)!r}; the model could never learn to stop.")
        end = start + reply.index(eot) + 1
        mask[end:] = [train_on_prompt] * (len(ids) - end)
    extend(_chat_ids(tok, messages, False), train_on_prompt, "the whole conversation")

    # Hard checks (not `assert`, which -O strips): a wrong mask silently trains the wrong thing.
    bos = tok.bos_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise EmberError("The chat template writes a BOS token and the tokenizer adds another (double BOS); "
                         "set add_bos_token to false or drop bos_token from the template.")
    if len(ids) != len(mask) or not any(mask):
        raise EmberError("The conversation renders with no trained token.")
    for j, t in enumerate(ids):
        if t == eot and j > 0 and mask[j - 1] and not mask[j]:
            raise EmberError("An assistant reply's end-of-turn token is not trained.")
    return ids, mask


# --- packing -----------------------------------------------------------------------------
@dataclass
class Row:
    """One training row: input ids, next-token labels (-100 = no loss), positions, documents."""

    input_ids: list[int]
    labels: list[int]
    positions: list[int]
    doc_ids: list[int]


def example_row(ids: Sequence[int], mask: Sequence[bool], doc: int = 0) -> Row:
    """An example as a row: the label at j is token j+1 when that token is trained."""
    labels = [ids[j + 1] if mask[j + 1] else -100 for j in range(len(ids) - 1)] + [-100]
    return Row(list(ids), labels, list(range(len(ids))), [doc] * len(ids))


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], block_size: int) -> list[Row]:
    """Greedily fill rows of at most `block_size` tokens, examples in order, never split.

    Examples longer than `block_size` are truncated (their tail loses its loss).
    """
    rows: list[Row] = []
    current: Row | None = None
    for ids, mask in examples:
        ids, mask = list(ids)[:block_size], list(mask)[:block_size]
        r = example_row(ids, mask)
        if current is None or len(current.input_ids) + len(ids) > block_size:
            current = Row([], [], [], [])
            rows.append(current)
        doc = current.doc_ids[-1] + 1 if current.doc_ids else 0
        current.input_ids += r.input_ids
        current.labels += r.labels
        current.positions += r.positions
        current.doc_ids += [doc] * len(ids)
    return rows


def collate(rows: Sequence[Row], pad_id: int, length: int | None = None) -> dict[str, Tensor]:
    """Right-pad rows to one length. Padding is its own document (doc id -1 - j), never trained."""
    T = length or max(len(r.input_ids) for r in rows)
    batch = {k: torch.empty(len(rows), T, dtype=torch.long) for k in ("input_ids", "labels", "positions", "doc_ids")}
    for i, r in enumerate(rows):
        pad = T - len(r.input_ids)
        batch["input_ids"][i] = torch.tensor(r.input_ids + [pad_id] * pad)
        batch["labels"][i] = torch.tensor(r.labels + [-100] * pad)
        batch["positions"][i] = torch.tensor(r.positions + [0] * pad)
        # Each pad token alone in its own document: attends to itself only, no empty softmax rows.
        batch["doc_ids"][i] = torch.tensor(r.doc_ids + [-1 - j for j in range(pad)])
    return batch


def block_diagonal_mask(doc_ids: Tensor) -> Tensor:
    """Boolean [B, 1, T, T] mask: token q sees key k when both are in the same document and
    k is not later than q (True = may attend), the form `CausalLM.forward(attn_mask=)` takes."""
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device)
    causal = idx[:, None] >= idx[None, :]
    return (same & causal)[:, None]
