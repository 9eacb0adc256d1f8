"""Evaluation: perplexity and log-likelihoods against `transformers` and lm-evaluation-harness,
task YAMLs, metrics, and the statistics of pairwise comparison."""

from __future__ import annotations

import json
import math
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ember.eval import metrics as M
from ember.eval.lm import LocalLM
from ember.eval.perplexity import rolling_windows, text_perplexity
from ember.eval.tasks import TaskConfig, encode_pair, run_task

from conftest import need_module, shared_data

CONTEXT = 128
TEXT = ("Perplexity is the exponential of the average negative log-likelihood per token. "
        "A rolling window keeps each prediction within the model's context; 3.14 and 42 are numbers.\n") * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from ember.checkpoint import save_pretrained
    from ember.config import preset
    from ember.model import CausalLM
    from ember.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT, "Question: what is it?\nAnswer: a test corpus for evaluation."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_position_embeddings=CONTEXT)
    path = tmp_path_factory.mktemp("eval") / "model"
    save_pretrained(CausalLM(config), tok, path)
    return path


@pytest.fixture(scope="module")
def lm(model_dir) -> LocalLM:
    return LocalLM(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = need_module("transformers", "the logits peer")
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# --- perplexity ------------------------------------------------------------------------------
@pytest.mark.parametrize("window, stride", [(8, 8), (10, 7), (32, 5)])
def test_rolling_windows_score_every_token_once_within_the_window(window, stride):
    tokens = list(range(100, 157))
    wins = rolling_windows(tokens, window, stride, prefix_token=1)
    assert sum((w.targets for w in wins), []) == tokens
    for w in wins:
        assert len(w.context) + len(w.targets) - 1 <= window  # the model input fits
        assert w.context, "every window has something to predict from"
    assert wins[0].context == [1] and len(wins[0].targets) == window  # lm-eval's first window


@pytest.mark.parametrize("stride", [None, 24])
def test_perplexity_equals_transformers_on_the_same_windows(lm, hf, stride):
    """Each window through `transformers` on its own; NLL summed over the scored tokens."""
    window = 40
    ours = text_perplexity(lm, TEXT, window=window, stride=stride)
    ids = lm.encode(TEXT)
    nll, n = 0.0, 0
    for w in rolling_windows(ids, window, stride, lm.prefix_token):
        full = w.context + w.targets
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([full[:-1]])).logits[0].double(), -1)
        k = len(w.targets)
        nll -= float(logp[-k:].gather(1, torch.tensor(w.targets)[:, None]).sum())
        n += k
    assert ours.tokens == n == len(ids)
    # Both run fp32 forwards of the same weights with different kernels: each token's log-prob (|x| ~ 5)
    # differs by ~1e-6 relative (fp32 sums over 64-wide rows), a random walk over ~60 tokens gives
    # ~1e-7 relative on the summed NLL; 1e-6 leaves a margin of ~10x, and a wrong window or a
    # double-counted token moves the NLL by a whole token's log-prob, ~2% of it.
    assert ours.nll == pytest.approx(nll, rel=1e-6)
    assert ours.perplexity == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert ours.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-6)


def test_cli_perplexity_prints_one_json_object(model_dir, tmp_path, capsys):
    from ember.cli import main

    f = tmp_path / "a.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "perplexity", str(f), "--model", str(model_dir), "--window", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["overall"]["tokens"] > 0 and res["window"] == 32
    assert main(["eval", "perplexity", str(tmp_path / "missing.txt"), "--model", str(model_dir)]) == 1
    assert capsys.readouterr().err.startswith("error: No such text file")


