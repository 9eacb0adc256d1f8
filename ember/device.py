"""Pick the device and dtype: CUDA, then MPS, then CPU; bf16 where the hardware is fast at it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ember.errors import EmberError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EmberError(f"Unknown device '{name}'; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmberError("CUDA was requested but no CUDA device is available.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EmberError("MPS was requested but is not available on this machine.")
    return device


def pick_dtype(device: torch.device, name: str | torch.dtype | None = None) -> torch.dtype:
    """Inference dtype. Default: bf16 on GPUs that support it, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise EmberError(f"Unknown dtype '{name}'; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for training, or None where autocast would not pay."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def cpu_name() -> str:
    """The processor's model name (benchmarks record it: which native bf16/int8 instructions a
    CPU has decides their ratios)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
