"""Many LoRA adapters over one base, unmerged, mixed in one batch (S-LoRA, Sheng et al., 2023;
Punica, Chen et al., 2023).

`attach_lora_slots(model, max_loras, max_rank)` swaps every linear layer of the model's blocks for a
`BatchedLoraLinear`: the base layer, whose forward is left as it is (float, fp16, or a GGUF file's
kept int4/int8 blocks), plus the A and B matrices of every adapter slot stacked into one tensor each.
A loaded adapter owns one slot; a rank below `max_rank` is padded with zero rows and columns, and its
scaling is folded into B (float32, as adapters train).

Which adapter each token uses is set for one forward by the engine's model runner
(`LoraSlots.active(token_slots)`), a context every wrapped layer reads; a token of the base has slot -1.
For that forward each layer computes, over the slots the batch uses (K of them, each R = max_rank wide):

    h = x @ A_used^T            [tokens, K*R]   one product for every adapter at once
    h *= mask                   a token keeps only its own slot's R columns
    y = base(x) + h @ B_used    [tokens, out]

so each row gets exactly its own adapter's update B_s A_s x in two dense products per layer, whatever
the mix (Punica's gather: the used slots' stacked weights are selected once, not one product per
adapter). A layer that q, k and v (gate and up) share after `prepare_for_inference` fused them has
its parts' A rows side by side in each slot (one product for all parts), and B is block-structured:
part p's rows of B read only part p's columns of h, so one product puts every part's update on its
own output columns.

An adapter's trainable token rows (PEFT's `trainable_token_indices`, which Ember's fine-tuning
trains for the chat template's tokens) ride the same context: the token table's wrapper gives a
token of such a slot its adapter's row, and with tied embeddings the head's wrapper gives the rows
it scores (the model runner sets their slots too) those tokens' logits from the same rows.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ember import gemv
from ember.cpu_inference import CPULinear, FusedProjection, onednn_packing_available
from ember.errors import EmberError
from ember.lora.layers import is_linear
from ember.lora.peft_format import TOKEN_KEY, read_adapter
from ember.model import MLP, Attention
from ember.modules import set_module

# A fused inference layer's parts, in the order `prepare_for_inference` stacks them.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class UnknownAdapter(EmberError):
    """No adapter of that name is loaded (the server answers 404)."""


class AdapterInUse(EmberError):
    """The adapter still has unfinished requests (the server answers 409)."""


class LoraBatch:
    """The adapter slot of every token of one forward, and what the layers derive from it once."""

    def __init__(self, token_slots: Tensor, used: tuple[int, ...]) -> None:
        self.token_slots = token_slots  # [N] long, -1: the base
        self.used = used  # the slots some token uses, ascending
        self._derived: dict[tuple, tuple[Tensor, Tensor]] = {}

    def rows_and_mask(self, slots: tuple[int, ...], width: int) -> tuple[Tensor, Tensor]:
        """For the stacked rows of `slots` (each `width` wide): their indices [K*W] and the mask
        [N, K*W] that keeps, on each token's row of a product with them, only its own slot's."""
        key = (slots, width)
        if key not in self._derived:
            device = self.token_slots.device
            chosen = torch.tensor(slots, device=device)
            rows = (chosen[:, None] * width + torch.arange(width, device=device)).flatten()
            owner = chosen.repeat_interleave(width)  # the slot of each selected row
            mask = (self.token_slots[:, None] == owner[None, :]).to(torch.float32)
            self._derived[key] = (rows, mask)
        return self._derived[key]


class BatchedLoraLinear(nn.Module):
    """A base linear layer plus the low-rank updates of every adapter slot, each token taking its own."""

    def __init__(self, base_layer: nn.Module, part_sizes: list[int], slots: "LoraSlots") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.part_sizes = part_sizes
        self.rank = slots.max_rank
        self.width = len(part_sizes) * self.rank  # one slot's rows of A: every part's, side by side
        device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        # Every slot's A stacked by rows, and B with every slot's (and part's) columns side by side,
        # as linear layers: when a batch uses every slot they run whole, through the CPU inference
        # layer where there is one (a product of a few rows in Ember's GEMV kernel). B's entries
        # outside a part's own block stay zero, so a fused layer needs one product, not one a part.
        self.lora_A = _stack_layer(self.in_features, slots.max_loras * self.width, device)
        self.lora_B = _stack_layer(slots.max_loras * self.width, self.out_features, device)
        self.filled: set[int] = set()  # slots whose adapter adapts this layer
        self._slots = [slots]  # a list: the shared context, not a submodule

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        batch = self._slots[0].batch
        if batch is None or not self.filled:
            return out
        slots = tuple(s for s in batch.used if s in self.filled)
        if not slots:
            return out
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] != batch.token_slots.shape[0]:
            raise RuntimeError(f"LoRA slots were set for {batch.token_slots.shape[0]} tokens, the layer got {x2.shape[0]}.")
        every = len(slots) == self._slots[0].max_loras  # every slot: the stacks as they are
        rows, mask = batch.rows_and_mask(slots, self.width)
        x2 = x2.to(self.lora_A.weight.dtype)
        if every:
            y = self.lora_B(self.lora_A(x2).mul_(mask))
        else:  # the used slots' rows of A and the same columns of B
            h = F.linear(x2, self.lora_A.weight.index_select(0, rows)).mul_(mask)
            y = F.linear(h, self.lora_B.weight.index_select(1, rows))
        return out.add_(y.view(out.shape).to(out.dtype))  # the base's output is this forward's own

    def extra_repr(self) -> str:
        return f"parts={self.part_sizes}, width={self.width}"


def _stack_layer(in_features: int, out_features: int, device: torch.device) -> nn.Module:
    """A frozen float32 linear layer of zeros: the CPU inference layer on a CPU that has one."""
    layer = nn.Linear(in_features, out_features, bias=False, device=device).requires_grad_(False)
    nn.init.zeros_(layer.weight)
    on_cpu = layer.weight.device.type == "cpu"
    return CPULinear.of(layer) if on_cpu and (gemv.available() or onednn_packing_available()) else layer


class BatchedTokenRows(nn.Module):
    """The token table plus every slot's trainable token rows: a token whose slot's adapter lists
    it reads that adapter's row instead of the table's."""

    def __init__(self, base_layer: nn.Module, vocab_size: int, hidden_size: int, slots: "LoraSlots") -> None:
        super().__init__()
        self.base_layer = base_layer
        device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        # lookup[slot, token]: the token's row in `rows`, -1 where the slot's adapter keeps the table's
        self.register_buffer("lookup", torch.full((slots.max_loras, vocab_size), -1, dtype=torch.long,
                                                  device=device), persistent=False)
        self.register_buffer("rows", torch.zeros(0, hidden_size, device=device), persistent=False)
        self.register_buffer("row_slot", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("row_token", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.by_slot: dict[int, tuple[Tensor, Tensor]] = {}  # slot -> (token ids [n], rows [n, hidden])
        self._slots = [slots]

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def set_rows(self, slot: int, rows: tuple[Tensor, Tensor] | None) -> None:
        """Give `slot` these (token ids, rows), or none, and rebuild the stacked rows."""
        self.by_slot.pop(slot, None)
        if rows is not None:
            self.by_slot[slot] = rows
        self.lookup.fill_(-1)
        ids, new, owner = [], [], []
        for s, (tokens, values) in sorted(self.by_slot.items()):
            start = sum(len(t) for t in ids)
            self.lookup[s, tokens.to(self.lookup.device)] = torch.arange(start, start + len(tokens),
                                                                          device=self.lookup.device)
            ids.append(tokens)
            new.append(values)
            owner.append(torch.full((len(tokens),), s, dtype=torch.long))
        device = self.lookup.device
        self.rows = torch.cat(new).float().to(device) if new else self.rows[:0]
        self.row_token = torch.cat(ids).to(device) if ids else self.row_token[:0]
        self.row_slot = torch.cat(owner).to(device) if owner else self.row_slot[:0]

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base_layer(ids)
        batch = self._slots[0].batch
        if batch is None or not any(s in self.by_slot for s in batch.used):
            return out
        flat = ids.reshape(-1)
        if flat.shape[0] != batch.token_slots.shape[0]:
            raise RuntimeError(f"LoRA slots were set for {batch.token_slots.shape[0]} tokens, the table got {flat.shape[0]}.")
        slot = batch.token_slots
        row = torch.where(slot >= 0, self.lookup[slot.clamp(min=0), flat], -1)
        hit = (row >= 0)[:, None]
        out2 = out.reshape(flat.shape[0], -1)
        return torch.where(hit, self.rows[row.clamp(min=0)].to(out.dtype), out2).view(out.shape)


class BatchedTiedHead(nn.Module):
    """The LM head of a tied model over `BatchedTokenRows`: on a row of a slot whose adapter has
    token rows, those tokens' logits come from the adapter's rows, as its inputs do."""

    def __init__(self, base_layer: nn.Module, table: BatchedTokenRows) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._table = [table]  # a list: the rows are stored once, in the table's wrapper

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, h: Tensor) -> Tensor:
        out = self.base_layer(h)
        table = self._table[0]
        batch = table._slots[0].batch
        if batch is None or not any(s in table.by_slot for s in batch.used):
            return out
        h2 = h.reshape(-1, h.shape[-1])
        if h2.shape[0] != batch.token_slots.shape[0]:
            raise RuntimeError(f"LoRA slots were set for {batch.token_slots.shape[0]} rows, the head got {h2.shape[0]}.")
        mine = batch.token_slots[:, None] == table.row_slot[None, :]  # [rows, token rows]: a row's own slot's
        i, j = mine.nonzero(as_tuple=True)
        scores = h2.to(table.rows.dtype) @ table.rows.t()
        out2 = out.view(h2.shape[0], -1)
        out2[i, table.row_token[j]] = scores[i, j].to(out.dtype)
        return out


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: Path
    id: int  # never reused: the prefix cache keys blocks by it, so a reloaded name shares nothing stale
    slot: int
    rank: int


class LoraSlots:
    """The adapter slots of one model: which adapter is in which slot, and the batch's token slots.

    `lock` is held by whoever changes the slots or runs a forward that reads them (the engine's step),
    so loading and unloading at run time never meet a forward halfway."""

    def __init__(self, max_loras: int, max_rank: int) -> None:
        if max_loras < 1:
            raise EmberError(f"max_loras must be at least 1, got {max_loras}.")
        if max_rank < 1:
            raise EmberError(f"max_lora_rank must be at least 1, got {max_rank}.")
        self.max_loras, self.max_rank = max_loras, max_rank
        self.targets: dict[str, tuple[BatchedLoraLinear, int]] = {}  # q_proj path -> (layer, part)
        self.token_rows: BatchedTokenRows | None = None
        self.adapters: dict[str, LoadedAdapter] = {}
        self.batch: LoraBatch | None = None
        self.lock = threading.RLock()
        self._ids = itertools.count(1)

    # --- adapters ------------------------------------------------------------------------------
    def slot_of(self, adapter_id: int) -> int:
        for a in self.adapters.values():
            if a.id == adapter_id:
                return a.slot
        return -1

    def get(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise UnknownAdapter(f"No LoRA adapter named '{name}' is loaded (loaded: {known}).")
        return self.adapters[name]

    def load(self, name: str, path: str | Path) -> LoadedAdapter:
        """Read the PEFT-format adapter in `path` into a free slot under `name`."""
        if not name:
            raise EmberError("An adapter needs a name.")
        if name in self.adapters:
            raise EmberError(f"An adapter named '{name}' is already loaded ({self.adapters[name].path}).")
        path = Path(path)
        cfg, state = read_adapter(path)
        rows = None
        if TOKEN_KEY in state:
            rows = (torch.tensor(cfg.trainable_token_indices, dtype=torch.long), state.pop(TOKEN_KEY).float())
            table = self.token_rows
            vocab, hidden = table.lookup.shape[1], table.rows.shape[1]
            if rows[0].max() >= vocab or rows[1].shape[1] != hidden:
                raise EmberError(f"The adapter in {path} was made for a different base model: its token rows are "
                                 f"{rows[1].shape[1]} wide for tokens up to {int(rows[0].max())}, this base has "
                                 f"{hidden} for {vocab} tokens.")
        if cfg.r > self.max_rank:
            raise EmberError(f"The adapter in {path} has rank {cfg.r}, above max_lora_rank {self.max_rank}; "
                             "start with a larger --max-lora-rank.")
        updates = self._updates(path, cfg.target_modules, state, cfg.scaling)
        with self.lock:
            taken = {a.slot for a in self.adapters.values()}
            free = [s for s in range(self.max_loras) if s not in taken]
            if not free:
                raise EmberError(f"All {self.max_loras} adapter slots are in use; unload one first, or start with "
                                 "a larger --max-loras.")
            slot = free[0]
            self._write(slot, updates)
            self.token_rows.set_rows(slot, rows)
            loaded = LoadedAdapter(name, path, next(self._ids), slot, cfg.r)
            self.adapters[name] = loaded
        return loaded

    def unload(self, name: str) -> None:
        with self.lock:
            slot = self.get(name).slot
            self._write(slot, [])
            self.token_rows.set_rows(slot, None)
            del self.adapters[name]

    def _updates(self, path: Path, modules: list[str], state: dict[str, Tensor],
                 scaling: float) -> list[tuple[BatchedLoraLinear, int, Tensor, Tensor]]:
        """(layer, part, A [r, in], B * scaling [out_part, r]) for every module the adapter adapts,
        checked against the base before any slot changes."""
        out = []
        for module in modules:
            if module not in self.targets:
                raise EmberError(f"The adapter in {path} adapts {module}, which is not a linear layer of this "
                                 "base's blocks (a different base model, or an adapted LM head).")
            layer, part = self.targets[module]
            a, b = state[f"{module}.lora_A.weight"].float(), state[f"{module}.lora_B.weight"].float()
            want_a = (a.shape[0], layer.in_features)
            want_b = (layer.part_sizes[part], a.shape[0])
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise EmberError(f"The adapter in {path} was made for a different base model: {module} has A "
                                 f"{tuple(a.shape)} and B {tuple(b.shape)}, this base needs {want_a} and {want_b}.")
            out.append((layer, part, a, b * scaling))
        return out

    @torch.no_grad()
    def _write(self, slot: int, updates: list[tuple[BatchedLoraLinear, int, Tensor, Tensor]]) -> None:
        """Clear `slot` in every layer, then write `updates` into it."""
        r = self.max_rank
        layers = {id(layer): layer for layer, _ in self.targets.values()}.values()
        for layer in layers:
            layer.lora_A.weight[slot * layer.width:(slot + 1) * layer.width] = 0
            layer.lora_B.weight[:, slot * layer.width:(slot + 1) * layer.width] = 0
            layer.filled.discard(slot)
        for layer, part, a, b in updates:
            first = slot * layer.width + part * r  # this part's block: its A rows, its B columns
            rows = sum(layer.part_sizes[:part])  # and its output columns
            device = layer.lora_A.weight.device
            layer.lora_A.weight[first:first + a.shape[0]] = a.to(device)
            layer.lora_B.weight[rows:rows + b.shape[0], first:first + a.shape[0]] = b.to(device)
            layer.filled.add(slot)

    # --- the batch -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self, token_slots: list[int], device: torch.device) -> Iterator[None]:
        """Within the block, the wrapped layers give token i the update of slot token_slots[i]."""
        used = tuple(sorted({s for s in token_slots if s >= 0}))
        self.batch = LoraBatch(torch.tensor(token_slots, device=device), used) if used else None
        try:
            yield
        finally:
            self.batch = None


def attach_lora_slots(model: nn.Module, max_loras: int, max_rank: int) -> LoraSlots:
    """Swap every linear layer of the model's attention and MLP blocks (fused or not) for a
    `BatchedLoraLinear` with `max_loras` empty slots of rank `max_rank`; returns the slots, also
    kept as `model.lora_slots`."""
    if getattr(model, "lora_slots", None) is not None:
        raise EmberError("This model already has adapter slots.")
    slots = LoraSlots(max_loras, max_rank)
    for owner_name, owner in list(model.named_modules()):
        if not isinstance(owner, (Attention, MLP)):
            continue
        for child_name, child in list(owner.named_children()):
            path = f"{owner_name}.{child_name}" if owner_name else child_name
            if isinstance(child, FusedProjection) and child_name in FUSED_PARTS:
                layer = BatchedLoraLinear(child.layer, list(child.sizes), slots)
                set_module(model, f"{path}.layer", layer)
                for part, short in enumerate(FUSED_PARTS[child_name]):
                    slots.targets[f"{owner_name}.{short}"] = (layer, part)
            elif is_linear(child):
                layer = BatchedLoraLinear(child, [child.out_features], slots)
                set_module(model, path, layer)
                slots.targets[path] = (layer, 0)
    if not slots.targets:
        raise EmberError("This model has no attention or MLP linear layers to put adapter slots on.")
    cfg = model.config
    slots.token_rows = BatchedTokenRows(model.model.embed_tokens, cfg.vocab_size, cfg.hidden_size, slots)
    model.model.embed_tokens = slots.token_rows
    if cfg.tie_word_embeddings:
        model.lm_head = BatchedTiedHead(model.lm_head, slots.token_rows)
    model.lora_slots = slots
    return slots
