"""Ember's CPU kernels for decoding, hand-written for x86 CPUs with AVX2 (`ember/csrc/gemv.cpp`).

A decode step multiplies a few activation rows (one per running sequence, or a speculative
step's guesses) by every weight matrix, so its speed is the speed at which weights stream from
memory. These kernels read each weight row once for all the rows and split the rows over
PyTorch's threads:
- `gemv`: up to `MAX_ROWS` rows times fp32, bf16, fp16 or int8 weights. Float weights are widened
  to fp32 in registers; for int8 weights each activation row is rounded once to int16 (15 bits
  against its largest element, finer than bf16) and the products are integer multiply-adds,
  with AVX-512 VNNI's `vpdpwssd` where the CPU has it (chosen at run time; `instruction_set()`
  says which path runs, EMBER_GEMV_AVX512=0 forces AVX2). int8 weights take a scale per row, or
  one per group of columns (GGUF's Q8_0: fp16 per 32): each group's integer sum is scaled in fp32.
- `gemv_int4`: group-wise int4 weights in `ember.quant.int4`'s portable layout, any number of rows,
  the same integer multiply-adds (VNNI for groups of a multiple of 128).
- `decode_attention`: one query per sequence against its cached keys and values, each KV head
  read once for its group of query heads, hidden positions skipped, the softmax in fp32;
  `paged_decode_attention` is the same over the engine's paged pool, reading each position
  where its slot lies (PagedAttention).

Who calls them: the inference layers that `ember.cpu_inference.prepare_for_inference` swaps
into a model (linear layers), and the KV-cache backends (`ember.kv_cache.decode_attention`,
`ember.engine.paged_cache`) for attention. Each `*applies` function says when a kernel serves
an input: CPU tensors, no autograd (the kernels have no backward), supported shapes and dtypes.

The source is compiled once per machine and source version with PyTorch's extension builder
(the C++ compiler PyTorch's own `torch.compile` needs on a CPU) and cached under
`~/.cache/torch_extensions`. Without a compiler, off x86, or with `EMBER_GEMV=0` in the
environment, `available()` is False and callers keep PyTorch's kernels: the results agree to
float rounding either way. Speeds are in benchmarks/results/ (`benchmarks/quant.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

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
    from torch.utils import cpp_extension  # the builder (setuptools and all): loaded only to build

    # A changed source or another torch gets a fresh build, never a stale or ABI-mismatched one.
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:10]
    name = f"ember_gemv_{digest}"
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        library = build_dir / f"{name}.so"
        if library.exists():  # built before: load it without the builder and its build lock
            torch.ops.load_library(str(library))
        else:
            _clear_dead_build_lock(build_dir / "lock")
            _put_pip_ninja_on_path()
            print(f"ember: compiling the CPU decode kernel {SOURCE.name} (once per machine and torch version, "
                  f"about a minute; cached in {build_dir})", file=sys.stderr, flush=True)
            cpp_extension.load(name=name, sources=[str(SOURCE)], is_python_module=False, verbose=False,
                               extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                               extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers, a changed builder: PyTorch's kernels serve instead
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"ember: the CPU decode kernel is not available ({type(e).__name__}: {first_line}); "
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
    torch.library.register_fake("ember_gemv::dequantize_int4")(
        lambda qweight, scale, offset, group: qweight.new_empty(qweight.shape[0], qweight.shape[1] * 2,
                                                                dtype=torch.float32))
    torch.library.register_fake("ember_gemv::dequantize_int8")(
        lambda qweight, scales: qweight.new_empty(*qweight.shape, dtype=torch.float32))
    torch.library.register_fake("ember_gemv::decode_attention")(lambda q, k, v, visible: torch.empty_like(q))
    torch.library.register_fake("ember_gemv::paged_decode_attention")(
        lambda q, pool, slots, visible: torch.empty_like(q))
    return True


BUILD_LOCK_STALE_S = 15 * 60  # a build takes a minute or two; a lock this old belongs to a process that died


def _clear_dead_build_lock(lock: Path) -> None:
    """PyTorch's builder waits forever on a lock file left by a build that was killed; remove one that old."""
    try:
        if time.time() - lock.stat().st_mtime > BUILD_LOCK_STALE_S:
            print(f"ember: removing {lock}, left by a kernel build that did not finish", file=sys.stderr, flush=True)
            lock.unlink()
    except FileNotFoundError:
        pass


