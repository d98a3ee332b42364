"""The benchmark harness's arithmetic: seeds summarised per method, paired by seed; stored rows reused only
where they stand for the row; the tables of README.md and docs/results.md current."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from common import Protocol, Row, across_seeds, gap_closed_by_seed, mean_sd, seed_of  # noqa: E402
import tables  # noqa: E402


def row(label, ppl, gap=None, config=True):
    return {"label": label, "ppl": {"wikitext2": ppl}, "gap": None if gap is None else {"wikitext2": gap},
            "config": {} if config else None, "prune_s": 10.0}


def test_seed_of_splits_the_label():
    assert seed_of("c4 | learned default | seed 12") == ("c4 | learned default", 12)
    assert seed_of("c4 | ria") == ("c4 | ria", None)


def test_across_seeds_means_and_pairs_by_seed():
    results = [row("c4 | ria | seed 0", 200.0, 0.5), row("c4 | ria | seed 1", 210.0, 0.4),
               row("c4 | learned | seed 0", 140.0, 0.8), row("c4 | learned | seed 1", 150.0, 0.6),
               row("c4 | learned | seed 2", 1.0, 1.0)]  # no ria at seed 2: no paired difference
    summary = {r["label"]: r for r in across_seeds(results, "c4 | ria")}
    assert summary["c4 | ria"]["ppl"]["wikitext2"] == pytest.approx((205.0, 50 ** 0.5))
    assert summary["c4 | ria"]["gap_minus_ref"] == {}
    assert summary["c4 | learned"]["seeds"] == [0, 1, 2]
    assert "wikitext2" not in summary["c4 | learned"]["gap_minus_ref"]
    assert "wikitext2" not in summary["c4 | learned"]["ppl_minus_ref"]
    del results[-1]
    learned = {r["label"]: r for r in across_seeds(results, "c4 | ria")}["c4 | learned"]
    assert learned["gap_minus_ref"]["wikitext2"] == pytest.approx(mean_sd([0.3, 0.2]))
    assert learned["ppl_minus_ref"]["wikitext2"] == pytest.approx(mean_sd([-60.0, -60.0]))
    assert learned["gap"]["wikitext2"] == pytest.approx((0.7, mean_sd([0.8, 0.6])[1]))


@pytest.mark.parametrize("document", tables.DOCUMENTS, ids=lambda path: path.name)
def test_generated_tables_match_their_results(document):
    text = document.read_text()
    assert tables.regenerate(text) == text, f"{document.name} tables are stale: run python3 bench/tables.py"


def test_every_table_sits_in_one_document():
    names = [name for document in tables.DOCUMENTS
             for name in re.findall(r"<!-- table:(\w+) -->", document.read_text())]
    assert "demo" in re.findall(r"<!-- table:(\w+) -->", tables.README.read_text())
    assert len(names) == len(set(names)), "a table appears twice across README.md and docs/results.md"


def test_check_fails_when_either_document_is_stale(tmp_path, monkeypatch):
    stale = "<!-- table:demo -->\nold\n<!-- /table:demo -->\n"
    fresh = tables.regenerate(stale)
    assert fresh != stale  # bench/results/demo.json rewrote the table
    readme, results = tmp_path / "README.md", tmp_path / "results.md"
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "DOCUMENTS", (readme, results))
    monkeypatch.setattr(sys, "argv", ["tables.py", "--check"])
    for first, second in ((fresh, stale), (stale, fresh), (fresh, fresh)):
        readme.write_text(first)
        results.write_text(second)
        assert tables.main() == (0 if first == second == fresh else 1)
        assert readme.read_text() == first and results.read_text() == second  # --check rewrites nothing
    readme.write_text(stale)
    results.write_text(stale)
    monkeypatch.setattr(sys, "argv", ["tables.py"])
    assert tables.main() == 0
    assert readme.read_text() == fresh and results.read_text() == fresh


def test_across_seeds_leaves_the_dense_row_without_gap_or_seconds():
    results = [row("dense | seed 0", 36.0, config=False), row("dense | seed 1", 36.0, config=False),
               row("ria | seed 0", 200.0, 0.5), row("ria | seed 1", 190.0, 0.6)]
    summary = {r["label"]: r for r in across_seeds(results, "ria")}
    assert summary["dense"]["gap"]["wikitext2"] == (None, None) and summary["dense"]["prune_s"] is None
    assert summary["ria"]["prune_s"] == 10.0 and summary["ria"]["ppl"]["wikitext2"][0] == 195.0


def test_gap_closed_by_seed_uses_each_seeds_own_limits():
    results = [row("none | seed 0", 300.0), row("limit | seed 0", 100.0), row("ria | seed 0", 200.0),
               row("none | seed 1", 400.0), row("limit | seed 1", 200.0), row("ria | seed 1", 250.0)]
    gap_closed_by_seed(results, "none", "limit")
    assert [r["gap"]["wikitext2"] for r in results] == pytest.approx([0.0, 1.0, 0.5, 0.0, 1.0, 0.75])


def test_stored_rows_are_reused_only_for_the_same_row_protocol_and_machine(tmp_path, monkeypatch):
    from permsparse import PruneConfig, Search
    from permsparse.serial import to_dict

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ria, none = PruneConfig(permutation=Search("ria")), PruneConfig()
    protocol = Protocol("smollm2-135m", 512, 16, ("wikitext2",))
    stored = [{"label": "c4 | ria", "config": to_dict(ria), "ppl": {"wikitext2": 200.0, "alpaca": 70.0}, "gap": {}},
              {"label": "c4 | none", "config": to_dict(PruneConfig(pattern="4:8")), "ppl": {"wikitext2": 300.0}}]
    payload = {"protocol": {"model": "smollm2-135m", "seqlen": 512, "windows": 16, "tasks": [], "limit": None},
               "machine": common.machine(), "results": stored}
    (tmp_path / "here.json").write_text(json.dumps(payload))
    rows = [Row("c4 | ria", ria), Row("c4 | none", none)]
    found = common.reusable(rows, protocol, ["here"])
    assert list(found) == ["c4 | ria"]  # the stored none row has another config
    assert found["c4 | ria"]["ppl"] == {"wikitext2": 200.0} and found["c4 | ria"]["reused_from"] == "here"
    assert common.reusable(rows, Protocol("smollm2-135m", 512, 32, ("wikitext2",)), ["here"]) == {}
    assert common.reusable(rows, Protocol("smollm2-135m", 512, 16, ("shakespeare",)), ["here"]) == {}
    (tmp_path / "there.json").write_text(json.dumps({**payload, "machine": {**payload["machine"], "cpu": "other"}}))
    assert common.reusable(rows, protocol, ["there"]) == {}


def test_a_one_seed_runs_rows_stand_for_the_rows_of_their_seed(tmp_path, monkeypatch):
    from permsparse import Calibration, PruneConfig, Search
    from permsparse.serial import to_dict

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    protocol = Protocol("smollm2-135m", 512, 16, ("wikitext2",))
    ria = {s: PruneConfig(permutation=Search("ria"), calibration=Calibration(seed=s)) for s in (0, 1)}
    payload = {"protocol": {"model": "smollm2-135m", "seqlen": 512, "windows": 16, "tasks": [], "limit": None},
               "machine": common.machine(),
               "results": [{"label": "c4 | ria", "config": to_dict(ria[1]), "ppl": {"wikitext2": 190.0}}]}
    (tmp_path / "seed1.json").write_text(json.dumps(payload))
    rows = [Row(f"c4 | ria | seed {s}", ria[s]) for s in (0, 1)]
    found = common.reusable(rows, protocol, ["seed1"])
    assert list(found) == ["c4 | ria | seed 1"]  # the stored config's seed picks the row
    assert found["c4 | ria | seed 1"]["label"] == "c4 | ria | seed 1"


def test_an_interrupted_runs_partial_results_are_reused(tmp_path, monkeypatch):
    from permsparse import PruneConfig, Search
    from permsparse.serial import to_dict

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ria = PruneConfig(permutation=Search("ria"))
    protocol = Protocol("smollm2-135m", 512, 16, ("wikitext2",), threads=1)
    done = {"label": "ria", "config": to_dict(ria), "ppl": {"wikitext2": 200.0}, "prune_s": 9.0}
    common.save_partial("run", protocol, [done])
    found = common.reusable([Row("ria", ria), Row("none", PruneConfig())], protocol, ["run.partial"])
    assert list(found) == ["ria"] and found["ria"]["ppl"] == {"wikitext2": 200.0}


def test_a_stored_config_that_predates_a_field_stands_for_that_fields_default(tmp_path, monkeypatch):
    from permsparse import Distill, PruneConfig, Search
    from permsparse.serial import to_dict

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ria = PruneConfig(permutation=Search("ria"))
    old = {k: v for k, v in to_dict(ria).items() if k != "distill"}  # written before distillation existed
    payload = {"protocol": {"model": "smollm2-135m", "seqlen": 512, "windows": 16, "tasks": [], "limit": None},
               "machine": common.machine(), "results": [{"label": "ria", "config": old, "ppl": {"wikitext2": 200.0}}]}
    (tmp_path / "old.json").write_text(json.dumps(payload))
    protocol = Protocol("smollm2-135m", 512, 16, ("wikitext2",))
    assert list(common.reusable([Row("ria", ria)], protocol, ["old"])) == ["ria"]
    distilled = PruneConfig(permutation=Search("ria"), distill=Distill(steps=10))
    assert common.reusable([Row("ria", distilled)], protocol, ["old"]) == {}
    nested = to_dict(distilled)  # written before the distillation's masks could follow the weights
    del nested["distill"]["masks"], nested["distill"]["perm_lr"]
    payload["results"] = [{"label": "d", "config": nested, "ppl": {"wikitext2": 90.0}}]
    (tmp_path / "older.json").write_text(json.dumps(payload))
    assert list(common.reusable([Row("d", distilled)], protocol, ["older"])) == ["d"]
    joint = PruneConfig(permutation=Search("ria"), distill=Distill(steps=10, masks="joint"))
    assert common.reusable([Row("d", joint)], protocol, ["older"]) == {}


def test_gpu_results_render_as_tables():
    check = {"machine": {"gpu": "H100", "torch": "2.11", "cuda": "13.0"}, "date": "2026-12-06",
             "command": "python3 bench/gpu_check.py", "estimate_8b_gb": {"e2e": 51.9},
             "parts": {"tests": {"result": {"summary": "40 passed"}},
                       "1b learned": {"result": {"stages": {"search": 3.0, "learning": 20.0}, "peak_gb": 12.0}},
                       "8b searches": {"result": {"ria q 4096x4096": 1.0}, "error": "stopped after its limit of 65 s"},
                       "70b offload": {"error": "stopped after its limit of 35 s"}}}
    text = tables.render_gpu_check(check).splitlines()
    assert "| 1b learned | 23 | 12.0 | search 3.0, learning 20.0 |" in text[5]
    assert "ria q 4096x4096 1.0 s; the rest stopped" in text[6] and "stopped after its limit of 35 s" in text[7]
    run = {"model": "llama-3.1-8b (8 of 32 blocks)", "config": {"dtype": "float16", "permuted": False},
           "machine": {"gpu": "H100"}, "linears": 56, "bytes": {"linear_dense": 1000, "linear_deployed": 570},
           "deploy": {"converted": ["a"], "storages": {"a": "cusparselt"}, "predicted_speedup": 1.2},
           "logit_error": {"linear24": 1e-3}, "tolerance": 1e-2, "best": "graph",
           "rows": [{"candidate": "graph", "regime": "graph", "shape": "1x8192", "dense_ms": 90.8, "sparse_ms": 75.0,
                     "speedup": 1.21}]}
    speed = tables.render_gpu_speed({"command": "python3 bench/gpu_speed.py", "date": "2026-12-06",
                                     "runs": {"8b": run, "1b": {"error": "RuntimeError: x"}},
                                     "targets": ["  8B folded prefill 1x8192: 1.210 (>= 1.15: met)"]})
    assert "on H100" in speed and "1.210" in speed and "1b: RuntimeError: x" in speed and "met" in speed


def test_zero_shot_over_seeds_pairs_within_each_seed_and_pools_the_differences():
    def scored(label, correct):  # one task of four items
        return {"label": label, "zero_shot": {"boolq": sum(correct) / 4, "mean": sum(correct) / 4},
                "zero_shot_correct": {"boolq": correct}}

    results = [scored("ria | seed 0", [1, 0, 0, 0]), scored("learned | seed 0", [1, 1, 0, 0]),
               scored("ria | seed 1", [1, 1, 1, 0]), scored("learned | seed 1", [1, 1, 1, 1])]
    text = tables.zero_shot_seeds_table({"protocol": {"tasks": ["boolq"]}}, results, "ria")
    learned = next(line for line in text.splitlines() if line.startswith("| learned"))
    # each seed: +25 points on the same items, standard error 25 (differences 0, 1, 0, 0: sd 0.5, 4 items);
    # pooled: +25 ± sqrt(2 * 25²) / 2
    assert learned == "| learned | 75.0 | 75.0 | +25.00 ± 25.00, +25.00 ± 25.00 | +25.00 ± 17.68 |"


def test_every_permsparse_name_a_bench_script_imports_exists():
    """Imports inside a benchmark's functions run only when its rows do: a name moved in the library would
    fail hours into a run. Every ``from permsparse... import name`` of bench/ must resolve now."""
    import ast
    import importlib

    missing = []
    for script in sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("permsparse"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{script.name}:{node.lineno} {node.module}.{alias.name}")
    assert not missing
