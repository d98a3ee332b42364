"""permsparse: N:M structured sparsity for Transformers, with learned channel permutations.

The public API: configure with :class:`PruneConfig` (a :class:`Search` or :class:`Learned`
permutation, a :class:`Calibration`, optionally a :class:`Distill` of the kept weights), call
:func:`prune` on a loaded model, save with :func:`export_checkpoint`, and :func:`load` /
:func:`check_checkpoint` the result.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from .checkpoint.check import check_checkpoint
from .checkpoint.load import load
from .checkpoint.save import ExportConfig, export_checkpoint
from .config import Calibration, Distill, Learned, PruneConfig, Search
from .evaluate.measures import (Perplexity, SentenceSimilarity, Similarity, embedding_similarity, perplexity,
                                sentence_similarity)
from .models.loading import load_model
from .permute.metrics import efficacy, retained
from .permute.search import find_permutation
from .pipeline import prune
from .report import PruneReport

__all__ = [
    "Calibration", "Distill", "ExportConfig", "Learned", "Perplexity", "PruneConfig", "PruneReport", "Search", "SentenceSimilarity",
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
    "smollm2": "models.smollm2", "testbed": "models.vit_testbed", "vlm_eval": "evaluate.vlm",
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
