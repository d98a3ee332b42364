"""permsparse: N:M structured sparsity for Transformers, with learned channel permutations.

The public API: configure with :class:`PruneConfig` (a :class:`Search` or :class:`Learned`
permutation, a :class:`Calibration`, optionally a :class:`Distill` of the kept weights), call
:func:`prune` on a loaded model, save with :func:`export_checkpoint`, and :func:`load` /
:func:`check_checkpoint` the result.
"""
from __future__ import annotations

from importlib import import_module

# Each public name and its module, imported on first use: ``import permsparse`` (and so the command line's
# argument parsing) stays free of torch and transformers until something heavy is asked for.
_WHERE = {
    "check_checkpoint": ".checkpoint.check", "load": ".checkpoint.load", "ExportConfig": ".config",
    "export_checkpoint": ".checkpoint.save", "Calibration": ".config", "Distill": ".config", "Learned": ".config",
    "PruneConfig": ".config", "Search": ".config", "Perplexity": ".evaluation", "SentenceSimilarity": ".evaluation",
    "Similarity": ".evaluation", "embedding_similarity": ".evaluation", "perplexity": ".evaluation",
    "sentence_similarity": ".evaluation", "load_model": ".models", "efficacy": ".permute.metrics",
    "retained": ".permute.metrics", "find_permutation": ".permute.search", "prune": ".pipeline",
    "PruneReport": ".report",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'permsparse' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Calibration", "Distill", "ExportConfig", "Learned", "Perplexity", "PruneConfig", "PruneReport", "Search", "SentenceSimilarity",
    "Similarity",
    "check_checkpoint", "efficacy", "embedding_similarity", "export_checkpoint", "find_permutation", "load", "load_model", "perplexity",
    "prune", "retained", "sentence_similarity",
]