def _put_pip_ninja_on_path() -> None:
    """The builder runs `ninja`; the PyPI package's binary is not on PATH in an un-activated environment."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package (a dependency): only its binary's folder is wanted
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


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


# Up to this many rows go through `gemv`; more rows are a matrix product, which oneDNN's blocked
# GEMM does better (see ember.cpu_inference.CPULinear).
MAX_ROWS = 16


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `gemv` serves this product: up to `MAX_ROWS` rows, CPU, no autograd, a
    supported layout."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (1 <= rows <= MAX_ROWS and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.shape[1] == x.shape[-1] and weight.shape[1] % 8 == 0
            and weight.dtype in WEIGHT_DTYPES and weight.is_contiguous() and serves(x))


def gemv(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """`F.linear` for a few rows: x [..., K] (up to `MAX_ROWS` rows in all, each weight row
    read once for all of them) times weight [N, K] (times a per-row `scale` [N] for int8 weights,
    or a per-group one [N, K / group], fp32 or fp16, group a power of two from 32), plus `bias`;
    returns [..., N] in x's dtype. Any number of rows is taken (eight at a time); `applies` says
    when this kernel is the faster choice for float weights."""
    return torch.ops.ember_gemv.gemv(x, weight, scale, bias)


def gemv_int4(x: Tensor, qweight: Tensor, scale: Tensor, offset: Tensor, group: int,
              bias: Tensor | None = None) -> Tensor:
    """`F.linear` with group-wise int4 weights (ember/quant/int4.py's portable layout): x [..., K]
    (a few rows: each weight row is read once for all of them), qweight uint8 [N, K/2], `scale` and
    `offset` [N, K/group] (a group's s and z - 8s; both fp32 or both fp16), plus `bias`; returns [..., N]."""
    return torch.ops.ember_gemv.gemv_int4(x, qweight, scale, offset, group, bias)


# Products of more rows than this are matrix products: the layers decode the weights to fp32 once
# (`dequantize_int4` / `dequantize_int8`) and hand them to PyTorch's float GEMM, which outruns the
# row kernels' integer multiply-adds there (see benchmarks/results/real_model.md's prefill rows).
DEQUANTIZE_ROWS = 32


def dequantize_int4(qweight: Tensor, scale: Tensor, offset: Tensor, group: int) -> Tensor:
    """The fp32 weight [N, K] of `gemv_int4`'s operands: w = q s + offset within each group."""
    return torch.ops.ember_gemv.dequantize_int4(qweight, scale, offset, group)


def dequantize_int8(qweight: Tensor, scales: Tensor) -> Tensor:
    """The fp32 weight [N, K] of int8 `qweight` with `scales` [N, G] (a scale per K / G columns)."""
    return torch.ops.ember_gemv.dequantize_int8(qweight, scales)


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
    """Whether `decode_attention` serves these queries: one query a sequence, a boolean mask that
    only says which positions each sequence sees (or none), supported shapes, no autograd."""
    B, H, tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    return (tq == 1 and q.dtype in WEIGHT_DTYPES[:3] and k.dtype == q.dtype and v.dtype == q.dtype
            and H % Hkv == 0 and H // Hkv <= 8 and D % 8 == 0 and D <= 256
            and k.stride(-1) == 1 and v.stride(-1) == 1 and k.device.type == "cpu"
            and (mask is None or (mask.dtype == torch.bool and mask.shape[-1] == T and mask.numel() in (T, B * T)))
            and serves(q))
