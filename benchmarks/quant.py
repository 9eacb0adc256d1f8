"""Quantization: weight memory, perplexity, batch-1 decode speed and GEMV kernels, per method.

    python benchmarks/quant.py [--model runs/quickstart/model] [--speed-preset llama-153m]

1. Quality: perplexity on held-out text of --model (a trained model; without one, a
   random-weight model whose perplexity only shows that nothing broke) in fp32, bf16 and
   every method, with the bytes of its weights. The same model with planted activation
   outliers (`ember.quant.outliers`) shows SmoothQuant's point: naive W8A8 vs SmoothQuant.
   Held-out text: the default corpus' validation documents (the quickstart's 2% split).
2. Decode: tokens/s at batch 1 (128-token prompt, --new-tokens new ones, greedy, Ember's
   KV-cached generator) on a random-weight Llama-shaped model (default: the issue's 153M
   reference shape), fp32/bf16 vs each method, with `transformers` fp32/bf16 as the peer.
   Also: the same with the step `torch.compile`d (`generate(..., compile=True)`), and the
   ablation with PyTorch's one-row kernels instead of `ember.gemv`.
   llama.cpp rows (F16, Q8_0, Q4_0 of the same weights) when `llama_cpp` is installed and
   --llama-cpp-src points at a llama.cpp tree:
       pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/llama
       pip install /tmp/llama/llama_cpp_python-*.tar.gz diskcache sentencepiece   # ~5 min build
       tar xzf /tmp/llama/llama_cpp_python-*.tar.gz -C /tmp/llama
       python benchmarks/quant.py --llama-cpp-src /tmp/llama/llama_cpp_python-*/vendor/llama.cpp
   Beside those Python-binding timings, llama.cpp's own `llama-bench` (pp512 and tg128, the same
   threads, one repetition a round) when --llama-bench names the binary (built in that tree:
   cmake -B build && cmake --build build --target llama-bench).
   Head to head: Ember against each peer in ABBA rounds, eager against eager and compiled
   against compiled (llama.cpp, ahead-of-time compiled C++, against both, as separate rows).
3. Batched: the engine at 16 and 64 concurrent sequences per method (does the speed-up survive
   many rows a step?).
4. GEMV: one token through one linear layer (its weight warm in cache), each kernel vs fp32
   and bf16 `F.linear`.
Headlines are medians over ABBA rounds with their spread (benchmarks/common.py); the tables
of single runs are there to show every method, not to rank them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, fmt, ratio_spread, read_bandwidth, run_rounds, spread, stamp, write_results  # noqa: E402
from ember.checkpoint import save_pretrained  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.cpu_inference import Int4KernelLinear, Int8KernelLinear, prepare_for_inference  # noqa: E402
from ember import gemv as ember_gemv  # noqa: E402
from ember.generation import generate_ids  # noqa: E402
from ember.load import load_model  # noqa: E402
from ember.model import CausalLM  # noqa: E402
from ember.quant import quantize_model, weight_bytes  # noqa: E402
from ember.quant.int4 import Int4Linear  # noqa: E402
from ember.quant.int8 import Int8Linear  # noqa: E402
from ember.quant.nf4 import NF4Linear  # noqa: E402
from ember.sampling import SamplingParams  # noqa: E402
from ember.quant.outliers import inject_outliers  # noqa: E402
from ember.quant.smoothquant import W8A8Linear  # noqa: E402

METHODS = [("int8", {}), ("int4 g32", {"group_size": 32}), ("int4 g64", {"group_size": 64}),
           ("int4 g128", {"group_size": 128}), ("nf4", {}), ("w8a8", {}), ("smoothquant", {})]


def heldout_ids(tokenizer, n_tokens: int) -> list[int]:
    from ember.data import is_validation, iter_documents

    ids: list[int] = []
    for _, text in iter_documents(["stdlib"]):
        if is_validation(text, 0.02):
            ids += tokenizer.encode(text) + [tokenizer.eos_id]
            if len(ids) >= n_tokens:
                break
    return ids[:n_tokens]


def calibration_ids(tokenizer, n: int = 16, seq: int = 256) -> torch.Tensor:
    from ember.quant.calibration import stdlib_calibration

    return torch.tensor([r for r in stdlib_calibration(tokenizer, n, seq) if len(r) == seq])


@torch.no_grad()
def perplexity(model: nn.Module, ids: list[int], ref: list[torch.Tensor] | None = None,
               window: int = 256) -> tuple[float, float, list[torch.Tensor]]:
    """(perplexity, mean KL(ref || model) per token, log-probs per window) over consecutive windows.

    Perplexity: exp(mean next-token NLL), each window scored from its own start. The KL to the
    fp32 model's distribution sees quantization error that perplexity of a weak model hides."""
    nll, kl, count, logps = 0.0, 0.0, 0, []
    for j, i in enumerate(range(0, len(ids) - 1, window)):
        x = torch.tensor([ids[i:i + window + 1]])
        if x.shape[1] < 2:
            break
        logp = F.log_softmax(model(x[:, :-1]).float()[0], dim=-1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        if ref is not None:
            kl += (ref[j].exp() * (ref[j] - logp)).sum().item()
        logps.append(logp)
        count += x.shape[1] - 1
    return math.exp(nll / count), kl / count, logps


# The LM head quantized too: int8 (under int4 as well, ember.quant.api's default) or int4.
HEAD_VARIANTS = [("int8 +head", {}), ("int4 g128 +head", {"group_size": 128}),
                 ("int4 g128 +int4 head", {"group_size": 128, "lm_head_method": "int4"})]


def quantized(model, name, kw, calib):
    method = name.split()[0]
    if method == "smoothquant":
        kw = dict(kw, calibration=calib)
    return quantize_model(copy.deepcopy(model), method, **kw)


def untied(model: CausalLM) -> CausalLM:
    """A copy whose LM head is its own matrix (the same function): the head can then be quantized."""
    m = copy.deepcopy(model)
    if m.config.tie_word_embeddings:
        m.config.tie_word_embeddings = False
        m.lm_head.weight = nn.Parameter(m.model.embed_tokens.weight.detach().clone())
    return m


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' linear layers: the part quantization shrinks."""
    from ember.quant.api import target_linears

    qcfg = getattr(model, "quantization_config", None)
    total = 0
    for name in (qcfg["modules"] if qcfg else target_linears(model)):
        mod = model.get_submodule(name)
        total += mod.nbytes() if hasattr(mod, "nbytes") else sum(p.numel() * p.element_size()
                                                                 for p in mod.parameters())
    return total


def quality(model, tokenizer, args) -> list[dict]:
    ids = heldout_ids(tokenizer, args.ppl_tokens) if tokenizer else torch.randint(
        0, model.config.vocab_size, (args.ppl_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    calib = calibration_ids(tokenizer) if tokenizer else torch.randint(0, model.config.vocab_size, (8, 256))
    rows, ref = [], perplexity(model, ids)[2]

    def add(label, method, m):
        ppl, kl, _ = perplexity(m, ids, ref)
        rows.append({"model": label, "method": method, "ppl": ppl, "kl_vs_fp32": kl, "weight_bytes": weight_bytes(m),
                     "linear_bytes": linear_bytes(m)})
        print(f"  {rows[-1]}", flush=True)

    add("plain", "fp32", model)
    add("plain", "bf16", copy.deepcopy(model).to(torch.bfloat16))
    for name, kw in METHODS:
        add("plain", name, quantized(model, name, kw, calib))
    # The LM head quantized too (int8 under int4, see ember.quant.api, or int4), on an untied copy.
    for label, kw in HEAD_VARIANTS:
        add("untied head", label, quantized(untied(model), label, dict(kw, include_lm_head=True), calib))
    outlier = copy.deepcopy(model)
    inject_outliers(outlier, channels=args.outlier_channels, factor=args.outlier_factor)
    add("outliers", "fp32", outlier)
    for name in ("int8", "w8a8", "smoothquant"):
        add("outliers", name, quantized(outlier, name, {}, calib))
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_vs_fp32"] = r["ppl"] / base - 1
    return rows


# --- decode speed ----------------------------------------------------------------------------------
@torch.inference_mode()
def ember_decode(model, prompt, n, compile: bool = False) -> float:
    """Decode tokens/s: time from the first new token to the last (the prompt's prefill excluded),
    on a copy of `model` prepared for CPU inference (as `ember generate` prepares the model it loads).
    The warm-up compiles the step when `compile` (its cache size rounds to the same 256 slots)."""
    model = prepare_for_inference(copy.deepcopy(model))
    list(generate_ids(model, prompt[:16], SamplingParams(max_tokens=4, temperature=0.0), compile=compile))  # warm-up
    stamps = []
    for _ in generate_ids(model, prompt, SamplingParams(max_tokens=n, temperature=0.0), compile=compile):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.inference_mode()
def hf_decode(path, dtype, prompt, n) -> float:
    import transformers
    from transformers import LogitsProcessor

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    stamps = []

    class Clock(LogitsProcessor):  # called once per new token
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    x = torch.tensor([prompt])
    hf.generate(x[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
    hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                logits_processor=[Clock()])
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def llama_cpp_rows(model, hf_dir: Path, prompt: list[int], n: int, args, add) -> dict[str, Path]:
    """llama.cpp on the same weights (`hf_dir`, the HF checkpoint the transformers rows read):
    GGUF F16 and Q8_0 from its own convert_hf_to_gguf.py, Q4_0 from its quantizer, timed like
    the Ember rows (greedy, first to last new token)."""
    import ctypes
    import subprocess

    try:
        import llama_cpp
    except ImportError:
        print("  llama-cpp-python not installed: no llama.cpp rows (pip install llama-cpp-python)")
        return {}
    src = Path(args.llama_cpp_src) if args.llama_cpp_src else None
    if src is None or not (src / "convert_hf_to_gguf.py").is_file():
        print("  no llama.cpp source tree (--llama-cpp-src, with convert_hf_to_gguf.py): no llama.cpp rows")
        return {}
    vocab = Path(args.data) / "tokenizers" / "hf" / "gpt2"
    if not (vocab / "tokenizer.json").is_file():  # the converter writes the vocabulary into the GGUF
        print(f"  no GPT-2 tokenizer at {vocab}: no llama.cpp rows")
        return {}
    for f in vocab.iterdir():
        shutil.copy(f, hf_dir / f.name)
    gguf = {name: Path(args.tmp) / f"speed-{name}.gguf" for name in ("F16", "Q8_0", "Q4_0")}
    for name in ("F16", "Q8_0"):
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", name.lower(),
                        "--outfile", str(gguf[name])], check=True, capture_output=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(gguf["F16"]).encode(), str(gguf["Q4_0"]).encode(), ctypes.byref(params)):
        raise RuntimeError("llama.cpp could not quantize to Q4_0")
    cfg = model.config
    table = cfg.vocab_size * cfg.hidden_size / model.num_parameters()  # input embedding: one row per token
    for name, path in gguf.items():
        size = path.stat().st_size
        add(name, "f32", llama_cpp_decode(path, prompt, n), size, impl="llama.cpp", read_bytes=int(size * (1 - table)))
    return gguf


def head_to_head(model, hf_dir: Path, gguf: dict[str, Path], prompt: list[int], n: int, calib, rounds: int) -> list[dict]:
    """Ember per format against its peer in ABBA rounds (Ember, peer; peer, Ember; ...): this
    machine's speed drifts over minutes, so each round's pair runs seconds apart and the ratio is
    the median of the rounds' own ratios. Eager Ember meets eager `transformers`; llama.cpp
    (ahead-of-time compiled) meets both eager and compiled Ember, in separate rows."""
    bf = copy.deepcopy(model).to(torch.bfloat16)
    contenders = [("bf16, eager", bf, False, "transformers bf16, eager",
                   lambda: hf_decode(hf_dir, torch.bfloat16, prompt, n))]
    if gguf:
        int8 = quantized(model, "int8", {"include_lm_head": True}, calib).to(torch.bfloat16)
        int4 = quantized(model, "int4", {"group_size": 128, "include_lm_head": True}, calib).to(torch.bfloat16)
        int4_head = quantized(model, "int4", {"group_size": 128, "include_lm_head": True, "lm_head_method": "int4"},
                              calib).to(torch.bfloat16)
        peers = [("bf16", bf, "llama.cpp F16", "F16"), ("int8 +head", int8, "llama.cpp Q8_0", "Q8_0"),
                 ("int4 g128 +head", int4, "llama.cpp Q4_0", "Q4_0"),
                 ("int4 g128 +int4 head", int4_head, "llama.cpp Q4_0", "Q4_0")]
        contenders = [(f"{name}, {mode}", m, mode == "compiled", peer,
                       lambda f=fmt_name: llama_cpp_decode(gguf[f], prompt, n))
                      for name, m, peer, fmt_name in peers for mode in ("compiled", "eager")] + contenders
    rows = []
    for name, m, compiled, peer, peer_decode in contenders:
        speeds = run_rounds({"ember": lambda: ember_decode(m, prompt, n, compile=compiled), "peer": peer_decode},
                            rounds)
        row = {"ember": name, "peer": peer, "order": "ABBA", "ember_tokens_per_s": speeds["ember"],
               "peer_tokens_per_s": speeds["peer"], "ember_spread": spread(speeds["ember"]),
               "peer_spread": spread(speeds["peer"]), "ratio": ratio_spread(speeds["ember"], speeds["peer"])}
        rows.append(row)
        print(f"  {name} / {peer}: {fmt(row['ratio'], 2, 'x')}", flush=True)
    return rows


def llama_bench(binary: str, gguf: dict[str, Path], rounds: int) -> list[dict]:
    """llama.cpp's own benchmark on each GGUF: pp512 (prompt of 512) and tg128 (128 generated), with
    the threads the other rows use, `rounds` repetitions; llama-bench reports tokens/s per repetition."""
    rows = []
    for name, path in gguf.items():
        argv = [binary, "-m", str(path), "-p", "512", "-n", "128", "-t", str(torch.get_num_threads()),
                "-r", str(rounds), "-o", "json"]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-bench failed on {path}: {r.stderr.strip()[-500:]}")
        for test in json.loads(r.stdout):
            kind = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
            samples = test.get("samples_ts") or [test["avg_ts"]]  # older builds report only the mean
            rows.append({"gguf": name, "test": kind, "threads": test.get("n_threads"),
                         "tokens_per_s": spread(samples), "command": " ".join(argv[1:])})
            print(f"  llama-bench {name} {kind}: {fmt(rows[-1]['tokens_per_s'])} tokens/s", flush=True)
    return rows


def llama_cpp_decode(path: Path, prompt: list[int], n: int) -> float:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_batch=len(prompt), n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), verbose=False)
    llm.eval(prompt[:16])  # warm-up
    llm.reset()
    llm.eval(prompt)
    stamps = []
    vocab = llm.n_vocab()
    for _ in range(n):  # greedy on the last logits; end-of-text is just another token for a random model
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))
        llm.eval([int(np.argmax(logits))])
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def speed(args, rows_h2h: list[dict], rows_bench: list[dict]) -> list[dict]:
    torch.manual_seed(0)
    cfg = preset(args.speed_preset)
    model = CausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    calib = torch.randint(0, cfg.vocab_size, (2, 64))
    n = args.new_tokens
    rows = []

    def add(name, act, tps, nbytes, tokens=n, impl="ember", read_bytes=None):
        # A token reads every weight once, except the input embedding table (one row) when the
        # head is untied; the table stays in the activation dtype under every method.
        table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * (2 if act == "bf16" else 4)
        rows.append({"impl": impl, "method": name, "activations": act, "tokens_per_s": tps,
                     "weight_bytes": nbytes, "read_bytes_per_token": nbytes - table if read_bytes is None else read_bytes,
                     "new_tokens": tokens})
        print(f"  {rows[-1]}", flush=True)

    add("fp32", "fp32", ember_decode(model, prompt, n), weight_bytes(model))
    bf = copy.deepcopy(model).to(torch.bfloat16)
    add("bf16", "bf16", ember_decode(bf, prompt, n), weight_bytes(bf))
    if args.compile:  # gpt-fast's way: the whole one-token step as one compiled graph
        add("fp32", "fp32", ember_decode(model, prompt, n, compile=True), weight_bytes(model), impl="ember, compiled")
        add("bf16", "bf16", ember_decode(bf, prompt, n, compile=True), weight_bytes(bf), impl="ember, compiled")
    if ember_gemv.available():  # the ablation: what the one-row kernel (ember/gemv.py) buys
        with ember_gemv.disabled():
            add("fp32", "fp32", ember_decode(model, prompt, n), weight_bytes(model), impl="ember, PyTorch GEMV")
            add("bf16", "bf16", ember_decode(bf, prompt, n), weight_bytes(bf), impl="ember, PyTorch GEMV")
    del bf
    for name, kw, acts, tokens in [("int8", {}, ("fp32", "bf16"), n),
                                   ("int4 g128", {"group_size": 128}, ("bf16", "fp32"), n),
                                   ("int4 g32", {"group_size": 32}, ("bf16",), n), ("smoothquant", {}, ("fp32",), n),
                                   ("nf4", {}, ("bf16",), args.slow_tokens)]:
        q = quantized(model, name, kw, calib)
        for act in acts:
            q = q.to(torch.bfloat16 if act == "bf16" else torch.float32)
            add(name, act, ember_decode(q, prompt, tokens), weight_bytes(q), tokens)
            if args.compile and act == "bf16" and name in ("int8", "int4 g128"):
                add(name, act, ember_decode(q, prompt, tokens, compile=True), weight_bytes(q), tokens,
                    impl="ember, compiled")
        del q
    # The LM head quantized too (int8, also under int4; or int4): llama.cpp's Q8_0 and Q4_0 files
    # store their output matrix at 8 and 6 bits, and on this model it is a third of the weights.
    for label, kw in HEAD_VARIANTS:
        q = quantized(model, label, dict(kw, include_lm_head=True), calib).to(torch.bfloat16)
        add(label, "bf16", ember_decode(q, prompt, n), weight_bytes(q))
        if args.compile:
            add(label, "bf16", ember_decode(q, prompt, n, compile=True), weight_bytes(q), impl="ember, compiled")
        del q
    if not args.no_peers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("  transformers not installed: no peer rows")
        else:
            path = Path(args.tmp) / "speed_model"
            save_pretrained(model, None, path)
            for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                add(name, name, hf_decode(path, dt, prompt, n), weight_bytes(model) // (1 if name == "fp32" else 2),
                    impl="transformers")
        gguf = llama_cpp_rows(model, path, prompt, n, args, add)
        if gguf and args.llama_bench:
            print("llama-bench ...", flush=True)
            rows_bench.extend(llama_bench(args.llama_bench, gguf, max(1, args.rounds)))
        elif gguf:
            print("  no llama-bench binary (--llama-bench): llama.cpp is timed through its Python binding only")
        if args.rounds:
            print("head to head ...", flush=True)
            rows_h2h.extend(head_to_head(model, path, gguf, prompt, n, calib, args.rounds))
    return rows


