"""permsparse: N:M structured sparsity for Transformers, with learned channel permutations.

The public API: configure with :class:`PruneConfig` (a :class:`Search` or :class:`Learned`
permutation, a :class:`Calibration`, optionally a :class:`Distill` of the kept weights or a :class:`Quantization` of them), call
:func:`prune` on a loaded model, save with :func:`export_checkpoint`, and :func:`load` /
:func:`check_checkpoint` the result.
"""
from __future__ import annotations

from .checkpoint.check import check_checkpoint
from .checkpoint.load import load
from .checkpoint.save import ExportConfig, export_checkpoint
from .config import Calibration, Distill, Learned, PruneConfig, Quantization, Search
from .evaluation import Perplexity, SentenceSimilarity, Similarity, embedding_similarity, perplexity, sentence_similarity
from .models import load_model
from .permute.metrics import efficacy, retained
from .permute.search import find_permutation
from .pipeline import prune
from .report import PruneReport

__all__ = [
    "Calibration", "Distill", "ExportConfig", "Learned", "Perplexity", "PruneConfig", "PruneReport", "Quantization", "Search", "SentenceSimilarity",
    "Similarity",
    "check_checkpoint", "efficacy", "embedding_similarity", "export_checkpoint", "find_permutation", "load", "load_model", "perplexity",
    "prune", "retained", "sentence_similarity",
]
