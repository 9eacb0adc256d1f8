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


# --- settings as flags: every recipe takes every training setting ---------------------------------
import argparse  # noqa: E402
import dataclasses  # noqa: E402

from ember.cli import build_parser, engine_args, main, sampling_params  # noqa: E402
from ember.engine import EngineConfig  # noqa: E402
from ember.sampling import SamplingParams  # noqa: E402
from ember.train.loop import TrainConfig  # noqa: E402

# A value for each TrainConfig field that no recipe has as its default, and what the field holds after.
TRAIN_FLAGS = {
    "max_steps": (["--max-steps", "7"], 7),
    "batch_size": (["--batch-size", "3"], 3),
    "grad_accum": (["--grad-accum", "5"], 5),
    "block_size": (["--block-size", "48"], 48),
    "lr": (["--lr", "0.0123"], 0.0123),
    "min_lr_ratio": (["--min-lr-ratio", "0.37"], 0.37),
    "warmup_steps": (["--warmup-steps", "9"], 9),
    "schedule": (["--schedule", "wsd"], "wsd"),
    "decay_fraction": (["--decay-fraction", "0.31"], 0.31),
    "weight_decay": (["--weight-decay", "0.05"], 0.05),
    "beta1": (["--beta1", "0.81"], 0.81),
    "beta2": (["--beta2", "0.91"], 0.91),
    "grad_clip": (["--grad-clip", "0.5"], 0.5),
    "eval_every": (["--eval-every", "11"], 11),
    "save_every": (["--save-every", "13"], 13),
    "log_every": (["--log-every", "17"], 17),
    "seed": (["--seed", "4242"], 4242),
    "mixed_precision": (["--mixed-precision", "off"], "off"),
    "time_budget_s": (["--time-budget", "2.5"], 150.0),  # minutes on the command line, seconds in the config
    "schedule_by_time": (["--schedule-by-time"], True),
}
# Each recipe: its required flags, and the library function that receives its TrainConfig.
RECIPES = {
    "pretrain": (["--data", "d", "--out", "o"], "ember.train.pretrain.pretrain"),
    "finetune": (["--model", "m", "--data", "d", "--out", "o"], "ember.train.sft.sft"),
    "dpo": (["--model", "m", "--data", "d", "--out", "o"], "ember.train.dpo.run_dpo"),
    "reward-model": (["--model", "m", "--data", "d", "--out", "o"], "ember.train.reward.run_reward_model"),
    "ppo": (["--policy", "m", "--reward", "rule:concise", "--prompts", "p", "--out", "o"], "ember.train.rlhf.run_ppo"),
}
# PPO's batches are rollouts and it logs every iteration: these settings have nothing to act on there.
PPO_WITHOUT = {"batch_size", "grad_accum", "block_size", "log_every", "mixed_precision", "time_budget_s",
               "schedule_by_time"}


class Captured(Exception):
    def __init__(self, args, kwargs):
        super().__init__("captured")
        self.args_, self.kwargs = args, kwargs

    def of_type(self, cls):
        found = [x for x in (*self.args_, *self.kwargs.values()) if isinstance(x, cls)]
        assert len(found) == 1, found
        return found[0]


def capture(monkeypatch, target: str) -> None:
    module, name = target.rsplit(".", 1)

    def fake(*args, **kwargs):
        raise Captured(args, kwargs)
    monkeypatch.setattr(f"{module}.{name}", fake)


def run_recipe(monkeypatch, recipe: str, *flags: str) -> Captured:
    required, target = RECIPES[recipe]
    capture(monkeypatch, target)
    with pytest.raises(Captured) as caught:
        main([recipe, *required, *flags])
    return caught.value


def test_the_flag_table_covers_every_training_setting():
    assert set(TRAIN_FLAGS) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("field", list(TRAIN_FLAGS))
