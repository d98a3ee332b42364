"""``permsparse speed``: dense against 2:4 end to end on this GPU – what to run before deploying.

The model is a permsparse checkpoint or a random LLaMA of a named shape (:data:`SHAPES`, optionally only
its first blocks) whose every block linear is pruned to 2:4 by magnitude. With ``permuted`` the linears
that per-linear binding cannot fold (the residual readers and the attention output) are stored permuted by
random permutations and gather their inputs at run time, as that export does. Its dense reference is the
same function with every linear in its original (masked) order and no gather.

The 2:4 model is made as :func:`permsparse.checkpoint.load.load` makes it: gathers folded into the norms
(:mod:`.gathers`), then :func:`.convert.deploy` with the workload of the measured shapes (each prefill
once, ``decode_tokens`` decode steps), which keeps dense whatever 2:4 does not speed up. The candidates
(:data:`CANDIDATES`) run it in different regimes, or replace it with other 2:4 implementations:

- ``eager``; ``graph`` (the whole forward captured in one CUDA graph and replayed); ``compile`` (each block
  compiled by ``torch.compile``, default mode: regional compilation, one compiled block serving all of
  them); ``compile+graph`` (both); ``compile-ro`` (each block compiled in ``reduce-overhead`` mode);
- ``torch-semi``: torch's semi-structured tensors with each output made contiguous, eager;
- ``torchao``: torchao's ``sparsify_`` with its 2:4 config, eager;
- ``fp8``: FP8 x 2:4 through cuSPARSELt (:mod:`.fp8`), as a CUDA graph; it changes the function, its logit
  error is reported and it is never the chosen candidate.

Each candidate is timed against the dense model in the same regime (``x``: dense ms over 2:4 ms) at the
first prefill shape; the fastest exact candidate is then timed at every prefill shape and for decode (one
step after a 128-token prompt, with a static KV cache). Also reported: the conversion (what became 2:4,
the predicted speed-up), the bytes of the linear weights against dense, and each candidate's logit error
against the dense model on one 128-token input. Times are medians of CUDA-event timings after warm-up.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..discover.adapters import adapter_for, linear_weight
from ..discover import permute_columns
from ..sparsity.masks import nm_mask
from .convert import TOLERANCE, deploy, gpu_problem
from .costs import capture, event_ms
from .gathers import attach_gathers, fold_gathers, gathered_linears, gathering_modules, remove_gathers
from .linear import weight_bytes
from .policy import CostKey

__all__ = ["CANDIDATES", "SHAPES", "SpeedConfig", "format_table", "measure_speed", "parse_prefill", "random_model",
           "speed_problem"]

# LLaMA shapes by name (the LlamaConfig fields that set a model's size).
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                        rope_theta=500000.0, max_position_embeddings=8192),
}
# candidate -> (regime, 2:4 implementation)
CANDIDATES = {
    "eager": ("eager", "linear24"), "graph": ("graph", "linear24"), "compile": ("compile", "linear24"),
    "compile+graph": ("compile+graph", "linear24"), "compile-ro": ("compile-ro", "linear24"),
    "torch-semi": ("eager", "torch-semi"), "torchao": ("eager", "torchao"), "fp8": ("graph", "fp8"),
}
INEXACT = {"fp8"}  # candidates that change the function
PROMPT = 128  # tokens before the decode steps, and of the logit check
REPLAYS = 16  # calls per timing of a decode step


@dataclass(frozen=True)
class SpeedConfig:
    """What ``permsparse speed`` measures."""

    checkpoint: str = ""  # a permsparse checkpoint folder; "" for a random model of ``shape``
    shape: str = "llama-3.2-1b"
    layers: int = 0  # only the first K blocks of the random model (0: all)
    dtype: str = "float16"
    prefill: tuple[tuple[int, int], ...] = ((1, 2048), (4, 2048), (1, 8192))  # (batch, tokens)
    decode_batch: int = 1
    decode_tokens: int = 128  # decode steps per prompt: weighs decode against prefill in the conversion
    candidates: tuple[str, ...] = tuple(CANDIDATES)
    permuted: bool = False
    repeats: int = 5
    seed: int = 0

    def __post_init__(self):
        if not self.checkpoint and self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r}: 2:4 kernels take float16 or bfloat16")
        unknown = [c for c in self.candidates if c not in CANDIDATES]
        if unknown or not self.candidates:
            raise ValueError(f"unknown candidate {unknown[0] if unknown else '(none given)'!r}; choose from "
                             f"{', '.join(CANDIDATES)}")
        if not self.prefill or any(b < 1 or t < 1 for b, t in self.prefill):
            raise ValueError(f"prefill shapes are BATCHxTOKENS with both at least 1; got {self.prefill}")
        if self.decode_batch < 1 or self.decode_tokens < 0 or self.repeats < 1 or self.layers < 0:
            raise ValueError("decode batch and repeats must be at least 1, decode tokens and layers at least 0")
        if self.checkpoint and (self.permuted or self.layers):
            raise ValueError("--permuted and --layers shape a random model; a checkpoint is measured as it is")


def parse_prefill(spec: str) -> tuple[tuple[int, int], ...]:
    """``"1x2048,4x2048"`` -> ``((1, 2048), (4, 2048))``."""
    shapes = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        batch, _, tokens = part.lower().partition("x")
        if not (batch.isdigit() and tokens.isdigit()):
            raise ValueError(f"prefill shape {part!r} is not BATCHxTOKENS (e.g. 1x2048)")
        shapes.append((int(batch), int(tokens)))
    return tuple(shapes)


def speed_problem() -> str:
    """Why this machine cannot measure 2:4 speed, or ""."""
    problem = gpu_problem()
    if problem:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"{problem} (torch {torch.__version__}, {build}): nothing was measured"
    return ""


def block_linears(model: nn.Module) -> list[str]:
    """Full names of every linear in the model's blocks."""
    adapter = adapter_for(model)
    return [f"{adapter.blocks_path}.{i}.{rel}" for i in range(len(adapter.blocks(model)))
            for group in adapter.kind(i).input_groups for rel in group]