# --- log-likelihood scoring ------------------------------------------------------------------
def test_shared_context_packing_equals_one_forward_per_request(lm, hf):
    """Siblings packed after one context (tree mask) score as if each ran alone."""
    rng = random.Random(0)
    reqs = []
    for _ in range(3):
        ctx = [rng.randrange(4, 300) for _ in range(rng.randrange(1, 30))]
        reqs += [(ctx, [rng.randrange(4, 300) for _ in range(rng.randrange(1, 9))]) for _ in range(3)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), r in zip(reqs, got):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([(ctx + cont)[:-1]])).logits[0].double(), -1)
        rows = logp[len(ctx) - 1:]
        # fp32 forwards of different shapes (a packed tree vs one sequence): ~1e-6 per log-prob, summed
        # over at most 8 tokens; 1e-4 is far above that and far below a sibling's leaked context (~0.1).
        assert r.logprob == pytest.approx(float(rows.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert r.is_greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_encode_pair_moves_trailing_spaces_to_the_continuation(lm):
    ctx, cont = encode_pair(lm, "Answer: ", "yes")
    assert ctx == lm.encode("Answer:") and ctx + cont == lm.encode("Answer: yes")
    assert encode_pair(lm, "", "yes")[0] == [lm.prefix_token]


# --- tasks -----------------------------------------------------------------------------------
def write_task(tmp_path: Path, output_type: str = "multiple_choice", **extra) -> Path:
    docs = [{"q": f"Question: is {i} even?", "choices": ["yes", "no", "maybe not"], "gold": i % 2}
            for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    cfg = {"task": "toy", "dataset_path": "json", "data_files": {"test": "d.jsonl"}, "output_type": output_type,
           "doc_to_text": "{{q}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
           "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}, {"metric": "acc_bytes"}]} | extra
    path = tmp_path / "toy.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


def test_multiple_choice_task_scores_each_choice_after_the_prompt(lm, tmp_path):
    cfg = TaskConfig.load(write_task(tmp_path))
    res = run_task(lm, cfg, num_fewshot=2)
    assert res["n"] == 12 and set(res["results"]) == {"acc", "acc_norm", "acc_bytes"}
    s = res["samples"][3]
    assert s["context"].count("Answer:") == 3 and s["context"].endswith("Question: is 3 even?\nAnswer:")
    ctx, cont = encode_pair(lm, s["context"], " maybe not")
    # The same forward in another batch: fp32 rounding of differently blocked matmuls only.
    assert s["loglikelihoods"][2] == pytest.approx(lm.loglikelihood([(ctx, cont)])[0].logprob, abs=1e-5)
    acc = np.mean([float(np.argmax(x["loglikelihoods"]) == x["gold"]) for x in res["samples"]])
    assert res["results"]["acc"]["value"] == pytest.approx(acc)
    assert 0 < res["results"]["acc"]["stderr"] < 0.3


def test_bad_task_files_are_one_sentence_errors(tmp_path):
    from ember.errors import EmberError

    with pytest.raises(EmberError, match="unsupported key"):
        TaskConfig.load(write_task(tmp_path, frobnicate=1))
    with pytest.raises(EmberError, match="ready tasks"):
        TaskConfig.load("no_such_task")


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "piqa", "hellaswag", "truthfulqa_mc2",
                                  "lambada_openai"])
def test_ready_tasks_read_the_shared_data(lm, name):
    cfg = TaskConfig.load(name)
    shared_data("eval", next(iter(cfg.data_files.values())))
    res = run_task(lm, cfg, limit=3, bootstrap_iters=50)
    assert res["n"] == 3 and res["results"]
    for v in res["results"].values():
        assert math.isfinite(v["value"])
    if name == "truthfulqa_mc2":
        assert 0 < res["results"]["mc2"]["value"] < 1


# --- metrics ---------------------------------------------------------------------------------
def test_squad_normalisation_exact_match_and_f1():
    assert M.squad_normalize("The  Cat, sat!") == "cat sat"
    assert M.exact_match("the cat sat.", ["Cat sat"]) == 1.0
    assert M.f1("a cat sat on the mat", ["the cat sat"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert M.f1("dog", ["cat", "dog"]) == 1.0
    assert M.contains("I think it is Paris, France", ["paris"]) == 1.0
    gsm = [",", "\\$", "(?s).*#### ", "\\.$"]
    assert M.exact_match("1,000", ["lots of work\n#### 1000"], gsm, normalize=False) == 1.0


def test_acc_norm_divides_by_characters_and_mc2_is_true_mass():
    lls, choices = [-10.0, -12.0], ["ab", "abcdefgh"]
    s = M.mc_scores(lls, choices, gold=1)
    assert s["acc"] == 0.0 and s["acc_norm"] == 1.0
    p = np.exp([-1.0, -2.0, -0.5])
    assert M.mc2([-1.0, -2.0, -0.5], [1, 1, 0]) == pytest.approx((p[0] + p[1]) / p.sum())
    assert M.mc2([-1e4, -1e4, -1e4 - 1], [1, 0, 0]) == pytest.approx(1 / (2 + math.exp(-1)))  # no underflow


def test_json_schema_validity_and_regex():
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}
    assert M.json_schema_valid('Sure! {"name": "Ada", "age": 36}', schema) == 1.0
    assert M.json_schema_valid('{"name": "Ada", "age": -1}', schema) == 0.0
    assert M.json_schema_valid("no json here", schema) == 0.0
    assert M._validate({"name": "Ada", "age": 36}, schema) and not M._validate({"name": "Ada"}, schema)
    assert M.regex_match("answer: 42", r"\b42\b") == 1.0


def test_bootstrap_stderr_matches_the_binomial_formula():
    x = np.random.default_rng(0).random(400) < 0.3
    assert M.bootstrap_stderr(x, iters=2000) == pytest.approx(math.sqrt(x.mean() * (1 - x.mean()) / 400), rel=0.1)


# --- parity with lm-evaluation-harness through `ember serve` ------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--served-model-name", "tiny", "--num-kv-blocks", "64"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(log.read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_endpoint_lm_scores_like_the_in_process_lm(lm, served, tmp_path):
    from ember.eval.lm import EndpointLM

    cfg = TaskConfig.load(write_task(tmp_path))
    ours = run_task(lm, cfg, limit=6, bootstrap_iters=10)
    remote = run_task(EndpointLM(served + "/v1", model="tiny"), cfg, limit=6, bootstrap_iters=10)
    for a, b in zip(ours["samples"], remote["samples"]):
        # The server batches requests differently (fp32 rounding, ~1e-6 a token) and sends each
        # log-prob through JSON as a float32 value printed to 7-8 digits.
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    assert ours["results"]["acc"]["value"] == remote["results"]["acc"]["value"]


def test_lm_eval_local_completions_through_ember_serve_matches_in_process(lm, served, tmp_path):
    """lm-eval's own client (`local-completions`, remote tokenizer) vs Ember's evaluator: same numbers."""
    need_module("lm_eval", "the lm-evaluation-harness peer")
    need_module("tenacity", "what lm-eval's API models need")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    cfg = TaskConfig.load(write_task(tmp_path))
    ours = run_task(lm, cfg, num_fewshot=1, bootstrap_iters=10)
    pairs = [(s["context"], " " + c) for s in ours["samples"] for c in s["choices"]]
    api = LocalCompletionsAPI(base_url=served + "/v1/completions", model="tiny", max_length=CONTEXT,
                              tokenizer_backend="remote", batch_size=4)
    theirs = api.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                                for i, p in enumerate(pairs)], disable_tqdm=True)
    mine = [ll for s in ours["samples"] for ll in s["loglikelihoods"]]
    # As above: other batches on the server, and log-probs through JSON.
    assert [t[0] for t in theirs] == pytest.approx(mine, abs=1e-4)
    k = len(ours["samples"][0]["choices"])
    their_acc = np.mean([float(np.argmax([t[0] for t in theirs[i * k:(i + 1) * k]]) == s["gold"])
                         for i, s in enumerate(ours["samples"])])
    assert their_acc == ours["results"]["acc"]["value"]


# --- pairwise comparison -------------------------------------------------------------------------
def simulate_battles(theta: np.ndarray, n: int, rng: np.random.Generator, tie_band: float = 0.0):
    k = len(theta)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    p = 1 / (1 + np.exp(-(theta[a] - theta[b])))
    u = rng.random(n)
    w = np.where(np.abs(u - p) < tie_band, "tie", np.where(u < p, "a", "b"))
    return [(f"m{x}", f"m{y}", z) for x, y, z in zip(a, b, w)]


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))  # no ties among fitted ratings
    return float(np.corrcoef(rx, ry)[0, 1])


