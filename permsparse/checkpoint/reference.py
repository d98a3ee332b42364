"""The logits check: a fixed, seeded input and a fingerprint of the logits recorded at export.

A reloaded checkpoint must reproduce the in-memory pruned model's logits on that input (an encoder
without a head: its final hidden states). The input is seeded token ids, recorded; for an image model no
tokens are recorded and the input is seeded standard-normal pixel values of its config's image size,
made again from the seed when checked. Comparing a fingerprint (samples, norms, a hash) keeps
``permsparse.json`` small whatever the vocabulary.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..discover import model_inputs, primary_output
from ..data.images import reads_images
from .record import LogitsSummary, Reference

REFERENCE_SEED = 0
REFERENCE_SHAPE = (1, 16)
REFERENCE_SAMPLES = 64
# Tolerance of the logits check, relative to the largest recorded |logit|.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def reference_tokens(vocab_size: int, seed: int = REFERENCE_SEED, shape: tuple[int, int] = REFERENCE_SHAPE) -> torch.Tensor:
    """The fixed input of the logits check: seeded uniform token ids in ``[0, vocab_size)``."""
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def reference_pixels(config, seed: int = REFERENCE_SEED) -> torch.Tensor:
    """The fixed input of an image model's logits check: one seeded standard-normal image of the
    config's size."""
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (REFERENCE_SHAPE[0], getattr(config, "num_channels", 3), height, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference_input(reference: Reference, model: nn.Module | None = None) -> torch.Tensor:
    """The recorded input: its token ids, or, with no tokens recorded, ``model``'s reference image."""
    if not reference.tokens and model is not None and reads_images(model):
        return reference_pixels(model.config, reference.seed)
    return torch.as_tensor(reference.tokens, dtype=torch.long)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def model_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of ``tokens`` or pixel values (final hidden states for a model without a head) as float32 on
    the CPU (the model stays where it is), in one pass without a cache (a stack of state-space layers alone
    cannot make the attention mask transformers builds for a cache)."""
    parameter = next(model.parameters())
    dtype = parameter.dtype if tokens.is_floating_point() else tokens.dtype
    return primary_output(model(**model_inputs(model, tokens.to(parameter.device, dtype)))).float().cpu()


def _sample_index(numel: int, seed: int) -> torch.Tensor:
    count = min(REFERENCE_SAMPLES, numel)
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed + 1))[:count].sort().values


def summarize_logits(logits: torch.Tensor, seed: int = REFERENCE_SEED) -> LogitsSummary:
    """The fingerprint :func:`compare_reference` checks logits against."""
    flat = logits.float().flatten()
    index = _sample_index(flat.numel(), seed)
    return LogitsSummary(list(logits.shape), float(flat.abs().max()),
                         logits.float().reshape(-1, logits.shape[-1]).norm(dim=-1).tolist(), index.tolist(),
                         flat[index].tolist(), _sha256(logits))


def _sha256(logits: torch.Tensor) -> str:
    return hashlib.sha256(logits.float().contiguous().numpy().tobytes()).hexdigest()


def record_reference(model: nn.Module, seed: int = REFERENCE_SEED, shape: tuple[int, int] = REFERENCE_SHAPE) -> Reference:
    """The fixed input and the fingerprint of ``model``'s logits on it."""
    if reads_images(model):
        tokens, inputs = [], reference_pixels(model.config, seed)
    else:
        inputs = reference_tokens(model.get_input_embeddings().num_embeddings, seed, shape)
        tokens = inputs.tolist()
    dtype = next(model.parameters()).dtype
    return Reference(seed, tokens, str(dtype).removeprefix("torch."), TOLERANCE.get(dtype, 1e-4),
                     summarize_logits(model_logits(model, inputs), seed))


def compare_reference(logits: torch.Tensor, reference: Reference, tolerance: float | None = None) -> tuple[bool, str]:
    """Compare logits with a recorded fingerprint; ``(ok, message)``.

    The error is the largest difference over the sampled logits and the per-position norms, relative to
    the largest recorded |logit| (small logits would make a per-value relative error meaningless).
    """
    ref = reference.logits
    tol = reference.tolerance if tolerance is None else tolerance
    if list(logits.shape) != ref.shape:
        return False, f"logits have shape {list(logits.shape)}, recorded {ref.shape}"
    flat = logits.float().flatten()
    sample = flat[torch.as_tensor(ref.sample_index, dtype=torch.long)]
    norms = logits.float().reshape(-1, logits.shape[-1]).norm(dim=-1)
    scale = max(ref.max_abs, 1e-30)
    errors = {
        "sampled logits": float((sample - torch.tensor(ref.sample)).abs().max()) / scale,
        "max |logit|": abs(float(flat.abs().max()) - ref.max_abs) / scale,
        "per-position norms": float((norms - torch.tensor(ref.position_norms)).abs().max())
        / max(max(ref.position_norms), 1e-30),
    }
    worst = max(errors, key=errors.get)
    identical = _sha256(logits) == ref.sha256
    detail = f"max relative error {errors[worst]:.2e} ({worst}), tolerance {tol:.0e}" + (
        ", bit-identical" if identical else "")
    return errors[worst] <= tol, detail
