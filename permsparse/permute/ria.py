"""RIA's channel permutation (Zhang et al., ICLR 2024): deal channels into groups by column-sum bands,
then re-assign one slot of every group at a time by an exact linear assignment."""
from __future__ import annotations

import torch

from .assignment import linear_sum_assignment
from .swaps import insert_values, leave_member_out


def ria(scores: torch.Tensor, n: int, m: int, gen: torch.Generator, *, rounds: int = 2) -> torch.Tensor:
    """RIA: snake-deal channels (by descending column sum) so every group gets one channel of each
    quantile band (slot), then, slot by slot for ``rounds`` rounds, give each group the slot channel
    that best completes its other ``m-1`` members: an exact linear assignment, so never a loss."""
    s = scores.double()
    cols, groups = s.shape[1], s.shape[1] // m
    order = torch.sort(s.sum(0), descending=True, stable=True).indices
    band, k = torch.arange(cols) // groups, torch.arange(cols) % groups
    slots = torch.empty(groups, m, dtype=torch.long)
    order = order.cpu()
    slots[torch.where(band % 2 == 0, k, groups - 1 - k), band] = order
    st = s.T.contiguous()  # (in, rows): channel scores contiguous for the inner reduction
    slots = slots.to(s.device)
    for _ in range(rounds if groups > 1 else 0):
        for j in range(m):
            grid = st[slots]  # (groups, m, rows)
            kept, nth = (x[:, 0] for x in leave_member_out(grid, n, j))  # (groups, rows)
            value = insert_values(st[slots[:, j]], nth) + kept.sum(-1)
            row, col = linear_sum_assignment(value.cpu().numpy(), maximize=True)
            row, col = torch.as_tensor(row, device=s.device), torch.as_tensor(col, device=s.device)
            slots[col, j] = slots[row, j].clone()
    return slots.reshape(-1)
