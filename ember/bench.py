"""`ember bench`: offline throughput of the engine, and online load against a running server.

Both use random token-id prompts and output lengths drawn from ranges, so a benchmark needs
no dataset and every request's cost is known in advance (EOS is ignored). The online
numbers use vLLM's names, so results read the same as `vllm bench serve`:

- TTFT, time to first token: request sent -> first streamed text;
- TPOT, time per output token: (latency - TTFT) / (output tokens - 1), per request;
- ITL, inter-token latency: the gaps between streamed chunks, pooled over all requests;
- request, output and total (prompt + output) token throughput over the whole run.

Each figure is reported as mean, median and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.settings import add_command


# --- workload ------------------------------------------------------------------------------
def parse_range(text: str, what: str) -> tuple[int, int]:
    """'128' -> (128, 128); '16:256' -> (16, 256)."""
    try:
        lo, _, hi = text.partition(":")
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise EmberError(f"{what} must be N or LOW:HIGH (integers), got {text!r}.") from None
    if not 1 <= low <= high:
        raise EmberError(f"{what} must satisfy 1 <= LOW <= HIGH, got {text!r}.")
    return low, high


def random_requests(num: int, vocab_size: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int = 0, first_id: int = 4) -> list[tuple[list[int], int]]:
    """`num` (prompt ids, output length) pairs; ids avoid the special tokens below `first_id`."""
    rng = random.Random(seed)
    return [([rng.randrange(first_id, vocab_size) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
            for _ in range(num)]


def percentiles(values: list[float], name: str, unit: str = "ms", scale: float = 1000.0) -> dict[str, float]:
    """mean/median/p99 of `values` (seconds) under vLLM's metric names, e.g. mean_ttft_ms."""
    if not values:
        return {f"{k}_{name}_{unit}": float("nan") for k in ("mean", "median", "p99")}
    ordered = sorted(values)
    rank = 0.99 * (len(ordered) - 1)  # linear interpolation, as numpy.percentile (vLLM's p99)
    low = int(rank)
    p99 = ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (rank - low)
    return {f"mean_{name}_{unit}": statistics.fmean(values) * scale,
            f"median_{name}_{unit}": statistics.median(values) * scale, f"p99_{name}_{unit}": p99 * scale}


# --- offline -------------------------------------------------------------------------------
def offline_throughput(llm: Any, requests: list[tuple[list[int], int]], progress: bool = False) -> dict[str, Any]:
    """Run every request through `llm.generate` at once; tokens/s and the engine's own stats."""
    from ember.sampling import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    steps_before, preempted_before = llm.stats["steps"], llm.scheduler.num_preemptions
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p, _ in requests)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "num_requests": len(requests), "total_input_tokens": prompt_tokens,
            "total_output_tokens": output_tokens, "request_throughput": len(requests) / elapsed,
            "output_throughput": output_tokens / elapsed, "total_token_throughput": (prompt_tokens + output_tokens)
            / elapsed, "steps": llm.stats["steps"] - steps_before,
            "preemptions": llm.scheduler.num_preemptions - preempted_before,
            "prefix_cache_hit_rate": llm.block_manager.hit_rate, "spec_acceptance_rate": llm.spec_acceptance_rate,
            "spec_mean_accepted_length": llm.spec_mean_accepted_length}


# --- online --------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _one_request(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    result = RequestResult(prompt_tokens=len(body["prompt"]))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = result.ttft > 0
        if not result.ok:
            result.error = "no text streamed"
    except Exception as e:  # a failed request is counted, not fatal to the run
        result.error = f"{type(e).__name__}: {e}"
    return result