def test_every_recipe_passes_every_training_flag_to_its_config(monkeypatch, capsys, recipe, field):
    argv, expected = TRAIN_FLAGS[field]
    if recipe == "ppo" and field in PPO_WITHOUT:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([recipe, *RECIPES[recipe][0], *argv])
        assert exited.value.code == 2 and argv[0] in capsys.readouterr().err
        return
    cfg = run_recipe(monkeypatch, recipe, *argv).of_type(TrainConfig)
    assert getattr(cfg, field) == expected
    default = run_recipe(monkeypatch, recipe).of_type(TrainConfig)
    assert getattr(default, field) != expected  # the flag, not a default, set it


def test_finetune_gets_the_flags_it_used_to_lack_with_the_loop_defaults(monkeypatch):
    cfg = run_recipe(monkeypatch, "finetune").of_type(TrainConfig)
    assert (cfg.grad_clip, cfg.mixed_precision) == (TrainConfig().grad_clip, TrainConfig().mixed_precision)
    # finetune's own defaults: a learning rate per method, a short warmup, no weight decay
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay) == (2e-3, 20, 0.0)
    assert run_recipe(monkeypatch, "finetune", "--method", "full").of_type(TrainConfig).lr == 3e-4


def test_preference_recipes_keep_max_length_as_the_row_length(monkeypatch):
    from ember.train.dpo import DPOConfig

    got = run_recipe(monkeypatch, "dpo", "--max-length", "64", "--loss", "ipo", "--beta", "0.2")
    assert got.of_type(TrainConfig).block_size == 64
    assert dataclasses.astuple(got.of_type(DPOConfig))[:3] == (0.2, "ipo", 64)
    got = run_recipe(monkeypatch, "reward-model", "--max-length", "64")
    assert got.of_type(TrainConfig).block_size == 64 and got.kwargs["max_length"] == 64


def test_ppo_optimizer_settings_reach_both_configs(monkeypatch):
    from ember.train.ppo import PPOConfig

    got = run_recipe(monkeypatch, "ppo", "--iterations", "3", "--lr", "0.002", "--grad-clip", "0.25",
                     "--seed", "5", "--kl-horizon", "77", "--no-whiten-advantages", "--warmup-steps", "2")
    train, ppo = got.of_type(TrainConfig), got.of_type(PPOConfig)
    assert (train.max_steps, train.lr, train.grad_clip, train.seed, train.warmup_steps) == (3, 0.002, 0.25, 5, 2)
    assert (ppo.iterations, ppo.lr, ppo.grad_clip, ppo.seed) == (3, 0.002, 0.25, 5)
    assert (ppo.kl_horizon, ppo.whiten_advantages) == (77, False)
    default = run_recipe(monkeypatch, "ppo").of_type(TrainConfig)
    # PPO's optimizer as before: constant learning rate, no warmup, no weight decay, beta2 0.999
    assert (default.schedule, default.warmup_steps, default.weight_decay, default.beta2) == ("constant", 0, 0.0, 0.999)


