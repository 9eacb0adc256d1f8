"""llama.cpp's 4- and 8-bit blocks as Ember's int4 and int8 tensors, moved by integer operations only.

A block holds 32 consecutive values of a row:
- Q4_0 (18 bytes): fp16 d, then 16 bytes whose byte j holds value j in its low nibble and value
  j + 16 in its high one; w = (q - 8) d. Ember's int4 (`ember.quant.int4`): group 32, s = d, z = 0.
- Q4_1 (20 bytes): fp16 d, fp16 m, the same 16 bytes; w = q d + m. Ember's int4: s = d, z = m + 8 d
  (Ember's w = (q - 8) s + z), held in fp32. q d is exact in fp32 (4 bits times 11), so where
  m + 8 d is exact in fp32 too, (q - 8) s + z is the same real number as q d + m and rounds to the
  same fp32 value: the weights are the file's, bit for bit. m + 8 d is exact unless the exponents of
  m and 8 d lie more than 12 binades apart; a tensor with such a block is decoded to float instead.
- Q8_0 (34 bytes): fp16 d, then 32 int8 values; w = q d. Ember's int8 with a scale per 32
  (`Int8Linear(group_size=32)`), the scales kept in fp16 as the file has them.

Ember's int4 packs column 2j of a group in the low nibble of byte j and 2j + 1 in its high nibble,
so a Q4 block's nibbles are unpacked and packed again; the scales become [groups, rows, 2]
(`scales_and_zeros`). Each function takes a tensor's raw rows, uint8 [rows, blocks * block bytes]
(any further leading dimensions allowed), as the gguf reader maps them.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

BLOCK = 32
# GGUF type -> Ember's layer for it (the types whose blocks are kept; every other type is decoded).
KEPT = {Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q8_0: "int8", Q.F16: "f16"}  # F16: the values themselves
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}


def _blocks(raw: np.ndarray, kind: Q) -> np.ndarray:
    """[..., rows, blocks, block bytes] from raw rows [..., rows, bytes]."""
    size = _BLOCK_BYTES[kind]
    if raw.dtype != np.uint8 or raw.shape[-1] % size:
        raise ValueError(f"raw {kind.name} rows must be uint8 of a whole number of {size}-byte blocks")
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size)


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of every block: [..., blocks]."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0]


def q4_exact(raw: np.ndarray, kind: Q) -> bool:
    """Whether Ember's int4 holds these blocks' weights exactly (Q4_0 always; Q4_1 where every
    block's m + 8 d is exact in fp32, see the module's docstring)."""
    if kind == Q.Q4_0:
        return True
    blocks = _blocks(raw, kind)
    d, m = _fp16(blocks, 0), _fp16(blocks, 2)
    z32 = m.astype(np.float32) + np.float32(8) * d.astype(np.float32)
    exact = m.astype(np.float64) + 8 * d.astype(np.float64)  # exact: fp16's range spans < 53 bits
    return bool(np.array_equal(z32.astype(np.float64), exact))


def q4_to_int4(raw: np.ndarray, kind: Q) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight uint8 [rows, in / 2], scales_and_zeros [in / 32, rows, 2]: fp16 for Q4_0, fp32 for
    Q4_1) from Q4_0 or Q4_1 rows [rows, bytes]."""
    blocks = _blocks(raw, kind)
    rows, groups = blocks.shape[0], blocks.shape[1]
    qs = blocks[..., 2 if kind == Q.Q4_0 else 4:]  # [rows, groups, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # values 0..31 of each block, in order
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    d = _fp16(blocks, 0)
    if kind == Q.Q4_0:
        sz = np.stack([d, np.zeros_like(d)], axis=-1)
    else:
        m = _fp16(blocks, 2)
        sz = np.stack([d.astype(np.float32), m.astype(np.float32) + np.float32(8) * d.astype(np.float32)], axis=-1)
    qweight = torch.from_numpy(np.ascontiguousarray(packed.reshape(rows, groups * 16)))
    return qweight, torch.from_numpy(np.ascontiguousarray(sz.swapaxes(0, 1)))


def q8_to_int8(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 [rows, in], scales fp16 [rows, in / 32]) from Q8_0 rows [rows, bytes]."""
    blocks = _blocks(raw, Q.Q8_0)
    rows, groups = blocks.shape[0], blocks.shape[1]
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, groups * BLOCK)
    return torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(_fp16(blocks, 0)))
