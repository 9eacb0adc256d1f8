"""Benchmark tasks in a subset of lm-evaluation-harness's YAML, run against any `LocalLM`/`EndpointLM`.

Keys read: `task`, `dataset_path` (`json`, `csv`, `hellaswag_txt`, or a file) with
`data_files` ({split: path}, also as lm-eval's `dataset_kwargs: {data_files: ...}`) and `test_split`/`fewshot_split`, `description`,
`doc_to_text`, `doc_to_choice`, `doc_to_target`, `doc_to_labels` (MC2), `target_delimiter`,
`fewshot_delimiter`, `num_fewshot`, `output_type` (multiple_choice, loglikelihood,
loglikelihood_rolling, generate_until), `generation_kwargs` (`until`, `max_gen_toks`),
`metric_list` (names, with `regexes_to_ignore`, `pattern`, `schema`), `filter_list`
(regex + take_first). A `doc_to_*` value is a field name, a Jinja template, or a literal.

Context/continuation pairs are tokenized as lm-eval does: trailing spaces of the context
move to the continuation, and the continuation's ids are what encoding the whole adds.

A prompt is built as lm-eval 0.4 builds it: an optional system turn (`--system-instruction`
joined to the task's description), each solved example as a user turn (the question) and
an assistant turn (its answer), then the question. Without a chat template the turns are
concatenated with the task's delimiters; with `--apply-chat-template` the model's template
renders them, as one user turn holding the examples or, with `--fewshot-as-multiturn`, as
alternating turns, and a multiple-choice answer follows the assistant header with no
delimiter. Tasks whose `doc_to_text` gives a choice index and whose choices are contexts
(WinoGrande's partial scoring) score the same continuation after each context.
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
        if isinstance(raw.get("dataset_kwargs"), dict):  # lm-eval's spelling of the same files
            kwargs = raw.pop("dataset_kwargs")
            if not isinstance(kwargs.get("data_files"), dict) or set(kwargs) - {"data_files"}:
                raise EmberError(f"{path}: dataset_kwargs may hold only data_files, a mapping of split to file.")
            raw.setdefault("data_files", kwargs["data_files"])
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


# What each ready task's file holds, for the message a user without it gets (docs/eval_tasks.md says more).
DATA_FORMATS = {
    "arc_easy": "JSONL, one {query, choices: [...], gold: index} a line",
    "arc_challenge": "JSONL, one {query, choices: [...], gold: index} a line",
    "boolq": "JSONL, one {query: 'Passage: ...\\nQuestion: ...?', choices: ['no', 'yes'], gold} a line",
    "openbookqa": "JSONL, one {query, choices: [4 answers], gold} a line",
    "piqa": "JSONL, one {query: 'Question: ...\\nAnswer: ', choices: [2 solutions], gold} a line",
    "winogrande": "JSONL, one {context_options: [2 sentence starts], continuation, gold} a line",
    "hellaswag": "llama.cpp's HellaSwag text, bzip2: 6 lines an item (context, gold index, 4 endings)",
    "truthfulqa_mc2": "TruthfulQA's mc_task.json: a list of {question, mc2_targets: {answer: 0|1}}",
    "lambada_openai": "JSONL, one {context, continuation: the last word} a line",
    "gsm8k": "JSONL, one {question, answer: '... #### <number>'} a line",
    "nq_open": "JSONL, one {question, answer: [...]} a line",
}


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
    raise EmberError(f"Task '{cfg.task}' needs the data file {rel} ({DATA_FORMATS.get(cfg.task, 'see the task YAML')}): "
                     f"put it at {default_data_dir() / rel}, or pass --data DIR holding {rel}.")


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
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EmberError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}).") from None
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EmberError(f"{path}, line {line_no}: not valid JSON ({e.msg}).") from None
            rows[-1]["_line"] = line_no
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EmberError(f"{path}, item {i + 1}: a row must be a JSON object, not {type(row).__name__}.")
        row.setdefault("_source", str(path))
    return rows


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
        where = doc.get("_source", "a document") + (f", line {doc['_line']}" if "_line" in doc else "")
        raise EmberError(f"Template {spec!r} failed on {where}: {e}.") from None
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


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered: lm-evaluation-harness's options of the same names."""

    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool | None = None  # None: on exactly when a chat template is applied (lm-eval's default)

    def __post_init__(self) -> None:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise EmberError("--fewshot-as-multiturn renders examples as chat turns; it needs --apply-chat-template.")
        if self.fewshot_as_multiturn is None:
            object.__setattr__(self, "fewshot_as_multiturn", self.apply_chat_template)


