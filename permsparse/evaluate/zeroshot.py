"""Zero-shot (and MMLU 5-shot) accuracy through EleutherAI's lm-evaluation-harness, offline.

The harness (PyPI ``lm-eval``) scores an in-memory ``transformers`` model wrapped in its ``HFLM`` class; nothing
is downloaded. Each supported task runs as a *local* harness task: the task definition carries the harness's own
prompt fields (``doc_to_text``, ``doc_to_choice``, ``doc_to_target``, ``target_delimiter``, ``description``),
preprocessing (HellaSwag's ``process_docs``, WinoGrande's partial-scoring functions), metrics (``acc``,
``acc_norm``, LAMBADA's ``perplexity``) and version numbers, copied verbatim from the YAML files bundled with
lm-eval 0.4.13. Only the data location differs: it reads the files under the ``zeroshot/`` data folder
(``$PERMSPARSE_DATA/zeroshot``, else ``shared/data/zeroshot`` beside the checkout, else beside the working
directory) through the ``datasets`` ``json`` loader. ``tests/test_zeroshot.py`` renders each local task and the
installed harness's own bundled task on the same documents and checks that every request is identical.

Files the ``json`` loader cannot read as they are (ARC/OpenBookQA's nested question object, PIQA's separate label
file, HellaSwag's bzip2 text, the MMLU CSVs) are converted once into JSON Lines in the Hugging Face schema the
harness's task expects (``allenai/ai2_arc``, ``allenai/openbookqa``, ``aps/super_glue``, ``baber/piqa``,
``allenai/winogrande``, ``Rowan/hellaswag``, ``cais/mmlu``), under ``$PERMSPARSE_CACHE/zeroshot`` (else the
platform's user cache folder for ``permsparse``). The converted files are keyed by a hash of the source bytes
and written atomically, so concurrent runs and changed data are both safe.

Evaluation splits: ARC, OpenBookQA, LAMBADA and MMLU use their test sets; BoolQ, HellaSwag, PIQA and WinoGrande
their validation sets, as the harness does.

Usage::

    from permsparse.evaluate.zeroshot import zero_shot, format_table
    results = zero_shot(model, tokenizer, ["arc_easy", "hellaswag", "mmlu"], limit=200)
    print(format_table(results))
"""
from __future__ import annotations

import bz2
import contextlib
import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..data.text import data_dirs
from ..run.cache import cache_dir

__all__ = [
    "MMLU_SUBJECTS", "TASKS", "TaskResult", "available_tasks", "cache_root", "data_root", "format_table",
    "local_task_config", "zero_shot",
]

TASKS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "winogrande", "piqa", "lambada_openai", "mmlu",
)
"""The supported task names (the harness's own names)."""

DEFAULT_FEWSHOT: dict[str, int] = {"mmlu": 5}
"""Shots per task when ``zero_shot`` is not given ``num_fewshot``: MMLU is 5-shot as in the literature, the rest 0."""

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)
"""The 57 MMLU subjects, in the harness's (alphabetical) order."""

_CONVERT_VERSION = "2"  # part of the cache key: bump when a converter's output changes
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- results


@dataclass
class TaskResult:
    """One task's scores as the harness reports them.

    ``acc``/``acc_norm`` are fractions in [0, 1]; ``*_stderr`` are the harness's standard errors (the sample
    standard error of the mean for accuracies, a bootstrap estimate for LAMBADA's perplexity; ``nan`` where the
    harness gives none: fewer than two items scored in the task, or in any MMLU subject). ``acc_norm`` is ``None``
    for tasks whose official metric list lacks it (BoolQ, WinoGrande, LAMBADA, MMLU); ``perplexity`` is set for
    ``lambada_openai`` only. ``items`` counts the documents scored (for MMLU, summed over the 57 subjects).
    ``seconds`` is the wall time of the harness run for this task, data loading included. ``source`` says where
    the documents came from. ``correct`` holds each scored document's ``acc`` (1 or 0) in document order (MMLU:
    subject after subject), so two models scored on the same items can be compared pair by pair.
    """

    task: str
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    items: int
    num_fewshot: int
    seconds: float
    perplexity: float | None = None
    perplexity_stderr: float | None = None
    source: str = ""
    correct: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------------------- where things live