async def serve_benchmark(base_url: str, requests: list[tuple[list[int], int]], model: str | None = None,
                          request_rate: float = float("inf"), max_concurrency: int | None = None,
                          api_key: str | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Send `requests` as streaming /v1/completions calls, arriving as a Poisson process at
    `request_rate` per second (inf: all at once), at most `max_concurrency` in flight."""
    import httpx
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base_url = base_url.rstrip("/")
    # A fresh connection a request: a server may close an idle keep-alive connection at any moment
    # (llama-server's HTTP library does after a few requests), and a request sent on it fails with no
    # response. A loopback connect costs far under a millisecond against a streamed completion's seconds.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
        if model is None:
            try:
                listing = (await client.get(base_url + "/v1/models", headers=headers)).json()
                model = listing["data"][0]["id"]
            except Exception as e:
                raise EmberError(f"Could not reach {base_url}/v1/models ({type(e).__name__}); is the server up?") from None
        rng = random.Random(seed)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), disable=not progress, unit="req")

        async def send(prompt: list[int], max_tokens: int) -> RequestResult:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            if gate is None:
                result = await _one_request(client, base_url + "/v1/completions", body, headers)
            else:
                async with gate:
                    result = await _one_request(client, base_url + "/v1/completions", body, headers)
            bar.update(1)
            return result

        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(send(prompt, max_tokens)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return summarize(results, duration)


def server_vocab_size(base_url: str, api_key: str | None = None) -> int | None:
    """The vocabulary size a server reports at /tokenizer_info, or None if it does not say."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        info = httpx.get(base_url.rstrip("/") + "/tokenizer_info", headers=headers, timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None
    size = info.get("vocab_size") if isinstance(info, dict) else None
    return int(size) if isinstance(size, int) else None


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    out = {"duration_s": duration, "completed": len(done), "failed": len(results) - len(done),
           "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
           "request_throughput": len(done) / duration, "output_throughput": output_tokens / duration,
           "total_token_throughput": (input_tokens + output_tokens) / duration}
    out |= percentiles([r.ttft for r in done], "ttft")
    out |= percentiles(tpot, "tpot")
    out |= percentiles([gap for r in done for gap in r.itl], "itl")
    out |= percentiles([r.latency for r in done], "e2el")
    errors = [r.error for r in results if not r.ok]
    if errors:
        out["errors"] = errors[:5]
    return out


# --- CLI -----------------------------------------------------------------------------------
def _print_table(title: str, figures: dict[str, Any]) -> None:
    print(f"{'=' * 20} {title} {'=' * 20}")
    for key, value in figures.items():
        if isinstance(value, float):
            print(f"{key:<32}{value:>14.2f}")
        elif not isinstance(value, (list, dict)):
            print(f"{key:<32}{value!s:>14}")
    for e in figures.get("errors", []):
        print("error:", e)


def _workload(a: argparse.Namespace) -> dict:
    """The flags of the run as recorded beside its figures (the parser's own bookkeeping left out)."""
    return {k: v for k, v in vars(a).items() if k != "func" and not k.startswith("_")}


def _write_json(path: str | None, record: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        print(f"Wrote {path}")


def cmd_throughput(a: argparse.Namespace) -> None:
    import torch

    from ember.engine import LLM

    from ember.cli import engine_args as engine_flags

    engine_args = engine_flags(a)
    if a.model:
        llm = LLM(a.model, device=a.device, dtype=a.dtype, quantization=a.quantize, adapter=a.adapter, **engine_args)
        source = a.model
    else:
        from ember.config import preset
        from ember.model import CausalLM

        torch.manual_seed(a.seed)
        model = CausalLM(preset(a.preset, vocab_size=a.vocab_size)).eval()
        if a.quantize:
            from ember.quant import quantize_model

            model = quantize_model(model, a.quantize)
        if a.adapter:
            raise EmberError("--adapter needs --model (the base the adapter was trained on).")
        llm = LLM(model, device=a.device, dtype=a.dtype, **engine_args)
        source = f"random-weight preset {a.preset}"
    vocab = llm.model.config.vocab_size
    max_len = llm.max_model_len
    input_len, output_len = parse_range(a.input_len, "--input-len"), parse_range(a.output_len, "--output-len")
    if input_len[1] + output_len[1] > max_len:
        raise EmberError(f"--input-len + --output-len can reach {input_len[1] + output_len[1]} tokens, beyond the "
                         f"model's context of {max_len}.")
    requests = random_requests(a.num_prompts, vocab, input_len, output_len, a.seed)
    if a.warmup:  # other random ids than the measured requests, so they leave no prefix-cache hits
        offline_throughput(llm, random_requests(2, vocab, input_len, output_len, a.seed + 1))
    figures = offline_throughput(llm, requests, progress=not a.no_progress)
    print(f"Model: {source}; {a.num_prompts} requests, input {a.input_len}, output {a.output_len} tokens")
    _print_table("Offline throughput", figures)
    _write_json(a.json, {"benchmark": "throughput", "model": source, "engine_args": engine_args,
                         "workload": _workload(a), "results": figures})


def cmd_serve(a: argparse.Namespace) -> None:
    input_len, output_len = parse_range(a.input_len, "--input-len"), parse_range(a.output_len, "--output-len")
    if a.request_rate <= 0:
        raise EmberError("--request-rate must be > 0 (inf sends everything at once).")
    vocab = a.vocab_size or server_vocab_size(a.base_url, a.api_key) or 4096
    requests = random_requests(a.num_prompts, vocab, input_len, output_len, a.seed)
    figures = asyncio.run(serve_benchmark(a.base_url, requests, model=a.model, request_rate=a.request_rate,
                                          max_concurrency=a.max_concurrency, api_key=a.api_key, seed=a.seed,
                                          progress=not a.no_progress))
    print(f"Server: {a.base_url}; {a.num_prompts} requests at rate {a.request_rate}/s, input {a.input_len}, "
          f"output {a.output_len} tokens")
    _print_table("Serving benchmark", figures)
    _write_json(a.json, {"benchmark": "serve", "base_url": a.base_url, "workload": _workload(a),
                         "results": figures})
    if figures["completed"] == 0:
        raise EmberError("No request completed; see the errors above.")


def _throughput_flags(t: argparse.ArgumentParser) -> None:
    from ember.cli import add_engine_flags, add_model_flags

    src = t.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (HF layout) or a .gguf file (llama.cpp's format; Q4_0/Q4_1 blocks kept as int4, Q8_0 as int8, F16 as fp16, other types decoded to float)")
    src.add_argument("--preset", default="llama-20m", help="random-weight model of this preset (default llama-20m)")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the --preset model (default 4096)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    t.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: auto)")
    add_model_flags(t)
    t.add_argument("--warmup", action="store_true", help="run two requests first (kernels, allocator)")
    add_engine_flags(t)
    _load_flags(t)


def _serve_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default %(default)s)")
    s.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    s.add_argument("--api-key", default=None, help="bearer token for the server (default: none)")
    s.add_argument("--vocab-size", type=int, default=None,
                   help="random prompt ids are drawn below this (default: the server's /tokenizer_info, else 4096)")
    s.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default inf: all at once)")
    s.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: no limit)")
    _load_flags(s)