@dataclass
class Turn:
    role: str  # system, user or assistant
    content: str
    delimiter: str = ""  # what follows the content when turns are joined as plain text


def _join(prefix: str | None, suffix: str | None, delimiter: str) -> str:
    """lm-eval's maybe_delimit: the delimiter only where neither side brings whitespace."""
    if not prefix or not suffix:
        return (prefix or "") + (suffix or "")
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() else prefix + delimiter + suffix


def multiple_input(cfg: TaskConfig, doc: dict[str, Any]) -> bool:
    """WinoGrande-style: `doc_to_text` gives the gold index and the choices are whole contexts."""
    return cfg.doc_to_choice is not None and isinstance(render(cfg.doc_to_text, doc), int)


def sample_fewshot(pool: list[dict[str, Any]], k: int, rng: random.Random, exclude: dict[str, Any] | None):
    """lm-eval's default sampler: k + 1 drawn and the evaluated document dropped (same split), or k."""
    if k <= 0:
        return []
    if exclude is None:
        return rng.sample(pool, min(k, len(pool)))
    picked = [d for d in rng.sample(pool, min(k + 1, len(pool))) if d != exclude][:k]
    if len(picked) < k:
        rest = [d for d in pool if d != exclude]
        picked = rng.sample(rest, min(k, len(rest)))
    return picked


def _question(cfg: TaskConfig, doc: dict[str, Any]) -> str:
    q = render(cfg.doc_to_text, doc)
    if isinstance(q, int) and cfg.doc_to_choice is not None:  # multiple input: the gold context
        return str(render(cfg.doc_to_choice, doc)[q])
    return str(q)


def build_turns(cfg: TaskConfig, doc: dict[str, Any], shots: list[dict[str, Any]],
                fmt: PromptFormat = PromptFormat()) -> list[Turn]:
    """The system turn, the solved examples and the question, before any rendering."""
    turns = []
    system = _join(fmt.system_instruction, cfg.description, cfg.fewshot_delimiter)
    if system:
        turns.append(Turn("system", system))
    for shot in shots:
        answer = str(render(cfg.doc_to_target, shot)) if multiple_input(cfg, shot) else _target_text(cfg, shot)
        turns += [Turn("user", _question(cfg, shot), cfg.target_delimiter),
                  Turn("assistant", answer, cfg.fewshot_delimiter)]
    turns.append(Turn("user", _question(cfg, doc)))
    return turns


def render_turns(turns: list[Turn], fmt: PromptFormat) -> str | list[dict[str, str]]:
    """Plain text, or the chat messages the model's template will render."""
    if not fmt.apply_chat_template:
        return "".join(t.content + t.delimiter for t in turns)
    system = [{"role": "system", "content": turns[0].content}] if turns[0].role == "system" else []
    rest = turns[len(system):]
    if fmt.fewshot_as_multiturn:
        return system + [{"role": t.role, "content": t.content} for t in rest]
    # One user turn holding the examples as plain text (lm-eval's multiturn_to_singleturn).
    text = "".join(t.content + t.delimiter for t in rest[:-1]) + rest[-1].content
    return system + [{"role": "user", "content": text}]