@pytest.mark.parametrize("argv, fragment", [
    (["pretrain", "--data", "d", "--out", "o", "--schedule", "sideways"], "--schedule"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--mixed-precision", "fp8"], "--mixed-precision"),
    (["dpo", "--model", "m", "--data", "d", "--out", "o", "--loss", "square"], "--loss"),
    (["ppo", "--policy", "m", "--reward", "rule:concise", "--prompts", "p", "--out", "o", "--batch-size", "4"],
     "--batch-size"),
    (["pretrain", "--data", "d", "--out", "o", "--grad-clip", "lots"], "--grad-clip"),
])
def test_a_bad_flag_is_one_sentence_and_a_nonzero_exit(argv, fragment):
    r = ember(*argv)
    assert_clean_error(r, fragment)
    assert r.returncode == 2


def test_a_setting_the_config_rejects_is_one_sentence():
    assert_clean_error(ember("pretrain", "--data", "d", "--out", "o", "--lr", "-1"), "learning rate")


def test_help_states_what_each_generated_flag_does_and_its_default():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for recipe in RECIPES:
        parser = sub.choices[recipe]
        assert "--grad-clip" in parser.format_help()  # the flags are added when the command is first used
        by_flag = {s: a for a in parser._actions for s in a.option_strings}
        for field in TRAIN_FLAGS:
            if recipe == "ppo" and field in PPO_WITHOUT:
                continue
            text = by_flag[TRAIN_FLAGS[field][0][0]].help
            what, _, default = text.partition("(default")
            assert len(what.split()) >= 3 and default, (recipe, text)


def test_building_the_command_tree_imports_no_torch():
    code = "import sys; from ember.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("command", [["serve", "--model", "m"], ["bench", "throughput"]])
def test_engine_flags_cover_the_engine_config(command):
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    a = build_parser().parse_args([*command, "--no-prefix-caching", "--no-chunked-prefill", "--block-size", "8",
                                   "--num-kv-blocks", "40", "--kv-cache-memory", "2GB", "--max-num-batched-tokens",
                                   "96", "--max-num-seqs", "3", "--max-model-len", "30", "--speculative", "ngram",
                                   "--num-speculative-tokens", "2", "--prompt-lookup-max", "4", "--prompt-lookup-min",
                                   "2", "--compile-draft", "--max-loras", "2", "--max-lora-rank", "32"])
    got = engine_args(a)
    assert set(got) == names
    assert got == {"enable_prefix_caching": False, "enable_chunked_prefill": False, "block_size": 8,
                   "num_kv_blocks": 40, "kv_cache_memory": "2GB", "max_num_batched_tokens": 96, "max_num_seqs": 3,
                   "max_model_len": 30, "speculative": "ngram", "num_speculative_tokens": 2,
                   "prompt_lookup_max": 4, "prompt_lookup_min": 2, "compile_draft": True, "max_loras": 2,
                   "max_lora_rank": 32}
    EngineConfig(**got)
    untouched = engine_args(build_parser().parse_args(command))
    assert untouched == {k: getattr(EngineConfig(), k) for k in names}


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_flags_build_the_sampling_params(command):
    required = ["--model", "m"] + (["--prompt", "x"] if command == "generate" else [])
    a = build_parser().parse_args([command, *required, "--temperature", "0", "--top-k", "5", "--top-p", "0.5",
                                   "--min-p", "0.1", "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
                                   "--frequency-penalty", "-0.5", "--seed", "3", "--max-tokens", "9",
                                   "--stop", "a", "--stop", "b"])
    assert sampling_params(a) == SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.2,
                                                presence_penalty=0.5, frequency_penalty=-0.5, seed=3, max_tokens=9,
                                                stop=["a", "b"])
    plain = build_parser().parse_args([command, *required])
    # a terminal's defaults: 128 tokens, temperature 0.8, top-p 0.95, no stop strings
    assert sampling_params(plain) == SamplingParams(temperature=0.8, top_p=0.95, max_tokens=128)
    assert build_parser().parse_args([command, *required]).stop == []  # the default list is never appended to


def test_settings_turn_each_kind_of_field_into_the_right_flag():
    from typing import Literal

    from ember.settings import CommandParser, add_flags, values

    @dataclasses.dataclass
    class Knobs:
        steps: int = dataclasses.field(default=3, metadata={"help": "how many steps"})
        shape: Literal["round", "square"] = "round"
        loud: bool = True
        limit: float | None = None
        tags: list[str] = dataclasses.field(default_factory=list)
        minutes: float | None = dataclasses.field(default=None, metadata={
            "flag": "--wait", "aliases": ["--pause"], "parse": lambda t: float(t) * 60})

    parser = CommandParser(prog="knobs")
    add_flags(parser, Knobs, exclude=["a_field_removed_elsewhere"], defaults={"steps": 5})
    assert values(Knobs, parser.parse_args([])) == Knobs(steps=5)
    got = values(Knobs, parser.parse_args(["--steps", "7", "--shape", "square", "--no-loud", "--limit", "0.5",
                                           "--tags", "a", "--tags", "b", "--pause", "2"]))
    assert got == Knobs(steps=7, shape="square", loud=False, limit=0.5, tags=["a", "b"], minutes=120.0)
    assert "how many steps (default: 5)" in " ".join(parser.format_help().split())
    with pytest.raises(ValueError, match="no field 'stepz'"):
        add_flags(CommandParser(), Knobs, defaults={"stepz": 1})
