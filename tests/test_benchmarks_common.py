"""benchmarks/common.py: the rules every results file follows (ABBA order, median and spread, the
command and the machine recorded), and quant.py reading llama.cpp's own llama-bench."""

import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: a second processor the first speaks for
flags\t\t: fpu
"""


def test_abba_alternates_the_order_round_by_round():
    assert common.abba(["ember", "peer"], 4) == [["ember", "peer"], ["peer", "ember"], ["ember", "peer"],
                                                 ["peer", "ember"]]
    assert common.abba(["a", "b", "c"], 2) == [["a", "b", "c"], ["c", "b", "a"]]
    with pytest.raises(ValueError):
        common.abba(["a", "b"], 0)


def test_run_rounds_calls_in_abba_order_and_keeps_round_order():
    calls = []

    def contender(name, values):
        it = iter(values)
        return lambda: calls.append(name) or next(it)

    got = common.run_rounds({"ember": contender("ember", [10, 11, 12]), "peer": contender("peer", [5, 6, 7])}, 3)
    assert calls == ["ember", "peer", "peer", "ember", "ember", "peer"]
    assert got == {"ember": [10, 11, 12], "peer": [5, 6, 7]}


def test_spread_is_the_median_of_all_rounds_never_the_best():
    assert common.spread([3.0, 9.0, 4.0]) == {"median": 4.0, "min": 3.0, "max": 9.0, "rounds": 3}
    assert common.spread([1.0, 2.0, 3.0, 10.0])["median"] == 2.5
    # Ratios pair the rounds: (10/5, 30/10, 12/3) = (2, 3, 4).
    assert common.ratio_spread([10, 30, 12], [5, 10, 3]) == {"median": 3.0, "min": 2.0, "max": 4.0, "rounds": 3}
    with pytest.raises(ValueError, match="pairs"):
        common.ratio_spread([1, 2], [1])
    assert common.fmt({"median": 2.5, "min": 1.25, "max": 4.0}, 2, "x") == "2.50x (1.25–4.00)"


def test_cpu_info_reads_the_model_and_the_kernel_flags():
    info = common.cpu_info(CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["flags"] == {"AVX2": True, "AVX-512": True, "AVX-512 VNNI": True, "AVX-VNNI": False,
                             "AVX-512 BF16": True, "AMX": True, "AMX BF16": True, "AMX INT8": True}
    amd = common.cpu_info("model name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n")
    assert [k for k, on in amd["flags"].items() if on] == ["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16"]


def test_command_is_the_exact_argv_as_a_shell_line():
    argv = [str(BENCHMARKS / "quant.py"), "--rounds", "3", "--out", "/tmp/my results/quant"]
    assert common.command(argv) == "python benchmarks/quant.py --rounds 3 --out '/tmp/my results/quant'"


def test_write_results_records_command_machine_and_only_this_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "attention.py"), "--lengths", "64"])
    md = common.write_results("attention", {"rows": [1, 2]}, "# Title\n\n| a |\n", results_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.json", "attention.md"]
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["command"] == "python benchmarks/attention.py --lengths 64" and data["rows"] == [1, 2]
    m = data["machine"]
    assert {"cpu", "threads", "torch", "torch_build"} <= m.keys()
    assert m["cpu"]["flags"] is None or {"AVX-512 BF16", "AVX-512 VNNI", "AMX"} <= m["cpu"]["flags"].keys()
    text = md.read_text()
    assert text.startswith("# Title\n\nWritten by `python benchmarks/attention.py --lengths 64`")
    assert f"threads: {m['threads']}, torch {m['torch']}" in text and text.endswith("| a |\n")


def test_quant_reads_llama_bench_json(tmp_path):
    """A stand-in llama-bench prints what the real one prints with -o json (one object per test)."""
    quant = pytest.importorskip("quant", reason="benchmarks/quant.py imports Ember's quantizers")
    fake = tmp_path / "llama-bench"
    tests = [{"n_prompt": 512, "n_gen": 0, "n_threads": 2, "avg_ts": 200.0, "samples_ts": [190.0, 200.0, 230.0]},
             {"n_prompt": 0, "n_gen": 128, "n_threads": 2, "avg_ts": 50.0}]
    fake.write_text(f"#!{sys.executable}\nimport sys\nassert sys.argv[sys.argv.index('-p') + 1] == '512'\n"
                    f"assert sys.argv[sys.argv.index('-n') + 1] == '128'\nprint({json.dumps(tests)!r})\n")
    fake.chmod(0o755)
    rows = quant.llama_bench(str(fake), {"Q4_0": tmp_path / "m.gguf"}, rounds=3)
    assert [(r["gguf"], r["test"]) for r in rows] == [("Q4_0", "pp512"), ("Q4_0", "tg128")]
    assert rows[0]["tokens_per_s"] == {"median": 200.0, "min": 190.0, "max": 230.0, "rounds": 3}
    assert rows[1]["tokens_per_s"]["median"] == 50.0  # an older build: its mean, as one figure


# A llama-bench -o json report written by hand in the layout the tool prints: a list, one object per
# test, its fields, then samples_ns and samples_ts (one each per repetition).
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "abc1234",
    "build_number": 6000,
    "cpu_info": "AMD EPYC",
    "model_filename": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 135M Q4_1",
    "n_threads": 2,
    "n_prompt": 512,
    "n_gen": 0,
    "n_depth": 0,
    "avg_ns": 2000000000,
    "avg_ts": 256.5,
    "stddev_ts": 0.0,
    "samples_ns": [ 2000000000 ],
    "samples_ts": [ 256.5 ]
  },
  {
    "build_commit": "abc1234",
    "model_type": "llama 135M Q4_1",
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 128,
    "n_depth": 0,
    "avg_ts": 101.0,
    "samples_ns": [ 1300000000, 1234000000 ],
    "samples_ts": [ 98.5, 103.5 ]
  },
  {
    "build_commit": "abc1234",
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 32,
    "n_depth": 1024,
    "avg_ts": 80.0
  }
]
"""


