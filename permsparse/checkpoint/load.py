"""Loading a permsparse checkpoint for inference: runtime input gathers and GPU 2:4 kernels.

:func:`load` reads a checkpoint written by :mod:`permsparse.checkpoint.save` with ``from_pretrained`` (a
causal LM with its head, an encoder as its bare model, :func:`permsparse.models.loading.auto_class`) and

- re-attaches a runtime input gather ``x[..., p]`` to every linear exported with ``fallback="gather"``,
  whose weight is stored permuted (N:M in storage order); without it the model computes a different
  function. Where all the linears reading one norm's output share one permutation (shared binding), the
  norm emits the gathered output once instead (:func:`permsparse.deploy.gathers.fold_gathers`; the
  same values). The permutations are non-persistent buffers ``permsparse_gather``, so they follow
  ``.to(device)`` and never enter ``state_dict``; ``save_pretrained`` of a loaded model therefore drops
  the gathers – re-export instead;
- with ``semi_structured=True`` converts the linears that are 2:4 in storage order to
  :class:`permsparse.deploy.Linear24` (NVIDIA GPUs of compute capability 8.0 or newer, float16 or
  bfloat16) where the conversion policy finds 2:4 faster for the expected ``workload`` than dense; the
  others stay dense, with the reason (:func:`permsparse.deploy.deploy`). **On a machine without a CUDA GPU
  this warns (RuntimeWarning) and leaves every weight dense**: the model still runs, and the reasons are
  reported. Linears that are N:M only through a permutation (the masked layout) are never converted:
  export ``folded`` (optionally with ``fallback="gather"``) to make them 2:4 in storage.

A ``compressed`` checkpoint (:mod:`.compressed`) is built without reading any dense pruned weight: the
model is made from its config with every parameter on the meta device (no weight is allocated, not even
uninitialised; its buffers are computed as usual), every pruned linear gets its stored form – its ``weight``
then expands for each use, in an inference forward into one reused buffer, so the model holds the compressed
bytes plus one dense weight at a time – and the other tensors are taken from the safetensors file as they
are (memory-mapped, read when used). With ``dense=True`` every pruned linear gets its expanded weight as an
ordinary parameter instead (plain HF modules, the dense model's memory). Either way the model computes what
the masked export computes, bit for bit in the same dtype. With ``device="cuda"`` (or ``semi_structured=True``)
the stored 2:4 linears become GPU 2:4 modules made from their stored form (:func:`runtime_modules`): int4 as
:class:`permsparse.deploy.int4.Int4Linear24` (a Triton kernel that dequantizes in registers up to 16 tokens,
dequantized 2:4 + cuSPARSELt above), the others as :class:`permsparse.deploy.Linear24` (int8/fp8 dequantized
to the model's dtype); one linear's dense weight exists at a time. Without a CUDA GPU that warns and keeps
the stored form.

What was done is in ``model.permsparse_deploy``: ``{"gathers": [...], "gather_folds": {...},
"semi_structured": {"converted": [...], "not_converted": {name: reason}, "storages": ..., "predicted_speedup":
..., "bytes": ...} or None}``.
"""
from __future__ import annotations

import ctypes
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..deploy.convert import BACKENDS, DTYPES, TOLERANCE, _set, deploy, gpu_problem, storages_here
from ..deploy.gathers import GATHER, attach_gathers, fold_gathers, remove_gathers
from ..deploy.int4 import DECODE_MAX, Int4Linear24
from ..deploy.linear import Linear24
from ..deploy.policy import CostKey, read_costs
from ..models.loading import auto_class, read_config
from ..serial import RecordError, to_dict
from .compressed import SAVE_DTYPES, StoredWeight, attach_stored, read_stored, stored_from_tensors
from .digest import check_weight_files
from .record import read_record

GATHER_BUFFER = GATHER

__all__ = ["attach_gathers", "remove_gathers", "load", "semi_structured_unavailable"]

semi_structured_unavailable = gpu_problem