def _load_flags(p: argparse.ArgumentParser) -> None:
    """The request mix, shared by both benchmarks."""
    g = p.add_argument_group("requests")
    g.add_argument("--num-prompts", type=int, default=32, help="requests to send (default 32)")
    g.add_argument("--input-len", default="16:256", help="prompt tokens, N or LOW:HIGH (default 16:256)")
    g.add_argument("--output-len", default="16:128", help="output tokens, N or LOW:HIGH (default 16:128)")
    g.add_argument("--seed", type=int, default=0, help="seed for the lengths, ids and arrivals (default 0)")
    g.add_argument("--json", default=None, help="also write the figures to this JSON file")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_commands(sub: argparse._SubParsersAction) -> dict:
    group = sub.add_parser("bench", help="measure engine throughput or a server's latency under load",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="action", metavar="ACTION")

    add_command(actions, "throughput", _throughput_flags, help="offline: all requests through the engine at once",
                description="Generate random-length requests (random token ids, EOS ignored) through "
                "ember.LLM and report request/output/total token throughput.")
    add_command(actions, "serve", _serve_flags, help="online: stream requests to a running OpenAI-compatible server",
                description="Send random-length streaming /v1/completions requests to a running server "
                "(ember serve or any vLLM-compatible one) as a Poisson process, and report TTFT, TPOT, "
                "ITL and end-to-end latency (mean/median/p99) and throughput.")
    return {("bench", "throughput"): cmd_throughput, ("bench", "serve"): cmd_serve}
