"""Evaluation of a real chat model against lm-evaluation-harness: SmolLM2-135M-Instruct, dequantized to
an HF checkpoint, every ready multiple-choice task, 0-shot, with and without its chat template.

Both harnesses get the same documents from the same local files (benchmarks/lm_eval_tasks.py writes
the YAMLs lm-eval reads); each item's prompt text, continuations and log-likelihoods must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO, need_module, shared_data, smollm2_gguf
from ember.eval.lm import LocalLM
from ember.eval.tasks import PromptFormat, TaskConfig, run_task

sys.path.insert(0, str(REPO / "benchmarks"))
from lm_eval_tasks import MULTIPLE_CHOICE, write_lm_eval_tasks  # noqa: E402

LIMIT = 3  # documents a task: every prompt shape is covered; the full sets are the benchmark's


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory) -> Path:
    from ember.gguf.convert import gguf_to_checkpoint

    return gguf_to_checkpoint(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "fp32", dtype="float32")


@pytest.fixture(scope="module")
def ember_lm(smollm_dir) -> LocalLM:
    return LocalLM(smollm_dir)


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    shared_data("eval")
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    return out, write_lm_eval_tasks(out, MULTIPLE_CHOICE)


@pytest.fixture(scope="module")
def peer_lm(smollm_dir):
    need_module("lm_eval", "the lm-evaluation-harness peer")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(smollm_dir), dtype="float32", device="cpu", batch_size=8)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_smollm2_multiple_choice_equals_lm_eval_hf(peer_lm, ember_lm, lm_eval_tasks, chat):
    import lm_eval
    from lm_eval.tasks import TaskManager

    include, names = lm_eval_tasks
    out = lm_eval.simple_evaluate(model=peer_lm, tasks=list(names.values()), limit=LIMIT, log_samples=True,
                                  bootstrap_iters=0, apply_chat_template=chat, num_fewshot=0,
                                  task_manager=TaskManager(include_path=str(include)))
    fmt = PromptFormat(apply_chat_template=chat)
    for name, peer_name in names.items():
        theirs = sorted(out["samples"][peer_name], key=lambda s: s["doc_id"])
        ours = run_task(ember_lm, TaskConfig.load(name), limit=LIMIT, bootstrap_iters=10, prompt_format=fmt)["samples"]
        assert len(theirs) == len(ours) == LIMIT, name
        for t, o in zip(theirs, ours):
            contexts = o["context"] if isinstance(o["context"], list) else [o["context"]] * len(t["arguments"])
            assert [a[0] for a in t["arguments"]] == contexts, name
            if chat:  # SmolLM2's template writes its own system turn when the conversation has none
                assert contexts[0].startswith("<|im_start|>system\n") and contexts[0].endswith("<|im_start|>assistant\n")
            # Two fp32 forwards of the same weights, transformers' and Ember's: ~1e-6 a token, sums of up
            # to a few hundred tokens (boolq's passages); the bound is 1e-4. A tokenization or
            # prompt difference moves a sum by a whole token's log-probability (~1 or more).
            assert [r[0][0] for r in t["resps"]] == pytest.approx(o["loglikelihoods"], abs=1e-4), name
            if "acc" in o["metrics"]:
                assert t["acc"] == o["metrics"]["acc"], name
