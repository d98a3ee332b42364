"""Tiny random models of every causal-LM and image-text-to-text type of the installed transformers, built from
their configs alone, and the sweep's verdict on one type (``bench/families.py`` runs it over all of them,
``tests/test_families_sweep.py`` over a named list).

A type's default config is shrunk at every level (the decoder's config, the vision tower's, ...): the sizes of
:data:`SIZES` wherever the config has such a field, every special token id moved above the tokenizer's
vocabulary, and the decoder stack cut to one layer of each kind. Kinds are discovered from the config: every
per-layer list (``layer_types``, ``mlp_layer_types``, ``layers_block_type``, ``no_rope_layers``, ...) gives each
layer a signature, and the stack keeps the shortest prefix that holds every signature (or, when that prefix is
long, the first layer of each); the fields that make dense first layers or interleave experts
(:data:`KIND_FIELDS`) are set so that two layers hold both kinds; :data:`OVERRIDES` adds the few kinds a
default config leaves out (a hybrid whose default is all state-space layers).

The verdict: the tiny model is saved with a small byte-level tokenizer, pruned by the command line as a user
runs it (``permsparse prune --perm ria --export folded``, 2:4, calibrated on Tiny Shakespeare), checked
(``permsparse check``), reloaded with plain transformers, and every matrix inside its blocks counted: each
pruned one must be half zero. ``pass``, ``refused`` (the command's one-line error), ``crash`` (a traceback),
``fails`` (a property above does not hold) or ``cannot be built`` (the config or the dense model's forward
pass fails before permsparse is involved).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VOCAB = 1024  # the models' vocabulary; the tokenizer's 512 tokens lie below it, special tokens above
TOKENIZER_VOCAB = 512
# Sizes set wherever a config (or one of its sub-configs) has the field: hidden 64, 4 heads of 16, 2 kv heads.
SIZES = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "text_hidden_size",
                     "out_hidden_size", "projector_hidden_size", "vision_output_dim", "projection_dim",
                     "word_embed_proj_dim", "lru_width", "attention_hidden_size"), 64),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "ffn_hidden_size", "encoder_ffn_dim", "decoder_ffn_dim",
                     "dense_intermediate_size", "first_dense_intermediate_size", "mlp_only_intermediate_size",
                     "intermediate_size_mlp", "mlp_dim", "n_inner", "feed_forward_size"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size", "expert_ffn_hidden_size",
                     "moe_hidden_size", "share_expert_dim"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads",
                     "encoder_attention_heads", "decoder_attention_heads", "swa_num_attention_heads",
                     "num_sliding_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "num_query_groups"), 2),
    **dict.fromkeys(("head_dim", "kv_channels", "swa_head_dim", "attention_head_size", "d_kv", "d_head"), 16),
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 256),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk"), 2),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    # multi-head latent attention: low-rank query and key-value projections
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_num_heads": 2,
    # linear attention (gated DeltaNet) and state-space mixers
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_num_heads": 4, "linear_head_dim": 16, "mamba_d_state": 16, "state_size": 16, "ssm_state_size": 16,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "n_mamba_heads": 8, "mamba_head_dim": 16, "mamba_headdim": 16,
    "time_step_rank": 8, "mamba_dt_rank": 8, "mamba_d_ssm": 128, "mamba_d_head": 16, "moe_k": 2,
    # per-layer inputs (Gemma 3n, Gemma 4), sliding and chunked attention
    "codebook_dim": 64, "dim_ff": 128, "dff": 128, "dim_head": 16, "rotary_dim": 8, "hidden_size_per_layer_input": 16, "laurel_rank": 8, "sliding_window": 64, "attention_chunk_size": 64,
}
# Sizes whose default is None (derived from others, or "the same as the heads") that the model needs small too.
UNSET_SIZES = ("head_dim", "num_key_value_heads", "intermediate_size", "num_experts_per_tok", "n_routed_experts",
               "kv_channels")
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "depth", "encoder_layers", "decoder_layers",
                "num_encoder_layers", "num_decoder_layers")
DECODER_CONFIGS = ("text_config",)  # the sub-config that holds a vision-language model's decoder stack
# Fields that make a stack of two kinds: dense first layers, experts or attention every other layer.
KIND_FIELDS = {"first_k_dense_replace": 1, "mlp_only_layers": [0], "decoder_sparse_step": 1, "attn_layer_period": 2,
               "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_indices": [1],
               "moe_layer_start_index": 1, "interleave_moe_layer_step": 1, "num_kv_shared_layers": 0}
# Per type, merged into its decoder's config: kinds a default config leaves out (its default stack holds one kind),
# sizes passed as arguments that are no field, a field the model reads that its default config lacks.
OVERRIDES = {
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "gemma4_text": {"head_dim": 16, "global_head_dim": 16}, "gemma4": {"head_dim": 16, "global_head_dim": 16},
    "mamba2": {"num_heads": 8},  # its heads are the state-space mixer's: 8 of 16 fill hidden x expand
    "zaya": {"num_experts_per_tok": 1},  # the only value its config accepts
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
}
LONGEST_PREFIX = 8  # a stack of more layers keeps the first layer of each kind instead of a prefix
INDEX_LIST = re.compile(r"(idxs|_ids|_indices|^moe_layers|^mlp_only_layers)$")


@dataclass
class Tiny:
    """A tiny model and how it was made: its type, the mapping it comes from, and the stack's kinds."""

    model: object
    model_type: str
    mapping: str  # "causal-lm" or "image-text-to-text"
    kinds: str  # the per-layer fields that make the stack's kinds, as given to the config