def test_llama_bench_results_names_each_test_as_llama_bench_does():
    got = common.llama_bench_results(LLAMA_BENCH_JSON)
    assert list(got) == ["pp512", "tg128", "tg32 @ d1024"]
    assert got["pp512"] == {"tokens_per_s": 256.5, "samples": [256.5], "threads": 2, "build": "abc1234",
                            "model_type": "llama 135M Q4_1"}
    assert got["tg128"]["samples"] == [98.5, 103.5] and got["tg128"]["tokens_per_s"] == 101.0
    assert got["tg32 @ d1024"]["samples"] == [80.0]  # no samples_ts (an older build): its mean alone
    with pytest.raises(ValueError, match="-o json"):
        common.llama_bench_results("| model | size | test | t/s |")  # the default markdown output
    with pytest.raises(ValueError, match="avg_ts"):
        common.llama_bench_results('[{"n_prompt": 512, "n_gen": 0}]')


def test_process_memory_reads_vmrss_and_vmhwm():
    status = "Name:\tllama-server\nVmPeak:\t  900000 kB\nVmHWM:\t  420000 kB\nVmRSS:\t  400000 kB\nThreads:\t3\n"
    assert common.process_memory(1, status) == {"rss_bytes": 400000 * 1024, "hwm_bytes": 420000 * 1024}
    with pytest.raises(ValueError, match="VmRSS or VmHWM"):
        common.process_memory(1, "Name:\tkthreadd\nState:\tS (sleeping)\n")
    if Path("/proc/self/status").exists():  # this very process: it holds torch, so well over 10 MB
        mine = common.process_memory(os.getpid())
        assert 10 * 2 ** 20 < mine["rss_bytes"] <= mine["hwm_bytes"]


def test_against_target_says_plainly_when_a_target_is_missed():
    assert common.against_target({"median": 0.62}, 1.0) == "**missed** (target ≥ 1.0×)"
    assert common.against_target({"median": 0.8}, 0.8) == "met (target ≥ 0.8×)"
    # Lower is better (a p99 time per token against the peer's): the target is a ceiling.
    assert common.against_target({"median": 2.5}, 1.0, higher_is_better=False) == "**missed** (target ≤ 1.0×)"
    assert common.against_target({"median": 0.9}, 1.0, higher_is_better=False) == "met (target ≤ 1.0×)"


def test_run_rounds_keeps_records_as_well_as_numbers():
    seen = iter([{"tps": 1}, {"tps": 2}])
    got = common.run_rounds({"ember": lambda: next(seen), "peer": lambda: {"tps": 0}}, 2)
    assert got == {"ember": [{"tps": 1}, {"tps": 2}], "peer": [{"tps": 0}, {"tps": 0}]}