@torch.no_grad()
def random_model(shape: str | dict, layers: int = 0, dtype: torch.dtype = torch.float16, device: str = "cuda",
                 permuted: bool = False, seed: int = 0) -> tuple[nn.Module, nn.Module, list[str]]:
    """``(model, dense, names)``: a random LLaMA of ``shape`` (a name of :data:`SHAPES` or LlamaConfig
    fields) with every block linear 2:4 in storage order – with ``permuted``, the residual readers and the
    attention output stored permuted with runtime gathers (folded into the norms where they can be) – its
    dense reference computing the same function without gathers, and the block linears' names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if layers:
        if layers > sizes["num_hidden_layers"]:
            raise ValueError(f"--layers {layers}: the shape has {sizes['num_hidden_layers']} blocks")
        sizes["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**sizes)).eval()
    finally:
        torch.set_default_dtype(default)
    names = block_linears(model)
    for name in names:
        weight = linear_weight(model.get_submodule(name))
        weight.mul_(nm_mask(weight.abs().float(), 2, 4))
    perms = {}
    if permuted:
        adapter = adapter_for(model)
        moved = set(adapter.single.residual_readers) | {adapter.single.attn_output}  # a LLaMA: one kind of block
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        for name in names:
            if name.rpartition(f"{adapter.blocks_path}.")[2].partition(".")[2] in moved:
                width = linear_weight(model.get_submodule(name)).shape[1]
                perms[name] = torch.randperm(width, generator=gen, device=device)
    dense = copy.deepcopy(model)
    for name, perm in perms.items():  # W[:, argsort(p)] reads x unpermuted: the masked layout
        permute_columns(dense.get_submodule(name), torch.argsort(perm))
    attach_gathers(model, perms)
    fold_gathers(model)
    return model, dense, names


def checkpoint_models(folder: str, dtype: torch.dtype, device: str = "cuda") -> tuple[nn.Module, nn.Module, list[str]]:
    """``(model, dense, names)`` of a permsparse checkpoint: loaded with its gathers (folded), its dense
    reference (every linear in its original order, no gather), and its linears that are 2:4 in storage."""
    from ..checkpoint.load import load
    from ..checkpoint.record import read_record

    record = read_record(folder)
    if record.config.nm != (2, 4):
        raise ValueError(f"{folder} is pruned to {record.config.pattern}; 2:4 kernels need 2:4")
    model = load(folder, device=device, dtype=dtype)
    dense = load(folder, device=device, dtype=dtype)
    remove_gathers(dense)
    with torch.no_grad():
        for name, entry in record.layouts.items():
            if entry.layout == "gather":
                permute_columns(dense.get_submodule(name), torch.argsort(torch.as_tensor(entry.perm)))
    names = [name for name, entry in record.layouts.items() if entry.layout in ("nm", "gather")]
    return model, dense, names


def _model_bytes(model: nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@contextlib.contextmanager
def _single_sequences():
    """Each input is one sequence, so transformers' detection of packed sequences (which cannot run inside a
    CUDA graph or a compiled region, and then falls back to an explicit attention mask, off the flash
    kernel) is switched off: captured and compiled prefills take eager's path."""
    from transformers import masking_utils

    saved = getattr(masking_utils, "find_packed_sequence_indices", None)
    if saved is not None:
        masking_utils.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if saved is not None:
            masking_utils.find_packed_sequence_indices = saved