@dataclass
class Outcome:
    """The sweep's verdict on one model type (see the module's docstring)."""

    model_type: str
    mapping: str = ""
    status: str = ""  # pass, refused, crash, fails, cannot be built
    message: str = ""  # the refusal's line, the crash's last lines, what fails, why it cannot be built
    kinds: str = ""
    layers: int = 0  # blocks in the tiny stack
    matrices: int = 0  # matrices inside the blocks (a packed expert tensor counts one per expert)
    pruned: int = 0  # of those, the ones the record names as pruned
    half_zero: int = 0  # of those, the ones at least half zero in the reloaded export
    dense: list[str] = field(default_factory=list)  # matrices inside the blocks left dense (names within a block)
    seconds: float = 0.0


class CannotBuild(Exception):
    """The type cannot be built from its config alone (or its dense model does not run on token ids)."""


def mappings() -> dict[str, str]:
    """Every causal-LM and image-text-to-text model type of the installed transformers -> its mapping (a type in
    both is a causal LM)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    out = dict.fromkeys(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "image-text-to-text")
    out.update(dict.fromkeys(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal-lm"))
    return dict(sorted(out.items()))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(config) -> dict:
    """The fields a config declares (not those its ``__post_init__`` derives), with their values."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return {k: v for k, v in vars(config).items() if not k.startswith("_")}
    out = {}
    for f in dataclasses.fields(config):
        if not f.name.startswith("_"):
            try:
                out[f.name] = getattr(config, f.name, None)
            except Exception:  # noqa: BLE001 - a field read per layer (Gemma 4's head_dim) has no single value
                continue
    return out


def _layer_count(config) -> tuple[str, int] | None:
    for name in LAYER_COUNTS:
        value = _fields(config).get(name)
        if _is_int(value) and value > 0:
            return name, value
    return None


def _layer_counts(config, count: int) -> dict[str, int]:
    """Every layer count field ``config`` has (a decoder's, an encoder's), set to ``count``."""
    return {name: count for name in LAYER_COUNTS if _is_int(_fields(config).get(name))}


def _per_layer(config, count: int) -> dict[str, list]:
    """The fields of ``config`` that hold one kind per layer: lists of ``count`` strings, booleans or 0/1."""
    out = {}
    for name, value in _fields(config).items():
        if name in SIZES or not isinstance(value, (list, tuple)) or len(value) != count:
            continue
        if INDEX_LIST.search(name):
            continue
        if all(isinstance(v, (str, bool)) or v in (0, 1) for v in value):
            out[name] = list(value)
    return out


def _index_lists(config, count: int) -> dict[str, list[int]]:
    """Fields of ``config`` that name layers by index (``full_attn_idxs``, ``hybrid_layer_ids``, ...)."""
    return {name: list(value) for name, value in _fields(config).items()
            if INDEX_LIST.search(name) and isinstance(value, (list, tuple))
            and all(_is_int(v) and 0 <= v < count for v in value)}


TEXT_TOKENS = re.compile(r"^_?(pad|bos|eos|sep|cls|unk|mask|decoder_start)_token_(id|index)$")


def _token_fields(config) -> list[str]:
    """Special token ids to move above the tokenizer's vocabulary: those of images, videos, audio, ... (random
    text then never holds one), and text ones (padding, start, end, ...) that lie above it already."""
    return [name for name, value in _fields(config).items()
            if _is_int(value) and re.search(r"token_(id|index)$", name)
            and not (TEXT_TOKENS.match(name) and value < TOKENIZER_VOCAB)]


