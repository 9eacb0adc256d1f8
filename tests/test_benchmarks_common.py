"""benchmarks/common.py: the rules every results file follows (ABBA order, median and spread, the
command and the machine recorded), and quant.py reading llama.cpp's own llama-bench."""

import json
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