def load(
    folder: str | Path, device: str | torch.device = "cpu", semi_structured: bool = False,
    dtype: torch.dtype | str = "auto", backend: str = "auto", workload: dict[int, float] | None = None,
    costs: str | Path | dict[CostKey, float] | None = None, dense: bool = False,
) -> nn.Module:
    """Load a permsparse checkpoint for inference, with its runtime gathers; see the module docstring.

    ``dtype`` defaults to the stored one; 2:4 GPU kernels need ``torch.float16`` or ``torch.bfloat16``.
    ``semi_structured=True`` converts the linears that are 2:4 in storage order (``folded`` exports, and
    every layer of a ``fallback="gather"`` export) where 2:4 is faster; on a machine without a CUDA GPU it
    warns and skips. ``backend``: ``auto`` (cuSPARSELt and the Triton kernel, as the policy chooses),
    ``cusparselt`` or ``triton`` alone. ``workload``: calls per token count to expect (default: a
    2048-token prompt and 128 generated tokens). ``costs``: a cost table (or the JSON file ``permsparse
    speed`` writes) that spares timing the linears at load. ``dense``: a compressed checkpoint's pruned
    linears as ordinary dense parameters instead of their stored form; without it, a compressed checkpoint loaded
    with ``device="cuda"`` or ``semi_structured=True`` gets GPU 2:4 modules made from its stored form.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown 2:4 backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    folder = Path(folder)
    record = read_record(folder)
    # what loading needs of the record, taken before the model is made: the record's parsed JSON (every layer's
    # permutation and digest) is freed first, so the model's objects reuse its memory instead of adding their own
    export, nm, pattern = record.export, record.config.nm, record.config.pattern
    layouts = {name: entry.layout for name, entry in record.layouts.items()}
    gathers = {name: torch.as_tensor(entry.perm) for name, entry in record.layouts.items() if entry.layout == "gather"}
    del record
    check_weight_files(folder)
    if export == "compressed":
        model = load_compressed(folder, dtype, dense=dense)
        _return_free_heap()
    else:
        model = auto_class(read_config(folder)).from_pretrained(folder, dtype=dtype, use_safetensors=True)
    model.eval()
    attach_gathers(model, gathers)
    model.to(device)
    folds = fold_gathers(model)
    info = {"folder": str(folder), "format": export, "gathers": sorted(gathers),
            "gather_folds": to_dict(folds), "semi_structured": None}
    stored = stored_linears(model)
    if stored and (semi_structured or torch.device(device).type == "cuda"):
        info["semi_structured"] = runtime_modules(model, stored, nm, pattern)
    elif semi_structured:
        if nm != (2, 4):
            reason = f"pattern {pattern}: GPU semi-structured kernels need 2:4"
            info["semi_structured"] = {"converted": [], "not_converted": dict.fromkeys(layouts, reason)}
        else:
            table = read_costs(costs) if isinstance(costs, (str, Path)) else costs
            storage = [name for name, layout in layouts.items() if layout in ("nm", "gather")]
            info["semi_structured"] = deploy(model, storage, workload=workload, costs=table, backend=backend)
            for name, layout in layouts.items():
                if layout == "masked":
                    info["semi_structured"]["not_converted"][name] = (
                        "2:4 only through its permutation (masked layout); export folded to make it 2:4 in storage")
    model.permsparse_deploy = info
    return model


def stored_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linears of ``model`` that keep a compressed checkpoint's stored form, by name."""
    return {name: module for name, module in model.named_modules() if isinstance(getattr(module, "stored", None), StoredWeight)}


def _input_gather(module: nn.Module, stored: StoredWeight) -> torch.Tensor | None:
    """Which input each stored column reads: the stored input order, through the module's runtime gather."""
    gather = getattr(module, GATHER, None)
    order = stored.input_order
    if order is None:
        return gather
    order = order.long()
    return order if gather is None else gather[order]


def _runtime_linear(module: nn.Module, storages: tuple[str, ...]) -> nn.Module:
    """The 2:4 module computing what a stored 2:4 linear computes, made from its stored form: int4 kept as codes
    (:class:`Int4Linear24`), everything else through :class:`Linear24` in the first of ``storages`` it runs in
    (one dense weight of this linear made and freed meanwhile, in the stored column order)."""
    stored = module.stored
    bias = getattr(module, "bias", None)
    gather = _input_gather(module, stored)
    if stored.spec.quant == "int4":
        return Int4Linear24(stored.values, stored.positions, stored._scales(), stored.spec.group,
                            None if bias is None else bias.detach(), gather)
    weight = stored.expand(storage_order=True)
    failures = []
    for storage in storages:
        try:
            return Linear24.from_weight(weight, storage, bias=bias, gather=gather,
                                        decode_max=DECODE_MAX if storage == "cusparselt+triton" else 0)
        except (ValueError, RuntimeError) as err:
            failures.append(f"{storage}: {str(err).splitlines()[0]}")
    raise ValueError("; ".join(failures))