def _shrunk(config, decoder: bool, model_type: str, token: list[int]) -> dict:
    """Overrides for one config level: sizes, special tokens above the tokenizer's vocabulary, the kind fields of
    a decoder stack, and sub-configs shrunk in turn (as dicts)."""
    from transformers import PretrainedConfig

    out = {}
    for name, value in _fields(config).items():
        if isinstance(value, PretrainedConfig):
            sub = _shrunk(value, name in DECODER_CONFIGS, model_type, token)
            out[name] = {**_as_dict(value, name in DECODER_CONFIGS), **sub}
        elif name in SIZES and (_is_int(value) or (value is None and name in UNSET_SIZES)):
            out[name] = SIZES[name]
        elif decoder and name in KIND_FIELDS:
            out[name] = KIND_FIELDS[name]
    if "qk_rope_head_dim" in out:  # multi-head latent attention: no grouped keys, head_dim is the rotary part
        out.update({k: SIZES["qk_rope_head_dim"] for k in ("head_dim",) if k in out})
        out.update({k: SIZES["num_attention_heads"] for k in ("num_key_value_heads",) if k in out})
    for name in _token_fields(config):
        token[0] += 1
        out[name] = VOCAB - token[0]
    counted = _layer_count(config)
    if counted and not decoder:  # a vision tower, an audio encoder: one layer
        out.update(_layer_counts(config, 1))
        out.update({k: v[:1] for k, v in _per_layer(config, counted[1]).items()})
    if decoder and model_type in OVERRIDES:
        for name, value in OVERRIDES[model_type].items():
            out[name] = {**out.get(name, {}), **value} if isinstance(value, dict) else value
        given = [len(v) for v in OVERRIDES[model_type].values() if isinstance(v, list)]
        if given:
            out.update(_layer_counts(config, given[0]) or {"num_hidden_layers": given[0]})
    if decoder and "rope_parameters" in _fields(config) and _reads_mrope(model_type, type(config).__module__):
        rope = out.get("rope_parameters", _fields(config).get("rope_parameters")) or {"rope_type": "default",
                                                                                       "rope_theta": 10000.0}
        if "rope_type" in rope or "rope_theta" in rope:
            rotary = rope.get("partial_rotary_factor") or _fields(config).get("partial_rotary_factor") or 1.0
            sections = rope.get("mrope_section") or [16, 24, 24]
            out["rope_parameters"] = {**rope, "mrope_section": _rescaled(sections, int(SIZES["head_dim"] * rotary) // 2)}
    return out


def _reads_mrope(model_type: str, config_module: str) -> bool:
    """Whether the modelling code of ``model_type`` splits its rotary embedding into multimodal sections (with
    sections of its own when the config gives none)."""
    import importlib
    import inspect

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    folders, seen = [model_type_to_module_name(model_type), config_module.split(".")[-2]], set()
    while folders:  # the type's modelling code and the modelling code it imports from other types
        folder = folders.pop()
        if folder in seen:
            continue
        seen.add(folder)
        try:
            source = inspect.getsource(importlib.import_module(f"transformers.models.{folder}.modeling_{folder}"))
        except (ImportError, OSError, TypeError):
            continue
        if "mrope_section" in source:
            return True
        folders += re.findall(r"from \.\.(\w+)\.modeling_\w+ import", source)
    return False


def _rescaled(sections: list[int], total: int) -> list[int]:
    """Multimodal rotary sections (time, height, width) scaled to sum to ``total`` (half the rotary width)."""
    scaled = [max(1, round(s * total / sum(sections))) for s in sections]
    scaled[-1] += total - sum(scaled)
    return scaled


def _as_dict(config, decoder: bool = False) -> dict:
    """A sub-config as its parent takes it: its fields but the sizes it derives (a decoder's: all it derives, which
    depend on its layers)."""
    declared = _fields(config)
    return {k: v for k, v in config.to_dict().items() if k in declared or not (decoder or k in SIZES)
            or k == "model_type"}


def _stack(config, overrides: dict) -> tuple[dict, str]:
    """Overrides that cut the decoder stack of ``config`` (built with ``overrides``) to one layer of each kind, and
    those kinds in words."""
    name, count = _layer_count(config) or ("num_hidden_layers", 2)
    per_layer = _per_layer(config, count)
    signatures = [tuple(v[i] for v in per_layer.values()) for i in range(count)]
    sized = {k: v for k, v in _fields(config).items() if k in SIZES and isinstance(v, (list, tuple)) and len(v) == count}
    numbers = {k: list(v) for k, v in _fields(config).items() if k not in sized and k not in per_layer
               and isinstance(v, (list, tuple)) and len(v) == count and not INDEX_LIST.search(k)
               and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)}  # a value per layer
    indexed = _index_lists(config, count)
    signatures = [s + tuple(i in v for v in indexed.values()) for i, s in enumerate(signatures)]
    kinds = list(dict.fromkeys(signatures))
    if len(kinds) <= 1:
        return ({**(_layer_counts(config, 2) or {name: 2}), **{k: v[:2] for k, v in (per_layer | numbers).items()},
                 **{k: [SIZES[k]] * 2 for k in sized}}, _kind_words(config, {}, overrides))
    prefix = max(signatures.index(k) for k in kinds) + 1
    keep = list(range(prefix)) if prefix <= LONGEST_PREFIX else sorted(signatures.index(k) for k in kinds)
    out = {**(_layer_counts(config, len(keep)) or {name: len(keep)}), **{k: [v[i] for i in keep] for k, v in per_layer.items()}}
    out.update({k: [j for j, i in enumerate(keep) if i in v] for k, v in indexed.items()})
    out.update({k: [SIZES[k]] * len(keep) for k in sized})  # a size per layer (Gemma 3n's MLP widths)
    out.update({k: [v[i] for i in keep] for k, v in numbers.items()})
    return out, _kind_words(config, {k: out[k] for k in (*per_layer, *indexed)}, overrides)


def _kind_words(config, lists: dict, overrides: dict) -> str:
    words = [f"{k}={v}" for k, v in overrides.items() if k in KIND_FIELDS and _fields(config).get(k) is not None]
    words += [f"{k}={','.join(map(str, v))}" for k, v in lists.items() if len(set(map(str, v))) > 1]
    return "; ".join(words)


def tiny_config(model_type: str):
    """The tiny config of ``model_type`` and its stack's kinds in words (see the module's docstring)."""
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type)
        overrides = _shrunk(default, True, model_type, [0])
        first = AutoConfig.for_model(model_type, **overrides)
        text_key = next((k for k in DECODER_CONFIGS if k in overrides and isinstance(overrides[k], dict)), None)
        if text_key is None:
            stack, kinds = _stack(first, overrides)
            config = AutoConfig.for_model(model_type, **{**overrides, **stack})
        else:
            level = getattr(first, text_key)
            stack, kinds = _stack(level, overrides[text_key])
            text = {**_as_dict(level, True), **stack}
            config = AutoConfig.for_model(model_type, **{**overrides, text_key: text})
    except Exception as err:  # noqa: BLE001 - any failure of transformers' own config code
        raise CannotBuild(f"config: {type(err).__name__}: {_first_line(err)}") from None
    return config, kinds


