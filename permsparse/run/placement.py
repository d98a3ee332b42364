"""Where a run computes: the device, the model's compute dtype, and whether its blocks wait on the host.

Every tensor the pipeline makes lives on the compute device (windows, statistics, masks, permutations,
the learner's state); only what is written to disk goes through the host. A model that fits the device
moves there whole. One that does not is *offloaded*: the embeddings, final norm and head move to the
device, the blocks stay on the host, and the pipeline moves one block at a time to the device while it
works on it (statistics, searches, blockwise learning, weight updates, the next block's inputs), so the
device holds one block and its calibration activations. Whole-model passes of an offloaded model
(evaluation, sampling the calibration text) move each block in for its forward and out again.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..config import DTYPES, Placement  # re-exported: defined with the other configs, light to import
from ..discover import find_blocks
from .memory import available_bytes, resident_bytes

__all__ = ["DTYPES", "Placement", "arrange_model", "block_on", "compute_device", "compute_dtype", "input_device",
           "is_offloaded", "place"]

def compute_device(spec: str | torch.device, check_available: bool = True) -> torch.device:
    """The device ``spec`` names: ``auto`` is this process's CUDA device when there is one (the one
    :func:`permsparse.run.distributed.initialise` set under torchrun), else the CPU. A CUDA device that does not
    exist here is a ValueError naming what exists."""
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not check_available:
            return device
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: torch {torch.__version__} sees no CUDA GPU here "
                             f"({'a CPU-only build' if torch.version.cuda is None else 'no device visible'}); "
                             "use --device cpu")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1})")
        device = torch.device("cuda", index)
    return device


def compute_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The model's dtype: ``auto`` is bfloat16 on a GPU and float32 on the CPU."""
    if spec not in DTYPES:
        raise ValueError(f"unknown dtype {spec!r}; choose one of {', '.join(DTYPES)}")
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def input_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s input embeddings (an image model's patch embedding): where its inputs go."""
    return next(model.get_input_embeddings().parameters()).device


def _on_host(block: nn.Module) -> bool:
    return next(block.parameters()).device.type == "cpu"


def _arrive(device: torch.device):
    def hook(block: nn.Module, args) -> None:
        if _on_host(block):
            block.to(device)
            block._permsparse_visiting = True
    return hook


def _leave(block: nn.Module, args, output) -> None:
    if block.__dict__.pop("_permsparse_visiting", False):
        block.to("cpu")


def arrange_model(model: nn.Module, device: torch.device, offloaded: bool) -> None:
    """Move ``model`` to ``device``: whole, or ``offloaded``: every parameter and buffer outside its blocks
    on ``device`` (parameters shared by several modules, tied embeddings, stay shared), the blocks on the
    host, each visiting ``device`` for its forward pass (a block already there stays)."""
    for module in model.modules():  # no visits left from an earlier arrangement
        for handle in module.__dict__.pop("_permsparse_visits", ()):
            handle.remove()
    if not offloaded:
        model.to(device)
        return
    blocks = model.get_submodule(find_blocks(model))
    inside = {id(t) for t in (*blocks.parameters(), *blocks.buffers())}
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in inside and param.device != device:
                    param.data = param.data.to(device)
            for key, buffer in module._buffers.items():
                if buffer is not None and id(buffer) not in inside and buffer.device != device:
                    module._buffers[key] = buffer.to(device)
    for block in blocks:
        block.to("cpu")
        block._permsparse_visits = (block.register_forward_pre_hook(_arrive(device)),
                                    block.register_forward_hook(_leave))


def place(model: nn.Module, placement: Placement) -> torch.device:
    """Arrange ``model`` for inference as ``placement`` says (offloaded when asked, or, with ``auto``, when its
    weights alone exceed the device's free memory); returns the device."""
    device = compute_device(placement.device)
    offloaded = placement.offload == "on" or (placement.offload == "auto" and device.type == "cuda"
                                              and resident_bytes(model) > available_bytes(device))
    if offloaded and device.type != "cuda":
        raise ValueError(f"--offload on keeps the blocks on the host for a GPU; the device is {device}")
    arrange_model(model, device, offloaded)
    return device


def is_offloaded(model: nn.Module) -> bool:
    """Whether ``model`` was arranged by :func:`offload`."""
    return any("_permsparse_visits" in module.__dict__ for module in model.modules())


@contextmanager
def block_on(block: nn.Module, device: torch.device):
    """``block`` on ``device`` while inside; a block that waits on the host goes back there on exit."""
    if device.type == "cpu" or not _on_host(block):
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to("cpu")
