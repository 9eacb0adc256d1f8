"""`LLM`: the offline engine API (vLLM's shape) over the engine core and the output processor.

    llm = LLM("runs/quickstart/model", num_kv_blocks=256)
    outs = llm.generate(["def add(a, b):", "import os"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)

`add_request` checks and tokenizes a prompt and hands its sequences to both halves. Each
`step()`: the core (`ember.engine.core`) schedules, runs the model once on the flat batch
and samples the next tokens; the output processor (`ember.engine.output_processor`)
detokenizes them, applies stop strings and returns each request's output (whole, delta or
final, as its `output_kind` asks).

The KV pool (`ember.engine.pool_size`): by default `max_model_len` is the model's context (cut
to fit half the available memory, not below 4096 tokens) and the pool holds `max_num_seqs`
sequences of it, capped by `kv_cache_memory` (default 256 MiB on CPU, 90% of free GPU memory),
never under one full-length sequence. `llm.pool_size.describe()` says what was chosen.

LoRA adapters served unmerged (`ember.lora.batched`): `LLM(base, lora_adapters={"sql": "runs/sql/adapter"})`
puts adapter slots on the base's layers; a request names its adapter (`generate(..., lora_name="sql")`)
and requests of different adapters, and of none, share each forward. `load_lora` and `unload_lora`
change the adapters while the engine runs (an adapter with unfinished requests is not unloaded).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence as Seq

import torch
from tqdm.auto import tqdm

from ember.cpu_inference import prepare_for_inference
from ember.engine.block_manager import BlockManager
from ember.engine.core import EngineCore, Proposer
from ember.engine.output_processor import CompletionOutput, OutputProcessor, RequestMetrics, RequestOutput
from ember.engine.paged_cache import KVPool
from ember.engine.pool_size import available_memory, bytes_per_token, default_max_model_len, size_pool
from ember.engine.sequence import Sequence, SpecState
from ember.engine.speculative import DraftProposer, NgramProposer, can_speculate
from ember.errors import EmberError
from ember.gguf import forget_parsed_files
from ember.load import is_gguf, load_model, load_tokenizer
from ember.lora.batched import AdapterInUse, LoadedAdapter, LoraSlots, attach_lora_slots
from ember.lora.peft_format import read_adapter
from ember.model import CausalLM
from ember.request import check_prompt_ids, stop_token_ids
from ember.sampling import PenaltyTracker, SamplingParams, seeded_generator
from ember.structured import compile_constraint

__all__ = ["LLM", "EngineConfig", "RequestOutput", "CompletionOutput", "RequestMetrics", "parse_bytes"]


@dataclass
class EngineConfig:
    block_size: int = 16
    # The KV pool: max_num_seqs sequences of max_model_len tokens, capped by kv_cache_memory (bytes,
    # or '512MB'; default 256 MiB on CPU, 90% of free GPU memory), never under one full-length
    # sequence; num_kv_blocks sets it directly. The whole rule: ember.engine.pool_size.
    num_kv_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True  # off: a prompt is computed in one step, stalling decodes
    max_model_len: int | None = None  # default: the model's context, fitted to memory (see pool_size)
    # Speculative decoding: "ngram" (prompt lookup), "draft:DIR", or a CausalLM to draft with.
    speculative: Any = None
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    # A draft model's guesses for a sequence running alone come from a compiled one-token step
    # on a static cache (see DraftProposer): the first use compiles for about half a minute.
    compile_draft: bool = False
    # LoRA adapters served unmerged (LLM(lora_adapters=...)): slots for this many at once, each of
    # rank up to max_lora_rank (both raised to fit the adapters given at start).
    max_loras: int = 4
    max_lora_rank: int = 16


def parse_bytes(value: int | str | None) -> int | None:
    """'2GB', '512MiB', '1e9' or an int -> bytes."""
    if value is None or isinstance(value, int):
        return value
    s = str(value).strip().upper().replace("IB", "B")
    try:
        for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
            if s.endswith(unit):
                return int(float(s[:-len(unit)]) * mult)
        return int(float(s))
    except ValueError:
        raise EmberError(f"Cannot read {value!r} as a size; write e.g. 512MB, 2GB or a number of bytes.") from None


class LLM:
    def __init__(self, model: str | Path | CausalLM, tokenizer: Any = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, quantization: str | None = None,
                 adapter: str | Path | None = None, lora_adapters: dict[str, str | Path] | None = None,
                 **engine_args: Any) -> None:
        known = EngineConfig.__dataclass_fields__
        unknown = set(engine_args) - set(known)
        if unknown:
            raise EmberError(f"Unknown engine argument(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(known)}.")
        self.config = cfg = EngineConfig(**engine_args)
        if isinstance(model, CausalLM):
            if quantization is not None or adapter is not None:
                raise EmberError("quantization= and adapter= apply when LLM loads a model directory; for a model "
                                 "object, use ember.quant.quantize_model or ember.lora.load_adapter first.")
            # The caller's own model (it may be training it): used as it is, never swapped.
            self.model = model.eval()
            self.tokenizer = tokenizer
        else:
            self.model = prepare_for_inference(load_model(model, device=device, dtype=dtype,
                                                          quantization=quantization, adapter=adapter).eval())
            # A directory without tokenizer files still serves token-id prompts.
            has_tokenizer = is_gguf(model) or (Path(model) / "tokenizer.json").exists()
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model) if has_tokenizer else None
            if is_gguf(model):
                forget_parsed_files()  # the weights are copied out and the tokenizer built: free the file's pages
        self.lora = self._attach_lora(model, lora_adapters, cfg)
        mcfg = self.model.config
        self.device, dtype = self.model.device, self.model.dtype
        context = mcfg.max_position_embeddings
        per_token = bytes_per_token(mcfg, dtype)
        if cfg.max_model_len is not None:
            if cfg.max_model_len < 1:
                raise EmberError("max_model_len must be at least 1.")
            self.max_model_len = min(cfg.max_model_len, context)
        else:
            self.max_model_len = default_max_model_len(context, per_token, available_memory(self.device))
        self.pool_size = size_pool(per_token, cfg.block_size, self.max_model_len, cfg.max_num_seqs,
                                   parse_bytes(cfg.kv_cache_memory), cfg.num_kv_blocks, self.device)
        num_blocks = self.pool_size.num_blocks
        self.pool = KVPool(mcfg, num_blocks, cfg.block_size, self.device, dtype)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.core = EngineCore(self.model, self.pool, self.block_manager, self.max_model_len,
                               cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.enable_chunked_prefill,
                               self._make_proposer(cfg), cfg.num_speculative_tokens)
        self.output_processor = OutputProcessor(self.tokenizer, self.core.stop_at)
        self._counter = itertools.count()

    # --- LoRA adapters served unmerged (ember.lora.batched) -------------------------------------------
    def _attach_lora(self, model: Any, lora_adapters: dict[str, str | Path] | None,
                     cfg: EngineConfig) -> LoraSlots | None:
        """Adapter slots on the model and the adapters given at start in them; None: no slots (the
        model's layers stay as they are). An empty dict makes slots for adapters loaded later."""
        self._lora_lock = threading.RLock()
        if lora_adapters is None:
            return None
        if isinstance(model, CausalLM):
            raise EmberError("lora_adapters= applies when LLM loads a model directory or GGUF file; a model "
                             "object is used as it is.")
        ranks = [read_adapter(path)[0].r for path in lora_adapters.values()]
        slots = attach_lora_slots(self.model, max(cfg.max_loras, len(lora_adapters)),
                                  max([cfg.max_lora_rank, *ranks]))
        for name, path in lora_adapters.items():
            slots.load(name, path)
        self._lora_lock = slots.lock
        return slots

    @property
    def lora_adapters(self) -> dict[str, LoadedAdapter]:
        """The adapters loaded now, by name."""
        return dict(self.lora.adapters) if self.lora is not None else {}

    def load_lora(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load the PEFT-format adapter in `path` into a free slot; requests then pick it by `name`.
        Safe from another thread than the one stepping the engine."""
        if self.lora is None:
            raise EmberError("This engine has no adapter slots; create it with lora_adapters= (e.g. {}).")
        return self.lora.load(name, path)

    def unload_lora(self, name: str) -> None:
        """Free an adapter's slot; refused (AdapterInUse) while a request of it is unfinished.
        Safe from another thread than the one stepping the engine."""
        if self.lora is None:
            raise EmberError("This engine has no adapter slots.")
        with self._lora_lock:
            adapter_id = self.lora.get(name).id
            users = [s for s in self._live_sequences() if s.lora_id == adapter_id]
            if users:
                raise AdapterInUse(f"The adapter '{name}' has {len({s.request_id for s in users})} unfinished "
                                   "request(s); unload it when they finish.")
            self.lora.unload(name)

    def _live_sequences(self) -> list[Sequence]:
        siblings = [s for _, rest in self.core._forks.values() for s in rest]
        return [*self.scheduler.running, *self.scheduler.waiting, *siblings]

    def _make_proposer(self, cfg: EngineConfig) -> Proposer | None:
        spec = cfg.speculative
        if spec is None:
            return None
        if cfg.num_speculative_tokens < 1:
            raise EmberError("num_speculative_tokens must be at least 1.")
        if spec == "ngram":
            if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
                raise EmberError("Prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max.")
            return NgramProposer(cfg.prompt_lookup_max, cfg.prompt_lookup_min)
        if isinstance(spec, CausalLM):
            draft = spec.to(device=self.device, dtype=self.model.dtype)  # the caller's own model, as above
        elif isinstance(spec, str) and spec.startswith("draft:"):
            draft = prepare_for_inference(load_model(spec[len("draft:"):], device=self.device,
                                                     dtype=self.model.dtype).eval())
        else:
            raise EmberError(f"Unknown speculative method {spec!r}; use 'ngram' or 'draft:MODEL_DIR'.")
        if draft.config.vocab_size != self.model.config.vocab_size:
            raise EmberError(f"The draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                             f"({self.model.config.vocab_size}); a draft must share the target's tokenizer.")
        return DraftProposer(draft, self.pool, compile_steps=cfg.compile_draft, max_len=self.max_model_len)

    # --- the core's parts, for callers that inspect them ----------------------------------------
    @property
    def scheduler(self) -> Any:
        return self.core.scheduler

    @property
    def runner(self) -> Any:
        return self.core.runner

    @property
    def proposer(self) -> Proposer | None:
        return self.core.proposer

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since the engine started: steps, prompt/generated tokens, speculation."""
        return self.core.stats

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted guessed tokens / proposed ones (0 when nothing was proposed)."""
        return self.stats["spec_accepted_tokens"] / max(1, self.stats["spec_proposed_tokens"])

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verifying step produced on average: accepted guesses + the target's own."""
        steps = self.stats["spec_verify_steps"]
        return (self.stats["spec_accepted_tokens"] + steps) / steps if steps else 0.0

    # --- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    lora_name: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id. `arrival_time`
        (perf_counter()) is when it reached the caller, for its time-to-first-token. `lora_name`:
        a loaded adapter to run it with (None: the base)."""
        with self._lora_lock:  # an adapter is not unloaded between the name's check and the queueing
            return self._add_request(prompt, params, request_id, arrival_time, lora_name)

    def _add_request(self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None,
                     arrival_time: float | None, lora_name: str | None) -> str:
        lora_id = 0
        if lora_name is not None:
            if self.lora is None:
                raise EmberError(f"lora_name={lora_name!r} needs an engine with adapter slots (lora_adapters=).")
            lora_id = self.lora.get(lora_name).id
        params = params or SamplingParams()
        request_id = request_id or str(next(self._counter))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EmberError("A text prompt needs a tokenizer; pass token ids instead.")
            # A raw prompt's special-token text becomes the special ids, as transformers encodes it.
            ids = self.tokenizer.encode(prompt, allowed_special="all",
                                        add_bos=bool(getattr(self.tokenizer, "add_bos_token", False)))
            text = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        check_prompt_ids(ids, self.model.config.vocab_size, self.max_model_len)
        need = -(-min(len(ids) + params.max_tokens, self.max_model_len) // self.config.block_size)
        if need > self.block_manager.num_blocks:
            raise EmberError(f"This request needs {need} KV blocks ({len(ids)} prompt + up to {params.max_tokens} new "
                             f"tokens) but the pool holds {self.block_manager.num_blocks} blocks of "
                             f"{self.config.block_size}; raise num_kv_blocks, or lower max_tokens.")
        stop_ids = stop_token_ids(params, self.model, self.tokenizer)
        speculate = self.proposer is not None and can_speculate(params)
        vocab = self.model.config.vocab_size
        outside = [t for t in (params.logit_bias or {}) if t >= vocab]
        if outside:
            raise EmberError(f"logit_bias names token id {outside[0]}, outside this model's vocabulary of {vocab}.")
        seqs = [Sequence(list(ids), params, request_id=request_id, index=i, stop_ids=stop_ids,
                         generator=seeded_generator(params.seed + i, self.device) if params.seed is not None else None,
                         penalties=PenaltyTracker(params, ids, vocab, self.device) if params.has_penalties else None,
                         spec=SpecState() if speculate else None, lora_id=lora_id,
                         # compiled once per constraint (cached); each sequence gets its own matcher
                         grammar=compile_constraint(params.structured, self.tokenizer, vocab)
                         if params.structured is not None else None)
                for i in range(params.n)]
        fork = len(seqs) > 1 and self.config.enable_prefix_caching and params.prompt_logprobs is None
        self.output_processor.add(request_id, text, seqs, arrival_time or time.perf_counter())
        self.core.add(seqs, fork)
        return request_id

    def abort(self, request_id: str) -> None:
        for seq in self.output_processor.abort(request_id):
            self.core.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass; returns an output for every request that made progress in it (in
        its `output_kind`). An output's `finished` says whether the request is done."""
        with self._lora_lock:  # adapters are not loaded or unloaded in the middle of a forward
            updates = self.core.step()
        return self.output_processor.process(updates, time.perf_counter())

    # --- offline API -------------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_name: str | None | Seq[str | None] = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order (each request's
        final output: generate asks for nothing in between, whatever `output_kind` says).
        `lora_name`: the adapter of every prompt, or a list with one per prompt (None: the base)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise EmberError(f"Got {len(params)} sampling params for {len(prompts)} prompts.")
        loras = list(lora_name) if isinstance(lora_name, (list, tuple)) else [lora_name] * len(prompts)
        if len(loras) != len(prompts):
            raise EmberError(f"Got {len(loras)} adapter names for {len(prompts)} prompts.")
        ids = [self.add_request(p, dataclasses.replace(sp, output_kind="final"), lora_name=lo)
               for p, sp, lo in zip(prompts, params, loras)]
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), disable=not use_tqdm, unit="req")
        t0 = time.perf_counter()
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        self.stats["elapsed_s"] = time.perf_counter() - t0
        return [done[i] for i in ids]