def build(model_type: str, seed: int = 0) -> Tiny:
    """A tiny random model of ``model_type`` in eval mode, its 1-D parameters (norms, biases) random so that a
    forgotten permutation of any of them shows; :class:`CannotBuild` when its config or its dense forward pass
    on token ids fails."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    mapping = mappings().get(model_type)
    if mapping is None:
        raise KeyError(f"{model_type} is neither a causal-LM nor an image-text-to-text type")
    config, kinds = tiny_config(model_type)
    auto = AutoModelForCausalLM if mapping == "causal-lm" else AutoModelForImageTextToText
    torch.manual_seed(seed)
    try:
        model = auto.from_config(config).eval()
    except Exception as err:  # noqa: BLE001
        raise CannotBuild(f"model: {type(err).__name__}: {_first_line(err)}") from None
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and param.is_floating_point():
                param.add_(0.1 * torch.randn_like(param))
        try:
            model(input_ids=torch.randint(3, TOKENIZER_VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed)))
        except Exception as err:  # noqa: BLE001
            raise CannotBuild(f"forward on token ids: {type(err).__name__}: {_first_line(err)}") from None
    return Tiny(model, model_type, mapping, kinds)


def tokenizer(folder: Path | None = None):
    """A byte-level BPE tokenizer of 512 tokens trained on Tiny Shakespeare (a real tokenizer, made offline); saved
    in and read back from ``folder`` when given."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<s>", "</s>"]))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if folder is not None:
        out.save_pretrained(folder)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def _cli(argv: list[str]) -> tuple[int, str]:
    """``permsparse ARGV`` in this process: its exit status and what it wrote to stderr."""
    from permsparse.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def count_matrices(model, record: dict) -> tuple[int, int, int, list[str]]:
    """Inside the blocks of the record's pruned linears: matrices (a packed expert tensor: one per expert; any other
    tensor of two or more dimensions, a convolution's, one), those pruned, those pruned and at least half zero,
    and the names (within a block) of those left dense."""
    pruned = {layer["name"] for layer in record["report"]["layers"]}
    blocks = sorted({m.group(1) for name in pruned if (m := re.match(r"(.*?\.\d+)\.", name))})
    matrices = done = half = 0
    dense: set[str] = set()
    for block in blocks:
        for name, param in model.get_submodule(block).named_parameters():
            if param.dim() < 2:
                continue
            full = f"{block}.{name}"
            owner = full.rsplit(".", 1)[0]
            packed = param.dim() == 3 and any(p.startswith(f"{owner}.0.") for p in pruned)  # experts split to prune
            slices = ([(param[e], any(p.startswith(f"{owner}.{e}.") for p in pruned)) for e in range(param.shape[0])]
                      if packed else [(param, full.removesuffix(".weight") in pruned)])
            for matrix, is_pruned in slices:
                matrices += 1
                if not is_pruned:
                    dense.add(name)
                    continue
                done += 1
                half += int((matrix == 0).sum().item() * 2 >= matrix.numel())
    return matrices, done, half, sorted({re.sub(r"^\d+\.", "", n) for n in dense})