def data_root() -> Path:
    """The ``zeroshot/`` data folder: the first of :func:`permsparse.data.text.data_dirs` that holds one (the first
    candidate when none does, so messages about missing files name a concrete place)."""
    candidates = [folder / "zeroshot" for folder in data_dirs()]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def cache_root() -> Path:
    """Where converted task files live: ``zeroshot/`` under :func:`permsparse.models.loading.cache_dir`."""
    return cache_dir() / "zeroshot"


# ----------------------------------------------------------------------------------------------- reading the sources


class _DataError(ValueError):
    """A data file is present but unusable (misaligned labels, wrong shape)."""


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _question_rows(path: Path, stem_key: str) -> list[dict[str, Any]]:
    """AI2's nested question JSONL (ARC, OpenBookQA) flattened: the stem under ``stem_key``, ``choices`` a dict of
    lists, as in the ``allenai/ai2_arc`` and ``allenai/openbookqa`` (``main``) schemas."""
    rows = []
    for doc in _jsonl(path):
        q = doc["question"]
        rows.append({
            "id": doc["id"],
            stem_key: q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
            "answerKey": doc["answerKey"],
        })
    return rows


def _arc_rows(path: Path) -> list[dict[str, Any]]:
    return _question_rows(path, "question")


def _openbookqa_rows(path: Path) -> list[dict[str, Any]]:
    return _question_rows(path, "question_stem")


_BOOL_LABELS = {False: 0, True: 1, "false": 0, "true": 1, "False": 0, "True": 1, "0": 0, "1": 1}  # 0/1 == False/True


def _boolq_rows(path: Path) -> list[dict[str, Any]]:
    """SuperGLUE BoolQ in the ``aps/super_glue`` schema: ``label`` is the class index (0 = False, 1 = True).

    The source's ``label`` may be a JSON boolean or the string ``"true"``/``"false"`` (this copy has strings);
    anything else is refused rather than guessed.
    """
    rows = []
    for d in _jsonl(path):
        label = _BOOL_LABELS.get(d["label"])
        if label is None:
            raise _DataError(f"{path.name}: BoolQ label {d['label']!r} is not a boolean")
        rows.append({"question": d["question"], "passage": d["passage"], "idx": int(d["idx"]), "label": label})
    return rows


def _piqa_rows(path: Path, labels: Path) -> list[dict[str, Any]]:
    """PIQA in the ``baber/piqa`` schema: the gold index from the line-aligned ``.lst`` becomes ``label``."""
    docs, golds = list(_jsonl(path)), _lines(labels)
    if len(docs) != len(golds):
        raise _DataError(f"{path.name} has {len(docs)} items but {labels.name} has {len(golds)} labels")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(g)} for d, g in zip(docs, golds)]


def _winogrande_rows(path: Path, labels: Path | None) -> list[dict[str, Any]]:
    """WinoGrande in the ``allenai/winogrande`` schema (``answer`` is ``"1"``/``"2"``).

    The answers come from the JSONL; the ``.lst`` label file, when present, must agree line by line.
    """
    docs = list(_jsonl(path))
    if labels is not None and labels.is_file():
        golds = _lines(labels)
        if len(golds) != len(docs) or any(str(d["answer"]) != g for d, g in zip(docs, golds)):
            raise _DataError(f"{labels.name} disagrees with the answers in {path.name}")
    return [
        {"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": str(d["answer"])}
        for d in docs
    ]


