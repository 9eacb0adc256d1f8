"""`LLM`: the offline engine API (vLLM's shape), and the step loop behind it.

    llm = LLM("runs/quickstart/model", num_kv_blocks=256)
    outs = llm.generate(["def add(a, b):", "import os"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)

Each `step()`: schedule (token budget, preemption), run the model once on the flat batch,
sample for every sequence whose tokens are all computed, detokenize, check stops, free
the blocks of finished sequences.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence as Seq

import torch

from ember.engine.block_manager import BlockManager
from ember.engine.model_runner import ModelRunner
from ember.engine.paged_cache import KVPool
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Sequence
from ember.engine.speculative import can_speculate
from ember.errors import EmberError
from ember.generation import check_prompt_ids, eos_ids, find_stop
from ember.model import CausalLM
from ember.sampling import SamplingParams
from ember.tokenizer import IncrementalDecoder


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = True


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    kv_cache_memory: int | None = None  # bytes for the KV pool (default: 1 GiB on CPU, 90% of free GPU memory)
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True  # off: a prompt is computed in one step, stalling decodes
    max_model_len: int | None = None
    # Speculative decoding: "ngram" (prompt lookup), "draft:DIR", or a CausalLM to draft with.
    speculative: Any = None
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    # A draft model's guesses for a sequence running alone come from a compiled one-token step
    # on a static cache (see DraftProposer): the first use compiles for about half a minute.
    compile_draft: bool = False
    # CPU fp32: multiply through oneDNN-packed copies of the linear weights (faster for
    # batches of rows; costs a second copy of those weights in memory). None: on when the
    # engine loaded the model itself, off for a model object passed in, which its owner may
    # be training (a fused optimizer step changes weights without PyTorch noticing).
    pack_weights: bool | None = None


def parse_bytes(value: int | str | None) -> int | None:
    """'2GB', '512MiB', '1e9' or an int -> bytes."""
    if value is None or isinstance(value, int):
        return value
    s = str(value).strip().upper().replace("IB", "B")
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    return int(float(s))


class LLM:
    def __init__(self, model: str | Path | CausalLM, tokenizer: Any = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, quantization: str | None = None,
                 adapter: str | Path | None = None, **engine_args: Any) -> None:
        from ember.load import load_model
        from ember.tokenizer import load_tokenizer

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
            self.model = model.eval()
            self.tokenizer = tokenizer
        else:
            self.model = load_model(model, device=device, dtype=dtype, quantization=quantization, adapter=adapter)
            # A directory without tokenizer files still serves token-id prompts.
            has_tokenizer = (Path(model) / "tokenizer.json").exists()
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model) if has_tokenizer else None
        mcfg = self.model.config
        weight = self.model.model.embed_tokens.weight  # device and dtype (the head may be quantized)
        self.max_model_len = min(cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        if cfg.block_size < 1:
            raise EmberError("block_size must be at least 1.")
        num_blocks = cfg.num_kv_blocks or self._blocks_from_memory(weight.device, weight.dtype)
        if num_blocks * cfg.block_size < self.max_model_len and cfg.num_kv_blocks is None:
            num_blocks = -(-self.max_model_len // cfg.block_size)
        self.pool = KVPool(mcfg, num_blocks, cfg.block_size, weight.device, weight.dtype)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.pack_weights = cfg.pack_weights if cfg.pack_weights is not None else not isinstance(model, CausalLM)
        self.runner = ModelRunner(self.model, self.pool, self.pack_weights)
        if weight.device.type == "cpu":
            from ember import gemv

            gemv.available()  # build the one-row kernel now (once per machine), not inside a request
        self.proposer = self._make_proposer(cfg, weight)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                   cfg.enable_chunked_prefill, lookahead=self._lookahead if self.proposer else None)
        self._requests: dict[str, list[Sequence]] = {}
        self._prompts: dict[str, str | None] = {}
        # n > 1: the siblings of a request wait until the first has computed the prompt, then
        # start from its blocks through the prefix cache (only the partial last block is redone).
        self._forks: dict[int, tuple[Sequence, list[Sequence]]] = {}
        self._counter = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "spec_proposed_tokens": 0,
                      "spec_accepted_tokens": 0, "spec_verify_steps": 0}

    def _make_proposer(self, cfg: EngineConfig, weight: torch.Tensor) -> Any:
        from ember.engine.speculative import DraftProposer, NgramProposer

        spec = cfg.speculative
        if spec is None:
            return None
        if cfg.num_speculative_tokens < 1:
            raise EmberError("num_speculative_tokens must be at least 1.")
        if spec == "ngram":
            if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
                raise EmberError("Prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max.")
            return NgramProposer(cfg.prompt_lookup_max, cfg.prompt_lookup_min)
        pack = self.pack_weights
        if isinstance(spec, CausalLM):
            draft = spec.to(device=weight.device, dtype=weight.dtype)
            pack = cfg.pack_weights is True  # the caller's own model, as above
        elif isinstance(spec, str) and spec.startswith("draft:"):
            from ember.load import load_model

            draft = load_model(spec[len("draft:"):], device=weight.device, dtype=weight.dtype)
        else:
            raise EmberError(f"Unknown speculative method {spec!r}; use 'ngram' or 'draft:MODEL_DIR'.")
        if draft.config.vocab_size != self.model.config.vocab_size:
            raise EmberError(f"The draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                             f"({self.model.config.vocab_size}); a draft must share the target's tokenizer.")
        return DraftProposer(draft, self.pool, pack, compile_steps=cfg.compile_draft, max_len=self.max_model_len)

    def _lookahead(self, seq: Sequence) -> int:
        """Guessed tokens worth verifying for this sequence: within its budget of new tokens and the context."""
        if not seq.speculate:
            return 0
        room = min(seq.params.max_tokens - len(seq.output_ids), self.max_model_len - seq.num_tokens + 1) - 1
        return max(0, min(self.config.num_speculative_tokens, room))

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted guessed tokens / proposed ones (0 when nothing was proposed)."""
        return self.stats["spec_accepted_tokens"] / max(1, self.stats["spec_proposed_tokens"])

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verifying step produced on average: accepted guesses + the target's own."""
        steps = self.stats["spec_verify_steps"]
        return (self.stats["spec_accepted_tokens"] + steps) / steps if steps else 0.0

    def _blocks_from_memory(self, device: torch.device, dtype: torch.dtype) -> int:
        per_block = KVPool.bytes_per_block(self.model.config, self.config.block_size, dtype)
        budget = parse_bytes(self.config.kv_cache_memory)
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * 0.9)
            else:
                budget = 1 << 30
        blocks = budget // per_block
        if self.config.kv_cache_memory is None:  # never more than every sequence at full length needs
            blocks = min(blocks, self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size))
        if blocks < 1:
            raise EmberError(f"kv_cache_memory {budget} bytes is smaller than one KV block ({per_block} bytes).")
        return int(blocks)

    # --- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id or str(next(self._counter))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EmberError("A text prompt needs a tokenizer; pass token ids instead.")
            ids = self.tokenizer.encode(prompt, add_bos=bool(getattr(self.tokenizer, "add_bos_token", False)))
            text = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        check_prompt_ids(ids, self.model.config.vocab_size, self.max_model_len)
        need = -(-min(len(ids) + params.max_tokens, self.max_model_len) // self.config.block_size)
        if need > self.block_manager.num_blocks:
            raise EmberError(f"One request needs {need} KV blocks but the pool has {self.block_manager.num_blocks}; "
                             "raise num_kv_blocks or kv_cache_memory, or lower max_tokens.")
        # EOS ends a completion unless ignore_eos; stop_token_ids always do.
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_ids(self.model, self.tokenizer)))
        seqs = [Sequence(list(ids), params, request_id=request_id, index=i, stop_ids=stop_ids)
                for i in range(params.n)]
        speculate = self.proposer is not None and can_speculate(params)
        for seq in seqs:
            seq.speculate = speculate
            if self.tokenizer is not None:
                seq.decoder = IncrementalDecoder(self.tokenizer)
        fork = len(seqs) > 1 and self.config.enable_prefix_caching and params.prompt_logprobs is None
        for seq in seqs[:1] if fork else seqs:
            self.scheduler.add(seq)
        if fork:
            self._forks[seqs[0].seq_id] = (seqs[0], seqs[1:])
        self._requests[request_id] = seqs
        self._prompts[request_id] = text
        self.stats["prompt_tokens"] += len(ids) * params.n
        return request_id

    def abort(self, request_id: str) -> None:
        for seq in self._requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        self._prompts.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass; returns a snapshot of every request that made progress in it.

        A snapshot's `finished` says whether the request is done; streaming callers send
        the text that grew since their last snapshot (see `ember.generation.stop_holdback`).
        """
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.waiting:
                raise EmberError("The KV pool cannot hold the next request; raise num_kv_blocks.")
            return []
        if self.proposer is not None:
            scheduled = self._propose(scheduled)
        ready, logits, counts = self.runner.run(scheduled)
        self.stats["steps"] += 1
        ready_ids = {seq.seq_id for seq in ready}
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if seq.seq_id not in ready_ids:  # a prefill chunk: its full blocks can be shared now
                self.block_manager.commit(seq)
        progressed: dict[str, None] = {}
        sampled = self.runner.sample_all(ready, logits, counts) if ready else []
        for seq, (tokens, lps) in zip(ready, sampled):
            if seq.spec_ids:
                self._settle_speculation(seq, accepted=len(tokens) - 1)
            reason = None
            for token, lp in zip(tokens, lps):
                seq.append(token)
                seq.token_times.append(time.perf_counter())
                if lp is not None:
                    seq.logprobs.append(lp)
                self.stats["generated_tokens"] += 1
                reason = self._check_stop(seq, token)
                if reason:  # tokens verified after a stop are dropped
                    break
            seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            self.block_manager.commit(seq)
            if reason:
                self.scheduler.finish(seq, reason)
            progressed[seq.request_id] = None
        if self._forks:
            self._release_forks()
        outputs = []
        for request_id in progressed:
            seqs = self._requests[request_id]
            outputs.append(self._output(request_id, finished=all(s.finished for s in seqs)))
        return outputs

    def _release_forks(self) -> None:
        """Queue the siblings of sequences whose prompt is now computed (and cached), first in line."""
        for parent_id, (parent, siblings) in list(self._forks.items()):
            if parent.num_computed_tokens >= parent.num_prompt_tokens or parent.finished:
                del self._forks[parent_id]
                self.scheduler.waiting.extendleft(reversed([s for s in siblings if not s.finished]))

    def _propose(self, scheduled: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Fill the lookahead slots the scheduler gave decoding sequences with guessed tokens."""
        from ember.engine.speculative import NgramProposer

        wanted = [(seq, n - seq.num_uncomputed) for seq, n in scheduled if n > seq.num_uncomputed]
        if not wanted:
            return scheduled
        if isinstance(self.proposer, NgramProposer):
            for seq, k in wanted:
                seq.spec_ids = self.proposer.propose(seq.token_ids, k)
        else:
            drafts, dists = self.proposer.propose([seq for seq, _ in wanted], [k for _, k in wanted])
            for (seq, _), draft, dist in zip(wanted, drafts, dists):
                seq.spec_ids, seq.spec_probs = draft, dist
        for seq, _ in wanted:
            self.stats["spec_proposed_tokens"] += len(seq.spec_ids)
            self.stats["spec_verify_steps"] += bool(seq.spec_ids)
        # Each sequence computes its newest token plus its guesses (fewer than its slots if the
        # proposer found less); unused slots stay allocated for the tokens still to come.
        return [(seq, seq.num_uncomputed if n > seq.num_uncomputed else n) for seq, n in scheduled]

    def _settle_speculation(self, seq: Sequence, accepted: int) -> None:
        """Forget the KV of rejected guesses: they are simply overwritten later."""
        seq.num_computed_tokens -= len(seq.spec_ids) - accepted
        seq.draft_computed = min(seq.draft_computed, seq.num_computed_tokens)
        self.stats["spec_accepted_tokens"] += accepted
        seq.spec_ids, seq.spec_probs = [], None

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.decoder is not None:
            if token not in seq.stop_ids:
                seq.text += seq.decoder.push(token)
            if params.stop:
                cut = find_stop(seq.text, params.stop)
                if cut is not None:
                    seq.text = seq.text[:cut]
                    return "stop"
        if token in seq.stop_ids:  # never before min_tokens: the runner masks them until then
            return "stop"
        if len(seq.output_ids) >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, request_id: str, finished: bool) -> RequestOutput:
        seqs = self._requests[request_id]
        prompt = self._prompts[request_id]
        if finished:
            del self._requests[request_id], self._prompts[request_id]
            for s in seqs:
                if s.decoder is not None:
                    s.text += s.decoder.flush()
                    cut = find_stop(s.text, s.params.stop)
                    if cut is not None:
                        s.text = s.text[:cut]
        outs = []
        for s in seqs:
            ids = list(s.output_ids)
            if s.finish_reason == "stop" and ids and ids[-1] in s.stop_ids:
                ids.pop()  # the stop token itself is not part of the completion
            logprobs = s.logprobs[:len(ids)] if s.params.logprobs is not None else None
            outs.append(CompletionOutput(s.index, s.text, ids, s.finish_reason, logprobs))
        first = seqs[0]
        return RequestOutput(request_id, prompt, first.prompt_ids, outs,
                             prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None
                             else None, finished=finished)

    # --- offline API -------------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise EmberError(f"Got {len(params)} sampling params for {len(prompts)} prompts.")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        from tqdm.auto import tqdm
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
