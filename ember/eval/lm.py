"""Language-model backends for evaluation: log-likelihood of continuations, and generation.

`LocalLM` scores in-process. Requests that share a context are packed into ONE row: the
context once, then every continuation after it, each seeing the context and itself but
not its siblings (a tree attention mask, positions restarting after the context). Rows
are sorted by length and batched under a token budget, and the LM head runs only on the
positions that predict a continuation token. `EndpointLM` asks any OpenAI-compatible
server for the same numbers through `/v1/completions` with `echo` and `logprobs`, and
generates through `/v1/completions` or, for chat prompts, `/v1/chat/completions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ember.cpu_inference import prepare_for_inference
from ember.engine import LLM, SamplingParams
from ember.errors import EmberError
from ember.load import is_gguf, load_model, load_tokenizer


@dataclass
class LLResult:
    logprob: float  # sum of log p(continuation token | everything before it)
    is_greedy: bool  # every continuation token is the argmax
    num_tokens: int


def _groups(requests: Sequence[tuple[list[int], list[int]]]) -> dict[tuple[int, ...], list[int]]:
    out: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx:
            raise EmberError("A log-likelihood request needs at least one context token (a BOS/EOS prefix).")
        if not cont:
            raise EmberError("A log-likelihood request needs at least one continuation token.")
        out.setdefault(tuple(ctx), []).append(i)
    return out


class LocalLM:
    """An Ember checkpoint (or model object) scored in this process."""

    def __init__(self, model: Any, tokenizer: Any = None, device: str | None = None, dtype: str | None = None,
                 max_batch_tokens: int = 4096) -> None:
        if isinstance(model, (str,)) or hasattr(model, "__fspath__"):
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
            # Scoring is inference: the CPU kernels serve it (a GGUF file's kept blocks among them).
            model = prepare_for_inference(load_model(model, device=device, dtype=dtype or "float32"))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = model.config.max_position_embeddings
        self.max_batch_tokens = max_batch_tokens
        self.device = model.device

    # --- tokens --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Special-token text (a chat template's `<|im_start|>`) becomes its id, as transformers encodes."""
        return self.tokenizer.encode(text, allowed_special="all")

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation through the model's chat template, ending with the assistant's header."""
        return chat_prompt(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def prefix_token(self) -> int:
        """What rolling windows and empty contexts start with: BOS, else EOS (lm-eval uses EOT)."""
        tok = self.tokenizer
        for t in (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None), self.model.config.eos_token_id):
            if isinstance(t, int):
                return t
        return 0

    # --- scoring ---------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LLResult]:
        results: list[LLResult | None] = [None] * len(requests)
        rows = []
        for ctx, members in _groups(requests).items():
            conts = [requests[i][1] for i in members]
            # Left-truncate the context so the longest continuation still fits in the window.
            keep = max(1, self.max_length - max(len(c) for c in conts) + 1)
            ctx = list(ctx[-keep:])
            conts = [c[-(self.max_length - len(ctx) + 1):] for c in conts]
            rows.append((ctx, conts, members))
        rows.sort(key=lambda r: -(len(r[0]) + sum(len(c) - 1 for c in r[1])))
        batch: list = []
        for row in rows:
            length = len(row[0]) + sum(len(c) - 1 for c in row[1])
            width = max([length] + [len(b[0]) + sum(len(c) - 1 for c in b[1]) for b in batch])
            if batch and width * (len(batch) + 1) > self.max_batch_tokens:
                self._score_batch(batch, results)
                batch = []
            batch.append(row)
        if batch:
            self._score_batch(batch, results)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(self, rows: list, results: list) -> None:
        T = max(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts, _ in rows)
        B = len(rows)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)  # 0 = context, k = k-th continuation, -1 = padding
        gather_b, gather_t, targets, owners = [], [], [], []
        for b, (ctx, conts, members) in enumerate(rows):
            n = len(ctx)
            ids[b, :n] = torch.tensor(ctx)
            pos[b, :n] = torch.arange(n)
            seg[b, :n] = 0
            t = n
            for k, (cont, req) in enumerate(zip(conts, members), start=1):
                body = cont[:-1]  # the last token is only predicted, never fed
                ids[b, t:t + len(body)] = torch.tensor(body, dtype=torch.long)
                pos[b, t:t + len(body)] = torch.arange(n, n + len(body))
                seg[b, t:t + len(body)] = k
                # token j of the continuation is predicted by the hidden state before it
                rows_for = [n - 1] + list(range(t, t + len(body)))
                gather_b += [b] * len(cont)
                gather_t += rows_for
                targets += cont
                owners += [req] * len(cont)
                t += len(body)
            pad = torch.arange(t, T)
            pos[b, t:] = pad  # padding sees only itself (a row with no key would be NaN)
        # a query sees earlier keys of the context and of its own continuation, never a sibling's
        mask = (seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :])
        mask &= (pos[:, :, None] >= pos[:, None, :])
        window = self.model.config.sliding_window
        if window is not None:
            mask &= (pos[:, :, None] - pos[:, None, :]) < window
        eye = torch.eye(T, dtype=torch.bool)[None]
        mask = torch.where((seg == -1)[:, :, None], eye, mask)
        dev = self.device
        hidden = self.model.hidden_states(ids.to(dev), positions=pos.to(dev), attn_mask=mask[:, None].to(dev))
        h = hidden[torch.tensor(gather_b, device=dev), torch.tensor(gather_t, device=dev)]
        logp = torch.log_softmax(self.model.lm_head(h).float(), dim=-1)
        tgt = torch.tensor(targets, device=dev)
        token_lp = logp.gather(1, tgt[:, None])[:, 0].double().cpu()
        greedy = (logp.argmax(-1) == tgt).cpu()
        acc: dict[int, list] = {}
        for i, req in enumerate(owners):
            a = acc.setdefault(req, [0.0, True, 0])
            a[0] += float(token_lp[i])
            a[1] = a[1] and bool(greedy[i])
            a[2] += 1
        for req, (lp, g, n) in acc.items():
            results[req] = LLResult(lp, g, n)

    # --- generation ------------------------------------------------------------------------
    def engine(self) -> Any:
        """The engine over this model, built on first use."""
        if not hasattr(self, "_llm"):
            self._llm = LLM(self.model, self.tokenizer)
        return self._llm

    def sample(self, prompts: list[str | list[dict[str, str]]], until: list[str], max_tokens: int = 256,
               temperature: float = 0.0, seeds: list[int | None] | None = None) -> list[Any]:
        """One engine request per (prompt, seed): `RequestOutput`s in that order, prompt-major.

        A prompt is text, or chat messages that the model's template renders.
        """
        L = self.engine().max_model_len
        budget = min(max_tokens, L // 2)  # lm-eval: the context keeps max_length - max_gen_toks tokens
        add_bos = bool(getattr(self.tokenizer, "add_bos_token", False))
        texts = [self.chat_prompt(p) if isinstance(p, list) else p for p in prompts]
        ids = [self.tokenizer.encode(p, allowed_special="all", add_bos=add_bos)[-(L - budget):] for p in texts]
        seeds = seeds or [None]
        reqs = [i for i in ids for _ in seeds]
        params = [SamplingParams(temperature=temperature, max_tokens=max(1, min(max_tokens, L - len(i))),
                                 stop=[u for u in until if u], seed=s) for i in ids for s in seeds]
        return self.engine().generate(reqs, params)

    def generate(self, prompts: list[str | list[dict[str, str]]], until: list[str], max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        outs = self.sample(prompts, until, max_tokens, temperature, [seed])
        return [o.outputs[0].text for o in outs]


class EndpointLM:
    """Any OpenAI-compatible server.

    Log-likelihood tasks need `/v1/completions` with `echo` and `logprobs` and a `/tokenize`
    route (Ember's and vLLM's servers have them). Generation tasks need only a completions or
    a chat endpoint: with `chat=True` (`--apply-chat-template`) prompts go to
    `/v1/chat/completions` as messages and the server renders its own template, so servers
    that offer only chat (llama-server's chat mode, hosted APIs) can be evaluated. A local
    `tokenizer` renders the template on this side instead, which log-likelihood tasks need.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 batch_size: int = 32, timeout: float = 300.0, tokenizer: Any = None) -> None:
        try:  # httpx is needed only to evaluate a server, so a missing one fails here, not on import
            import httpx
        except ImportError:
            raise EmberError("--endpoint needs the httpx package (pip install httpx).") from None

        self.base = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)
        self.model = model
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.info = self._optional_get("/tokenizer_info")  # Ember's and vLLM's; {} where a server has none
        # A scored prompt is context + continuation, and the server must still fit one token after it.
        self.max_length = int(self.info.get("max_model_len") or 2048) - 2
        self._prefix = next((self.info[k] for k in ("bos_token_id", "eos_token_id") if self.info.get(k) is not None),
                            None)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.model:
            body = {"model": self.model, **body}
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            raise EmberError(f"The endpoint answered {r.status_code} to {path}: {r.text[:300]}")
        return r.json()

    def _optional_get(self, path: str) -> dict[str, Any]:
        r = self.http.get(path)
        return r.json() if r.status_code == 200 else {}

    def _needs_scoring_routes(self, what: str) -> EmberError:
        return EmberError(f"{what} needs a completions endpoint with echo and logprobs and a /tokenize route "
                          f"(Ember's and vLLM's servers have them); {self.base} has no /tokenize. Evaluate "
                          "generation tasks here (with --apply-chat-template for a chat-only server), or score "
                          "log-likelihoods with --model.")

    @property
    def prefix_token(self) -> int:
        if self._prefix is None:
            raise self._needs_scoring_routes("Scoring a continuation with no context")
        return int(self._prefix)

    def encode(self, text: str) -> list[int]:
        r = self.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                              **({"model": self.model} if self.model else {})})
        if r.status_code == 404:
            raise self._needs_scoring_routes("A log-likelihood task")
        if r.status_code != 200:
            raise EmberError(f"The endpoint answered {r.status_code} to /tokenize: {r.text[:300]}")
        return r.json()["tokens"]

    def decode(self, ids: list[int]) -> str:
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer is None:
            raise EmberError("Scoring log-likelihoods with --apply-chat-template on an endpoint needs the model's "
                             "chat template on this side: add --tokenizer DIR|FILE.gguf (the served model's).")
        return chat_prompt(self.tokenizer, messages)

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LLResult]:
        out = []
        for s in range(0, len(requests), self.batch_size):
            chunk = requests[s:s + self.batch_size]
            prompts = [(list(c) + list(t))[-self.max_length:] for c, t in chunk]
            r = self.http.post("/v1/completions", json={"prompt": prompts, "echo": True, "max_tokens": 0,
                                                        "logprobs": 1, "temperature": 0,
                                                        **({"model": self.model} if self.model else {})})
            if r.status_code != 200:
                raise EmberError(f"Log-likelihood tasks need /v1/completions with echo and logprobs, and "
                                 f"{self.base} answered {r.status_code}: {r.text[:300]}")
            reply = r.json()
            for (ctx, cont), choice in zip(chunk, sorted(reply["choices"], key=lambda c: c["index"])):
                lp = choice.get("logprobs") or {}
                if not lp.get("token_logprobs") or not lp.get("top_logprobs"):
                    raise EmberError(f"{self.base} returned no prompt logprobs for echo=true; log-likelihood tasks "
                                     "need a server that scores the prompt (Ember's, vLLM's).")
                n = len(cont)
                toks = lp["token_logprobs"][-n:]
                tops = lp["top_logprobs"][-n:]
                greedy = all(abs(max(top.values()) - v) < 1e-9 for v, top in zip(toks, tops))
                out.append(LLResult(float(sum(toks)), greedy, n))
        return out

    def generate(self, prompts: list[str | list[dict[str, str]]], until: list[str], max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        out = []
        for p in prompts:
            body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
            if until:
                body["stop"] = [u for u in until if u][:4]
            if seed is not None:
                body["seed"] = seed
            if isinstance(p, list) and self.tokenizer is None:  # the server renders its own template
                out.append(self._post("/v1/chat/completions", {"messages": p, **body})["choices"][0]["message"]
                           .get("content") or "")
            else:
                prompt = self.chat_prompt(p) if isinstance(p, list) else p
                out.append(self._post("/v1/completions", {"prompt": prompt, **body})["choices"][0]["text"])
        return out


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """What lm-eval's `apply_chat_template` gives: the template's text, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise EmberError("--apply-chat-template needs a model with a chat template; this tokenizer has none.")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def open_lm(model: str | None = None, endpoint: str | None = None, **kwargs: Any) -> LocalLM | EndpointLM:
    """`--model DIR` or `--endpoint URL`, exactly one."""
    if (model is None) == (endpoint is None):
        raise EmberError("Give exactly one of --model DIR or --endpoint URL.")
    if endpoint is not None:
        tok = load_tokenizer(kwargs["tokenizer"]) if kwargs.get("tokenizer") else None
        return EndpointLM(endpoint, model=kwargs.get("served_model"), api_key=kwargs.get("api_key"), tokenizer=tok)
    if not is_gguf(model) and not (Path(model) / "config.json").exists():
        raise EmberError(f"No model at {model} (config.json is missing).")
    return LocalLM(Path(model), device=kwargs.get("device"), dtype=kwargs.get("dtype"))
