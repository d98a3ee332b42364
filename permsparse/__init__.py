"""permsparse: N:M structured sparsity for Transformers, with learned channel permutations."""
from __future__ import annotations

__version__ = "0.1.0"

from .deploy import load
from .evaluation import Perplexity, perplexity
from .masks import is_nm, nm_mask, parse_pattern, unstructured_mask
from .models import load_model
from .permutation import efficacy, find_permutation, permutation_methods, retained
from .pruning import PruneConfig, PruneReport, prune
from .scores import magnitude, ria, wanda

__all__ = [
    "Perplexity", "PruneConfig", "PruneReport", "efficacy", "find_permutation", "is_nm", "load", "load_model",
    "magnitude", "nm_mask", "parse_pattern", "perplexity", "permutation_methods", "prune", "retained", "ria",
    "unstructured_mask", "wanda",
]