def _hellaswag_rows(path: Path) -> list[dict[str, Any]]:
    """HellaSwag's bzip2 text (6 lines an item) in the ``Rowan/hellaswag`` schema.

    The file holds ``activity_label + ": " + ctx`` already joined, so the context goes to ``ctx_a`` and ``ctx_b`` is
    empty. The harness's ``process_docs`` then builds the same query string from it, except that it cannot
    capitalise the first letter of the original ``ctx_b`` (the file did not keep the split): where lm-eval reads
    "...on a roof. He", this data reads "...on a roof. he". Scores can therefore differ slightly from published
    HellaSwag numbers; the data is not altered to hide that.
    """
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise _DataError(f"{path.name} has {len(lines)} lines, not a multiple of 6")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep:
            raise _DataError(f"{path.name} item {i // 6} lacks the 'activity: context' header")
        rows.append({
            "ind": i // 6, "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
            "endings": endings, "label": str(int(label)),
        })
    return rows


def _mmlu_rows(path: Path, subject: str) -> list[dict[str, Any]]:
    """One MMLU CSV (header ``question,choice0..3,answer``) in the ``cais/mmlu`` schema.

    Read with ``csv`` so option texts such as ``None`` stay strings.
    """
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
            raise _DataError(f"{path.name} has header {header}")
        return [
            {"question": r[0], "subject": subject, "choices": r[1:5], "answer": int(r[5])} for r in reader if r
        ]


# ----------------------------------------------------------------------------------------------- the harness's prompts
# Copied from lm-eval 0.4.13's bundled tasks; tests/test_zeroshot.py checks them against the installed harness.


def _hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py ``preprocess``: strip WikiHow bracket artefacts and double spaces."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_process_docs(dataset):
    """lm_eval/tasks/hellaswag/utils.py ``process_docs``: build ``query``/``choices``/``gold`` from the raw fields."""

    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


def _winogrande_doc_to_text(doc):
    """lm_eval/tasks/winogrande/preprocess_winogrande.py: the gold option's index (multiple-input scoring)."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def _winogrande_doc_to_target(doc):
    """The shared continuation after the blank: partial scoring."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def _winogrande_doc_to_choice(doc):
    """The two contexts: the sentence up to the blank with each option filled in."""
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}

def _task(output_type: str, text, target, choice, metrics: list, decontaminate=None, version: float = 1.0,
          **extra) -> dict[str, Any]:
    """One task's prompt and metric fields, keyed as in the harness's YAML (``doc_to_*``, ``metric_list``...)."""
    fields = {"output_type": output_type, **extra, "doc_to_text": text, "doc_to_target": target}
    if choice is not None:
        fields["doc_to_choice"] = choice
    if decontaminate is not None:
        fields.update(should_decontaminate=True, doc_to_decontamination_query=decontaminate)
    fields.update(metric_list=metrics, metadata={"version": version})
    return fields


# Per task: the prompt/metric fields of the harness's YAML (no dataset or split keys; those are local).
_PROMPTS: dict[str, dict[str, Any]] = {
    "arc_easy": _task("multiple_choice", "Question: {{question}}\nAnswer:", "{{choices.label.index(answerKey)}}",
                      "{{choices.text}}", [_ACC, _ACC_NORM], "Question: {{question}}\nAnswer:"),
    "boolq": _task("multiple_choice", "{{passage}}\nQuestion: {{question}}?\nAnswer:", "label", ["no", "yes"],
                   [{"metric": "acc"}], "passage", version=2.0),
    "hellaswag": _task("multiple_choice", "{{query}}", "{{label}}", "choices", [_ACC, _ACC_NORM],
                       process_docs=_hellaswag_process_docs),
    "openbookqa": _task("multiple_choice", "question_stem", "{{choices.label.index(answerKey.lstrip())}}",
                        "{{choices.text}}", [_ACC, _ACC_NORM], "question_stem"),
    "winogrande": _task("multiple_choice", _winogrande_doc_to_text, _winogrande_doc_to_target,
                        _winogrande_doc_to_choice, [_ACC], "sentence"),
    "piqa": _task("multiple_choice", "Question: {{goal}}\nAnswer:", "label", "{{[sol1, sol2]}}", [_ACC, _ACC_NORM],
                  "goal"),
    "lambada_openai": _task("loglikelihood", "{{text.split(' ')[:-1]|join(' ')}}", "{{' '+text.split(' ')[-1]}}",
                            None, [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                   _ACC], "{{text}}"),
    # lm_eval/tasks/mmlu/default/_default_template_yaml; the description is per subject
    "mmlu": _task("multiple_choice", "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                  "D. {{choices[3]}}\nAnswer:", "answer", ["A", "B", "C", "D"], [_ACC],
                  fewshot_config={"sampler": "first_n"}),
}
_PROMPTS["arc_challenge"] = _PROMPTS["arc_easy"]

