"""Batch-1 decoding's kernels, hand-written for x86 CPUs with AVX2.

A decode step with one sequence multiplies a single activation row by every weight matrix:
its speed is the speed at which weights stream from memory. On the 2-core AVX2 machine
these figures come from (`python benchmarks/quant.py --skip quality batched`), PyTorch's
kernels for one row reach about half the read bandwidth: MKL's fp32 GEMV runs on one
thread, and the bf16 and int8 paths are bound by converting weights rather than by reading
them. `ember/csrc/gemv.cpp` (~450 lines) holds three kernels:
- `gemv`: one row times fp32/bf16/fp16/int8 weights; each weight row streams once, rows split
  over PyTorch's threads. It also takes 2 to 16 rows (a speculative step's verification, a
  small batch), each weight row loaded once for all of them: for float weights 3-7x MKL's
  kernels and 1.3-1.7x oneDNN's pre-packed weights at 2-8 rows, ~1.1x at 9-16, past which
  oneDNN's blocked GEMM is faster. Float weights are widened to fp32 in registers (bf16 with a shift or
  a mask, no shuffle). For int8 weights the activation row is rounded once to int16 (15 bits
  against its largest element, finer than bf16) and the products are integer multiply-adds,
  about 1.4x the rate of widening int8 to fp32. 1.6-2.5x PyTorch's kernels per layer, at the
  read bandwidth with cold weights. Where the CPU has AVX-512 VNNI (Intel since Ice Lake, AMD
  since Zen 4), chosen at run time, 64 weights a load meet the activations in `vpdpwssd`, which
  multiplies, adds pairs and accumulates in one instruction: 1.5-5x the AVX2 loop per layer
  (`instruction_set()` says which path runs; EMBER_GEMV_AVX512=0 forces AVX2).
- `gemv_int4`: group-wise int4 weights in `ember.quant.int4`'s portable layout, the same
  integer multiply-adds, for any number of rows (each weight row is read once for all of
  them): 2x PyTorch's int4 kernel for one row, 1.2x for 4 to 128 rows. With AVX-512 VNNI and groups
  of a multiple of 128, 128 columns a load go through `vpdpwssd` in four independent chains: 1.4x
  the AVX2 loop per layer.
- `gemv_many`, `gemv_int4_many` (through `many`): several matrices that read the same input
  (q, k and v; gate and up) in one call, the input prepared once and one thread split over all
  their rows, the outputs side by side in one tensor: ~10 µs less per layer's q/k/v than three
  calls (2 threads), which a 153M model's step pays 12 times over.
- `decode_attention`: one query per sequence against its cached keys and values, each KV
  head read once for its group of query heads, hidden positions skipped, the softmax in fp32:
  ~4x PyTorch's SDPA for this shape at 256 cached tokens. `paged_decode_attention` is the same
  over the engine's paged pool, reading each position where its slot lies (PagedAttention).

The source is compiled once per machine with PyTorch's extension builder (the C++ compiler
PyTorch's own `torch.compile` needs on a CPU) and cached under `~/.cache/torch_extensions`.
Without a compiler, off x86, or with `EMBER_GEMV=0` in the environment, `available()` is
False and callers keep PyTorch's kernels: the results agree to float rounding either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
_switched_off = False  # see `disabled`
_built: bool | None = None  # None until the first call; a plain global so torch.compile can read it


def available() -> bool:
    """Build (once) and load the kernel; False where it cannot run here."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    if os.environ.get("EMBER_GEMV", "1") == "0" or not SOURCE.exists():
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
    name = f"ember_gemv_{digest}"  # a changed source gets a fresh build, never a stale one
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not (build_dir / f"{name}.so").exists():
            print(f"ember: compiling the CPU decode kernel {SOURCE.name} (once per machine, about a minute; "
                  f"cached in {build_dir})", file=sys.stderr, flush=True)
        cpp_extension.load(name=name, sources=[str(SOURCE)], is_python_module=False, verbose=False,
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers, a changed builder: PyTorch's kernels serve instead
        print(f"ember: the CPU decode kernel is not available ({type(e).__name__}); "
              "using PyTorch's kernels", file=sys.stderr, flush=True)
        return False
    # torch.compile traces the op through this: the output's shape and dtype, without running it.
    torch.library.register_fake("ember_gemv::gemv")(
        lambda x, w, scale, bias: x.new_empty(*x.shape[:-1], w.shape[0]))
    torch.library.register_fake("ember_gemv::gemv_int4")(
        lambda x, qweight, scale, offset, group, bias: x.new_empty(*x.shape[:-1], qweight.shape[0]))
    torch.library.register_fake("ember_gemv::gemv_many")(
        lambda x, ws, scales, biases: x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in ws)))
    torch.library.register_fake("ember_gemv::gemv_int4_many")(
        lambda x, qweights, scales, offsets, group, biases: x.new_empty(*x.shape[:-1],
                                                                        sum(w.shape[0] for w in qweights)))
    torch.library.register_fake("ember_gemv::decode_attention")(lambda q, k, v, visible: torch.empty_like(q))
    torch.library.register_fake("ember_gemv::paged_decode_attention")(
        lambda q, pool, slots, visible: torch.empty_like(q))
    return True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """PyTorch's kernels inside the block: the ablation that benchmarks and tests compare with."""
    global _switched_off
    old, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = old


def serves(x: Tensor, frozen_weights: bool = False) -> bool:
    """Whether the kernels here take this input: CPU, built, and no autograd (they have no
    backward). With `frozen_weights` (quantized layers) grad mode is fine while x needs no grad."""
    no_grad = not torch.is_grad_enabled() or (frozen_weights and not x.requires_grad)
    return not _switched_off and no_grad and x.device.type == "cpu" and available()


