"""`ember bench`: the workload generator, the figures' arithmetic, and both modes end to end."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ember.bench import RequestResult, parse_range, percentiles, random_requests, summarize
from ember.errors import EmberError


def test_random_requests_are_reproducible_and_inside_their_ranges():
    a = random_requests(50, 300, (8, 20), (3, 5), seed=7)
    assert a == random_requests(50, 300, (8, 20), (3, 5), seed=7)
    assert a != random_requests(50, 300, (8, 20), (3, 5), seed=8)
    assert all(8 <= len(p) <= 20 and 3 <= n <= 5 for p, n in a)
    assert all(4 <= t < 300 for p, _ in a for t in p)  # no special tokens, no ids past the vocabulary


@pytest.mark.parametrize("text", ["0", "9:3", "a:b", "3:"])
def test_bad_length_ranges_are_refused(text):
    if text == "3:":
        assert parse_range(text, "--input-len") == (3, 3)
        return
    with pytest.raises(EmberError, match="--input-len"):
        parse_range(text, "--input-len")


def test_summary_uses_vllm_definitions():
    # Two requests: TTFT 0.1 and 0.3 s; 5 and 3 output tokens; gaps as listed.
    r1 = RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4)
    r2 = RequestResult(ok=True, prompt_tokens=20, output_tokens=3, ttft=0.3, latency=0.7, itl=[0.2, 0.2])
    bad = RequestResult(ok=False, error="HTTP 400")
    s = summarize([r1, r2, bad], duration=2.0)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["output_throughput"] == pytest.approx(8 / 2.0)
    assert s["total_token_throughput"] == pytest.approx(38 / 2.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    # TPOT per request: (0.5 - 0.1) / 4 = 0.1 s and (0.7 - 0.3) / 2 = 0.2 s
    assert s["mean_tpot_ms"] == pytest.approx(150.0)
    assert s["median_itl_ms"] == pytest.approx(100.0)  # ITL pools the gaps: four of 0.1, two of 0.2
    assert s["p99_itl_ms"] == pytest.approx(200.0)
    assert s["errors"] == ["HTTP 400"]


def test_percentiles_interpolate_like_numpy():
    values = [i / 1000 for i in range(100, 0, -1)]  # 1..100 ms, unsorted
    p = percentiles(values, "x")
    assert p["median_x_ms"] == pytest.approx(50.5)
    assert p["p99_x_ms"] == pytest.approx(99.01)  # numpy.percentile(range(1, 101), 99)
    assert percentiles([0.004], "x")["p99_x_ms"] == pytest.approx(4.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from ember.checkpoint import save_pretrained
    from ember.config import preset
    from ember.model import CausalLM
    from ember.tokenizer import train_tokenizer

    tok = train_tokenizer(["def add(a, b):\n    return a + b\n", "hello world, a small corpus.\n"] * 40,
                          vocab_size=300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bench") / "model"
    cfg = preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_position_embeddings=512)
    save_pretrained(CausalLM(cfg), tok, path)
    return path


def ember_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def test_bench_throughput_generates_every_requested_token(model_dir, tmp_path):
    out = tmp_path / "t.json"
    r = ember_cli("bench", "throughput", "--model", str(model_dir), "--num-prompts", "6", "--input-len", "4:40",
                  "--output-len", "2:9", "--no-progress", "--json", str(out))
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())["results"]
    expected = random_requests(6, 296, (4, 40), (2, 9), seed=0)  # same seed, same workload
    assert figures["total_output_tokens"] == sum(n for _, n in expected)
    assert figures["output_throughput"] > 0 and figures["num_requests"] == 6
    assert "output_throughput" in r.stdout


def test_bench_throughput_refuses_lengths_beyond_the_context(model_dir):
    r = ember_cli("bench", "throughput", "--model", str(model_dir), "--input-len", "500", "--output-len", "100")
    assert r.returncode == 1 and "context" in r.stderr and "Traceback" not in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_serve_measures_a_live_server(model_dir, tmp_path):
    httpx = pytest.importorskip("httpx")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", "--model", str(model_dir), "--port",
                               str(port), "--num-kv-blocks", "128"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        out = tmp_path / "s.json"
        r = ember_cli("bench", "serve", "--base-url", url, "--vocab-size", "290", "--num-prompts", "8",
                      "--input-len", "4:30", "--output-len", "3:12", "--request-rate", "50", "--max-concurrency",
                      "4", "--no-progress", "--json", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        figures = json.loads(out.read_text())["results"]
        expected = random_requests(8, 290, (4, 30), (3, 12), seed=0)
        assert (figures["completed"], figures["failed"]) == (8, 0)
        assert figures["total_output_tokens"] == sum(n for _, n in expected)  # usage counts from the server
        assert figures["total_input_tokens"] == sum(len(p) for p, _ in expected)
        assert 0 < figures["median_ttft_ms"] <= figures["p99_e2el_ms"]
        assert figures["mean_itl_ms"] > 0
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_bench_serve_without_a_server_says_so(tmp_path):
    r = ember_cli("bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2",
                  "--no-progress")
    assert r.returncode == 1 and "server" in r.stderr and "Traceback" not in r.stderr
