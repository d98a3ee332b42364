"""Zero-shot evaluation through lm-evaluation-harness on local data.

The central check: every local task renders exactly the requests (contexts, continuations, gold answers) and
declares exactly the metrics that the installed harness's own bundled YAML definition produces on the same
documents, so the official prompts are kept. Then the tiny random model runs end to end, offline.
"""
from __future__ import annotations

import bz2
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from permsparse.evaluate import zeroshot as zs  # noqa: E402
from permsparse.serial import to_dict  # noqa: E402

HARNESS_TASKS = Path(__import__("lm_eval").__file__).resolve().parent / "tasks"
OFFICIAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
# Keys that say where the data is, not how it is prompted or scored.
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
             "test_split", "fewshot_split", "num_fewshot", "metadata"}
ROOT = zs.data_root()
HAVE_DATA = all(v.startswith("local") for v in zs.available_tasks(ROOT).values())
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"zero-shot data not found under {ROOT}")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Converted files and the datasets cache go to a temporary folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERMSPARSE_CACHE", str(tmp_path_factory.mktemp("zs-cache")))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """A data folder whose HellaSwag file holds 8 items (the first 6 and the first 2 with ``[...]`` tags), so its
    ``process_docs`` maps 8 documents instead of 10,042; the other tasks link to the real files."""
    root = tmp_path_factory.mktemp("zs-data") / "zeroshot"
    root.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != "hellaswag":
            (root / entry.name).symlink_to(entry)
    with bz2.open(ROOT / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    items = [lines[i:i + 6] for i in range(0, len(lines) - 5, 6)]
    tagged = [item for item in items[6:] if "[" in "".join(item)][:2]
    (root / "hellaswag").mkdir()
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(line for item in items[:6] + tagged for line in item) + "\n")
    return root


def official_yaml(leaf: str) -> dict:
    rel = f"mmlu/default/{leaf}.yaml" if leaf.startswith("mmlu_") else OFFICIAL_YAML[leaf]
    return load_yaml(HARNESS_TASKS / rel, resolve_func=True)


def official_task(leaf: str, ours: dict) -> ConfigurableTask:
    """The harness's bundled task definition, unchanged except that it reads our local files."""
    cfg = {k: v for k, v in official_yaml(leaf).items() if k != "tag"}
    splits = set(ours["dataset_kwargs"]["data_files"])
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs=copy.deepcopy(ours["dataset_kwargs"]),
               num_fewshot=ours["num_fewshot"])
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) not in splits:
            cfg[key] = None
    return ConfigurableTask(config=cfg)


def requests(task: ConfigurableTask, samples: list[int]) -> list[tuple]:
    task.set_fewshot_seed(1234)
    task.build_all_requests(samples=samples)
    return [(i.doc_id, i.idx, i.request_type, i.arguments) for i in task.instances]


def pick(task: ConfigurableTask, n: int = 6, extra=lambda doc: False) -> list[int]:
    """The first ``n`` documents plus the first two that match ``extra`` (unusual shapes worth rendering)."""
    docs = task.task_docs
    special = [i for i in range(len(docs)) if extra(docs[i])][:2]
    return sorted(set(range(n)) | set(special))


def _arc_unusual(doc):
    return len(doc["choices"]["text"]) != 4 or doc["answerKey"].isdigit()


def _hellaswag_bracket(doc):
    return "[" in doc["ctx"] or any("[" in e for e in doc["endings"])


UNUSUAL = {"arc_easy": _arc_unusual, "arc_challenge": _arc_unusual, "hellaswag": _hellaswag_bracket}


# ------------------------------------------------------------------------------------------------ official prompts


@needs_data
@pytest.mark.parametrize("leaf", [*OFFICIAL_YAML, "mmlu_abstract_algebra", "mmlu_high_school_european_history"])
def test_local_task_renders_like_the_harness(leaf, small_root):
    shots = 5 if leaf.startswith("mmlu_") else 0
    ours_cfg = zs.local_task_config(leaf, num_fewshot=shots, data_dir=small_root)
    ours, theirs = ConfigurableTask(config=ours_cfg), official_task(leaf, ours_cfg)
    samples = pick(theirs, extra=UNUSUAL.get(leaf, lambda d: False))
    if leaf == "hellaswag":
        assert len(samples) == 8 and any("[" in theirs.task_docs[i]["ctx"] for i in samples)

    assert requests(ours, samples) == requests(theirs, samples)
    docs_ours, docs_theirs = ours.task_docs, theirs.task_docs
    assert len(docs_ours) == len(docs_theirs)
    gold = [ours.doc_to_target(docs_ours[i]) for i in samples]
    assert gold == [theirs.doc_to_target(docs_theirs[i]) for i in samples]
    assert ours.OUTPUT_TYPE == theirs.OUTPUT_TYPE
    assert ours._aggregation_list == theirs._aggregation_list
    assert ours._higher_is_better == theirs._higher_is_better
    assert ours.config.metadata["version"] == theirs.config.metadata["version"]
    # Every prompt/metric field of the YAML is carried over verbatim (functions are compared by output above).
    official = official_yaml(leaf)
    for key, value in official.items():
        if key in DATA_KEYS:
            continue
        assert key in ours_cfg, key
        assert callable(ours_cfg[key]) if callable(value) else ours_cfg[key] == value, key