@torch.no_grad()
def _matches(stored: nn.Module, runtime: nn.Module, tokens: tuple[int, ...]) -> str:
    """"" when ``runtime`` computes what the stored linear computes at each token count (float32: to its
    rounding; 16-bit: within the deployed kernels' tolerance)."""
    weight = stored.weight
    for count in tokens:
        x = torch.randn(count, stored.stored.spec.shape[1], device=weight.device,
                        generator=torch.Generator(weight.device).manual_seed(count)).to(weight.dtype)
        expected = stored(x).float()
        error = ((runtime(x).float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
        if not error <= TOLERANCE.get(weight.dtype, 1e-5):
            return f"its result differs from the stored linear's at {count} tokens (relative error {error:.2e})"
    return ""


def runtime_modules(model: nn.Module, stored: dict[str, nn.Module], nm: tuple[int, int] | None, pattern: str,
                    storages: tuple[str, ...] | None = None) -> dict:
    """Replace a compressed checkpoint's stored 2:4 linears by GPU 2:4 modules made from their stored form: int4
    by :class:`Int4Linear24` (Triton decode, cuSPARSELt prefill), bf16/fp16 – and int8/fp8 dequantized to the
    model's dtype – by :class:`Linear24` (cuSPARSELt and the Triton kernel). No dense model is made: one linear's
    dense weight at a time. Each (shape, kind) is checked once against the stored linear. ``storages``: the
    Linear24 storages to try, in order (default: what this GPU runs). Without a usable GPU nothing changes and
    a RuntimeWarning says why. Returns the report (``converted``, ``storages``, ``not_converted``, ``bytes``)."""
    report = {"converted": [], "storages": {}, "not_converted": {}, "bytes": None}
    if nm != (2, 4):
        report["not_converted"] = dict.fromkeys(stored, f"pattern {pattern}: GPU 2:4 kernels need 2:4")
        return report
    device = next(iter(stored.values())).stored.values.device
    if storages is None:
        problem = gpu_problem(device)
        if problem:
            warnings.warn(f"{problem}; the {len(stored)} stored linears keep their stored form", RuntimeWarning,
                          stacklevel=3)
            report["not_converted"] = dict.fromkeys(stored, problem)
            return report
        dtype = next(iter(stored.values())).stored.dtype
        here = storages_here(dtype if dtype in DTYPES else torch.bfloat16, device)
        storages = tuple(s for s in ("cusparselt+triton", "cusparselt", "triton") if not here.get(s, "unknown"))
    checked: dict[tuple, str] = {}
    dense_bytes = deployed_bytes = 0
    for name, module in stored.items():
        spec = module.stored.spec
        if spec.pattern != [2, 4]:
            report["not_converted"][name] = f"stored dense ({spec.quant or spec.dtype}): no 2:4 kernel"
            continue
        try:
            runtime = _runtime_linear(module, storages)
        except (ValueError, RuntimeError, ImportError) as err:
            report["not_converted"][name] = f"conversion failed: {str(err).splitlines()[0]}"
            continue
        key = (tuple(spec.shape), spec.quant, getattr(runtime, "storage", "int4"))
        if key not in checked:
            checked[key] = _matches(module, runtime, (1, DECODE_MAX + 1))
        if checked[key]:
            report["not_converted"][name] = checked[key]
            continue
        _set(model, name, runtime)
        report["converted"].append(name)
        report["storages"][name] = getattr(runtime, "storage", "int4")
        dense_bytes += spec.shape[0] * spec.shape[1] * 2
        deployed_bytes += sum(t.nbytes for n, t in runtime.named_buffers() if n not in ("bias", GATHER, "gather"))
    if report["converted"]:
        report["bytes"] = {"dense_bf16": dense_bytes, "deployed": deployed_bytes, "ratio": deployed_bytes / dense_bytes}
    return report


def _return_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing): what reading
    the record and checking the stored tensors freed would otherwise stay resident under the model's objects."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty`` without a device (how linears and embeddings make their weights) gives a meta tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextmanager
def _parameters_on_meta(empty_on_meta: bool):
    """Every parameter registered meanwhile is a meta tensor of its shape and dtype: the model's structure without
    its dense weights (the file's tensors take their places). ``empty_on_meta``: weights made by ``torch.empty`` are
    never allocated at all (a parameter made on the CPU and freed at once still leaves its hole in the allocator's
    heap, which the transients of loading and of every forward then touch); the buffers – non-persistent ones the
    file lacks, such as rotary frequencies – are computed on the CPU as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        if empty_on_meta:
            with _EmptyOnMeta():
                yield
        else:
            yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` in ``dtype`` with every parameter on the meta device and its buffers computed. A
    model that makes a buffer with ``torch.empty`` (to fill it later) is made again with only its parameters moved
    to meta after they are made, so that no buffer is ever left without its values."""
    for empty_on_meta in (True, False):
        with _no_init(), _parameters_on_meta(empty_on_meta):
            model = auto_class(config).from_config(config, dtype=dtype)
        if not any(buffer.is_meta for buffer in model.buffers()):
            return model
        del model
    raise RecordError(f"{type(model).__name__}: buffers left on the meta device")


@torch.no_grad()
def load_compressed(folder: str | Path, dtype: torch.dtype | str = "auto", dense: bool = False) -> nn.Module:
    """A compressed checkpoint's model on the CPU: its pruned linears keeping their stored form (``dense``:
    expanded into ordinary parameters), the other tensors read one at a time, in ``dtype`` (``auto``: the
    stored one). RecordError (one line) when the files do not describe the model."""
    from safetensors import safe_open

    folder = Path(folder)
    specs, tied, files = read_stored(folder)
    config = read_config(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    stored_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else SAVE_DTYPES.get(str(config.dtype))
    if dtype == "auto":
        dtype = stored_dtype or torch.float32
    elif isinstance(dtype, str):
        dtype = SAVE_DTYPES[dtype]
    model = _skeleton(config, dtype)  # no dense weight is made, not even uninitialised
    owners = dict(model.named_modules())
    loaded: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())

            def get(key: str):
                return f.get_tensor(key) if key in keys else None

            for name, spec in specs.items():
                if f"{name}.weight.values" not in keys:
                    continue
                module = owners.get(name)
                if module is None or "weight" not in module._parameters:
                    raise RecordError(f"{path.name}: {name} is no linear of this {type(model).__name__}")
                stored = stored_from_tensors(name, spec, get)
                problem = stored.problem()
                if problem:
                    raise RecordError(f"{path.name}: {name}: {problem}")
                stored.to(dtype)
                if dense:
                    module.weight = nn.Parameter(stored.expand_as_module(), requires_grad=False)
                else:
                    attach_stored(module, stored)
                loaded.add(f"{name}.weight")
                keys -= {k for k in keys if k.startswith(f"{name}.weight.")}
            for key in sorted(keys):
                tensor = f.get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                owner, _, attribute = key.rpartition(".")
                module = owners.get(owner)
                if module is None or not (attribute in module._parameters or attribute in module._buffers):
                    raise RecordError(f"{path.name}: {key} is no parameter or buffer of this {type(model).__name__}")
                if attribute in module._parameters:
                    module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
                else:
                    module._buffers[attribute] = tensor
                loaded.add(key)
    for key, source in tied.items():
        owner, _, attribute = key.rpartition(".")
        source_owner, _, source_attribute = source.rpartition(".")
        setattr(owners[owner], attribute, getattr(owners[source_owner], source_attribute))
        loaded.add(key)
    expected = set(model.state_dict()) - {k for k in model.state_dict() if ".stored." in k}
    missing = sorted(expected - loaded)
    if missing:
        raise RecordError(f"{folder}: the compressed checkpoint lacks {len(missing)} tensors of the model "
                          f"(first: {missing[0]})")
    return model
