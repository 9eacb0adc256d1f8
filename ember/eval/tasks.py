"""Benchmark tasks in a subset of lm-evaluation-harness's YAML, run against any `LocalLM`/`EndpointLM`.

Keys read: `task`, `dataset_path` (`json`, `csv`, `hellaswag_txt`, or a file) with
`data_files` ({split: path}) and `test_split`/`fewshot_split`, `description`,
`doc_to_text`, `doc_to_choice`, `doc_to_target`, `doc_to_labels` (MC2), `target_delimiter`,
`fewshot_delimiter`, `num_fewshot`, `output_type` (multiple_choice, loglikelihood,
loglikelihood_rolling, generate_until), `generation_kwargs` (`until`, `max_gen_toks`),
`metric_list` (names, with `regexes_to_ignore`, `pattern`, `schema`), `filter_list`
(regex + take_first). A `doc_to_*` value is a field name, a Jinja template, or a literal.

Context/continuation pairs are tokenized as lm-eval does: trailing spaces of the context
move to the continuation, and the continuation's ids are what encoding the whole adds.
"""

from __future__ import annotations

import ast
import bz2
import csv
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ember.errors import EmberError
from ember.eval import metrics as M
from ember.eval.perplexity import text_perplexity

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass
class TaskConfig:
    task: str
    output_type: str = "multiple_choice"
    dataset_path: str = "json"
    data_files: dict[str, str] = field(default_factory=dict)
    test_split: str = "test"
    fewshot_split: str | None = None
    description: str = ""
    doc_to_text: Any = "{{query}}"
    doc_to_choice: Any = None
    doc_to_target: Any = None
    doc_to_labels: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    metric_list: list[dict[str, Any]] = field(default_factory=list)
    filter_list: list[dict[str, Any]] = field(default_factory=list)
    fewshot_seed: int = 1234
    base_dir: Path = Path(".")

    @classmethod
    def load(cls, name_or_path: str | Path) -> TaskConfig:
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = TASKS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
            raise EmberError(f"No task file or ready task named '{name_or_path}'; ready tasks: {known}.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise EmberError(f"{path} is not valid YAML: {e}.") from None
        if not isinstance(raw, dict) or "task" not in raw:
            raise EmberError(f"{path} must be a mapping with at least a 'task' key.")
        known_keys = set(cls.__dataclass_fields__) - {"base_dir"}
        unknown = set(raw) - known_keys - {"dataset_name", "validation_split", "training_split", "metadata",
                                          "should_decontaminate", "doc_to_decontamination_query", "tag"}
        if unknown:
            raise EmberError(f"{path}: unsupported key(s) {', '.join(sorted(unknown))}.")
        cfg = cls(**{k: v for k, v in raw.items() if k in known_keys}, base_dir=path.parent)
        if cfg.output_type not in ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until"):
            raise EmberError(f"{path}: unknown output_type '{cfg.output_type}'.")
        if not cfg.metric_list:
            cfg.metric_list = [{"metric": m} for m in DEFAULT_METRICS[cfg.output_type]]
        return cfg


DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "loglikelihood": ["perplexity", "acc"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
                   "generate_until": ["exact_match"]}


# --- data ----------------------------------------------------------------------------------
def default_data_dir() -> Path:
    root = os.environ.get("EMBER_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return base / "eval"


def _resolve(cfg: TaskConfig, rel: str, data_dir: Path | None) -> Path:
    for base in [p for p in (data_dir, default_data_dir(), cfg.base_dir) if p is not None]:
        for cand in (Path(base) / rel, Path(base) / Path(rel).name):
            if cand.is_file():
                return cand
    if Path(rel).is_file():
        return Path(rel)
    raise EmberError(f"Task '{cfg.task}' needs the data file '{rel}'; pass --data DIR holding it.")


def _read(path: Path, fmt: str) -> list[dict[str, Any]]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if fmt == "hellaswag_txt":  # blocks of 6 lines: context, gold index, 4 endings
            lines = f.read().split("\n")
            return [{"query": lines[i], "gold": int(lines[i + 1]), "choices": lines[i + 2:i + 6]}
                    for i in range(0, len(lines) - 5, 6)]
        if fmt == "csv" or path.suffix == ".csv":
            return list(csv.DictReader(f))
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_split(cfg: TaskConfig, split: str, data_dir: Path | None = None) -> list[dict[str, Any]]:
    if split not in cfg.data_files:
        raise EmberError(f"Task '{cfg.task}' has no data file for split '{split}'.")
    return _read(_resolve(cfg, cfg.data_files[split], data_dir), cfg.dataset_path)


# --- templates -----------------------------------------------------------------------------
_env = None


def render(spec: Any, doc: dict[str, Any]) -> Any:
    """lm-eval's rules: a field name gives the field; '{{...}}' is Jinja; anything else is literal."""
    global _env
    if not isinstance(spec, str):
        return spec
    if spec in doc:
        return doc[spec]
    if "{{" not in spec and "{%" not in spec:
        return spec
    if _env is None:
        _env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        out = _env.from_string(spec).render(**doc)
    except Exception as e:  # a template naming a missing field is the user's to fix
        raise EmberError(f"Template {spec!r} failed on a document: {e}.") from None
    if out.startswith("[") and out.endswith("]"):  # a rendered list, e.g. "{{choices}}"
        try:
            return ast.literal_eval(out)
        except (ValueError, SyntaxError):
            pass
    return out


def _target(cfg: TaskConfig, doc: dict[str, Any], choices: list[str] | None) -> Any:
    t = render(cfg.doc_to_target, doc)
    if choices is not None and isinstance(t, str):
        t = int(t) if t.strip().lstrip("-").isdigit() else choices.index(t)
    return t


def _target_text(cfg: TaskConfig, doc: dict[str, Any]) -> str:
    choices = render(cfg.doc_to_choice, doc) if cfg.doc_to_choice is not None else None
    t = _target(cfg, doc, choices)
    if choices is not None:
        return choices[t[0] if isinstance(t, list) else t]
    return str(t[0] if isinstance(t, list) else t)


def build_context(cfg: TaskConfig, doc: dict[str, Any], pool: list[dict[str, Any]], k: int,
                  rng: random.Random) -> str:
    """Description, k solved examples (never the doc itself), then the doc's question."""
    shots = []
    if k > 0:
        candidates = [d for d in pool if d is not doc]
        picked = rng.sample(candidates, min(k, len(candidates)))
        shots = [str(render(cfg.doc_to_text, d)) + cfg.target_delimiter + _target_text(cfg, d) for d in picked]
    text = str(render(cfg.doc_to_text, doc))
    return cfg.description + "".join(s + cfg.fewshot_delimiter for s in shots) + text


def encode_pair(lm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: spaces move to the continuation; its ids are what the whole adds."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    if not context:
        return [lm.prefix_token], lm.encode(continuation)
    whole, ctx = lm.encode(context + continuation), lm.encode(context)
    return ctx, whole[len(ctx):]


def _filter(cfg: TaskConfig, text: str) -> str:
    for flt in cfg.filter_list[:1]:
        for step in flt.get("filter", []):
            if step.get("function") == "regex":
                found = re.findall(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), text)
                if not found:
                    return step.get("fallback", "[invalid]")
                first = found[step.get("group_select", 0)]
                text = first if isinstance(first, str) else next((g for g in first if g), "")
    return text


# --- running -------------------------------------------------------------------------------
def run_task(lm: Any, cfg: TaskConfig, limit: int | None = None, num_fewshot: int | None = None,
             data_dir: Path | None = None, bootstrap_iters: int = 1000) -> dict[str, Any]:
    """Score every document; returns {task, results: {metric: {value, stderr, n}}, samples: [...]}."""
    docs = load_split(cfg, cfg.test_split, data_dir)
    k = cfg.num_fewshot if num_fewshot is None else num_fewshot
    pool = load_split(cfg, cfg.fewshot_split, data_dir) if (k and cfg.fewshot_split) else docs
    docs = docs[:limit] if limit else docs
    rng = random.Random(cfg.fewshot_seed)
    rolling = cfg.output_type == "loglikelihood_rolling"  # whole documents: no prompt to build
    contexts = [""] * len(docs) if rolling else [build_context(cfg, d, pool, k, rng) for d in docs]
    metric_names = [m["metric"] for m in cfg.metric_list]
    samples: list[dict[str, Any]] = []

    if cfg.output_type == "multiple_choice":
        reqs, spans, all_choices = [], [], []
        for doc, ctx in zip(docs, contexts):
            choices = [str(c) for c in render(cfg.doc_to_choice, doc)]
            all_choices.append(choices)
            spans.append((len(reqs), len(reqs) + len(choices)))
            reqs += [encode_pair(lm, ctx, cfg.target_delimiter + c) for c in choices]
        results = lm.loglikelihood(reqs)
        for i, (doc, ctx, choices, (a, b)) in enumerate(zip(docs, contexts, all_choices, spans)):
            lls = [r.logprob for r in results[a:b]]
            gold = _target(cfg, doc, choices)
            scores = {m: v for m, v in M.mc_scores(lls, choices, gold).items() if m in metric_names}
            if "mc2" in metric_names:
                scores["mc2"] = M.mc2(lls, [int(x) for x in render(cfg.doc_to_labels, doc)])
            samples.append({"doc_id": i, "context": ctx, "choices": choices, "gold": gold, "loglikelihoods": lls,
                            "is_greedy": [r.is_greedy for r in results[a:b]], "metrics": scores})

    elif cfg.output_type == "loglikelihood":
        reqs = [encode_pair(lm, ctx, str(render(cfg.doc_to_target, d))) for d, ctx in zip(docs, contexts)]
        for i, (r, ctx) in enumerate(zip(lm.loglikelihood(reqs), contexts)):
            samples.append({"doc_id": i, "context": ctx, "loglikelihood": r.logprob, "is_greedy": r.is_greedy,
                            "metrics": {"acc": float(r.is_greedy), "_nll": -r.logprob, "_tokens": r.num_tokens}})

    elif cfg.output_type == "loglikelihood_rolling":
        for i, d in enumerate(docs):
            text = str(render(cfg.doc_to_target, d))
            r = text_perplexity(lm, text, window=lm.max_length - 1)
            samples.append({"doc_id": i, "metrics": {"_nll": r.nll, "_words": r.words, "_bytes": r.bytes}})

    else:  # generate_until
        gk = dict(cfg.generation_kwargs)
        until = gk.get("until", ["\n\n"])
        until = [until] if isinstance(until, str) else list(until)
        outs = lm.generate(contexts, until, max_tokens=int(gk.get("max_gen_toks", 256)),
                           temperature=float(gk.get("temperature", 0.0)))
        for i, (doc, ctx, out) in enumerate(zip(docs, contexts, outs)):
            target = render(cfg.doc_to_target, doc)
            refs = [str(t) for t in target] if isinstance(target, list) else [str(target)]
            pred = _filter(cfg, out)
            scores = {}
            for m in cfg.metric_list:
                name = m["metric"]
                if name == "exact_match":
                    scores[name] = M.exact_match(pred, refs, m.get("regexes_to_ignore", ()),
                                                 normalize=m.get("normalize", True))
                elif name == "f1":
                    scores[name] = M.f1(pred, refs)
                elif name == "contains":
                    scores[name] = M.contains(pred, refs)
                elif name == "regex":
                    scores[name] = M.regex_match(pred, m.get("pattern") or refs[0])
                elif name == "json_schema":
                    scores[name] = M.json_schema_valid(pred, m.get("schema") or json.loads(refs[0]))
                else:
                    raise EmberError(f"Unknown generation metric '{name}'.")
            samples.append({"doc_id": i, "context": ctx, "output": out, "filtered": pred, "references": refs,
                            "metrics": scores})

    return {"task": cfg.task, "output_type": cfg.output_type, "num_fewshot": k, "n": len(docs),
            "results": _aggregate(cfg, samples, bootstrap_iters), "samples": samples}


def _aggregate(cfg: TaskConfig, samples: list[dict[str, Any]], iters: int) -> dict[str, Any]:
    per_item = [{k: v for k, v in s["metrics"].items() if not k.startswith("_")} for s in samples]
    out = M.aggregate(per_item, iters) if any(per_item) else {}
    if cfg.output_type == "loglikelihood" and samples:  # perplexity: exp of the mean per-document NLL
        nll = [s["metrics"]["_nll"] for s in samples]
        ones = [1.0] * len(nll)
        out["perplexity"] = {"value": math.exp(sum(nll) / len(nll)), "n": len(nll),
                             "stderr": M.bootstrap_stderr_of(lambda a, b: math.exp(a / b), [nll, ones], iters)}
    if cfg.output_type == "loglikelihood_rolling" and samples:  # pooled over documents, as lm-eval
        cols = [[s["metrics"][k] for s in samples] for k in ("_nll", "_words", "_bytes")]
        nll, words, nbytes = (sum(c) for c in cols)
        figures = {"word_perplexity": (lambda a, w, b: math.exp(a / max(w, 1)), [cols[0], cols[1], cols[2]]),
                   "byte_perplexity": (lambda a, w, b: math.exp(a / max(b, 1)), [cols[0], cols[1], cols[2]]),
                   "bits_per_byte": (lambda a, w, b: a / max(b, 1) / math.log(2), [cols[0], cols[1], cols[2]])}
        for name, (fn, c) in figures.items():
            out[name] = {"value": fn(nll, words, nbytes), "n": len(samples),
                         "stderr": M.bootstrap_stderr_of(fn, c, iters)}
    return out