def test_bradley_terry_recovers_known_strengths_and_its_intervals_cover_them():
    from ember.eval.compare import rate

    rng = np.random.default_rng(0)
    theta = np.linspace(-1.2, 1.2, 8)  # evenly spaced log-strengths, mean 0
    truth = 1000 + 400 * theta / math.log(10)
    covered, rhos = [], []
    for sim in range(8):
        r = rate(simulate_battles(theta, 1200, rng), bootstrap=100, seed=sim)
        est = np.array([r["systems"][f"m{i}"]["bt"] for i in range(8)])
        ci = np.array([r["systems"][f"m{i}"]["bt_ci"] for i in range(8)])
        covered += list((ci[:, 0] <= truth) & (truth <= ci[:, 1]))
        rhos.append(spearman(est, truth))
        elo = np.array([r["systems"][f"m{i}"]["elo"] for i in range(8)])
        assert spearman(elo, truth) > 0.8  # online Elo is noisier but ordered
    assert min(rhos) >= 0.95
    assert 0.86 <= np.mean(covered) <= 1.0  # 64 intervals at a nominal 95% (binomial sd ~ 2.7%)


def test_position_swap_turns_inconsistent_verdicts_into_ties():
    from ember.eval.compare import judge_pair

    always_first = lambda ins, x, y: "1"  # noqa: E731 - pure position bias
    prefers_long = lambda ins, x, y: "1" if len(x) > len(y) else "2"  # noqa: E731
    assert judge_pair(always_first, "q", "short", "a longer answer") == "tie"
    assert judge_pair(prefers_long, "q", "short", "a longer answer") == "b"
    assert judge_pair(prefers_long, "q", "a longer answer", "short") == "a"


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    from ember.eval.compare import length_controlled_win_rate

    rng = np.random.default_rng(0)
    base = rng.integers(200, 2000, 2000)
    model = base + rng.normal(600, 400, 2000).astype(int)  # the model writes longer answers
    d = (model - base) / (model - base).std()
    y = (rng.random(2000) < 1 / (1 + np.exp(-(0.0 + 1.5 * np.tanh(d))))).astype(float)  # equal quality
    res = length_controlled_win_rate(y, model, base)
    assert res["raw_win_rate"] > 0.6 and abs(res["lc_win_rate"] - 0.5) < 0.06 and res["phi"] > 1.0


def test_alpaca_eval_win_rate_recomputed_from_stored_annotations():
    from ember.eval.compare import alpaca_eval_win_rate

    ann = shared_data("eval", "alpaca_eval", "mistral-7b-instruct-v0.2_annotations.json")
    board = shared_data("eval", "alpaca_eval", "leaderboard_alpaca_eval_2.csv")
    import csv

    row = next(r for r in csv.DictReader(board.open()) if r[""] == "Mistral-7B-Instruct-v0.2")
    res = alpaca_eval_win_rate(ann)
    assert res["n"] == int(row["n_total"]) == 805
    # The stored annotations are alpaca_eval_cot_gpt4_turbo_fn's; AlpacaEval's leaderboard for that
    # annotator (src/alpaca_eval/leaderboards/data_AlpacaEval_2/alpaca_eval_cot_gpt4_turbo_fn_leaderboard.csv)
    # publishes Mistral-7B-Instruct-v0.2 at win_rate 15.527950310559005, standard_error 1.2772783712147573.
    assert res["win_rate"] * 100 == pytest.approx(15.527950310559005, abs=1e-9)
    assert res["stderr"] * 100 == pytest.approx(1.2772783712147573, rel=1e-3)
    # The default leaderboard's (weighted) judge differs, so only closeness is expected there.
    published = float(row["discrete_win_rate"]) / 100
    assert abs(res["win_rate"] - published) <= 2 * res["stderr"]
    assert abs(res["lc_win_rate"] - float(row["length_controlled_winrate"]) / 100) <= 3 * res["stderr"]