def _compile_blocks(model: nn.Module, mode: str | None, blocks_path: str) -> None:
    """Compile each block (``mode``: "default" or a ``torch.compile`` mode), or run them eagerly again (None).
    A block keeps its compiled callable per mode, so that compiling again reuses what was compiled."""
    for block in model.get_submodule(blocks_path):
        if mode is None:
            block._compiled_call_impl = None
            continue
        compiled = block.__dict__.setdefault("_permsparse_compiled", {})
        if mode not in compiled:
            compiled[mode] = torch.compile(block._call_impl, dynamic=False, mode=None if mode == "default" else mode)
        block._compiled_call_impl = compiled[mode]


def _cache_arg(model: nn.Module) -> str:
    """transformers 5.2x names the KV cache ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class Runner:
    """One model in one regime: a prefill or decode step as a callable, made (and captured) once per shape."""

    def __init__(self, model: nn.Module, regime: str):
        self.model, self.regime = model, regime
        self.graphs: list[torch.cuda.CUDAGraph] = []  # kept alive while their callables are used

    def _finish(self, fn: Callable[[], object]) -> Callable[[], object]:
        if "graph" not in self.regime:
            return fn
        graph = capture(fn)
        self.graphs.append(graph)
        return graph.replay

    def prefill(self, batch: int, tokens: int, generator: torch.Generator) -> Callable[[], object]:
        ids = torch.randint(0, self.model.config.vocab_size, (batch, tokens), generator=generator,
                            device=generator.device)
        return self._finish(lambda: self.model(input_ids=ids, use_cache=False, logits_to_keep=1))

    def decode(self, batch: int, steps: int, generator: torch.Generator) -> Callable[[], object]:
        """One decode step after a :data:`PROMPT`-token prompt, with room in a static cache for ``steps``
        more calls (each call appends one position)."""
        from transformers import StaticCache

        device = generator.device
        cache = StaticCache(config=self.model.config, max_cache_len=PROMPT + steps + 8)
        arg = _cache_arg(self.model)
        prompt = torch.randint(0, self.model.config.vocab_size, (batch, PROMPT), generator=generator, device=device)
        stance = getattr(torch.compiler, "set_stance", None)
        with stance("force_eager") if stance is not None else contextlib.nullcontext():
            self.model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{arg: cache})
        token = torch.randint(0, self.model.config.vocab_size, (batch, 1), generator=generator, device=device)
        position = torch.full((batch, 1), PROMPT, device=device, dtype=torch.long)
        return self._finish(lambda: self.model(input_ids=token, position_ids=position, use_cache=True,
                                               logits_to_keep=1, **{arg: cache}))


@contextlib.contextmanager
def _regime(models: list[nn.Module], regime: str, blocks_path: str):
    mode = {"compile": "default", "compile+graph": "default", "compile-ro": "reduce-overhead"}.get(regime)
    try:
        if mode:
            for model in models:
                _compile_blocks(model, mode, blocks_path)
        yield
    finally:
        if mode:
            for model in models:
                _compile_blocks(model, None, blocks_path)


def _torch_semi(model: nn.Module, names: list[str]) -> nn.Module:
    """torch's semi-structured tensors (cuSPARSELt where available), each output made contiguous."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}: torch's semi-structured weights need nn.Linear")
        module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(module.weight.detach()),
                                     requires_grad=False)
        module.register_forward_hook(lambda m, args, out: out.contiguous())
    return model


def _torchao(model: nn.Module, names: list[str]) -> nn.Module:
    from torchao.sparsity import sparsify_

    try:
        from torchao.sparsity.sparse_api import SemiSparseWeightConfig
        config = SemiSparseWeightConfig()
    except ImportError:  # older torchao
        from torchao.sparsity import semi_sparse_weight
        config = semi_sparse_weight()
    wanted = set(names)
    sparsify_(model, config, filter_fn=lambda module, fqn: fqn in wanted)
    return model


def _fp8(model: nn.Module, names: list[str]) -> nn.Module:
    from .convert import _set
    from .fp8 import Fp8Linear24, fp8_problem

    problem = fp8_problem()
    if problem:
        raise RuntimeError(problem)
    for name in names:
        _set(model, name, Fp8Linear24.from_linear(model.get_submodule(name)))
    return model


