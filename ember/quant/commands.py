"""`ember quantize`: write a quantized copy of a model directory (argparse only at import time)."""

from __future__ import annotations

import argparse

METHOD_NAMES = ["int8", "int4", "nf4", "smoothquant", "w8a8"]


def add_commands(sub: argparse._SubParsersAction) -> dict:
    p = sub.add_parser(
        "quantize", help="quantize a model: int8, int4, nf4 or smoothquant (W8A8)",
        description="Quantize the linear layers of a model directory and save it with a quantization_config in "
        "config.json; `ember generate/serve` and ember.load_model open the result directly. int8: weight-only, "
        "per output channel. int4: weight-only, group-wise with scales and zero points. nf4: QLoRA's 4-bit "
        "NormalFloat with double-quantized block scales. smoothquant: int8 weights and per-token int8 "
        "activations after SmoothQuant's calibrated migration (w8a8: the same without smoothing).")
    p.add_argument("--model", required=True, help="model directory (HF layout) or a .gguf file (llama.cpp's format; its blocks decoded to float)")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 (default) or 256")
    p.add_argument("--block-size", type=int, default=None, help="nf4 block size (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="nf4: keep the block scales in fp32")
    p.add_argument("--alpha", type=float, default=None, help="smoothquant migration strength (default 0.5)")
    p.add_argument("--calibration", default="stdlib",
                   help="smoothquant calibration text: a file, directory, .jsonl/.parquet, or 'stdlib' (default)")
    p.add_argument("--calibration-samples", type=int, default=32, help="512-token windows to calibrate on")
    p.add_argument("--lm-head", nargs="?", const="default", default=None, metavar="FORMAT",
                   help="also quantize an untied LM head (default: keep it): int8 under int4 and nf4, the method "
                   "itself otherwise, or FORMAT (int8 or the method, e.g. `--lm-head int4` under int4: the fewest "
                   "bytes). On a small model with a large vocabulary the head is a third of the weights a decode "
                   "step reads, so it speeds decoding, at the cost of the most sensitive layer")
    return {"quantize": cmd_quantize}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_quantize(a: argparse.Namespace) -> None:
    from ember.load import load_model, load_tokenizer
    from ember.errors import EmberError
    from ember.quant.api import check_method, quantize_model, target_linears, weight_bytes
    from ember.quant.calibration import file_calibration, stdlib_calibration
    from ember.quant.io import save_quantized

    check_method(a.method)
    if a.calibration_samples < 1:
        raise EmberError("--calibration-samples must be at least 1.")
    model = load_model(a.model, device="cpu", dtype="float32")
    if getattr(model, "quantization_config", None):
        raise EmberError(f"{a.model} is already quantized ({model.quantization_config['method']}).")
    try:
        tokenizer = load_tokenizer(a.model)
    except EmberError:
        tokenizer = None
    calibration = None
    if a.method == "smoothquant":
        if tokenizer is None:
            raise EmberError(f"SmoothQuant calibrates on text, but {a.model} has no tokenizer.")
        if a.calibration == "stdlib":
            calibration = stdlib_calibration(tokenizer, a.calibration_samples)
        else:
            calibration = file_calibration(a.calibration, tokenizer, a.calibration_samples)
    include_head = a.lm_head is not None
    head_method = None if a.lm_head in (None, "default") else a.lm_head
    names = target_linears(model, include_head)
    linear_before = sum(p.numel() * p.element_size() for n in names for p in model.get_submodule(n).parameters())
    before = weight_bytes(model)
    quantize_model(model, a.method, group_size=a.group_size, block_size=a.block_size,
                   double_quant=False if a.no_double_quant else None, alpha=a.alpha,
                   calibration=calibration, include_lm_head=include_head, lm_head_method=head_method)
    after = weight_bytes(model)
    linear_after = sum(model.get_submodule(n).nbytes() for n in names)
    save_quantized(model, tokenizer, a.out)
    print(f"quantized {len(names)} linear layers with {a.method}")
    if include_head and "lm_head" not in names:
        print("  the LM head is tied to the token embeddings, which stay in full precision: kept as it is")
    print(f"  linear weights: {_mib(linear_before)} -> {_mib(linear_after)} "
          f"({linear_before / max(linear_after, 1):.2f}x smaller)")
    print(f"  all weights:    {_mib(before)} -> {_mib(after)} ({before / max(after, 1):.2f}x smaller)")
    print(f"saved to {a.out}")
