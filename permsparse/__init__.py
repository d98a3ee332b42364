"""permsparse: N:M structured sparsity for Transformers, with learned channel permutations.

The public API: configure with :class:`PruneConfig` (a :class:`Search` or :class:`Learned`
permutation, a :class:`Calibration`, optionally a :class:`Distill` of the kept weights or a
:class:`Quantization` of them), call :func:`prune` on a loaded model, save with :func:`export_checkpoint`, and :func:`load` /
:func:`check_checkpoint` the result.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# Each public name and its module, imported on first use: ``import permsparse`` (and so the command line's
# argument parsing) stays free of torch and transformers until something heavy is asked for.
_WHERE = {
    "check_checkpoint": ".checkpoint.check", "load": ".checkpoint.load", "ExportConfig": ".config",
    "export_checkpoint": ".checkpoint.save", "Calibration": ".config", "Distill": ".config", "Learned": ".config",
    "PruneConfig": ".config", "Quantization": ".config", "Search": ".config", "Perplexity": ".evaluate.measures",
    "SentenceSimilarity": ".evaluate.measures", "Similarity": ".evaluate.measures",
    "embedding_similarity": ".evaluate.measures", "perplexity": ".evaluate.measures",
    "sentence_similarity": ".evaluate.measures", "load_model": ".models.loading", "efficacy": ".permute.metrics",
    "retained": ".permute.metrics", "find_permutation": ".permute.search", "prune": ".pipeline",
    "PruneReport": ".report",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'permsparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Calibration", "Distill", "ExportConfig", "Learned", "Perplexity", "PruneConfig", "PruneReport", "Quantization", "Search", "SentenceSimilarity",
    "Similarity",
    "check_checkpoint", "efficacy", "embedding_similarity", "export_checkpoint", "find_permutation", "load", "load_model", "perplexity",
    "prune", "retained", "sentence_similarity",
]


# Modules that moved into the stage packages (issue 46): their old import paths keep working.
MOVED = {
    "adapters": "discover.adapters", "cache": "run.cache", "calibration": "sparsity.statistics",
    "data": "data.text", "distill": "train.distill", "distributed": "run.distributed",
    "evaluation": "evaluate.measures", "images": "data.images", "imagetext": "data.imagetext",
    "masking": "train.following_masks", "masks": "sparsity.masks", "memory": "run.memory",
    "objective": "permute.objective", "placement": "run.placement", "progress": "run.progress",
    "report_html": "checkpoint.compare", "resume": "run.resume", "scores": "sparsity.scores",
    "smollm2": "models.smollm2", "towers": "per_tower", "testbed": "models.vit_testbed", "vlm_eval": "evaluate.vlm",
    "vlm_testbed": "models.vlm_testbed", "zeroshot": "evaluate.zeroshot",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``permsparse.<old name>`` as the module it moved to (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{__name__}.")
        if fullname.startswith(f"{__name__}.") and old in MOVED and old != "data":
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.removeprefix(f'{__name__}.')]}")

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _MovedModules())
