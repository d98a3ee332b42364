"""The package's layout: imports point one way, the top level stays small, old import paths still work."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from import_graph import cycles, import_graph, measure  # noqa: E402


def test_the_cycle_finder_finds_a_cycle_and_none_in_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_module_imports_itself_back_and_the_top_level_holds_at_most_eight_modules():
    figures = measure(ROOT)
    assert figures["module_cycles"] == []
    assert len(figures["top_level_modules"]) + 1 <= 8  # with __init__
    assert set(figures["importers_of_pipeline"]) <= {"permsparse", "permsparse.cli.commands"}  # nothing climbs back


def test_every_module_of_the_graph_imports():
    for name in sorted(import_graph(ROOT)):
        if name.split(".")[-1] in ("triton_decode", "__main__"):  # imported only where Triton runs; the CLI entry
            continue
        importlib.import_module(name)


@pytest.mark.parametrize("old, new", [("evaluation", "evaluate.measures"), ("placement", "run.placement"),
                                      ("masks", "sparsity.masks"), ("testbed", "models.vit_testbed"),
                                      ("report_html", "checkpoint.compare")])
def test_old_module_paths_import_the_moved_module(old, new):
    assert importlib.import_module(f"permsparse.{old}") is importlib.import_module(f"permsparse.{new}")


def test_the_public_names_keep_their_old_import_paths():
    import permsparse
    from permsparse.evaluation import perplexity
    from permsparse.models import load_model
    from permsparse.pipeline import prune

    assert (perplexity, load_model, prune) == (permsparse.perplexity, permsparse.load_model, permsparse.prune)
