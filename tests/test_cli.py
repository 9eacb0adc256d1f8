"""The `ember` command as a user meets it: real processes, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from ember.checkpoint import save_pretrained
from ember.config import preset
from ember.model import CausalLM
from ember.tokenizer import train_tokenizer


def ember(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_clean_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    text = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"] * 50
    tok = train_tokenizer(text, vocab_size=300)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=32, eos_token_id=tok.eos_id)
    path = tmp_path_factory.mktemp("m") / "model"
    save_pretrained(CausalLM(cfg), tok, path)
    return path


def test_help_teaches_the_pipeline():
    r = ember("--help")
    assert r.returncode == 0
    for word in ("quickstart", "pretrain", "generate", "tokenizer", "data"):
        assert word in r.stdout


def test_generate_runs_and_is_reproducible_with_seed(model_dir):
    a = ember("generate", "--model", model_dir, "--prompt", "def ", "--max-tokens", "8", "--seed", "3")
    b = ember("generate", "--model", model_dir, "--prompt", "def ", "--max-tokens", "8", "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("def ")
    ids = ember("generate", "--model", model_dir, "--prompt-ids", "5,6,7", "--max-tokens", "4", "--temperature", "0")
    assert ids.returncode == 0, ids.stderr


def test_missing_model_dir(tmp_path):
    assert_clean_error(ember("generate", "--model", tmp_path / "nope", "--prompt", "x"), "does not exist")


def test_malformed_model_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_clean_error(ember("generate", "--model", tmp_path, "--prompt", "x"), "not valid JSON")


def test_model_dir_without_weights(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    assert_clean_error(ember("generate", "--model", tmp_path, "--prompt", "x"), "model.safetensors")


def test_prompt_longer_than_context(model_dir):
    assert_clean_error(ember("generate", "--model", model_dir, "--prompt", "def add(a, b): " * 40), "context")


def test_bad_prompt_ids(model_dir):
    assert_clean_error(ember("generate", "--model", model_dir, "--prompt-ids", "1,x"), "integers")


def test_unknown_preset(tmp_path):
    assert_clean_error(ember("pretrain", "--preset", "huge-9000", "--data", tmp_path, "--out", tmp_path / "o"),
                       "huge-9000")


def test_config_file_with_unknown_model_type(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "bert"}))
    assert_clean_error(ember("pretrain", "--config", tmp_path / "c.json", "--data", tmp_path, "--out", tmp_path / "o"),
                       "bert")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(ember("tokenizer", "train", "--input", tmp_path / "empty", "--vocab-size", "300",
                             "--out", tmp_path / "tok"))


def test_tokens_shows_pieces_ids_and_count(model_dir):
    r = ember("tokens", "--tokenizer", model_dir, "def add")
    assert r.returncode == 0, r.stderr
    assert "ids:" in r.stdout and "count:" in r.stdout


def test_chat_reads_turns_from_stdin_and_streams_replies(model_dir):
    r = subprocess.run([sys.executable, "-m", "ember.cli", "chat", "--model", str(model_dir), "--max-tokens", "5",
                        "--seed", "1"], input="hello\n/reset\nagain\n/exit\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert len([x for x in r.stdout.splitlines()]) >= 2  # one line per reply


def test_plot_writes_a_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 5 - s / 10, "lr": 1e-3, **({"val_loss": 5.0} if s % 5 == 0 else {})})
                  for s in range(1, 21)))
    r = ember("plot", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_clean_error(ember("plot", tmp_path / "missing"), "metrics.jsonl")