# The harness's ``mmlu`` group (lm_eval/tasks/mmlu/default/_mmlu.yaml): size-weighted mean of ``acc``.
_MMLU_GROUP = {
    "group": "mmlu",
    "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
    "metadata": {"version": 2},
}


def _mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


# ----------------------------------------------------------------------------------------------- local task data


@dataclass(frozen=True)
class _Local:
    """Where one task's documents come from and how they become harness-ready JSON Lines."""

    files: tuple[str, ...]  # required, relative to the zeroshot folder
    split: str  # the harness's evaluation split name
    convert: Callable[[Path], dict[str, list[dict[str, Any]]]] | None  # None: the first file is read as it is
    optional: tuple[str, ...] = ()  # read when present (cross-checks)


_LOCAL: dict[str, _Local] = {
    "arc_easy": _Local(("arc_easy/ARC-Easy-Test.jsonl",), "test",
                       lambda d: {"test": _arc_rows(d / "arc_easy/ARC-Easy-Test.jsonl")}),
    "arc_challenge": _Local(("arc_challenge/ARC-Challenge-Test.jsonl",), "test",
                            lambda d: {"test": _arc_rows(d / "arc_challenge/ARC-Challenge-Test.jsonl")}),
    "boolq": _Local(("boolq/val.jsonl",), "validation",
                    lambda d: {"validation": _boolq_rows(d / "boolq/val.jsonl")}),
    "hellaswag": _Local(("hellaswag/hellaswag_val_full.txt.bz2",), "validation",
                        lambda d: {"validation": _hellaswag_rows(d / "hellaswag/hellaswag_val_full.txt.bz2")}),
    "openbookqa": _Local(("openbookqa/test.jsonl",), "test",
                         lambda d: {"test": _openbookqa_rows(d / "openbookqa/test.jsonl")}),
    "winogrande": _Local(("winogrande/dev.jsonl",), "validation",
                         lambda d: {"validation": _winogrande_rows(d / "winogrande/dev.jsonl",
                                                                   d / "winogrande/dev-labels.lst")},
                         optional=("winogrande/dev-labels.lst",)),
    "piqa": _Local(("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation",
                   lambda d: {"validation": _piqa_rows(d / "piqa/valid.jsonl", d / "piqa/valid-labels.lst")}),
    "lambada_openai": _Local(("lambada_openai/lambada_test.jsonl",), "test", None),
}
for _subject in MMLU_SUBJECTS:
    _LOCAL[f"mmlu_{_subject}"] = _Local(
        (f"mmlu/test/{_subject}_test.csv", f"mmlu/dev/{_subject}_dev.csv"), "test",
        (lambda s: lambda d: {"test": _mmlu_rows(d / f"mmlu/test/{s}_test.csv", s),
                              "dev": _mmlu_rows(d / f"mmlu/dev/{s}_dev.csv", s)})(_subject),
    )
del _subject


def _leaves(task: str) -> list[str]:
    return [f"mmlu_{s}" for s in MMLU_SUBJECTS] if task == "mmlu" else [task]


def _missing(task: str, root: Path) -> list[Path]:
    return [root / f for leaf in _leaves(task) for f in _LOCAL[leaf].files if not (root / f).is_file()]


def available_tasks(data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Each supported task name mapped to where its data comes from, or why it is missing.

    ``data_dir`` is the ``zeroshot/`` folder (default: ``data_root()``). A value reads ``"local: <folder>"`` when
    every file the task needs is there, else ``"missing: <first missing file> (+N more)"``.
    """
    root = Path(data_dir) if data_dir is not None else data_root()
    out: dict[str, str] = {}
    for task in TASKS:
        missing = _missing(task, root)
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            out[task] = f"missing: {missing[0]}{more}"
        else:
            out[task] = f"local: {root / ('mmlu' if task == 'mmlu' else task)}"
    return out


def _digest(root: Path, local: _Local) -> str:
    h = hashlib.sha256(_CONVERT_VERSION.encode())
    for rel in local.files + local.optional:
        path = root / rel
        if path.is_file():
            h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _data_files(leaf: str, root: Path, cache: Path) -> dict[str, str]:
    """The ``data_files`` mapping for one leaf task, converting into the cache on first use."""
    local = _LOCAL[leaf]
    if local.convert is None:
        return {local.split: str((root / local.files[0]).resolve())}
    folder = cache / leaf / _digest(root, local)
    converted = None
    files: dict[str, str] = {}
    for split in (local.split, "dev") if leaf.startswith("mmlu_") else (local.split,):
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            converted = converted if converted is not None else local.convert(root)
            _write_jsonl_atomic(path, converted[split])
        files[split] = str(path)
    return files


def local_task_config(
    leaf: str,
    *,
    num_fewshot: int = 0,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The harness task config (a dict for ``lm_eval.api.task.ConfigurableTask``) that reads local files.

    ``leaf`` is a task name from ``TASKS`` other than ``mmlu``, or an MMLU subject task ``mmlu_<subject>``. The
    prompt and metric fields are the harness's own; the dataset is the ``json`` loader over the local (or
    converted) files, with the ``datasets`` cache under ``cache_dir`` (default: ``cache_root()``).

    Few-shot examples: MMLU draws its first ``num_fewshot`` ``dev`` items, as the harness does. The other tasks'
    official few-shot sources are their training splits, which are not in the local data; with
    ``num_fewshot > 0`` they sample from the evaluation split itself (seeded), never the item being scored.
    """
    if leaf not in _LOCAL:
        raise ValueError(f"unknown local task {leaf!r}")
    root = Path(data_dir) if data_dir is not None else data_root()
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    mmlu = leaf.startswith("mmlu_")
    cfg = copy.deepcopy({k: v for k, v in _PROMPTS["mmlu" if mmlu else leaf].items() if not callable(v)})
    cfg.update({k: v for k, v in _PROMPTS["mmlu" if mmlu else leaf].items() if callable(v)})
    split = _LOCAL[leaf].split
    cfg.update({
        "task": leaf,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": _data_files(leaf, root, cache), "cache_dir": str(cache / "hf-datasets")},
        "test_split": split,
        "num_fewshot": num_fewshot,
    })
    if mmlu:
        subject = leaf.removeprefix("mmlu_")
        cfg.update({"task_alias": subject, "description": _mmlu_description(subject), "fewshot_split": "dev"})
    elif num_fewshot > 0:
        cfg["fewshot_split"] = split  # equal to test_split, so the harness excludes the item being scored
    return cfg


# ----------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def _scoped_env(offline: bool, progress: bool) -> Iterator[None]:
    """Offline switches (environment and the already-imported libraries' flags) and, without ``progress``, no
    progress bars, harness log lines or harness prints on stdout/stderr; all undone afterwards."""
    env = {"DISABLE_MULTIPROC": "1"}  # the harness's bootstrap runs in-process instead of forking the model
    if offline:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    saved_env = {k: os.environ.get(k) for k in env}
    patched: list[tuple[Any, str, Any]] = []
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    saved_levels = [lg.level for lg in loggers]
    progress_was_on = False
    try:
        os.environ.update(env)
        if offline:
            import datasets.config
            import huggingface_hub.constants

            for mod, attr in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                              (huggingface_hub.constants, "HF_HUB_OFFLINE")):
                if hasattr(mod, attr):
                    patched.append((mod, attr, getattr(mod, attr)))
                    setattr(mod, attr, True)
        if not progress:
            import datasets

            progress_was_on = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        if progress:
            yield
        else:  # the harness prints some bars and notes unconditionally
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for lg, level in zip(loggers, saved_levels):
            lg.setLevel(level)
        if progress_was_on:
            import datasets

            datasets.enable_progress_bars()


def _harness_lm(model, tokenizer, batch_size: int, progress: bool):
    """Wrap the in-memory model in the harness's ``HFLM`` (a copy of the tokenizer: HFLM may set a pad token)."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):  # the harness writes "N/A" when a stderr cannot be computed
        return math.nan


def _build_local(task: str, shots: int, root: Path, cache: Path):
    """The harness Task (or, for MMLU, Group of 57 subject tasks) for one of our task names."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask

    if task != "mmlu":
        return ConfigurableTask(config=local_task_config(task, num_fewshot=shots, data_dir=root, cache_dir=cache))
    group = Group.from_config({**_MMLU_GROUP, "task": _leaves("mmlu")})
    for leaf in _leaves("mmlu"):
        group.add(ConfigurableTask(config=local_task_config(leaf, num_fewshot=shots, data_dir=root, cache_dir=cache)))
    return group


def _result(task: str, results: dict[str, Any], seconds: float, source: str) -> TaskResult:
    metrics = results["results"][task]
    leaves = results.get("group_subtasks", {}).get(task) or [task]
    n_samples = results.get("n-samples", {})
    items = sum(int(n_samples[leaf]["effective"]) for leaf in leaves if leaf in n_samples)
    if not items:
        items = int(metrics.get("sample_len", 0))
    shots = [int(results["n-shot"][leaf]) for leaf in leaves if leaf in results.get("n-shot", {})]
    return TaskResult(
        task=task,
        acc=float(metrics["acc,none"]),
        acc_stderr=_number(metrics.get("acc_stderr,none", math.nan)),
        acc_norm=_number(metrics.get("acc_norm,none")),
        acc_norm_stderr=_number(metrics.get("acc_norm_stderr,none")) if "acc_norm,none" in metrics else None,
        items=items,
        num_fewshot=max(shots) if shots else 0,
        seconds=seconds,
        perplexity=_number(metrics.get("perplexity,none")),
        perplexity_stderr=_number(metrics.get("perplexity_stderr,none")) if "perplexity,none" in metrics else None,
        source=source,
        correct=tuple(int(sample["acc"]) for leaf in leaves
                      for sample in sorted(results.get("samples", {}).get(leaf, []), key=lambda s: s["doc_id"])),
    )


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
    source: Literal["local", "hub"] = "local",
    data_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 1000,
) -> list[TaskResult]:
    """Score an in-memory causal LM on the named tasks with lm-evaluation-harness; one ``TaskResult`` each.

    ``model`` is a ``transformers`` causal LM and ``tokenizer`` its tokenizer; the harness's ``HFLM`` wraps them
    as they are (HFLM puts the model in eval mode and re-ties tied embeddings; the training flag is restored
    afterwards). ``device`` moves the model there first; ``None`` leaves it where it is.

    ``tasks`` are names from ``TASKS``. An unknown name raises ``ValueError`` before anything runs. With
    ``source="local"`` (the default) the data comes from the ``zeroshot/`` folder (``data_dir``, default
    ``data_root()``); a task whose files are missing is skipped with a warning naming it and the file, and the
    harness runs with the Hugging Face hub and datasets switched offline. ``source="hub"`` instead runs the
    harness's own registered tasks of the same names, which download their datasets from the hub (needs network).

    ``num_fewshot`` applies to every task; ``None`` means 0, except 5 for MMLU (``DEFAULT_FEWSHOT``). ``limit``
    scores the first ``limit`` documents of each task (for MMLU, of each subject).

    MMLU reports the harness's ``mmlu`` group score: the mean accuracy over all scored questions, i.e. each
    subject weighted by its number of items (``weight_by_size: True``, as in the harness's ``mmlu`` group at every
    level), with the pooled standard error. It is not the unweighted mean of the 57 subject accuracies.

    ``bootstrap_iters`` sets the bootstrap resamples for LAMBADA's perplexity standard error (accuracy standard
    errors are analytic); the harness's command line uses 100000, which costs minutes on a CPU.

    Each task runs as its own harness evaluation so that ``seconds`` is per task; results are deterministic for a
    given model (the harness's fixed seeds, first-``limit`` documents, first-n MMLU shots).
    """
    if source not in ("local", "hub"):
        raise ValueError(f"source must be 'local' or 'hub', not {source!r}")
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError("num_fewshot must be >= 0")

    root = Path(data_dir) if data_dir is not None else data_root()
    cache = cache_root()
    runnable: list[str] = []
    for task in dict.fromkeys(tasks):
        if source == "local":
            missing = _missing(task, root)
            if missing:
                more = f" and {len(missing) - 1} more file(s)" if len(missing) > 1 else ""
                warnings.warn(f"zero_shot: skipping task {task!r}: missing {missing[0]}{more}", stacklevel=2)
                continue
        runnable.append(task)
    if not runnable:
        return []

    if device is not None:
        model.to(device)
    was_training = model.training
    out: list[TaskResult] = []
    unusable: list[str] = []  # warned about after the run: without progress, stderr is silenced during it
    try:
        with _scoped_env(offline=source == "local", progress=progress):
            import lm_eval
            from lm_eval.tasks import TaskManager

            lm = _harness_lm(model, tokenizer, batch_size, progress)
            manager = TaskManager(include_defaults=False) if source == "local" else TaskManager()
            for task in runnable:
                shots = num_fewshot if num_fewshot is not None else DEFAULT_FEWSHOT.get(task, 0)
                start = time.perf_counter()
                if source == "local":
                    try:
                        spec = _build_local(task, shots, root, cache)
                    except (_DataError, KeyError, ValueError) as err:
                        unusable.append(f"zero_shot: skipping task {task!r}: unusable data ({err})")
                        continue
                    where = f"local: {root}"
                    results = lm_eval.simple_evaluate(
                        model=lm, tasks=[spec], task_manager=manager, limit=limit,
                        bootstrap_iters=bootstrap_iters, log_samples=True,
                    )
                else:
                    where = "hub"
                    results = lm_eval.simple_evaluate(
                        model=lm, tasks=[task], task_manager=manager, num_fewshot=shots, limit=limit,
                        bootstrap_iters=bootstrap_iters, log_samples=True,
                    )
                seconds = time.perf_counter() - start
                out.append(_result(task, results, seconds, where))
    finally:
        model.train(was_training)
        for message in unusable:
            warnings.warn(message, stacklevel=2)
    return out


# ----------------------------------------------------------------------------------------------- reporting


def format_table(results: Sequence[TaskResult]) -> str:
    """One plain-text table: task, shots, items, acc ± stderr, acc_norm ± stderr, perplexity, seconds.

    Accuracies are percentages with two decimals; an absent metric shows as ``-``.
    """

    def pct(v: float | None) -> str:
        return "-" if v is None else ("nan" if math.isnan(v) else f"{100 * v:.2f}")

    def num(v: float | None) -> str:
        return "-" if v is None else (f"{v:.3f}" if abs(v) < 1e6 else f"{v:.3g}")

    header = ["task", "shots", "items", "acc%", "±", "acc_norm%", "±", "ppl", "±", "seconds"]
    rows = [
        [r.task, str(r.num_fewshot), str(r.items), pct(r.acc), pct(r.acc_stderr), pct(r.acc_norm),
         pct(r.acc_norm_stderr), num(r.perplexity), num(r.perplexity_stderr), f"{r.seconds:.1f}"]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
