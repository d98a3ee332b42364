"""The compressed checkpoint: pruned linears stored as their kept values and positions, or codes and scales.

A pruned linear that is N:M in storage order (its columns read in its input order, the site permutation
through which its mask was chosen) is stored as the N:M layout of :mod:`permsparse.deploy.format` – kept
values plus ``ceil(log2 M)``-bit positions – and, when its order is not the identity, the input order
itself. A quantized linear (:class:`permsparse.quant.QuantizedWeight`) stores its codes the same way (int4:
two codes a byte) and its scales. Every other tensor is stored as in a normal checkpoint. Keys of
linear ``NAME``:

- ``NAME.weight.values``: kept values (the save dtype), or int8 codes, fp8 codes, or int4 codes packed two
  a byte (low nibble first);
- ``NAME.weight.positions`` (uint8, N:M only): the packed positions;
- ``NAME.weight.scales`` (quantized only): ``(out, in / group)``, bfloat16 or float16 when every scale is
  exactly one (then 4-bit 2:4 weights in groups of 128 take under 20% of their dense bf16 bytes), else float32;
- ``NAME.weight.input_order`` (int16, int32 beyond 32767 inputs; only when not the identity): stored
  column j reads input ``input_order[j]``.

The files are safetensors named ``model.permsparse*.safetensors`` – not ``model.safetensors``, so a plain
``from_pretrained`` of the folder never loads a model with missing (randomly initialised) weights; every
file's metadata holds the JSON ``{"format", "revision", "linears": {NAME: LinearSpec}, "tied": {...}}``.
``config.json`` carries a ``quantization_config`` with the method ``permsparse``: transformers only warns
about a method it does not know and goes on (to the missing weights file), and once permsparse is
imported ``from_pretrained`` refuses the folder in one line naming :func:`permsparse.load`.

In memory a stored linear is a :class:`StoredWeight`: the module keeps its class and its forward, and its
``weight`` becomes a property that expands the stored form for each use (:func:`attach_stored`), so the
model holds the compressed bytes plus one dense weight at a time: in an inference forward (no autograd) every
linear expands into one reused buffer of the largest linear's size, so a forward allocates no weight.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..deploy.format import compress_nm, decompress_nm, pack_int4, position_bytes, position_problem, unpack_int4
from ..quant import KINDS, QuantizedWeight
from ..serial import RecordError, from_dict

FORMAT = "permsparse-compressed"
REVISION = 1
QUANT_METHOD = "permsparse"
WEIGHTS = "model.permsparse.safetensors"
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REFUSAL = ("this folder is a permsparse compressed checkpoint (pruned linears stored as kept values and "
           "positions): open it with permsparse.load(DIR), or permsparse.load(DIR, dense=True) for plain "
           "nn.Linear layers")
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_SCALES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
# Rows dequantized at once when a weight expands: bounds the float32 intermediate to a few megabytes.
_CHUNK_ENTRIES = 1 << 16
# Kept entries whose positions are checked at once: their transients stay in the allocator's small bins.
_CHECK_ENTRIES = 1 << 14

__all__ = ["LinearSpec", "StoredWeight", "attach_stored", "detach_stored", "quantization_config", "read_stored",
           "stored_digest", "store_linear", "write_stored"]


@dataclass
class LinearSpec:
    """How one linear is stored: its weight's ``(out, in)`` shape, the N:M pattern of its storage (None:
    dense), the dtype it expands to, its quantization kind, group and the dtype its scales are stored in
    (None: unquantized; bfloat16 or float16 when every float32 scale is one exactly), whether the module keeps its
    weight transposed (GPT-2's Conv1D) and whether an input order is stored."""

    shape: list[int]
    pattern: list[int] | None
    dtype: str
    quant: str | None
    group: int | None
    scales: str | None
    transposed: bool
    ordered: bool


def _dtype(name: str) -> torch.dtype:
    if name not in SAVE_DTYPES:
        raise ValueError(f"unknown stored dtype {name!r}; one of {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[name]


class StoredWeight(nn.Module):
    """A linear's weight in its stored form; :meth:`expand` gives the dense weight in the linear's own input
    order. The buffers keep their stored types under ``model.to(dtype)`` (codes as integers, scales as the
    bits of float32), except unquantized values, which follow it; the weight expands to the dtype the model
    was last moved to (an empty probe buffer follows it)."""

    def __init__(self, spec: LinearSpec, values: torch.Tensor, positions: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None, input_order: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        if spec.quant == "fp8":
            values = values.view(torch.uint8)
        self.register_buffer("values", values)
        self.register_buffer("positions", positions)
        self.register_buffer("scale_bits", None if scales is None else scales.view(_BITS[scales.dtype]))
        self.register_buffer("input_order", input_order)
        self.register_buffer("probe", torch.empty(0, dtype=_dtype(spec.dtype)), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.probe.dtype

    @property
    def nbytes(self) -> int:
        """The stored bytes (values, positions, scales and input order)."""
        return sum(t.nbytes for t in (self.values, self.positions, self.scale_bits, self.input_order) if t is not None)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors as stored under ``NAME.weight.*``."""
        values = self.values.view(torch.float8_e4m3fn) if self.spec.quant == "fp8" else self.values
        out = {f"{name}.weight.values": values}
        if self.positions is not None:
            out[f"{name}.weight.positions"] = self.positions
        if self.scale_bits is not None:
            out[f"{name}.weight.scales"] = self._scales()
        if self.input_order is not None:
            out[f"{name}.weight.input_order"] = self.input_order
        return out

    def _scales(self) -> torch.Tensor:
        return self.scale_bits.view(_SCALES[self.spec.scales])

    def _stored_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows of the weight in storage order, unquantized: the values; quantized: the codes."""
        spec = self.spec
        values = self.values[start:stop]
        kept = spec.shape[1] if spec.pattern is None else spec.shape[1] // spec.pattern[1] * spec.pattern[0]
        if spec.quant == "int4":
            values = unpack_int4(values, kept)
        elif spec.quant == "fp8":
            values = values.view(torch.float8_e4m3fn)
        if spec.pattern is None:
            return values
        return decompress_nm(values, self.positions[start:stop], *spec.pattern)

    @torch.no_grad()
    def expand(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               storage_order: bool = False) -> torch.Tensor:
        """The dense ``(out, in)`` weight in the linear's input order (``storage_order``: in the stored column
        order, N:M there), in ``dtype`` (default: :attr:`dtype`), written into ``out`` when given (any
        ``(out, in)`` view)."""
        dtype = self.dtype if dtype is None else dtype
        rows, width = self.spec.shape
        target = torch.empty(rows, width, dtype=dtype, device=self.values.device) if out is None else out
        step = max(1, _CHUNK_ENTRIES // width)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            stored = self._stored_rows(start, stop)
            if self.spec.quant is not None:
                scales = self._scales()[start:stop]
                stored = QuantizedWeight(self.spec.quant, stored, scales, self.spec.group).dequantize(dtype)
            else:
                stored = stored.to(dtype)
            if self.input_order is None or storage_order:
                target[start:stop] = stored
            else:
                target[start:stop].index_copy_(1, self.input_order.long(), stored)
        return target

    def expand_as_module(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in the layout its module stores it (transposed for a Conv1D)."""
        if not self.spec.transposed:
            return self.expand(dtype)
        dtype = self.dtype if dtype is None else dtype
        buffer = torch.empty(self.spec.shape[1], self.spec.shape[0], dtype=dtype, device=self.values.device)
        self.expand(dtype, out=buffer.t())
        return buffer

    def problem(self) -> str:
        """Why this stored form is malformed ("" when it is not): tensor types and shapes against the spec,
        positions that do not name N distinct positions per group, non-finite or non-positive scales, fp8
        codes that are not finite, an input order that is no permutation."""
        spec = self.spec
        if len(spec.shape) != 2 or min(spec.shape) <= 0:
            return f"shape {spec.shape} is not (out, in)"
        rows, width = spec.shape
        if spec.quant is not None and spec.quant not in KINDS:
            return f"unknown quantization {spec.quant!r}"
        if spec.dtype not in SAVE_DTYPES:
            return f"unknown dtype {spec.dtype!r}"
        kept = width
        if spec.pattern is not None:
            if len(spec.pattern) != 2 or not 0 < spec.pattern[0] < spec.pattern[1] or width % spec.pattern[1]:
                return f"pattern {spec.pattern} does not tile {width} inputs"
            kept = width // spec.pattern[1] * spec.pattern[0]
        values_shape = (rows, math.ceil(kept / 2)) if spec.quant == "int4" else (rows, kept)
        values_dtype = torch.uint8 if spec.quant in ("fp8", "int4") else (
            torch.int8 if spec.quant == "int8" else self.dtype)
        if tuple(self.values.shape) != values_shape or self.values.dtype != values_dtype:
            return (f"values of shape {tuple(self.values.shape)} ({self.values.dtype}), expected {values_shape} "
                    f"({values_dtype})")
        if spec.pattern is not None:
            expected = position_bytes(rows, width, *spec.pattern)
            if self.positions is None or tuple(self.positions.shape) != expected or self.positions.dtype != torch.uint8:
                got = None if self.positions is None else tuple(self.positions.shape)
                return f"positions of shape {got}, expected {expected} uint8"
            step = max(1, _CHECK_ENTRIES // kept)  # a few rows at a time: small transients, no heap left behind
            for start in range(0, rows, step):
                problem = position_problem(self.positions[start:start + step], kept, *spec.pattern, first_row=start)
                if problem:
                    return problem
        elif self.positions is not None:
            return "positions stored for a dense linear"
        if spec.quant is not None:
            if spec.group is None or spec.group <= 0 or width % spec.group:
                return f"quantization group {spec.group} does not divide {width} inputs"
            if spec.scales not in _SCALES or self.scale_bits is None or self.scale_bits.dtype != _BITS[_SCALES[spec.scales]]:
                return f"scales missing or not of the declared dtype {spec.scales}"
            if tuple(self.scale_bits.shape) != (rows, width // spec.group):
                return f"scales of shape {tuple(self.scale_bits.shape)}, expected {(rows, width // spec.group)}"
            scales = self._scales().float()
            if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
                return "scales are not all finite and positive"
            if spec.quant == "fp8" and not bool(torch.isfinite(self.values.view(torch.float8_e4m3fn).float()).all()):
                return "fp8 codes that are not finite"
        elif self.scale_bits is not None:
            return "scales stored for an unquantized linear"
        if spec.ordered != (self.input_order is not None):
            return "the input order is " + ("missing" if spec.ordered else "stored but not declared")
        if self.input_order is not None:
            order = self.input_order.long()
            if order.shape != (width,) or not torch.equal(order.sort().values, torch.arange(width, device=order.device)):
                return f"the input order is not a permutation of {width} inputs"
        return ""


def _index_dtype(width: int) -> torch.dtype:
    """The narrowest signed integer type that indexes ``width`` inputs (int16 up to 32767)."""
    return torch.int16 if width <= torch.iinfo(torch.int16).max else torch.int32


def store_linear(weight: torch.Tensor, *, nm: tuple[int, int] | None, order: torch.Tensor | None,
                 quantized: QuantizedWeight | None, dtype: torch.dtype, transposed: bool = False) -> StoredWeight:
    """The stored form of a linear whose dense ``(out, in)`` weight (its own input order) is ``weight``:
    unquantized, ``weight[:, order]`` kept N:M (ValueError when it is not N:M in that order); quantized, the
    record's codes (in its input order) kept N:M, and its scales. ``nm`` None: stored dense."""
    name = {v: k for k, v in SAVE_DTYPES.items()}[dtype]
    if quantized is not None:
        order = quantized.input_order
        stored = quantized.codes.to(CODE_DTYPES[quantized.kind] if quantized.kind != "int4" else torch.int8)
    else:
        stored = weight.to(dtype)
        if order is not None:
            stored = stored[:, order.to(stored.device)]
    if order is not None and torch.equal(order.cpu(), torch.arange(order.numel())):
        order = None
    positions = None
    values = stored.contiguous()
    if nm is not None:
        values, positions = compress_nm(stored, *nm)
    if quantized is not None and quantized.kind == "int4":
        values = pack_int4(values)
    scales = None
    if quantized is not None:
        scales = quantized.scales.to(torch.float32).contiguous().cpu()
        for narrow in (torch.bfloat16, torch.float16):  # the quantizers make every scale exact in bfloat16
            if torch.equal(scales.to(narrow).float(), scales):
                scales = scales.to(narrow)
                break
    spec = LinearSpec(list(weight.shape), None if nm is None else list(nm), name,
                      None if quantized is None else quantized.kind, None if quantized is None else quantized.group,
                      None if scales is None else str(scales.dtype).removeprefix("torch."), transposed, order is not None)
    return StoredWeight(spec, values.cpu(), None if positions is None else positions.cpu(), scales,
                        None if order is None else order.to(_index_dtype(weight.shape[1])).cpu())


def stored_digest(weight: torch.Tensor) -> str:
    """SHA-256 of a dense weight's bytes, signed zeros made +0 (a masked weight keeps -0.0 where a negative
    weight was pruned; the stored form does not)."""
    weight = weight.detach().contiguous().cpu()
    weight = torch.where(weight == 0, torch.zeros_like(weight), weight)
    return hashlib.sha256(weight.view(torch.uint8).numpy().tobytes()).hexdigest()


def quantization_config(pattern: str, dtype: str, quant: str, group: int | None) -> dict:
    """The ``quantization_config`` of ``config.json``: our own method name, so tools that read it know the
    weights are not plain dense tensors."""
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "revision": REVISION, "pattern": pattern,
            "dtype": dtype, "weights": quant, "group": group, "loader": "permsparse.load(DIR)"}


def write_stored(folder: Path, tensors: dict[str, torch.Tensor], specs: dict[str, LinearSpec],
                 tied: dict[str, str], shard_bytes: int) -> list[Path]:
    """Write ``tensors`` as safetensors files of at most ``shard_bytes`` (one file when it fits), every file's
    metadata naming the specs of the linears it holds; returns the files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += tensor.nbytes
    paths = []
    for i, shard in enumerate(shards):
        name = WEIGHTS if len(shards) == 1 else WEIGHTS.replace(".safetensors", f"-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        linears = {n: asdict(s) for n, s in specs.items() if f"{n}.weight.values" in shard}
        header = {"format": FORMAT, "revision": REVISION, "linears": linears, "tied": tied if i == 0 else {}}
        save_file(shard, folder / name, metadata={"format": "pt", "permsparse": json.dumps(header)})
        paths.append(folder / name)
    return paths


def weight_files(folder: Path) -> list[Path]:
    """The compressed weight files of ``folder``, in order; FileNotFoundError when there are none or a shard is
    missing."""
    single = folder / WEIGHTS
    if single.is_file():
        return [single]
    shards = sorted(folder.glob(WEIGHTS.replace(".safetensors", "-*-of-*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}: not a compressed permsparse checkpoint")
    total = int(shards[0].name.rsplit("-of-", 1)[1].split(".")[0])
    if len(shards) != total:
        raise FileNotFoundError(f"{folder}: {len(shards)} of {total} compressed weight files")
    return shards


def read_stored(folder: str | Path) -> tuple[dict[str, LinearSpec], dict[str, str], list[Path]]:
    """The linear specs and tied keys of a compressed checkpoint, and its files; RecordError when a file's
    metadata is malformed."""
    specs: dict[str, LinearSpec] = {}
    tied: dict[str, str] = {}
    files = weight_files(Path(folder))
    for path in files:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        try:
            header = json.loads(metadata.get("permsparse", ""))
        except json.JSONDecodeError as err:
            raise RecordError(f"{path.name}: no readable permsparse metadata ({err})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("revision") != REVISION:
            raise RecordError(f"{path.name}: metadata is not {FORMAT} revision {REVISION}")
        if not isinstance(header.get("linears"), dict) or not isinstance(header.get("tied"), dict):
            raise RecordError(f"{path.name}: metadata lacks its linears or tied keys")
        for name, spec in header["linears"].items():
            specs[name] = from_dict(LinearSpec, spec, f"{path.name}: {name}")
        tied.update(header["tied"])
    return specs, tied, files


def stored_from_tensors(name: str, spec: LinearSpec, get) -> StoredWeight:
    """The :class:`StoredWeight` of ``name`` from ``get(key) -> tensor or None``."""
    values = get(f"{name}.weight.values")
    if values is None:
        raise RecordError(f"{name}: no stored values")
    return StoredWeight(spec, values, get(f"{name}.weight.positions"), get(f"{name}.weight.scales"),
                        get(f"{name}.weight.input_order"))


_CLASSES: dict[type, type] = {}
_WORKSPACES = threading.local()  # per thread: (device, dtype) -> the flat buffer weights expand into in inference


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's flat buffer of at least ``numel`` elements for ``(device, dtype)``, grown as needed: the
    dense weight of the linear running now, so an inference forward allocates no weight at all (the allocator
    would otherwise be asked for, and fragment its heap with, one dense weight per linear per forward)."""
    buffers = _WORKSPACES.__dict__.setdefault("buffers", {})
    buffer = buffers.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        buffers.pop((device, dtype), None)  # the smaller one goes before the larger one is made
        buffer = buffers[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _expanding_class(cls: type) -> type:
    """``cls`` with ``weight`` a property that expands the module's stored form for each use. In a forward without
    autograd the weight expands into this thread's workspace (:func:`_workspace`), overwritten by the next linear;
    with autograd, or outside a forward, every access gives a tensor of its own."""
    if cls not in _CLASSES:
        def weight(self) -> torch.Tensor:
            borrowed = self.__dict__.get("_borrowed")
            return borrowed if borrowed is not None else self.stored.expand_as_module()

        def forward(self, *args, **kwargs):
            if torch.is_grad_enabled() or self.__dict__.get("_borrowed") is not None:
                return cls.forward(self, *args, **kwargs)
            stored = self.stored
            rows, width = stored.spec.shape
            flat = _workspace(rows * width, stored.dtype, stored.values.device)
            if stored.spec.transposed:  # the module keeps (in, out); the weight fills its transpose
                borrowed = flat.view(width, rows)
                stored.expand(out=borrowed.t())
            else:
                borrowed = stored.expand(out=flat.view(rows, width))
            self.__dict__["_borrowed"] = borrowed
            try:
                return cls.forward(self, *args, **kwargs)
            finally:
                del self.__dict__["_borrowed"]

        _CLASSES[cls] = type(f"Stored{cls.__name__}", (cls,), {"weight": property(weight), "forward": forward,
                                                              "__module__": __name__})
    return _CLASSES[cls]


def attach_stored(module: nn.Module, stored: StoredWeight) -> None:
    """Make ``module`` keep ``stored`` instead of its dense weight: same class (a subclass) and forward, its
    ``weight`` expanded on each access."""
    module._parameters.pop("weight", None)
    module.__class__ = _expanding_class(type(module))
    module.add_module("stored", stored)


def detach_stored(module: nn.Module) -> None:
    """Give a module of :func:`attach_stored` its dense weight back, as an ordinary parameter."""
    weight = module.stored.expand_as_module()
    del module.stored
    module.__class__ = type(module).__mro__[1]
    module.weight = nn.Parameter(weight, requires_grad=False)


def _register_refusal() -> None:
    """Make ``from_pretrained`` of a compressed folder fail in one line naming permsparse.load (transformers
    alone warns about the unknown method and then finds no weights file)."""
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # another transformers: the folder still holds no model.safetensors
        return
    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return

    class PermsparseCompressed(QuantizationConfigMixin):
        """Refuses to be read: the weights are not in a form transformers loads."""

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            raise ValueError(REFUSAL)

    register_quantization_config(QUANT_METHOD)(PermsparseCompressed)


_register_refusal()
