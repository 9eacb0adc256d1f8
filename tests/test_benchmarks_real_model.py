"""benchmarks/real_model.py: llama.cpp's tools driven with the agreed arguments, the ratios and
verdicts its tables print, and the random prompts kept clear of special tokens."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import real_model  # noqa: E402


def write_gguf(path: Path, token_types: list[int], tensors: dict | None = None) -> Path:
    """A small GGUF file written with llama.cpp's own writer: a vocabulary and some tensors."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"t{i}" for i in range(len(token_types))])
    writer.add_token_types(token_types)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def args(*extra: str):
    return real_model.parse_args(["--llama-bin", "/nonexistent", *extra])


def test_llama_bench_runs_once_a_round_with_the_shared_threads(tmp_path):
    """A stand-in llama-bench checks its argv and prints what the real one prints with -o json."""
    np = pytest.importorskip("numpy")
    model = write_gguf(tmp_path / "m.gguf", [1] * 8, {"output.weight": np.zeros((8, 4), np.float32),
                                                      "output_norm.weight": np.ones(4, np.float16)})
    fake = tmp_path / "llama-bench"
    tests = [{"build_commit": "abc1234", "model_type": "llama 135M Q4_1", "n_threads": 3, "n_prompt": 64,
              "n_gen": 0, "n_depth": 0, "avg_ts": 300.0, "samples_ts": [300.0]},
             {"build_commit": "abc1234", "model_type": "llama 135M Q4_1", "n_threads": 3, "n_prompt": 0,
              "n_gen": 16, "n_depth": 0, "avg_ts": 90.0, "samples_ts": [90.0]}]
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    f"assert sys.argv[1:] == ['-m', {str(model)!r}, '-t', '3', '-p', '64', '-n', '16', '-r', '1', "
                    f"'-o', 'json'], sys.argv\nprint({json.dumps(tests)!r})\n")
    fake.chmod(0o755)
    a = real_model.parse_args(["--llama-bin", str(tmp_path), "--threads", "3", "--prompt-tokens", "64",
                               "--new-tokens", "16"])
    got = real_model.run_llama_bench(model, a)
    assert got == {"prefill_tps": 300.0, "decode_tps": 90.0, "threads": 3, "build": "abc1234",
                   "model_type": "llama 135M Q4_1", "weight_bytes": 8 * 4 * 4 + 4 * 2}  # the tensors' bytes


def test_a_missing_tool_says_how_to_build_it():
    with pytest.raises(SystemExit, match="build_llama_cpp.sh"):
        real_model.tool(args(), "llama-bench")


def ember_run(prefill, eager, compiled):
    return {"prefill_tps": prefill, "decode_eager_tps": eager, "decode_compiled_tps": compiled, "layers": 30,
            "weight_bytes": 500 * 10 ** 6}


def test_decode_rows_pair_rounds_and_say_where_a_target_is_missed():
    runs = {"Q4_1": {"ember": [ember_run(200.0, 40.0, 120.0), ember_run(300.0, 60.0, 90.0)],
                     "llama.cpp": [{"prefill_tps": 400.0, "decode_tps": 100.0, "weight_bytes": 100 * 10 ** 6},
                                   {"prefill_tps": 300.0, "decode_tps": 100.0, "weight_bytes": 100 * 10 ** 6}]}}
    rows = real_model.summarize_decode(runs, args())
    assert [r["test"] for r in rows] == ["prefill", "decode, eager", "decode, compiled"]
    prefill, eager, compiled = rows
    # Round ratios: prefill 200/400 and 300/300; compiled decode 120/100 and 90/100.
    assert prefill["ratio"] == {"median": 0.75, "min": 0.5, "max": 1.0, "rounds": 2}
    assert compiled["ratio"] == {"median": pytest.approx(1.05), "min": 0.9, "max": 1.2, "rounds": 2}
    assert (prefill["target"], eager["target"], compiled["target"]) == (0.8, None, 1.0)
    # Per layer: 1000 ms / (tokens/s) / 30 layers; llama.cpp at 100 tokens/s spends 1/3 ms a layer.
    assert eager["ember_ms_per_layer"]["median"] == pytest.approx((1000 / 40 / 30 + 1000 / 60 / 30) / 2)
    assert eager["llama_ms_per_layer"]["median"] == pytest.approx(1 / 3)
    # Weights read a second: 500 MB x 40 and x 60 tokens/s (20 and 30 GB/s); 100 MB x 100 tokens/s.
    assert eager["ember_read_gbps"] == {"median": 25.0, "min": 20.0, "max": 30.0, "rounds": 2}
    assert compiled["llama_read_gbps"]["median"] == pytest.approx(10.0)
    result = {"settings": vars(args()) | {"model": "/m/SmolLM2.Q4_1.gguf"}, "llama_build": "abc1234",
              "elapsed_s": 60.0, "decode": {"rows": rows, "ember_dtype": "float32", "read_bandwidth": 40e9,
                                             "ember_linear_types": ["CPULinear"], "ember_weight_mb": {"Q4_1": 500.0},
                                             "file_weight_mb": {"Q4_1": 100.0}, "eager_compiled_differ": ["Q4_1"]}}
    md = real_model.markdown(result)
    prefill_line = next(line for line in md.splitlines() if "| prefill |" in line)
    compiled_line = next(line for line in md.splitlines() if "| decode, compiled |" in line)
    assert "0.75× (0.50–1.00)" in prefill_line and "**missed** (target ≥ 0.8×)" in prefill_line
    assert "met (target ≥ 1.0×)" in compiled_line and "0.333" in compiled_line
    assert "| 10.0 (10.0–10.0) |" in compiled_line  # llama.cpp's read GB/s
    assert "40.0 GB/s" in md and "Q4_1 500 MB; llama.cpp's, the file's: Q4_1 100 MB" in md
    assert "eager and compiled greedy tokens differ on Q4_1" in md


