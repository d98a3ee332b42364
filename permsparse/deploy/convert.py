"""Converting a model's 2:4 linears for GPU inference: the policy decides, :class:`.Linear24` runs.

:func:`deploy` takes the linears that are 2:4 in storage order, finds what this machine can run
(cuSPARSELt, the Triton kernel, and whether the Triton kernel can read cuSPARSELt's kept values),
measures the costs it does not know on the GPU (or reads them from a table), lets :mod:`.policy` choose a
storage per linear shape for the expected workload, and replaces each chosen linear by a
:class:`.Linear24` – after checking, once per shape, that it computes what the dense linear computes. A
linear whose 2:4 kernels are not faster stays dense (its mask still holds). Without a usable GPU nothing
is converted and a RuntimeWarning says why.

The report (a dict, kept by :func:`permsparse.checkpoint.load.load` in ``model.permsparse_deploy``) says
what was converted to which storage, why the rest was not, the predicted speed-up of the workload, and
the bytes of the linear weights on the GPU against the dense ones.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..discover import is_linear, linear_weight, optional_submodule
from ..sparsity.masks import nm_mask
from . import cusparselt
from .format import compress as compress_values, format_problem
from .linear import STORAGES, Linear24, weight_bytes
from .policy import DEFAULT_WORKLOAD, Choice, CostKey, Plan, cost_entries, plan

__all__ = ["BACKENDS", "DTYPES", "deploy", "gpu_problem", "storages_here"]

DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = {"auto": STORAGES, "cusparselt": ("cusparselt",), "triton": ("triton",)}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max |2:4 - dense| / max |dense| of the shape check


def gpu_problem(device: torch.device | str | None = None) -> str:
    """Why GPU 2:4 kernels cannot run here, or "" when they can."""
    if not torch.cuda.is_available():
        return "semi-structured 2:4 sparsity needs a CUDA GPU (compute capability >= 8.0); none is available"
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return f"semi-structured 2:4 sparsity needs the model on a CUDA device, not {device}; load with device='cuda'"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"semi-structured 2:4 sparsity needs compute capability >= 8.0; this GPU has {major}.{minor}"
    return ""


def storages_here(dtype: torch.dtype, device: torch.device, backend: str = "auto") -> dict[str, str]:
    """Each storage of ``backend`` mapped to "" where this machine can run it, else to why not."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown 2:4 backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cslt = "" if cusparselt.cusparselt_available() else f"torch {torch.__version__} has no cuSPARSELt"
    try:
        from . import triton_decode  # noqa: F401 - only whether it imports
        triton = ""
    except ImportError as err:
        triton = f"Triton is not installed ({err}); pip install 'permsparse[gpu]'"
    shared = cslt or triton
    if not shared:
        weight = torch.randn(64, 128, device=device, dtype=dtype)
        weight = weight * nm_mask(weight.abs().float(), 2, 4)
        try:
            packed = cusparselt.compress(weight)
            same = torch.equal(cusparselt.kept_values(packed, 64, 128), compress_values(weight)[0])
        except RuntimeError as err:
            same, cslt = False, f"cuSPARSELt cannot compress: {type(err).__name__}: {str(err).splitlines()[0]}"
        shared = cslt or ("" if same else "cuSPARSELt does not store its kept values row by row here, so the "
                                          "Triton kernel cannot share them")
    found = {"cusparselt": cslt, "triton": triton, "cusparselt+triton": shared}
    return {storage: found[storage] for storage in BACKENDS[backend]}


