"""RIA's channel permutation (Zhang et al., ICLR 2024): deal channels into groups by column-sum bands,
then re-assign one slot of every group at a time by an exact linear assignment."""
from __future__ import annotations

import torch

from .assignment import linear_sum_assignment
from .swaps import insert_values, leave_member_out


def ria(scores: torch.Tensor, n: int, m: int, gen: torch.Generator, *, rounds: int = 2) -> torch.Tensor:
    """RIA: snake-deal channels (by descending column sum) so every group gets one channel of each
    quantile band (slot), then, slot by slot for ``rounds`` rounds, give each group the slot channel
    that best completes its other ``m-1`` members: an exact linear assignment, so never a loss.

    The sums are float64, as the assignment's ties and near-ties need; only the groups gathered for one
    slot are held in float64 at a time; the scores themselves stay in their own dtype.
    """
    cols, groups = scores.shape[1], scores.shape[1] // m
    order = torch.sort(scores.double().sum(0), descending=True, stable=True).indices  # a passing copy
    band, k = torch.arange(cols) // groups, torch.arange(cols) % groups
    slots = torch.empty(groups, m, dtype=torch.long)
    slots[torch.where(band % 2 == 0, k, groups - 1 - k), band] = order.cpu()
    st = scores.T.contiguous()  # (in, rows) in the scores' own dtype: channel scores contiguous for the sums
    slots = slots.to(scores.device)
    for _ in range(rounds if groups > 1 else 0):
        for j in range(m):
            grid = st[slots].double()  # (groups, m, rows)
            kept, nth = (x[:, 0] for x in leave_member_out(grid, n, j))  # (groups, rows)
            value = insert_values(grid[:, j].contiguous(), nth) + kept.sum(-1)
            row, col = linear_sum_assignment(value.cpu().numpy(), maximize=True)
            row, col = torch.as_tensor(row, device=scores.device), torch.as_tensor(col, device=scores.device)
            slots[col, j] = slots[row, j].clone()
    return slots.reshape(-1)