def test_mmlu_subjects_and_descriptions_match_the_harness():
    bundled = sorted(p.stem.removeprefix("mmlu_") for p in (HARNESS_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert list(zs.MMLU_SUBJECTS) == bundled and len(bundled) == 57
    for subject in zs.MMLU_SUBJECTS:
        official = official_yaml(f"mmlu_{subject}")
        assert official["dataset_name"] == subject
        assert zs._mmlu_description(subject) == official["description"]
    group = load_yaml(HARNESS_TASKS / "mmlu" / "default" / "_mmlu.yaml", resolve_func=False)
    assert group["aggregate_metric_list"] == zs._MMLU_GROUP["aggregate_metric_list"]


# ------------------------------------------------------------------------------------------------ the data itself


@needs_data
def test_rendered_items_match_the_data_readme(small_root):
    def first(leaf, shots=0):
        task = ConfigurableTask(config=zs.local_task_config(leaf, num_fewshot=shots, data_dir=small_root))
        return requests(task, [0])

    arc = first("arc_easy")
    assert arc[0][3] == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                         "food webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.")
    assert [r[3][1] for r in first("boolq")] == [" no", " yes"]
    hs = first("hellaswag")  # the README's example: ctx_b not capitalised in this copy of the data
    assert hs[0][3] == ("Roof shingle removal: A man is sitting on a roof. he",
                        " is using wrap to wrap a pair of skis.")
    wg = first("winogrande")  # partial scoring: two contexts, one shared continuation
    assert [r[3] for r in wg] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    text = json.loads((ROOT / "lambada_openai" / "lambada_test.jsonl").open().readline())["text"]
    assert first("lambada_openai")[0][3] == (text.rsplit(" ", 1)[0], " " + text.rsplit(" ", 1)[1])
    mmlu = first("mmlu_anatomy", shots=5)
    ctx = mmlu[0][3][0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx.count("\nAnswer:") == 6 and [r[3][1] for r in mmlu] == [" A", " B", " C", " D"]


@needs_data
def test_converted_item_counts_are_the_official_ones():
    counts = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042, "openbookqa": 500,
              "winogrande": 1267, "piqa": 1838, "lambada_openai": 5153}
    for leaf, n in counts.items():
        files = zs.local_task_config(leaf)["dataset_kwargs"]["data_files"]
        (path,) = files.values()
        assert sum(1 for line in open(path, encoding="utf-8") if line.strip()) == n, leaf
    def rows(leaf):
        (path,) = zs.local_task_config(leaf)["dataset_kwargs"]["data_files"].values()
        return [json.loads(line) for line in open(path, encoding="utf-8")]

    assert sum(r["label"] for r in rows("piqa")) == 928  # README: 910 zeros / 928 ones
    assert sorted({r["label"] for r in rows("boolq")}) == [0, 1]
    assert sum(r["label"] for r in rows("boolq")) == 2033  # README: 2,033 true / 1,237 false
    winogrande = rows("winogrande")
    assert len(winogrande) == 1267 and {r["answer"] for r in winogrande} == {"1", "2"}
    mmlu = zs.local_task_config("mmlu_professional_law")["dataset_kwargs"]["data_files"]
    assert sum(1 for _ in open(mmlu["test"])) == 1534 and sum(1 for _ in open(mmlu["dev"])) == 5


@needs_data
def test_few_shot_outside_mmlu_never_shows_the_scored_item():
    task = ConfigurableTask(config=zs.local_task_config("arc_easy", num_fewshot=3))
    reqs = requests(task, list(range(5)))
    for doc_id, _, _, (ctx, _) in reqs:
        question = f"Question: {task.task_docs[doc_id]['question']}\nAnswer:"
        assert ctx.endswith(question) and ctx.count(question) == 1
        assert ctx.count("\nAnswer:") == 4


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


@needs_data
def test_zero_shot_tiny_model_is_sane_and_deterministic(tiny_model, tiny_tokenizer):
    tiny_model.train()
    pad_before = tiny_tokenizer.pad_token
    first = zs.zero_shot(tiny_model, tiny_tokenizer, ["arc_easy", "winogrande"], limit=4, batch_size=4, progress=False)
    second = zs.zero_shot(tiny_model, tiny_tokenizer, ["arc_easy", "winogrande"], limit=4, batch_size=2, progress=False)
    assert [r.task for r in first] == ["arc_easy", "winogrande"]
    for r in first:
        assert 0.0 <= r.acc <= 1.0 and r.items == 4 and r.num_fewshot == 0 and r.seconds > 0
        assert r.acc * 4 == round(r.acc * 4)  # a fraction of the 4 items
        assert len(r.correct) == 4 and set(r.correct) <= {0, 1} and sum(r.correct) / 4 == r.acc  # item by item
        assert math.isfinite(r.acc_stderr)
        assert r.source.startswith("local")
    assert first[0].acc_norm is not None and 0.0 <= first[0].acc_norm <= 1.0
    assert first[1].acc_norm is None  # WinoGrande's official metric list has acc only
    strip = lambda rs: [{k: v for k, v in to_dict(r).items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(first) == strip(second)  # batch size does not change the scores
    assert tiny_model.training  # the training flag is restored
    assert tiny_tokenizer.pad_token == pad_before  # the caller's tokenizer is not modified
    table = zs.format_table(first)
    assert table.splitlines()[0].split()[:3] == ["task", "shots", "items"]
    assert "arc_easy" in table and "winogrande" in table and len(table.splitlines()) == 4


@needs_data
def test_zero_shot_lambada_and_mmlu_group(tiny_model, tiny_tokenizer):
    results = zs.zero_shot(tiny_model, tiny_tokenizer, ["lambada_openai", "mmlu"], limit=1, num_fewshot=0,
                           progress=False)
    lambada, mmlu = results
    assert lambada.perplexity is not None and lambada.perplexity > 1 and lambada.items == 1
    assert mmlu.task == "mmlu" and mmlu.items == 57 and mmlu.num_fewshot == 0  # one question per subject
    assert mmlu.acc * 57 == pytest.approx(round(mmlu.acc * 57))  # item-weighted: a count over the 57 questions
    assert mmlu.acc_norm is None
    assert len(mmlu.correct) == 57 and sum(mmlu.correct) / 57 == pytest.approx(mmlu.acc)
    assert len(lambada.correct) == 1 and lambada.correct[0] == lambada.acc


# ------------------------------------------------------------------------------------------------ errors and skips


def test_unknown_task_raises_listing_known_ones(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="known tasks: arc_easy, arc_challenge"):
        zs.zero_shot(tiny_model, tiny_tokenizer, ["arc_easy", "no_such_task"])
    with pytest.raises(ValueError, match="source"):
        zs.zero_shot(tiny_model, tiny_tokenizer, ["arc_easy"], source="somewhere")


def test_missing_data_folder_skips_with_a_warning(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="skipping task 'hellaswag'.*hellaswag_val_full.txt.bz2"):
        assert zs.zero_shot(tiny_model, tiny_tokenizer, ["hellaswag"], data_dir=tmp_path / "nowhere") == []
    assert all(v.startswith("missing: ") for v in zs.available_tasks(tmp_path).values())


@needs_data
def test_partial_data_runs_what_is_there(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "zeroshot" / "piqa").mkdir(parents=True)
    for name in ("valid.jsonl", "valid-labels.lst"):
        shutil.copy(ROOT / "piqa" / name, tmp_path / "zeroshot" / "piqa" / name)
    monkeypatch.setenv("PERMSPARSE_DATA", str(tmp_path))
    assert zs.data_root() == tmp_path / "zeroshot"
    available = zs.available_tasks()
    assert available["piqa"].startswith("local: ") and available["boolq"].startswith("missing: ")
    with pytest.warns(UserWarning, match="skipping task 'boolq'") as record:
        results = zs.zero_shot(tiny_model, tiny_tokenizer, ["boolq", "piqa"], limit=2, progress=False)
    assert [r.task for r in results] == ["piqa"] and results[0].items == 2
    assert not any("piqa" in str(w.message) for w in record)


def test_format_table_shows_absent_metrics_as_dashes():
    r = zs.TaskResult(task="boolq", acc=0.5, acc_stderr=0.1, acc_norm=None, acc_norm_stderr=None, items=10,
                      num_fewshot=0, seconds=1.0)
    lines = zs.format_table([r]).splitlines()
    assert len(lines) == 3 and set(lines[1]) == {"-"}
    assert lines[2].split() == ["boolq", "0", "10", "50.00", "10.00", "-", "-", "-", "-", "1.0"]


@needs_data
def test_unusable_data_skips_with_a_warning(tiny_model, tiny_tokenizer, tmp_path):
    (tmp_path / "piqa").mkdir()
    shutil.copy(ROOT / "piqa" / "valid.jsonl", tmp_path / "piqa" / "valid.jsonl")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")  # misaligned with the 1,838 items
    with pytest.warns(UserWarning, match="skipping task 'piqa': unusable data.*2 labels"):
        assert zs.zero_shot(tiny_model, tiny_tokenizer, ["piqa"], data_dir=tmp_path, progress=False) == []
