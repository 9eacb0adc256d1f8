"""Ember's ready tasks as lm-evaluation-harness task YAMLs over the same local files.

    python benchmarks/lm_eval_tasks.py --out DIR [--data ../shared/data/eval] [--tasks arc_easy ...]
    lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path DIR --tasks ember_arc_easy ...

Each task keeps Ember's prompt (`doc_to_text`, `doc_to_choice`, `doc_to_target`, delimiters)
and points lm-eval at the absolute path of the same data file (lm-eval resolves `data_files`
from its working directory). Files lm-eval's `json` loader cannot read are rewritten once
as JSONL beside the YAMLs: HellaSwag's llama.cpp text export (six lines an item). TruthfulQA
MC2 is scored by a function of lm-eval's own task, which a local YAML cannot name, so its
copy asks for `acc` and only its per-choice log-likelihoods are compared. Task names get an
`ember_` prefix so they never shadow lm-eval's own tasks of the same names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.eval.tasks import TaskConfig, _resolve, default_data_dir, load_split  # noqa: E402

MULTIPLE_CHOICE = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa",
                   "truthfulqa_mc2"]
PREFIX = "ember_"


def write_lm_eval_tasks(out: Path, tasks: list[str] = MULTIPLE_CHOICE, data_dir: Path | None = None) -> dict[str, str]:
    """Write one lm-eval YAML per task into `out`; returns {ember task: lm-eval task name}."""
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    for name in tasks:
        cfg = TaskConfig.load(name)
        split = cfg.test_split
        path = _resolve(cfg, cfg.data_files[split], data_dir).resolve()
        if cfg.dataset_path != "json":  # a format only Ember reads: hand lm-eval the parsed rows
            rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in load_split(cfg, split, data_dir)]
            path = out / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        metrics = [m for m in cfg.metric_list if m["metric"] in ("acc", "acc_norm")] or [{"metric": "acc"}]
        spec = {"task": PREFIX + name, "dataset_path": "json", "dataset_kwargs": {"data_files": {split: str(path)}},
                "test_split": split, "fewshot_split": split, "output_type": cfg.output_type,
                "doc_to_text": cfg.doc_to_text, "doc_to_choice": cfg.doc_to_choice, "doc_to_target": cfg.doc_to_target,
                "target_delimiter": cfg.target_delimiter, "fewshot_delimiter": cfg.fewshot_delimiter,
                "metric_list": [{"metric": m["metric"], "aggregation": "mean", "higher_is_better": True}
                                for m in metrics]}
        if cfg.description:
            spec["description"] = cfg.description
        (out / f"{PREFIX}{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True),
                                                  encoding="utf-8")
        names[name] = PREFIX + name
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the YAMLs (lm_eval --include_path)")
    ap.add_argument("--data", help=f"the eval data folder (default: {default_data_dir()})")
    ap.add_argument("--tasks", nargs="+", default=MULTIPLE_CHOICE)
    args = ap.parse_args()
    names = write_lm_eval_tasks(Path(args.out), args.tasks, Path(args.data) if args.data else None)
    print(" ".join(names.values()))


if __name__ == "__main__":
    main()