def test_compare_cli_rates_a_battles_file(tmp_path, capsys):
    from ember.cli import main

    rng = np.random.default_rng(1)
    battles = simulate_battles(np.array([-1.0, 0.0, 1.0]), 300, rng, tie_band=0.05)
    f = tmp_path / "battles.jsonl"
    f.write_text("".join(json.dumps({"model_a": a, "model_b": b, "winner": w}) + "\n" for a, b, w in battles))
    assert main(["eval", "compare", str(f), "--json", "--bootstrap", "50"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["systems"]["m2"]["bt"] > res["systems"]["m1"]["bt"] > res["systems"]["m0"]["bt"]
    assert res["win_matrix"]["m2"]["m0"] > 0.5


# --- groundedness ----------------------------------------------------------------------------
def test_groundedness_separates_supported_from_perturbed_answers():
    from ember.eval.groundedness import auroc, check, synthetic_set

    items = synthetic_set(50, seed=3)
    scores = {k: [check(it["answer"], it["context"]).score for it in items if it["kind"] == k]
              for k in ("supported", "number", "entity", "citation")}
    for kind in ("number", "entity", "citation"):
        assert auroc(scores["supported"], scores[kind]) >= 0.85, kind
    assert auroc(scores["supported"], scores["number"] + scores["entity"] + scores["citation"]) >= 0.85


def test_groundedness_flags_a_misattributed_citation_and_accepts_paraphrase():
    from ember.eval.groundedness import check

    passages = ["Marie Curie won the Nobel Prize in Physics in 1903.", "Lise Meitner worked in Berlin until 1938."]
    ok = check("In 1903 Marie Curie received the Nobel Prize in Physics [1].", passages)
    assert ok.score > 0.7 and ok.citation_precision == 1.0
    wrong = check("Marie Curie won the Nobel Prize in Physics in 1903 [2].", passages)
    assert wrong.claims[0].misattributed and wrong.citation_precision == 0.0
    assert check("Marie Curie won the Nobel Prize in Physics in 1911.", passages).score == 0.0


# --- judge and consistency ---------------------------------------------------------------------
class ScriptedLM:
    """A judge whose free text is scripted and whose log-likelihoods prefer one scale value."""

    prefix_token = 0
    max_length = 10_000

    def __init__(self, text: str, favourite: str = " 4") -> None:
        self.text, self.favourite = text, favourite

    def encode(self, s: str) -> list[int]:
        return [ord(ch) for ch in s]

    def loglikelihood(self, reqs):
        from ember.eval.lm import LLResult

        return [LLResult(0.0 if "".join(map(chr, c)) == self.favourite else -5.0, True, len(c)) for _, c in reqs]

    def generate(self, prompts, until, max_tokens=256, temperature=0.0, seed=None):
        return [self.text for _ in prompts]


def test_judge_parses_json_falls_back_and_never_returns_nan():
    from ember.eval.judge import DEFAULT_RUBRIC, Judge, Rubric

    rubric = Rubric.from_dict(DEFAULT_RUBRIC)
    item = {"question": "2+2?", "answer": "4"}
    parsed = Judge(ScriptedLM('{"correctness": 5, "clarity": 3} and completeness: 2'), rubric, "generate").score(item)
    assert parsed["scores"]["correctness"] == 5 and parsed["scores"]["completeness"] == 2
    assert parsed["method"]["tone"] == "loglikelihood"  # missing in the text: constrained reading
    assert 3.9 < parsed["scores"]["tone"] < 4.1
    garbage = Judge(ScriptedLM("I refuse. correctness: 11"), rubric, "generate").score(item)
    assert all(math.isfinite(v) and 1 <= v <= 5 for v in garbage["scores"].values())
    assert math.isfinite(garbage["overall"])


def test_judge_with_a_real_model_gives_in_range_scores(lm):
    from ember.eval.judge import DEFAULT_RUBRIC, Judge, Rubric

    out = Judge(lm, Rubric.from_dict(DEFAULT_RUBRIC)).score({"question": "What is it?", "answer": "A test."})
    assert all(1 <= v <= 5 for v in out["scores"].values()) and set(out["method"].values()) == {"loglikelihood"}


def test_agreement_with_human_labels():
    from ember.eval.judge import agreement

    a = agreement([1, 2, 3, 4, 5, 5], [1, 2, 3, 4, 5, 4])
    assert a["exact"] == pytest.approx(5 / 6) and a["within_one"] == 1.0 and a["quadratic_kappa"] > 0.9
    assert agreement([5, 4, 3, 2, 1], [1, 2, 3, 4, 5])["spearman"] == pytest.approx(-1.0)


def test_majority_vote_and_paraphrase_agreement():
    from ember.eval.consistency import answer_key, maj_at_k, paraphrase_agreement

    assert answer_key("so the total is 1,200.") == "1200" and answer_key("blah #### 18") == "18"
    samples = [["#### 3", "it is 4", "4"], ["7", "8", "9"]]
    res = maj_at_k(samples, ["4", "7"], k=3, tokens=[[10, 12, 9], [5, 5, 5]])
    assert res["maj@3"] == 1.0 and res["pass@1"] == 0.5 and res["tokens"] == 46
    assert res["agreement"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert paraphrase_agreement([["Paris", "paris.", "Lyon"]])["agreement"] == pytest.approx(2 / 3)


# --- resumable runs and reports ----------------------------------------------------------------
class Flaky:
    """Wraps an LM; fails after `budget` scored requests (an interrupted run)."""

    def __init__(self, lm, budget: int) -> None:
        self.lm, self.budget, self.scored = lm, budget, 0

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def loglikelihood(self, reqs):
        if self.scored + len(reqs) > self.budget:
            raise KeyboardInterrupt
        self.scored += len(reqs)
        return self.lm.loglikelihood(reqs)


def test_an_interrupted_run_resumes_from_the_sqlite_cache(lm, tmp_path):
    from ember.eval.report import CachedLM

    cfg = TaskConfig.load(write_task(tmp_path))
    full = run_task(lm, cfg, bootstrap_iters=10)
    flaky = Flaky(lm, budget=20)
    with pytest.raises(KeyboardInterrupt):
        run_task(CachedLM(flaky, tmp_path / "c.sqlite", "m", batch_size=16), cfg)  # 36 choices, dies in the second batch of 16
    flaky.budget, flaky.scored = 10**9, 0
    cached = CachedLM(flaky, tmp_path / "c.sqlite", "m", batch_size=16)
    resumed = run_task(cached, cfg, bootstrap_iters=10)
    assert cached.hits > 0 and flaky.scored == cached.misses < 36
    for a, b in zip(resumed["samples"], full["samples"]):  # other batches: float rounding only
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)


def test_report_renders_tasks_and_ratings(lm, tmp_path):
    from ember.eval.compare import rate
    from ember.eval.report import write_report

    cfg = TaskConfig.load(write_task(tmp_path))
    res = run_task(lm, cfg, limit=4, bootstrap_iters=10)
    run = tmp_path / "run"
    run.mkdir()
    (run / "toy.json").write_text(json.dumps({k: v for k, v in res.items() if k != "samples"}))
    (run / "ratings.json").write_text(json.dumps(rate([("x", "y", "a"), ("y", "x", "tie")], bootstrap=5)))
    paths = write_report([run], tmp_path / "report")
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "| run | toy | acc |" in md and "Bradley–Terry" in md
    assert "<svg" in page and "Win-rate matrix" in page


# --- safety probes ------------------------------------------------------------------------------
class PolicyLM(ScriptedLM):
    """Refuses plain harmful requests, falls for encodings, leaks the canary when it is in a document."""

    def generate(self, prompts, until, max_tokens=256, temperature=0.0, seed=None):
        from ember.eval.safety import CANARY

        out = []
        for p in prompts:
            if "[document]" in p or "search result" in p:
                out.append(f"{CANARY} The council met on Tuesday.")
            elif "Base64" in p or "ROT13" in p:
                out.append("Sure, here you go: step one...")
            elif "kill a Python" in p or "portrait" in p or "vaccines" in p or "smaller steps" in p:
                out.append("Here is how.")
            else:
                out.append("I'm sorry, but I can't help with that.")
        return out


def test_safety_suite_reports_attack_success_per_family_with_intervals():
    from ember.eval.safety import run_suite, wilson

    fams = run_suite(PolicyLM(""))["families"]
    assert fams["direct"]["attack_success_rate"] == 0.0 and fams["base64"]["attack_success_rate"] == 1.0
    assert fams["indirect_injection"]["attack_success_rate"] == 1.0 and fams["injection"]["attack_success_rate"] == 0
    assert fams["harmless"]["refusal_rate"] == 0.0
    lo, hi = fams["jailbreak"]["ci95"]
    assert lo == 0.0 < hi < 0.5 and wilson(5, 10)[0] < 0.5 < wilson(5, 10)[1]


def test_bias_probe_measures_log_odds_gaps(lm):
    from ember.eval.safety import bias_probe

    gaps = bias_probe(lm)
    assert set(gaps) == {"gender", "religion", "nationality"} and all(g >= 0 and math.isfinite(g) for g in gaps.values())


def test_compare_judges_outputs_files_pairwise_with_a_model(model_dir, tmp_path):
    from ember.eval.compare import compare_files

    for name, suffix in (("sys_a", "yes"), ("sys_b", "no"), ("sys_c", "maybe")):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"instruction": f"Question {i}?", "output": f"{suffix} {i}"}) + "\n" for i in range(4)))
    res = compare_files([str(tmp_path / f"sys_{x}.jsonl") for x in "abc"], judge=str(model_dir), bootstrap=10)
    assert res["battles"] == 12 and set(res["systems"]) == {"sys_a", "sys_b", "sys_c"}
    assert all(math.isfinite(s["bt"]) for s in res["systems"].values())