MAX_ROWS = 16  # up to this many rows go through the kernel (past ~16 oneDNN's GEMM wins for floats)


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `gemv` serves this product: up to `MAX_ROWS` rows, CPU, no autograd, a
    supported layout."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (1 <= rows <= MAX_ROWS and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.shape[1] == x.shape[-1] and weight.shape[1] % 8 == 0
            and weight.dtype in WEIGHT_DTYPES and weight.is_contiguous() and serves(x))


def gemv(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """`F.linear` for a few rows: x [..., K] (up to `MAX_ROWS` rows in all, each weight row
    read once for all of them) times weight [N, K] (times a per-row `scale` for int8 weights),
    plus `bias`; returns [..., N] in x's dtype."""
    return torch.ops.ember_gemv.gemv(x, weight, scale, bias)


def gemv_int4(x: Tensor, qweight: Tensor, scale: Tensor, offset: Tensor, group: int,
              bias: Tensor | None = None) -> Tensor:
    """`F.linear` with group-wise int4 weights (ember/quant/int4.py's portable layout): x [..., K]
    (a few rows: each weight row is read once for all of them), qweight uint8 [N, K/2], fp32
    `scale` and `offset` [N, K/group] (a group's s and z - 8s), plus `bias`; returns [..., N]."""
    return torch.ops.ember_gemv.gemv_int4(x, qweight, scale, offset, group, bias)


class Operand(NamedTuple):
    """What a linear layer hands `many` (through its `gemv_operand(x)`) to join a shared call:
    kind "rows" (float or int8 weights, `gemv`'s arguments) or "int4" (`gemv_int4`'s)."""
    kind: str
    weight: Tensor
    scale: Tensor | None = None
    offset: Tensor | None = None
    group: int = 0
    bias: Tensor | None = None


def many(x: Tensor, layers: Sequence[nn.Module]) -> tuple[Tensor, ...] | None:
    """x through several linear layers that all read it (q, k and v; gate and up) in one kernel
    call: the activations are prepared once and one thread split covers every matrix, where
    separate calls would pay the kernel's fixed costs (~5-10 µs each) once per layer. Each layer
    says through `gemv_operand(x)` whether its own forward would take these kernels; None (run
    each layer) where one would not, or where they differ in weight format."""
    operands = []
    for layer in layers:
        get = getattr(layer, "gemv_operand", None)
        op = get(x) if get is not None else None
        if op is None:
            return None
        operands.append(op)
    first = operands[0]
    if any(o.kind != first.kind or o.weight.dtype != first.weight.dtype or o.group != first.group
           for o in operands[1:]):
        return None
    weights, biases = [o.weight for o in operands], [o.bias for o in operands]
    if first.kind == "int4":
        y = torch.ops.ember_gemv.gemv_int4_many(x, weights, [o.scale for o in operands],
                                                [o.offset for o in operands], first.group, biases)
    else:
        y = torch.ops.ember_gemv.gemv_many(x, weights, [o.scale for o in operands], biases)
    return y.split([w.shape[0] for w in weights], dim=-1)  # views, side by side in one output


def instruction_set() -> str:
    """The integer path the int8 and int4 kernels take here: "avx512_vnni" (AVX-512 VNNI, chosen
    at run time where the CPU has it and EMBER_GEMV_AVX512 is not 0), "avx2", or "none" where the
    kernels are not built."""
    return torch.ops.ember_gemv.instruction_set() if available() else "none"


def decode_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """Softmax attention of one query per sequence over its cache: q [B, H, 1, D], k and v
    [B, Hkv, T, D] (H / Hkv <= 8 query heads share a KV head; rows of D contiguous), visible
    [T] or [B, T] bool (the positions each query may see). fp32 arithmetic, like PyTorch's."""
    return torch.ops.ember_gemv.decode_attention(q, k, v, visible)


def paged_decode_attention(q: Tensor, pool: Tensor, slots: Tensor, visible: Tensor) -> Tensor:
    """`decode_attention` reading a paged KV pool in place: q [B, H, 1, D], pool [S, 2 Hkv, D]
    (each slot's keys, then its values), slots [B, T] (the pool slot of each sequence's position),
    visible [T] or [B, T] bool. No gathered copy of the keys and values is made."""
    return torch.ops.ember_gemv.paged_decode_attention(q, pool, slots, visible)


def paged_decode_attention_applies(q: Tensor, pool: Tensor) -> bool:
    """Whether `paged_decode_attention` serves these queries against this pool."""
    H, D, Hkv = q.shape[1], q.shape[3], pool.shape[1] // 2
    return (q.shape[2] == 1 and q.dtype in WEIGHT_DTYPES[:3] and pool.dtype == q.dtype and pool.device.type == "cpu"
            and H % Hkv == 0 and H // Hkv <= 8 and D % 8 == 0 and D <= 256 and pool.shape[2] == D
            and pool.stride(2) == 1 and pool.stride(1) == D and serves(q))


def decode_attention_applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether `decode_attention` serves `model.attention(q, k, v, mask)`: one query a sequence, a
    boolean mask that only says which positions each sequence sees (or none), supported shapes."""
    B, H, tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    return (tq == 1 and q.dtype in WEIGHT_DTYPES[:3] and k.dtype == q.dtype and v.dtype == q.dtype
            and H % Hkv == 0 and H // Hkv <= 8 and D % 8 == 0 and D <= 256
            and k.stride(-1) == 1 and v.stride(-1) == 1 and k.device.type == "cpu"
            and (mask is None or (mask.dtype == torch.bool and mask.shape[-1] == T and mask.numel() in (T, B * T)))
            and serves(q))