def verdict(model_type: str, workdir: Path, token_folder: Path | None = None) -> Outcome:
    """The sweep's verdict on ``model_type`` (see the module's docstring), its files under ``workdir``."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    started = time.perf_counter()
    out = Outcome(model_type, mappings().get(model_type, ""))
    torch.set_num_threads(1)
    try:
        tiny = build(model_type)
    except CannotBuild as err:
        out.status, out.message = "cannot be built", str(err)
        return _timed(out, started)
    out.kinds = tiny.kinds
    folder, pruned = Path(workdir) / "tiny", Path(workdir) / "pruned"
    try:
        tiny.model.save_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - transformers cannot save the model it built
        out.status, out.message = "cannot be built", f"save_pretrained: {type(err).__name__}: {_first_line(err)}"
        return _timed(out, started)
    tokenizer(token_folder).save_pretrained(folder)
    out.layers = _layer_total(tiny.model)
    del tiny
    try:
        rc, err = _cli(["prune", "--model", str(folder), "--perm", "ria", "--export", "folded", "--calib", "shakespeare",
                        "--nsamples", "8", "--seqlen", "32", "--eval-windows", "0", "--quiet", "--out", str(pruned)])
        if rc != 0:
            out.status, out.message = "refused", _error_line(err, rc)
            return _timed(out, started)
        rc, err = _cli(["check", str(pruned)])
        auto = AutoModelForCausalLM if out.mapping == "causal-lm" else AutoModelForImageTextToText
        reloaded = auto.from_pretrained(pruned).eval()
        record = json.loads((pruned / "permsparse.json").read_text())
        out.matrices, out.pruned, out.half_zero, out.dense = count_matrices(reloaded, record)
    except Exception:  # noqa: BLE001 - the verdict
        out.status, out.message = "crash", _summary(traceback.format_exc())
        return _timed(out, started)
    problems = []
    if rc != 0:
        problems.append(f"check fails: {_error_line(err, rc)}")
    if out.pruned == 0:
        problems.append("no matrix inside the blocks is pruned")
    if out.half_zero < out.pruned:
        problems.append(f"{out.pruned - out.half_zero} of {out.pruned} pruned matrices are not half zero")
    out.status, out.message = ("fails", "; ".join(problems)) if problems else ("pass", "")
    return _timed(out, started)


def _error_line(err: str, rc: int) -> str:
    """The command's error line (its last ``permsparse: error:`` line), saying how many more lines followed it:
    a refusal is meant to be one line."""
    lines = err.strip().splitlines()
    at = max((i for i, line in enumerate(lines) if line.startswith("permsparse: error:")), default=len(lines) - 1)
    if at < 0:
        return f"exit {rc}"
    more = len(lines) - at - 1
    return lines[at] + (f" (+{more} more line{'s' * (more > 1)})" if more else "")


def _layer_total(model) -> int:
    config = model.config
    for name in DECODER_CONFIGS:
        config = getattr(config, name, None) or config
    counted = _layer_count(config)
    return counted[1] if counted else 0


def _timed(out: Outcome, started: float) -> Outcome:
    out.seconds = round(time.perf_counter() - started, 2)
    return out


def _summary(trace: str) -> str:
    """A traceback in one line: its last frame and its error."""
    lines = [line.strip() for line in trace.strip().splitlines()]
    frames = [line for line in lines if line.startswith("File ")]
    return f"{lines[-1][:300]} (at {frames[-1][5:][:200]})" if frames else lines[-1][:300]


def as_dict(outcome: Outcome) -> dict:
    return asdict(outcome)