def server_run(throughput, tpot_p99, idle):
    levels = {c: {"output_throughput": throughput * c, "median_ttft_ms": 50.0, "p99_ttft_ms": 90.0,
                  "median_tpot_ms": tpot_p99 / 2, "p99_tpot_ms": tpot_p99} for c in (1, 16)}
    return {"command": ["x"], "levels": levels,
            "memory": {"idle_rss_bytes": idle, "load_peak_rss_bytes": 2 * idle, "hwm_bytes": 2 * idle}}


def test_serving_verdicts_hold_the_top_level_to_both_targets():
    a = args("--concurrency", "1,16", "--serve-requests", "4,32")
    runs = {"ember": [server_run(30.0, 150.0, 1024 * 2 ** 20)], "llama.cpp": [server_run(60.0, 60.0, 512 * 2 ** 20)]}
    sv = real_model.summarize_serve(runs, a)
    top = sv["levels"][1]
    assert top["concurrency"] == 16 and top["output_throughput"]["ratio"]["median"] == 0.5
    assert top["p99_tpot_ms"]["ratio"]["median"] == 2.5 and sv["memory"]["idle_rss_bytes"]["ratio"]["median"] == 2.0
    sv["commands"] = {"ember": [sys.executable, "-m", "ember.cli", "serve", "--model", "/m/x.gguf", "--port", "8123"],
                      "llama.cpp": ["/b/llama-server", "-m", "/m/x.gguf", "-np", "16", "--port", "8124"]}
    result = {"settings": vars(a) | {"model": "/m/x.gguf", "serve_model": "/m/x.gguf"}, "elapsed_s": 60.0, "serve": sv}
    md = real_model.markdown(result)
    line16 = next(line for line in md.splitlines() if line.startswith("| 16 (32) |"))
    assert "0.50× (0.50–0.50) **missed** (target ≥ 1.0×)" in line16
    assert "2.50× (2.50–2.50) **missed** (target ≤ 1.0×)" in line16
    line1 = next(line for line in md.splitlines() if line.startswith("| 1 (4) |"))
    assert "target" not in line1  # the targets are set at 16 concurrent only
    small = real_model.markdown(result | {"settings": result["settings"] | {"concurrency": [1, 4]},
                                          "serve": sv | {"levels": [sv["levels"][0] | {"concurrency": 4}]}})
    assert "target" not in next(line for line in small.splitlines() if line.startswith("| 4 (4) |"))
    assert "`python -m ember.cli serve --model FILE --port PORT`" in md and "`llama-server -m FILE -np 16" in md
    assert "| idle after load (VmRSS) | 1024 (1024–1024) | 512 (512–512) | 2.00× (2.00–2.00) |" in md


def test_random_prompts_skip_the_special_tokens(tmp_path):
    # Control tokens at the start (as SmolLM2's ChatML ones), an unused one at the end (as Llama 3's).
    path = write_gguf(tmp_path / "vocab.gguf", [3] * 5 + [1] * 90 + [1, 1, 1, 1, 5])
    assert real_model.plain_token_range(path) == (5, 99)


def test_quick_is_a_small_run_and_bad_lists_are_refused(capsys):
    q = args("--quick")
    assert (q.rounds, q.formats, q.prompt_tokens, q.new_tokens, q.concurrency) == (1, ["Q4_1"], 64, 16, [1, 4])
    full = args()
    assert (full.formats, full.concurrency, full.serve_requests, full.threads) == (
        ["Q4_1", "Q8_0", "F16"], [1, 4, 16], [4, 16, 48], 2)
    assert real_model.serve_context(full) == 256  # 128 + 64 tokens, rounded up to 256
    for bad in (["--concurrency", "1,4", "--serve-requests", "4"], ["--formats", "Q5_K"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            args(*bad)