def _eligible(module: nn.Module | None) -> str:
    """Why a linear cannot be converted, or ""."""
    if module is None:
        return "a packed expert weight (3-D): no 2:4 kernel"
    if not is_linear(module):
        return f"{type(module).__name__} is not a linear layer"
    weight = linear_weight(module)
    if not weight.is_cuda:
        return f"weight on {weight.device}, not a CUDA device"
    if weight.dtype not in DTYPES:
        return f"dtype {str(weight.dtype).removeprefix('torch.')}: needs float16 or bfloat16 (load with dtype=...)"
    return format_problem(weight)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def _check(dense: nn.Module, sparse: Linear24, tokens: list[int]) -> str:
    """"" when ``sparse`` computes what ``dense`` does at each token count (within the dtype's tolerance)."""
    width = sparse.in_features
    weight = linear_weight(dense)
    for count in tokens:
        x = torch.randn(count, width, device=weight.device, dtype=weight.dtype)
        expected = dense(x).float()
        error = ((sparse(x).float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
        if not error <= TOLERANCE[weight.dtype]:
            return f"its result differs from the dense linear's at {count} tokens (relative error {error:.2e})"
    return ""


def deploy(model: nn.Module, names: list[str], *, workload: dict[int, float] | None = None,
           costs: dict[CostKey, float] | None = None, backend: str = "auto") -> dict:
    """Convert the named linears (2:4 in storage order) where the policy says 2:4 wins; see the module
    docstring. ``costs`` (from :func:`permsparse.deploy.policy.read_costs`) spares measuring what it holds;
    what it lacks is measured here, on the GPU. Returns the report."""
    from .costs import LinearCosts

    workload = dict(DEFAULT_WORKLOAD if workload is None else workload)
    result = {"storages": {}, "converted": [], "not_converted": {}, "workload": workload, "predicted_speedup": None,
              "speedup_by_tokens": {}, "bytes": None, "alg_ids": {}, "choices": {}, "costs": [], "notes": []}
    modules = {name: optional_submodule(model, name) for name in names}
    problems = {name: _eligible(module) for name, module in modules.items()}
    if not names:
        return result
    first = next((linear_weight(m) for m in modules.values() if m is not None and is_linear(m)), None)
    unavailable = gpu_problem(first.device if first is not None and torch.cuda.is_available() else None)
    if unavailable:
        warnings.warn(f"{unavailable}; all {len(names)} linears stay dense", RuntimeWarning, stacklevel=3)
        result["not_converted"] = {name: problems[name] if problems[name].startswith("a packed") else unavailable
                                   for name in names}
        return result
    result["not_converted"] = {name: problem for name, problem in problems.items() if problem}
    ready = {name: modules[name] for name in names if not problems[name]}
    if not ready:
        return result
    dtype = linear_weight(next(iter(ready.values()))).dtype
    here = storages_here(dtype, first.device, backend)
    result["notes"] += [f"{storage} unavailable: {why}" for storage, why in here.items() if why]

    def storages(out: int, width: int) -> dict[str, str]:
        shape = cusparselt.cusparselt_problem(out, width, dtype)
        return {s: why or (shape if "cusparselt" in s else "") for s, why in here.items()}

    shapes = {name: tuple(linear_weight(module).shape) for name, module in ready.items()}
    dense_bytes = sum(weight_bytes(module) for module in ready.values())
    table = dict(costs or {})
    measure = LinearCosts(first.device)
    chosen: Plan = plan(shapes, str(dtype).removeprefix("torch."), workload, table, storages, measure)
    measure.release()
    result["costs"] = cost_entries(table)
    result["notes"] += [f"{k[4]} at {k[0]}x{k[1]}, {k[2]} tokens: {why}" for k, why in measure.failures.items()]
    checked: dict[tuple, tuple[int, str]] = {}  # shape -> (alg_id, problem)
    for name, module in ready.items():
        choice = chosen.choices[name]
        if choice.storage == "dense":
            result["not_converted"][name] = choice.reason
            continue
        shape = shapes[name]
        alg_id, problem = checked.get(shape, (0, ""))
        if shape not in checked:  # the algorithm, searched at the longest calls cuSPARSELt serves; the result checked
            try:
                if "cusparselt" in choice.storage:
                    x = torch.randn(max(workload), shape[1], device=first.device, dtype=dtype)
                    alg_id, note = cusparselt.search_alg_id(cusparselt.compress(linear_weight(module).detach()), x)
                    if note:
                        result["notes"].append(f"{shape[0]}x{shape[1]}: {note}; algorithm 0")
                sparse = Linear24.from_linear(module, choice.storage, choice.decode_max, alg_id)
                problem = _check(module, sparse, sorted(workload))
            except Exception as err:  # noqa: BLE001 - any kernel failure (Triton raises its own errors) keeps it dense
                problem = f"conversion failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            checked[shape] = alg_id, problem
            result["alg_ids"][f"{shape[0]}x{shape[1]}"] = alg_id
        else:
            sparse = None if problem else Linear24.from_linear(module, choice.storage, choice.decode_max, alg_id)
        if problem:
            result["not_converted"][name] = f"{choice.storage}: {problem}"
            chosen.choices[name] = Choice("dense", 0, choice.dense_ms, choice.dense_ms, problem)
            continue
        _set(model, name, sparse)
        result["converted"].append(name)
        result["storages"][name] = choice.storage
    result["predicted_speedup"] = chosen.predicted_speedup()
    result["speedup_by_tokens"] = chosen.speedup_by_tokens()
    deployed = sum(weight_bytes(model.get_submodule(name)) for name in ready)
    result["bytes"] = {"dense": dense_bytes, "deployed": deployed, "ratio": deployed / dense_bytes}
    result["choices"] = {f"{o}x{i}": {"storage": c.storage, "reason": c.reason, "triton_up_to_tokens":
                                      "all" if c.storage == "triton" else c.decode_max}
                         for (o, i), c in {shapes[n]: chosen.choices[n] for n in ready}.items()}
    return result
