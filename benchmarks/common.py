"""What every benchmark results file shares, spelled once.

The rules (benchmarks/README.md explains them):
- One command writes a results file and produces every number in it; the file records that
  command (the exact argv), the date, the machine and the torch build. Nothing is carried over
  from an older run.
- Contenders run in ABBA order: round 1 is A, B; round 2 is B, A; and so on (with three
  contenders A, B, C then C, B, A), so a machine that speeds up or slows down during the run
  favours no one.
- A headline is the median over all rounds, shown with its spread (min-max), never the best run.
  A ratio is the median of each round's own ratio (the pair ran seconds apart).
- The machine is the CPU model with the flags that decide which kernels run (AVX-512 BF16, VNNI,
  AMX), the thread count, and the torch version and build.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the scripts run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))

from ember.files import atomic_write_text, write_json  # noqa: E402

T = TypeVar("T")

RESULTS = Path(__file__).resolve().parent / "results"
# /proc/cpuinfo flag -> what it is called in a results file
CPU_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX BF16",
    "amx_int8": "AMX INT8",
}


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and which of CPU_FLAGS it has, from /proc/cpuinfo (or the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: the model from platform, the flags unknown
            return {"model": platform.processor() or platform.machine(), "flags": None}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor speaks for all
            fields[key.strip()] = value.strip()
    present = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "flags": {name: flag in present for flag, name in CPU_FLAGS.items()}}


def machine() -> dict[str, Any]:
    """The machine a run measured: CPU model and flags, cores, threads, torch version and build."""
    return {
        "cpu": cpu_info(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_build": {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
                        "openmp": torch.backends.openmp.is_available(), "cuda": torch.version.cuda,
                        "git": torch.version.git_version},
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def command(argv: Sequence[str] | None = None) -> str:
    """The command that ran this benchmark, as a shell line: `python <script> <arguments>`."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass  # a script outside the repository keeps its path
    return shlex.join(["python", str(script), *argv[1:]])


def abba(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The running order, round by round: the names, then reversed, alternately."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def run_rounds(contenders: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Each contender's measurements (a number, or a record of several), one a round, run in ABBA
    order; lists are in round order."""
    out: dict[str, list[T]] = {name: [] for name in contenders}
    for order in abba(list(contenders), rounds):
        for name in order:
            out[name].append(contenders[name]())
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """The median of all rounds, their min and max, and how many there were."""
    values = list(values)
    if not values:
        raise ValueError("no measurements")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": len(values)}


def ratio_spread(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """The spread of a / b round by round (a and b measured in the same round)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} measurements against {len(b)}: a ratio needs pairs from the same rounds")
    return spread([x / y for x, y in zip(a, b)])


def against_target(ratio: dict[str, Any], target: float, higher_is_better: bool = True) -> str:
    """A table cell saying plainly whether a ratio's median meets its target: 'met (target ≥ 1.0×)'
    or '**missed** (target ≥ 1.0×)'; for a lower-is-better ratio the target is a ceiling (≤)."""
    met = ratio["median"] >= target if higher_is_better else ratio["median"] <= target
    return f"{'met' if met else '**missed**'} (target {'≥' if higher_is_better else '≤'} {target:.1f}×)"


def fmt(s: dict[str, Any], digits: int = 1, suffix: str = "") -> str:
    """`median (min–max)` for a table cell."""
    return f"{s['median']:.{digits}f}{suffix} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Memory read bandwidth in bytes/s with torch's threads: the fastest of `reps` sums over a
    `gib`-GiB float32 tensor, far bigger than any cache. A ceiling, so the fastest repeat counts."""
    x = torch.ones(int(gib * 2 ** 28))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def llama_bench_results(text: str) -> dict[str, dict[str, Any]]:
    """llama.cpp's `llama-bench -o json` output as {test name: figures}, the test named as
    llama-bench prints it (pp512 for a 512-token prompt, tg128 for 128 generated tokens; a test at
    a depth d gets ' @ d<d>'). Figures: `tokens_per_s` (the mean over its repetitions), `samples`
    (each repetition's tokens/s; older builds give only the mean), `threads`, and the build."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench did not print JSON ({e}); was it run with -o json?") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise ValueError("llama-bench's JSON is not a list of tests")
    out = {}
    for t in tests:
        try:
            name = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
            if t.get("n_depth"):
                name += f" @ d{t['n_depth']}"
            out[name] = {"tokens_per_s": float(t["avg_ts"]),
                         "samples": [float(x) for x in t.get("samples_ts") or [t["avg_ts"]]],
                         "threads": t.get("n_threads"), "build": t.get("build_commit"),
                         "model_type": t.get("model_type")}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"llama-bench test without the field {e}: {t}") from None
    return out


def process_memory(pid: int, status: str | None = None) -> dict[str, int]:
    """A process's resident set now (VmRSS) and at its peak so far (VmHWM), in bytes, from
    /proc/PID/status (or the text given)."""
    if status is None:
        status = Path(f"/proc/{pid}/status").read_text()
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            number, unit = value.split()
            if unit != "kB":
                raise ValueError(f"/proc/{pid}/status gives {key} in {unit}, not kB")
            fields[key] = int(number) * 1024
    if set(fields) != {"VmRSS", "VmHWM"}:
        raise ValueError(f"/proc/{pid}/status lacks VmRSS or VmHWM (a kernel thread, or a zombie?)")
    return {"rss_bytes": fields["VmRSS"], "hwm_bytes": fields["VmHWM"]}


def describe_machine(m: dict[str, Any]) -> str:
    """One line for a results table: CPU, its kernel flags, threads, torch build."""
    flags = m["cpu"]["flags"]
    has = "unknown" if flags is None else (", ".join(name for name, on in flags.items() if on) or "none of them")
    b = m["torch_build"]
    return (f"{m['cpu']['model']} ({m['cores']} cores; {has}), threads: {m['threads']}, torch {m['torch']} "
            f"(CPU capability {b['cpu_capability']}, oneDNN {'on' if b['mkldnn'] else 'off'}, "
            f"CUDA {b['cuda'] or 'none'})")


def stamp(result: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`result` with the command, date and machine first."""
    return {"command": command(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), **result}


def write_results(name: str, result: dict[str, Any], markdown: str, results_dir: Path = RESULTS) -> Path:
    """Write results/<name>.json (the stamped result) and results/<name>.md (a header naming the
    command and the machine, then `markdown`), each atomically. Returns the .md path."""
    result = result if "command" in result else stamp(result)
    header = (f"Written by `{result['command']}` on {result['date']}; every number below comes from that run.\n\n"
              f"Machine: {describe_machine(result['machine'])}.\n\n")
    title, body = "", markdown.lstrip("\n")
    if body.startswith("# "):  # the header goes under the title
        title, _, body = body.partition("\n")
        title, body = title + "\n\n", body.lstrip("\n")
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / f"{name}.json", result)
    atomic_write_text(results_dir / f"{name}.md", title + header + body.rstrip("\n") + "\n")
    return results_dir / f"{name}.md"