@torch.no_grad()
def _logit_error(model: nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def _error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class _Session:
    config: SpeedConfig
    log: Callable[[str], None]
    generator: torch.Generator
    blocks_path: str
    rows: list[dict] = field(default_factory=list)
    dense_ms: dict[tuple, float] = field(default_factory=dict)

    def timed(self, fn: Callable[[], object], calls: int = 1) -> float:
        return event_ms(fn, self.config.repeats, warmup=2, calls=calls)

    def decode_steps(self) -> int:
        return 2 + 2 + self.config.repeats * REPLAYS  # capture's warm-up, timing's warm-up, timed calls

    def measure(self, candidate: str, shape: str, dense: nn.Module, model: nn.Module, regime: str = "") -> dict:
        """Time ``shape`` ("BxT" prefill or "decode") dense and 2:4, both in the candidate's regime (or
        ``regime``). A decode step that cannot be captured in a CUDA graph is timed without one, and the row
        says why."""
        regime = regime or CANDIDATES[candidate][0]
        row = {"candidate": candidate, "regime": regime, "shape": shape}
        began = time.perf_counter()
        try:
            with _regime([dense, model], regime, self.blocks_path):
                for key, target in (("dense_ms", dense), ("sparse_ms", model)):
                    if key == "dense_ms" and (regime, shape) in self.dense_ms:
                        row[key] = self.dense_ms[regime, shape]
                        continue
                    runner = Runner(target, regime)
                    if shape == "decode":
                        fn = runner.decode(self.config.decode_batch, self.decode_steps(), self.generator)
                        row[key] = self.timed(fn, calls=REPLAYS)
                    else:
                        batch, tokens = (int(v) for v in shape.split("x"))
                        row[key] = self.timed(runner.prefill(batch, tokens, self.generator))
                    del runner
                    if key == "dense_ms":
                        self.dense_ms[regime, shape] = row[key]
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        except Exception as err:  # noqa: BLE001 - one candidate's failure is a result, not the end of the run
            if shape == "decode" and "graph" in regime:
                self.log(f"  {candidate:>13} {shape:>9}: not capturable ({_error_line(err)}); timed without a graph")
                fallback = self.measure(candidate, shape, dense, model, regime.replace("+graph", "").replace(
                    "graph", "eager"))
                fallback["note"] = f"{regime}: {_error_line(err)}"
                return fallback
            row["error"] = _error_line(err)
        row["seconds"] = time.perf_counter() - began
        self.rows.append(row)
        self.log(f"  {candidate:>13} {shape:>9}: " + (row["error"] if "error" in row else
                 f"dense {row['dense_ms']:.3f} ms, 2:4 {row['sparse_ms']:.3f} ms, x{row['speedup']:.3f}") +
                 f" ({row['seconds']:.0f} s)")
        return row


def measure_speed(config: SpeedConfig, log: Callable[[str], None] = print,
                  costs: dict[CostKey, float] | None = None) -> dict:
    """Measure dense against 2:4 as the module docstring says; returns the result (JSON-ready).

    ``costs``: a cost table shared between runs (measured linear costs are added to it)."""
    problem = speed_problem()
    if problem:
        raise RuntimeError(problem)
    began = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    for option, value in (("recompile_limit", 64), ("cache_size_limit", 64)):
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, value)
    with _single_sequences(), torch.no_grad():
        if config.checkpoint:
            model, dense, names = checkpoint_models(config.checkpoint, dtype)
            label = config.checkpoint
        else:
            model, dense, names = random_model(config.shape, config.layers, dtype, "cuda", config.permuted, config.seed)
            blocks = len(adapter_for(model).blocks(model))
            label = f"{config.shape} ({blocks} of {SHAPES[config.shape]['num_hidden_layers']} blocks)"
        linears = len(gathered_linears(model))
        gathers = {"linears": linears, "norms": len(gathering_modules(model)) - linears}
        log(f"[{time.perf_counter() - began:6.1f}s] {label}: {len(names)} 2:4 linears, gathers {gathers}")
        stored = copy.deepcopy(model)  # 2:4 in storage, dense tensors: the other implementations start here
        workload: dict[int, float] = {}
        for batch, tokens in config.prefill:
            workload[batch * tokens] = workload.get(batch * tokens, 0.0) + 1.0
        if config.decode_tokens:
            workload[config.decode_batch] = workload.get(config.decode_batch, 0.0) + config.decode_tokens
        info = deploy(model, names, workload=workload, costs=costs)
        if costs is not None:
            costs.update({(e["out"], e["in"], e["tokens"], e["dtype"], e["kernel"]): e["ms"] for e in info["costs"]})
        ratio = info["bytes"]["ratio"] if info["bytes"] else 1.0
        log(f"[{time.perf_counter() - began:6.1f}s] converted {len(info['converted'])}/{len(names)} "
            f"({', '.join(sorted(set(info['storages'].values()))) or 'none'}), predicted "
            f"{info['predicted_speedup'] or 0:.3f}x; linear weights {ratio:.3f} of dense bytes")
        generator = torch.Generator(device="cuda").manual_seed(config.seed + 2)
        check = torch.randint(0, dense.config.vocab_size, (1, PROMPT), generator=generator, device="cuda")
        with torch.no_grad():
            reference = dense(input_ids=check, use_cache=False).logits.float()
        session = _Session(config, log, generator, adapter_for(dense).blocks_path)
        errors = {"linear24": _logit_error(model, reference, check)}
        first = "x".join(map(str, config.prefill[0]))
        for candidate in config.candidates:
            implementation = CANDIDATES[candidate][1]
            target = model
            if implementation != "linear24":
                try:
                    build = {"torch-semi": _torch_semi, "torchao": _torchao, "fp8": _fp8}[implementation]
                    target = build(copy.deepcopy(stored), names)
                    errors[implementation] = _logit_error(target, reference, check)
                except Exception as err:  # noqa: BLE001 - an implementation this machine lacks
                    session.rows.append({"candidate": candidate, "shape": first, "error": _error_line(err)})
                    log(f"  {candidate:>13}: unavailable: {_error_line(err)}")
                    continue
            session.measure(candidate, first, dense, target)
            del target
            torch.cuda.empty_cache()
        tolerance = TOLERANCE[dtype]
        exact = [r for r in session.rows if "speedup" in r and r["candidate"] not in INEXACT
                 and errors.get(CANDIDATES[r["candidate"]][1], math.inf) <= tolerance]
        best = min(exact, key=lambda r: r["sparse_ms"])["candidate"] if exact else None
        if best is not None:
            target = model if CANDIDATES[best][1] == "linear24" else {
                "torch-semi": _torch_semi, "torchao": _torchao}[CANDIDATES[best][1]](copy.deepcopy(stored), names)
            for batch, tokens in config.prefill[1:]:
                session.measure(best, f"{batch}x{tokens}", dense, target)
            session.measure(best, "decode", dense, target)
        bytes_dense = sum(weight_bytes(dense.get_submodule(n)) for n in names)
        result = {
            "config": {**asdict(config), "prefill": [f"{b}x{t}" for b, t in config.prefill]},
            "model": label,
            "machine": {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
            "linears": len(names), "gathers": gathers,
            "deploy": {k: v for k, v in info.items() if k != "costs"},
            "costs": info["costs"],
            "bytes": {"linear_dense": bytes_dense,
                      "linear_deployed": info["bytes"]["deployed"] if info["bytes"] else None,
                      "model_dense": _model_bytes(dense), "model_deployed": _model_bytes(model)},
            "logit_error": errors, "tolerance": tolerance, "best": best, "rows": session.rows,
            "seconds": time.perf_counter() - began,
        }
    return result


def format_table(result: dict) -> str:
    """The result as one table, with a head line on the model, the conversion and the memory."""
    deployed, dense = result["bytes"]["linear_deployed"], result["bytes"]["linear_dense"]
    info = result["deploy"]
    storages = ", ".join(sorted(set(info.get("storages", {}).values()))) or "none"
    errors = ", ".join(f"{k} {v:.1e}" for k, v in result["logit_error"].items())
    lines = [
        f"{result['model']}, {result['config']['dtype']}{', permuted' if result['config']['permuted'] else ''} on "
        f"{result['machine']['gpu']}: {len(info['converted'])}/{result['linears']} linears 2:4 ({storages}), "
        f"predicted x{info['predicted_speedup'] or 0:.2f}; linear weights "
        f"{(deployed or dense) / dense:.3f} of dense bytes; logit error vs dense {errors} (tolerance "
        f"{result['tolerance']:.0e}); best: {result['best'] or 'none'}",
        f"{'candidate':>14} {'regime':>13} {'shape':>9} {'dense ms':>10} {'2:4 ms':>10} {'x':>6}",
    ]
    for row in result["rows"]:
        head = f"{row['candidate']:>14} {row.get('regime', ''):>13} {row['shape']:>9}"
        if "error" in row:
            lines.append(f"{head} {row['error'][:90]}")
        else:
            unit = " per token" if row["shape"] == "decode" else ""
            note = f"  [{row['note'][:70]}]" if "note" in row else ""
            lines.append(f"{head} {row['dense_ms']:>10.3f} {row['sparse_ms']:>10.3f} {row['speedup']:>6.3f}{unit}{note}")
    return "\n".join(lines)