# --- batched decode in the engine ---------------------------------------------------------------------
def batched(args) -> list[dict]:
    """Engine output tokens/s at 16 and 64 concurrent sequences, per method: does a method's
    batch-1 speed-up survive when each step multiplies many rows?"""
    from ember.engine import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = preset(args.batch_preset)
    model = CausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist() for _ in range(max(args.concurrency))]
    params = SamplingParams(temperature=0.0, max_tokens=args.batch_tokens, ignore_eos=True)
    calib = torch.randint(0, cfg.vocab_size, (2, 64))
    rows = []
    for name, kw, act in [("fp32", None, "fp32"), ("bf16", None, "bf16"), ("int8", {}, "bf16"),
                          ("int8", {}, "fp32"), ("int4 g128", {"group_size": 128}, "bf16")]:
        m = copy.deepcopy(model) if kw is None else quantized(model, name, kw, calib)
        m = m.to(torch.bfloat16 if act == "bf16" else torch.float32)
        llm = LLM(prepare_for_inference(m), max_num_seqs=max(args.concurrency))
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
        for n in args.concurrency:
            t = time.perf_counter()
            outs = llm.generate(prompts[:n], params)
            dt = time.perf_counter() - t
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"method": name, "activations": act, "concurrency": n, "tokens_per_s": tokens / dt})
            print(f"  {rows[-1]}", flush=True)
        del llm, m
    for r in rows:
        base = next(b["tokens_per_s"] for b in rows if b["method"] == "bf16" and b["concurrency"] == r["concurrency"])
        r["vs_bf16"] = r["tokens_per_s"] / base
    return rows


