"""Several processes, one result: the few collective operations the pipeline needs, on ``torch.distributed``.

Started with ``torchrun --nproc-per-node K -m permsparse prune ...`` (on one or several machines, one process
per GPU, each computing on its own ``cuda:LOCAL_RANK``), every process (rank) draws the
same calibration windows and takes its share of them: statistics are summed across ranks, so every rank
searches the same permutations; a learning step's batch is split across ranks and the gradients of the
cost tiles are summed, so every rank holds the same costs; the judgments are summed, so every rank keeps
the same best set. Rank 0 alone writes progress and the checkpoint. Without ``torchrun`` (or with one
process) every function here is the identity.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def initialise() -> None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1). With GPUs each process takes the
    one of its ``LOCAL_RANK`` and collectives go through NCCL for CUDA tensors and gloo for CPU tensors
    (the statistics of a run on the CPU, counts kept on the host); without GPUs, gloo alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")


def finish() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``items`` (rows ``rank, rank + world, ...``)."""
    return items[rank()::world()] if active() else items


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place, and returned (float64 sums stay exact enough that
    every rank, and a single process, see the same statistics)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor``, in place on every rank, and returned (one process: ``tensor`` itself)."""
    if active():
        dist.broadcast(tensor, src=0)
    return tensor