def test_consistency_cli_reports_maj_at_k_and_paraphrase_agreement(tmp_path, capsys):
    from ember.cli import main

    f = tmp_path / "c.jsonl"
    f.write_text('{"samples": ["#### 3", "4", "it is 4"], "reference": "4", "group": "q"}\n'
                 '{"samples": ["4", "5", "6"], "reference": "4", "group": "q"}\n')
    assert main(["eval", "consistency", "--input", str(f), "--k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["k=3"]["maj@3"] == 1.0 and res["k=1"]["maj@1"] == 0.5 and res["paraphrases"]["agreement"] == 0.5


def test_rolling_task_pools_documents_like_perplexity(lm, tmp_path):
    texts = [TEXT[:150], TEXT[150:400]]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg_path = tmp_path / "roll.yaml"
    cfg_path.write_text(json.dumps({"task": "roll", "data_files": {"test": "r.jsonl"},
                                    "output_type": "loglikelihood_rolling", "doc_to_target": "{{text}}"}))
    res = run_task(lm, TaskConfig.load(cfg_path), bootstrap_iters=20)["results"]
    parts = [text_perplexity(lm, t, window=lm.max_length - 1) for t in texts]
    nll, nbytes = sum(p.nll for p in parts), sum(p.bytes for p in parts)
    assert res["bits_per_byte"]["value"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-9)
    assert math.isfinite(res["bits_per_byte"]["stderr"])


# --- calibration and sampled self-consistency -------------------------------------------------
def test_calibration_ece_and_brier_on_hand_made_numbers():
    # Perfectly calibrated: at 0.25 one in four is right, at 0.75 three in four.
    perfect = M.calibration([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0])
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-12) and perfect["mce"] == pytest.approx(0.0, abs=1e-12)
    # Overconfident: 90% sure, 60% right -> ECE 0.3; Brier (6·0.01 + 4·0.81) / 10 = 0.33.
    over = M.calibration([0.9] * 10, [1] * 6 + [0] * 4)
    assert over["ece"] == pytest.approx(0.3) and over["brier"] == pytest.approx(0.33)
    # Two bins, each half right: |0.5 - 0.95|·½ + |0.5 - 0.55|·½ = 0.25; the largest gap is 0.45.
    two = M.calibration([0.95, 0.95, 0.55, 0.55], [1, 0, 1, 0], bins=10)
    assert two["ece"] == pytest.approx(0.25) and two["mce"] == pytest.approx(0.45)
    counts = [b["count"] for b in two["bins"]]
    assert counts[9] == 2 and counts[5] == 2 and sum(counts) == 4
    # Bins are right-closed: 0.1 belongs to the first bin, 0.0 too, 1.0 to the last.
    edges = M.calibration([0.0, 0.1, 0.1000001, 1.0], [0, 0, 1, 1], bins=10)
    assert [b["count"] for b in edges["bins"]][:2] == [2, 1] and edges["bins"][9]["count"] == 1
    with pytest.raises(Exception, match="one confidence"):
        M.calibration([0.5], [1, 0])


def test_choice_confidence_normalises_over_the_choices():
    conf, hit, brier = M.choice_confidence([math.log(0.7) - 3, math.log(0.2) - 3, math.log(0.1) - 3], 1)
    assert conf == pytest.approx(0.7) and hit == 0.0 and brier == pytest.approx(0.49 + 0.64 + 0.01)
    assert M.choice_confidence([-1.0, -5.0], 0)[1] == 1.0


def test_report_adds_calibration_for_multiple_choice_runs(lm, tmp_path):
    from ember.eval.report import task_calibration, write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "toy.json").write_text(json.dumps({"task": "toy", "results": {"acc": {"value": 0.6, "stderr": 0.1, "n": 10}}}))
    p, q = math.log(0.9), math.log(0.1)  # 90% confident every time, right 6 times in 10
    (run / "toy.samples.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "choices": ["a", "b"], "gold": 0 if i < 6 else 1, "loglikelihoods": [p, q]}) + "\n"
        for i in range(10)))
    cal = task_calibration(run / "toy.samples.jsonl")
    assert cal["ece"] == pytest.approx(0.3) and cal["brier"] == pytest.approx(0.33)
    assert cal["brier_multiclass"] == pytest.approx(0.66)  # two choices: twice the top-label score
    paths = write_report([run], tmp_path / "report")
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "## Calibration (run/toy)" in md and "ECE 0.3000" in md and "| (0.8, 0.9] | 10 | 0.9000 | 0.6000 |" in md
    assert "data:image/png;base64," in page
    # A real run's samples log works end to end.
    res = run_task(lm, TaskConfig.load(write_task(tmp_path)), limit=6, bootstrap_iters=10)
    with open(run / "toy.samples.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in res["samples"])
    cal = task_calibration(run / "toy.samples.jsonl")
    assert cal["n"] == 6 and cal["accuracy"] == pytest.approx(res["results"]["acc"]["value"])
    assert 0 <= cal["ece"] <= 1 and sum(b["count"] for b in cal["bins"]) == 6


def test_consistency_draws_k_samples_with_a_local_model(model_dir, tmp_path, capsys):
    from ember.cli import main

    qs = tmp_path / "q.jsonl"
    qs.write_text('{"question": "what is 2 + 2?", "answer": "4"}\n{"question": "name a colour"}\n')
    argv = ["eval", "consistency", "--questions", str(qs), "--model", str(model_dir), "--k", "3",
            "--temperature", "1.0", "--max-tokens", "6", "--json"]
    assert main(argv + ["--out", str(tmp_path / "a.jsonl")]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert res["k"] == 3 and res["n"] == 2 and res["with_answers"] == 1 and "maj@3" in res["k=3"]
    assert [len(r["samples"]) for r in rows] == [3, 3] and all(1 <= t <= 6 for r in rows for t in r["tokens"])
    assert res["tokens"] == sum(sum(r["tokens"]) for r in rows) and rows[0]["reference"] == "4"
    assert 1 / 3 <= res["agreement"] <= 1
    assert main(argv + ["--out", str(tmp_path / "b.jsonl")]) == 0  # seeded: the same answers again
    capsys.readouterr()
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    assert main(["eval", "consistency", "--input", str(tmp_path / "a.jsonl"), "--k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["k=3"]["tokens"] == res["k=3"]["tokens"]


def test_consistency_draws_k_samples_from_an_endpoint(monkeypatch, capsys, tmp_path):
    import functools

    from ember.cli import main

    answers = {"q1": ["#### 4", "4", "5"], "q2": ["7", "8", "9"], "q3": ["a", "a", "a"]}
    seen = []

    def handler(request):
        if request.url.path == "/tokenizer_info":
            return httpx.Response(200, json={"max_model_len": 128, "eos_token_id": 2})
        body = json.loads(request.content)
        seen.append(body)
        q = body["prompt"].split(":")[1].strip().split()[0]
        choices = [{"index": j, "text": t, "finish_reason": "stop"} for j, t in enumerate(answers[q])]
        if q != "q2":  # q2's server gives only a total: 7 tokens split 3 + 2 + 2
            for c in choices:
                c["logprobs"] = {"tokens": c["text"].split()}
        return httpx.Response(200, json={"choices": choices[::-1], "usage": {"completion_tokens": 7}})

    monkeypatch.setattr(httpx, "Client", functools.partial(httpx.Client, transport=httpx.MockTransport(handler)))
    qs = tmp_path / "q.jsonl"
    qs.write_text('{"question": "q1", "answer": "4"}\n{"question": "q2", "answer": 9}\n{"question": "q3"}\n')
    assert main(["eval", "consistency", "--questions", str(qs), "--endpoint", "http://fake/v1", "--k", "3",
                 "--temperature", "0.8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [b["n"] for b in seen] == [3, 3, 3] and all(b["temperature"] == 0.8 for b in seen)
    assert res["agreement"] == pytest.approx((2 / 3 + 1 / 3 + 1) / 3) and res["all_agree"] == pytest.approx(1 / 3)
    assert res["k=3"]["maj@3"] == 0.5 and res["k=3"]["pass@1"] == 0.5 and res["with_answers"] == 2
    assert res["tokens"] == 4 + 7 + 3 and res["k=3"]["tokens"] == 11 and res["k=1"]["tokens"] == 2 + 3


# --- did my change help? (ember eval diff) ------------------------------------------------------
def _write_run(run: Path, task: str, acc: list[float], contexts: list[str] | None = None) -> Path:
    """A run directory as `ember eval run --out` lays it out: <task>.samples.jsonl, one item a line."""
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"doc_id": i, "context": (contexts[i] if contexts else f"q{i}"), "metrics": {"acc": a, "_nll": 1.0}}
            for i, a in enumerate(acc)]
    (run / f"{task}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return run


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (3, 9), (12, 12), (40, 61), (2, 700)])
def test_mcnemar_exact_equals_the_binomial_test(a_only, b_only):
    from ember.eval.diff import mcnemar_exact

    stats = need_module("scipy.stats", "the binomial-test peer")
    n = a_only + b_only
    expected = 1.0 if n == 0 else stats.binomtest(b_only, n, 0.5, alternative="two-sided").pvalue
    # Both sum the same binomial terms; ours in log space: agreement to fp64 rounding over <= 700 terms.
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    from ember.eval.diff import paired_bootstrap

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 2000).astype(float)
    b = np.where(rng.random(2000) < 0.1, 1 - a, a)  # 10% of items flip, in either direction
    low, high = paired_bootstrap(a, b, iters=20000, seed=1)
    d = b - a
    half = 1.959964 * d.std() / math.sqrt(len(d))
    # With 2000 items the mean difference is close to normal (CLT); the percentile interval's ends carry
    # Monte Carlo error ~ sd/sqrt(iters) of the bootstrap distribution, well under 3% of its half-width.
    assert (high - low) / 2 == pytest.approx(half, rel=0.03)
    assert (low + high) / 2 == pytest.approx(d.mean(), abs=0.03 * half)


def test_diff_pairs_items_and_reports_only_the_changed_ones(tmp_path):
    from ember.eval.diff import diff_runs

    rng = np.random.default_rng(3)
    a = (rng.random(300) < 0.5).astype(float)
    b = a.copy()
    fixed = np.flatnonzero(a == 0)[:40]  # B gets 40 of A's wrong items right and breaks 10 of its right ones
    broken = np.flatnonzero(a == 1)[:10]
    b[fixed], b[broken] = 1.0, 0.0
    res = diff_runs(_write_run(tmp_path / "A", "toy", list(a)), _write_run(tmp_path / "B", "toy", list(b)),
                    iters=4000)
    m = res["tasks"]["toy"]["metrics"]["acc"]
    assert set(res["tasks"]["toy"]["metrics"]) == {"acc"}  # private fields (_nll) are not metrics
    assert (m["n"], m["a_only"], m["b_only"]) == (300, 10, 40)
    assert m["diff"] == pytest.approx(30 / 300)
    assert 0 < m["ci_low"] < 0.1 < m["ci_high"]
    assert m["mcnemar_p"] < 1e-4  # 10 against 40 discordant items: p = 2 P(Bin(50, 1/2) <= 10) ~ 2e-5

    same = diff_runs(tmp_path / "A", tmp_path / "A", iters=500)["tasks"]["toy"]["metrics"]["acc"]
    assert (same["diff"], same["ci_low"], same["ci_high"], same["mcnemar_p"]) == (0.0, 0.0, 0.0, 1.0)


def test_diff_cli_on_two_real_runs_and_its_errors(model_dir, tmp_path, capsys):
    from ember.cli import main

    task = write_task(tmp_path)
    for run, shots in (("A", "0"), ("B", "2")):
        assert main(["eval", "run", "--task", str(task), "--model", str(model_dir), "--num-fewshot", shots,
                     "--bootstrap-iters", "10", "--out", str(tmp_path / run), "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", "diff", str(tmp_path / "A"), str(tmp_path / "B"), "--json",
                 "--bootstrap-iters", "200"]) == 0
    res = json.loads(capsys.readouterr().out)
    toy = res["tasks"]["toy"]
    assert toy["shared_items"] == 12 and toy["prompts_differ"] == 12  # 0-shot and 2-shot prompts differ
    samples = [[json.loads(x) for x in (tmp_path / r / "toy.samples.jsonl").read_text().splitlines()]
               for r in ("A", "B")]
    for name in ("acc", "acc_norm", "acc_bytes"):
        a, b = ([s["metrics"][name] for s in run] for run in samples)
        assert toy["metrics"][name]["diff"] == pytest.approx(np.mean(b) - np.mean(a))
        assert toy["metrics"][name]["a_only"] == sum(1 for x, y in zip(a, b) if x > y)
    assert main(["eval", "diff", str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    assert "McNemar" in capsys.readouterr().out

    assert main(["eval", "diff", str(tmp_path / "A"), str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "toy.samples.jsonl").write_text('{"doc_id": 0, "metrics": {"acc": 1}}\n{"doc": 1}\n')
    assert main(["eval", "diff", str(tmp_path / "A"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "toy.samples.jsonl, line 2" in err and err.count("\n") == 1


# --- chat models: lm-eval's --apply-chat-template, --system-instruction, --fewshot-as-multiturn -----
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    """A tiny model with a ChatML template, its window wide enough that no prompt here is truncated
    (the markup is plain text to its 300-token vocabulary: ~270 tokens for two examples as turns)."""
    from ember.checkpoint import save_pretrained
    from ember.config import preset
    from ember.model import CausalLM
    from ember.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT, "Question: what is it?\nAnswer: a test corpus for evaluation."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("chat") / "model"
    save_pretrained(CausalLM(config), tok, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": CHATML}))
    return path


def lm_eval_task(tmp_path: Path, name: str, data: Path, **extra) -> Path:
    """A task YAML both harnesses read (lm-eval resolves data_files from the working directory: absolute)."""
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "fewshot_split": "test",  # lm-eval excludes the evaluated doc only when named
           "output_type": "multiple_choice", "doc_to_text": "{{q}}\nAnswer:", "doc_to_choice": "{{choices}}",
           "doc_to_target": "{{gold}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]} | extra
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def lm_eval_samples(model_dir: Path, task: Path, limit: int, **options) -> list[dict]:
    """lm-eval's own `hf` backend on the same checkpoint: its per-document requests and log-likelihoods."""
    lm_eval = need_module("lm_eval", "the lm-evaluation-harness peer")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf_lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(model=hf_lm, tasks=[task.stem], task_manager=TaskManager(include_path=str(task.parent)),
                                  limit=limit, log_samples=True, bootstrap_iters=0, **options)
    return sorted(out["samples"][task.stem], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("options", [
    {"system_instruction": "Answer with the right choice."},
    {"apply_chat_template": True, "fewshot_as_multiturn": False, "num_fewshot": 2},
    {"apply_chat_template": True, "system_instruction": "Be brief.", "num_fewshot": 2},  # multiturn by default
], ids=["system-plain", "chat-single-turn", "chat-multiturn"])
def test_chat_prompts_and_scores_equal_lm_eval_hf(chat_model_dir, tmp_path, options):
    from ember.eval.tasks import PromptFormat

    docs = [{"q": f"Question: is {i} even?", "choices": ["yes", "no", "maybe not"], "gold": i % 2} for i in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    task = lm_eval_task(tmp_path, "chattoy", data)
    theirs = lm_eval_samples(chat_model_dir, task, limit=6, **options)
    fmt = PromptFormat(**{k: v for k, v in options.items() if k != "num_fewshot"})
    ours = run_task(LocalLM(chat_model_dir), TaskConfig.load(task), limit=6, num_fewshot=options.get("num_fewshot", 0),
                    bootstrap_iters=10, prompt_format=fmt)["samples"]
    assert len(theirs) == len(ours) == 6
    for t, o in zip(theirs, ours):
        # The same prompt text, few-shot examples included (lm-eval's sampler, seed 1234), and the same
        # continuations: with a template, an answer follows the assistant header with no delimiter.
        assert [a[0] for a in t["arguments"]] == [o["context"]] * 3
        delimiter = "" if options.get("apply_chat_template") else " "
        assert [a[1] for a in t["arguments"]] == [delimiter + c for c in o["choices"]]
        # Two fp32 forwards of the same weights (transformers' and Ember's kernels): ~1e-6 a token on
        # sums of ~10-60 tokens; 1e-4 is the bound, and a token more or less moves a sum by ~1.
        assert [r[0][0] for r in t["resps"]] == pytest.approx(o["loglikelihoods"], abs=1e-4)
        assert t["acc"] == o["metrics"]["acc"]
    if options.get("system_instruction") == "Be brief.":
        assert ours[0]["context"].count("<|im_start|>user") == 3 and "<|im_start|>system\nBe brief." in ours[0]["context"]


def test_winogrande_style_partial_scoring_equals_lm_eval_hf(chat_model_dir, tmp_path):
    """Multiple input: each option becomes a context and the same continuation is scored after each."""
    docs = [{"context_options": [f"Ann gave Bo {i} apples because Ann", f"Ann gave Bo {i} apples because Bo"],
             "continuation": "had too many.", "gold": i % 2} for i in range(8)]
    data = tmp_path / "w.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    task = lm_eval_task(tmp_path, "winotoy", data, doc_to_text="gold", doc_to_choice="{{context_options}}",
                        doc_to_target="{{continuation}}", metric_list=[{"metric": "acc"}])
    theirs = lm_eval_samples(chat_model_dir, task, limit=8, num_fewshot=1)
    ours = run_task(LocalLM(chat_model_dir), TaskConfig.load(task), limit=8, num_fewshot=1, bootstrap_iters=10)
    for t, o in zip(theirs, ours["samples"]):
        assert [a[0] for a in t["arguments"]] == o["context"]  # one context per option, the shot before each
        assert {a[1] for a in t["arguments"]} == {" had too many."}
        # transformers' and Ember's fp32 forwards of the same weights differ by ~1e-6 a token over these
        # ~20-token sums; a prompt or tokenization difference moves a sum by a whole token's log-prob (~1).
        assert [r[0][0] for r in t["resps"]] == pytest.approx(o["loglikelihoods"], abs=1e-4)
        assert t["acc"] == o["metrics"]["acc"]


def test_chat_only_endpoint_runs_generation_tasks_and_refuses_loglikelihood_clearly(tmp_path, monkeypatch):
    """A server with /v1/chat/completions only: generation through chat turns; scoring says what it needs."""
    from ember.errors import EmberError
    from ember.eval.lm import EndpointLM

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            body = json.loads(request.content)
            seen.append(body["messages"])
            return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant",
                                                                                   "content": "#### 4"}}]})
        return httpx.Response(404, json={"error": {"message": "not found"}})

    client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: client(transport=httpx.MockTransport(handler), **kw))
    lm = EndpointLM("http://chat-only.test/v1")  # no /tokenizer_info: optional now
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+{4 - i}?", "answer": "... #### 4"}) + "\n" for i in range(3)))
    task = tmp_path / "gen.yaml"
    task.write_text(json.dumps({"task": "gen", "data_files": {"test": str(data)}, "output_type": "generate_until",
                                "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
                                "metric_list": [{"metric": "exact_match", "regexes_to_ignore": ["(?s).*#### "]}]}))
    from ember.eval.tasks import PromptFormat

    res = run_task(lm, TaskConfig.load(task), bootstrap_iters=10,
                   prompt_format=PromptFormat(apply_chat_template=True, system_instruction="Think."))
    assert res["results"]["exact_match"]["value"] == 1.0
    assert seen[0] == [{"role": "system", "content": "Think."}, {"role": "user", "content": "Q: 0+4?\nA:"}]
    (tmp_path / "mc.jsonl").write_text(json.dumps({"q": "2+2?", "choices": ["4", "5"], "gold": 0}) + "\n")
    mc = lm_eval_task(tmp_path, "mc", tmp_path / "mc.jsonl")
    with pytest.raises(EmberError, match="needs a completions endpoint with echo and logprobs"):
        run_task(lm, TaskConfig.load(mc), bootstrap_iters=10)


def test_missing_or_malformed_task_data_names_the_file_and_line(tmp_path, monkeypatch):
    from ember.errors import EmberError

    monkeypatch.setenv("EMBER_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EmberError, match=r"winogrande/winogrande_val.jsonl \(JSONL, one \{context_options.*put it at "):
        run_task(None, TaskConfig.load("winogrande"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "a", "choices": ["x"], "gold": 0}\n\n{"q": "b", "choices": ["x"]\n')
    with pytest.raises(EmberError, match=r"d.jsonl, line 3: not valid JSON"):
        run_task(None, TaskConfig.load(lm_eval_task(tmp_path, "bad", data)))
    data.write_text('{"q": "a", "choices": ["x"], "gold": 0}\n{"question": "b", "choices": ["x"], "gold": 0}\n')
    with pytest.raises(EmberError, match=r"d.jsonl, line 2: 'q' is undefined"):
        run_task(None, TaskConfig.load(lm_eval_task(tmp_path, "bad", data)))