# --- GEMV kernels -------------------------------------------------------------------------------------
def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


@torch.inference_mode()
def gemv(args) -> list[dict]:
    from ember.quant.kernels import fallback_only

    rows = []
    for k, n in [(768, 2048), (2048, 768)]:
        torch.manual_seed(0)
        lin = nn.Linear(k, n, bias=False)
        x32, x16 = torch.randn(1, k), torch.randn(1, k).to(torch.bfloat16)
        w16 = lin.weight.detach().to(torch.bfloat16)
        reps = max(10, int(2e7 / (k * n)))
        base = timed(lambda: F.linear(x32, lin.weight), reps)
        cases = [("fp32 F.linear", lambda: F.linear(x32, lin.weight), False),
                 ("bf16 F.linear", lambda: F.linear(x16, w16), False)]
        i8, i4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 128)
        i4_32, nf = Int4Linear.from_linear(lin, 32), NF4Linear.from_linear(lin)
        w8 = W8A8Linear.from_linear(lin)
        s8 = i8.scales.to(torch.bfloat16)
        if ember_gemv.available():
            k8, k4 = Int8KernelLinear.of(i8), Int4KernelLinear.of(i4)
            cases += [("Ember gemv, fp32", lambda: ember_gemv.gemv(x32, lin.weight), False),
                      ("Ember gemv, bf16", lambda: ember_gemv.gemv(x16, w16), False),
                      ("Ember gemv, int8 weight-only", lambda: k8(x32), False),
                      ("Ember gemv_int4 g128, bf16 act", lambda: k4(x16), False),
                      ("Ember gemv_int4 g128, fp32 act", lambda: k4(x32), False)]
        cases += [("int8 weight-only (aten int8pack), fp32 act",
                   lambda: torch.ops.aten._weight_int8pack_mm(x32, i8.qweight, i8.scales), False),
                  ("int8 weight-only (aten int8pack), bf16 act",
                   lambda: torch.ops.aten._weight_int8pack_mm(x16, i8.qweight, s8), False),
                  ("int8 dequantize+matmul", lambda: i8(x32), True),
                  ("int4 g128 (aten int4pack), bf16 act", lambda: i4(x16), False),
                  ("int4 g128 (aten int4pack), fp32 act", lambda: i4(x32), False),
                  ("int4 g32 (aten int4pack), bf16 act", lambda: i4_32(x16), False),
                  ("int4 dequantize+matmul", lambda: i4(x32), True),
                  ("nf4 dequantize+matmul, bf16", lambda: nf(x16), False),
                  ("w8a8 (int8 x int8 -> int32)", lambda: w8(x32), False)]
        for name, fn, fallback in cases:
            if fallback:
                with fallback_only():
                    t = timed(fn, max(3, reps // 10))
            else:
                t = timed(fn, reps)
            rows.append({"shape": f"{k}->{n}", "kernel": name, "us": t * 1e6, "speedup_vs_fp32": base / t})
        bf = next(r["us"] for r in rows if r["shape"] == f"{k}->{n}" and r["kernel"] == "bf16 F.linear")
        for r in rows:
            if r["shape"] == f"{k}->{n}":
                r["speedup_vs_bf16"] = bf / r["us"]
        print(f"  {k}->{n} done", flush=True)
    return rows


# --- report --------------------------------------------------------------------------------------------
def markdown(result) -> str:
    mib = 2 ** 20
    out = ["# Quantization"]
    if result.get("quality"):
        out += ["", f"## Perplexity and weight memory ({result['quality_model']})", "",
                "| model | method | all weights (MiB) | block linears (MiB) | perplexity | vs fp32 "
                "| KL to fp32 (nats/token) |",
                "|---|---|---:|---:|---:|---:|---:|"]
    for r in result.get("quality", []):
        out.append(f"| {r['model']} | {r['method']} | {r['weight_bytes'] / mib:.2f} | {r['linear_bytes'] / mib:.3f} | "
                   f"{r['ppl']:.3f} | {100 * r['ppl_vs_fp32']:+.2f}% | {r['kl_vs_fp32']:.2e} |")
    if result.get("decode"):
        fp = next(r["tokens_per_s"] for r in result["decode"] if r["impl"] == "ember" and r["method"] == "fp32")
        bf = next(r["tokens_per_s"] for r in result["decode"] if r["impl"] == "ember" and r["method"] == "bf16")
        bw = result.get("memory_bandwidth")
        out += ["", f"## Batch-1 decode ({result['speed_model']}, {result['prompt_tokens']}-token prompt, greedy)", ""]
        if bw:
            out += [f"Memory read bandwidth measured in the same run (the fastest of 5 reads: the ceiling): "
                    f"{bw / 1e9:.1f} GB/s. 'Roofline' is "
                    "bytes read per token (every weight but the rows of an untied input embedding table) × "
                    "tokens/s ÷ that bandwidth (gpt-fast's 'bandwidth achieved'): the share of the speed "
                    "that reading every weight once per token allows.", ""]
        out += ["| impl | method | activations | weights (MiB) | tokens/s | vs Ember fp32 | vs Ember bf16 "
                "| GB/s | roofline |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["decode"]:
            achieved = r.get("read_bytes_per_token", r["weight_bytes"]) * r["tokens_per_s"]
            roof = f"{100 * achieved / bw:.0f}%" if bw else "-"
            out.append(f"| {r['impl']} | {r['method']} | {r['activations']} | {r['weight_bytes'] / mib:.1f} | "
                       f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / fp:.2f}x | {r['tokens_per_s'] / bf:.2f}x | "
                       f"{achieved / 1e9:.1f} | {roof} |")
        if any(r["impl"] == "llama.cpp" for r in result["decode"]):
            out += ["", "'+head': the LM head quantized too (int8 under int4; '+int4 head': int4 like the blocks); "
                    "llama.cpp's Q8_0 and Q4_0 files store their output matrix at 8 and 6 bits. Each row of this "
                    "table is one run; the head-to-head rounds below are the figures to compare."]
    if result.get("head_to_head"):
        out += ["", "### Head to head: Ember against its peer in ABBA rounds", "",
                "Rounds run Ember, peer; peer, Ember; ... seconds apart. Figures are the median over all rounds "
                "with the spread (min–max); the ratio is the median of each round's own ratio. Eager meets eager "
                "and compiled meets compiled; llama.cpp (compiled ahead of time) is shown against both.", "",
                "| Ember | peer | rounds | Ember tokens/s | peer tokens/s | Ember / peer |", "|---|---|---:|---|---|---|"]
        for r in result["head_to_head"]:
            out.append(f"| {r['ember']} | {r['peer']} | {r['ratio']['rounds']} | {fmt(r['ember_spread'])} | "
                       f"{fmt(r['peer_spread'])} | **{fmt(r['ratio'], 2, 'x')}** |")
    if result.get("llama_bench"):
        out += ["", "### llama.cpp's own `llama-bench` on the same GGUF files", "",
                "pp512: a 512-token prompt; tg128: 128 generated tokens; the same threads as every row above. "
                "Tokens/s: the median over its repetitions (min–max).", "",
                "| GGUF | test | threads | tokens/s |", "|---|---|---:|---|"]
        for r in result["llama_bench"]:
            out.append(f"| {r['gguf']} | {r['test']} | {r['threads']} | {fmt(r['tokens_per_s'])} |")
    if result.get("batched"):
        out += ["", f"## Batched decode in the engine ({result['batch_model']}, 16-token prompts, "
                f"{result['batch_tokens']} new tokens each, greedy)", "",
                "Output tokens/s of `LLM.generate` with every sequence running at once. With many rows a "
                "step is a matrix product (compute), not a stream of weights (bandwidth): a method keeps "
                "its batch-1 speed-up only where its kernel multiplies many rows at full speed.", "",
                "| method | activations | concurrent | tokens/s | vs bf16 |", "|---|---|---:|---:|---:|"]
        for r in result["batched"]:
            out.append(f"| {r['method']} | {r['activations']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
                       f"{r['vs_bf16']:.2f}x |")
    if result.get("gemv"):
        out += ["", "## GEMV: one token through one linear layer", "",
                "| shape (in->out) | kernel | µs | vs fp32 | vs bf16 |", "|---|---|---:|---:|---:|"]
        for r in result["gemv"]:
            out.append(f"| {r['shape']} | {r['kernel']} | {r['us']:.1f} | {r['speedup_vs_fp32']:.2f}x | "
                       f"{r['speedup_vs_bf16']:.2f}x |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="trained model dir for perplexity (default: random small model)")
    ap.add_argument("--speed-preset", default="llama-153m", help="random-weight model for decode speed")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--slow-tokens", type=int, default=16, help="new tokens for dequantize-per-step methods (nf4)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--outlier-channels", type=int, default=4)
    ap.add_argument("--outlier-factor", type=float, default=50.0)
    ap.add_argument("--skip", nargs="*", default=[], choices=["quality", "decode", "batched", "gemv"])
    ap.add_argument("--batch-preset", default="llama-20m", help="random-weight model for the batched engine rows")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batch-tokens", type=int, default=64, help="new tokens per sequence in the batched rows")
    ap.add_argument("--no-peers", action="store_true", help="skip the transformers and llama.cpp decode rows")
    ap.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"),
                    help="a llama.cpp source tree (for convert_hf_to_gguf.py), e.g. the vendor/llama.cpp of the "
                    "llama-cpp-python sdist; with llama-cpp-python installed, adds llama.cpp F16/Q8_0/Q4_0 rows")
    ap.add_argument("--llama-bench", default=shutil.which("llama-bench"),
                    help="llama.cpp's llama-bench binary (default: on PATH): pp512 and tg128 on each GGUF")
    ap.add_argument("--data", default=os.environ.get("EMBER_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")),
                    help="shared data directory (the GPT-2 tokenizer the GGUF conversion needs)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile'd decode rows (each compiles for up to a minute)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="head-to-head rounds in ABBA order (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--tmp", default="/tmp/ember_quant_bench")
    ap.add_argument("--out", default=str(RESULTS / "quant"), help="results path without extension")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = stamp({"gemv_kernel": ember_gemv.instruction_set() if ember_gemv.available() else None,
                    "speed_model": f"random {args.speed_preset}", "prompt_tokens": args.prompt_tokens})
    t0 = time.time()
    if "quality" not in args.skip:
        print("perplexity ...", flush=True)
        if args.model:
            from ember.tokenizer import load_tokenizer

            model, tok = load_model(args.model, device="cpu", dtype="float32"), load_tokenizer(args.model)
            result["quality_model"] = f"trained {args.model}, {model.num_parameters() / 1e6:.1f}M params"
        else:
            torch.manual_seed(0)
            model, tok = CausalLM(preset("small", vocab_size=4096)).eval(), None
            result["quality_model"] = "random-weight small preset: perplexity only shows nothing broke"
        result["quality"] = quality(model, tok, args)
    if "decode" not in args.skip:
        print("decode ...", flush=True)
        result["memory_bandwidth"] = read_bandwidth()
        print(f"  memory read bandwidth {result['memory_bandwidth'] / 1e9:.1f} GB/s", flush=True)
        result["head_to_head"], result["llama_bench"] = [], []
        result["decode"] = speed(args, result["head_to_head"], result["llama_bench"])
    if "batched" not in args.skip:
        print("batched ...", flush=True)
        result["batch_model"] = f"random {args.batch_preset}"
        result["batch_tokens"] = args.batch_tokens
        result["batched"] = batched(args)
    if "gemv" not in args.skip:
        print("gemv ...", flush=True)
        result["gemv"] = gemv(args)
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    write_results(out.name, result, markdown(result), results_dir=out.parent)
    print(markdown(result))


if __name__ == "__main__":
    main()
