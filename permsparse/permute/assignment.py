"""The exact linear assignment (the Hungarian solution) of RIA's search and of the learned permutations'
hardening: scipy's, imported where it is first needed, so that permsparse itself imports without scipy (a
lent GPU machine has none until the wheels of ``bench/gpu_prepare.sh`` are installed there)."""
from __future__ import annotations

import numpy as np


def linear_sum_assignment(cost: np.ndarray, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.optimize.linear_sum_assignment(cost, maximize=maximize)``; without scipy, an ImportError that
    says which computation needs it."""
    try:
        from scipy.optimize import linear_sum_assignment as solve
    except ImportError as err:
        raise ImportError(f"permutation assignments (RIA's search, learned permutations) need scipy, which cannot "
                          f"be imported here ({err}); install scipy") from err
    return solve(cost, maximize=maximize)