def build_context(cfg: TaskConfig, doc: dict[str, Any], pool: list[dict[str, Any]], k: int,
                  rng: random.Random, fmt: PromptFormat = PromptFormat(), same_split: bool = True,
                  ) -> str | list[dict[str, str]] | list[str | list[dict[str, str]]]:
    """Description, k solved examples (never the doc itself), then the doc's question.

    A multiple-input document gives one context per choice (the same examples before each).
    """
    shots = sample_fewshot(pool, k, rng, doc if same_split else None)
    if not multiple_input(cfg, doc):
        return render_turns(build_turns(cfg, doc, shots, fmt), fmt)
    head = build_turns(cfg, doc, shots, fmt)[:-1]
    return [render_turns(head + [Turn("user", str(c))], fmt) for c in render(cfg.doc_to_choice, doc)]


def _rendered(lm: Any, ctx: Any) -> Any:
    """Chat messages through the model's template (lm.chat_prompt); text and lists of contexts as they are."""
    if isinstance(ctx, list) and ctx and isinstance(ctx[0], dict):
        return lm.chat_prompt(ctx)
    if isinstance(ctx, list):
        return [_rendered(lm, c) for c in ctx]
    return ctx


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
             data_dir: Path | None = None, bootstrap_iters: int = 1000,
             prompt_format: PromptFormat = PromptFormat()) -> dict[str, Any]:
    """Score every document; returns {task, results: {metric: {value, stderr, n}}, samples: [...]}."""
    fmt = prompt_format
    docs = load_split(cfg, cfg.test_split, data_dir)
    k = cfg.num_fewshot if num_fewshot is None else num_fewshot
    # Examples drawn from the evaluated split never include the evaluated document (lm-eval drops it
    # when a task names that split as its fewshot_split; Ember always does).
    same_split = cfg.fewshot_split in (None, cfg.test_split)
    pool = docs if same_split or not k else load_split(cfg, cfg.fewshot_split, data_dir)
    docs = docs[:limit] if limit else docs
    rng = random.Random(cfg.fewshot_seed)
    rolling = cfg.output_type == "loglikelihood_rolling"  # whole documents: no prompt to build
    if rolling and fmt.apply_chat_template:
        raise EmberError(f"Task '{cfg.task}' scores whole documents (loglikelihood_rolling): there is no prompt "
                         "for a chat template to render; run it without --apply-chat-template.")
    contexts = [""] * len(docs) if rolling else [build_context(cfg, d, pool, k, rng, fmt, same_split) for d in docs]
    if fmt.apply_chat_template and cfg.output_type != "generate_until":
        contexts = [_rendered(lm, c) for c in contexts]  # scoring needs the text; generation sends the turns
    # With a chat template an answer follows the assistant header directly (lm-eval's rule).
    delimiter = "" if fmt.apply_chat_template else cfg.target_delimiter
    metric_names = [m["metric"] for m in cfg.metric_list]
    samples: list[dict[str, Any]] = []

    if cfg.output_type == "multiple_choice":
        reqs, spans, all_choices = [], [], []
        for doc, ctx in zip(docs, contexts):
            choices = [str(c) for c in render(cfg.doc_to_choice, doc)]
            all_choices.append(choices)
            spans.append((len(reqs), len(reqs) + len(choices)))
            if isinstance(ctx, list):  # multiple input: one context per choice, the same continuation
                cont = delimiter + str(render(cfg.doc_to_target, doc))
                reqs += [encode_pair(lm, c, cont) for c in ctx]
            else:
                reqs += [encode_pair(lm, ctx, delimiter + c) for c in choices]
        results = lm.loglikelihood(reqs)
        for i, (doc, ctx, choices, (a, b)) in enumerate(zip(docs, contexts, all_choices, spans)):
            lls = [r.logprob for r in results[a:b]]
            gold = render(cfg.doc_to_text, doc) if isinstance(ctx, list) else _target(cfg, doc, choices)
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
