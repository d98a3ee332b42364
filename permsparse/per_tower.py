"""Pruning a vision-language model tower by tower (``PruneConfig.towers``).

The language tower prunes inside the whole model, on the text sources of ``--calib``: its blocks are the
ones discovery finds (:func:`permsparse.discover.find_towers`), its objective the model's logits. The
vision tower prunes as a model of its own that reads pixel values, on the image sources of ``--calib``,
with the image processor; its names are then prefixed with the tower's path, so the report names every
linear of the whole model. The include/exclude globs name linears of the whole model: for the vision
tower, a glob that starts with its path loses that prefix, one that starts with ``*`` applies as it is,
any other names a linear elsewhere. The projector and the embeddings are never pruned. While the vision
tower prunes, its final hidden states are what the projector reads (:func:`reading_projector_input`), so
its objective aims there.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import nn

from .config import PruneConfig
from .data.text import mixture
from .data.images import is_image_source
from .report import PruneReport


def tower_source(source: str, tower: str) -> str:
    """The parts of a calibration mixture a tower reads: images for the vision tower, text for the language
    tower; a one-line error when there is none."""
    parts = [(name, weight) for name, weight in mixture(source) if is_image_source(name) == (tower == "vision")]
    if not parts:
        kind = "images (cifar10 or imagefolder:PATH)" if tower == "vision" else "text (c4, alpaca, ...)"
        raise ValueError(f"the {tower} tower calibrates on {kind}, and --calib {source} has none: add a part such as "
                         f"--calib {source}:1,{'cifar10' if tower == 'vision' else 'c4'}:1")
    return ",".join(f"{name}:{weight:g}" for name, weight in parts) if len(parts) > 1 else parts[0][0]


def _local_globs(patterns: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    local = []
    for pattern in patterns:
        if pattern.startswith(prefix + "."):
            local.append(pattern[len(prefix) + 1:])
        elif pattern.startswith("*"):
            local.append(pattern)
    return tuple(local)


def tower_config(config: PruneConfig, tower: str, prefix: str = "", given: bool = False) -> PruneConfig | None:
    """``config`` for pruning one tower: its calibration sources (unless its windows are ``given``) and, for a
    tower pruned as a model of its own (``prefix``: its path), its include/exclude globs relative to it. None
    when the include globs name none of the tower's linears."""
    calibration = config.calibration
    if not given:
        calibration = dataclasses.replace(calibration, source=tower_source(calibration.source, tower))
    include, exclude = config.include, config.exclude
    if prefix:
        include, exclude = _local_globs(include, prefix), _local_globs(exclude, prefix)
        if config.include and not include:
            return None
    return dataclasses.replace(config, calibration=calibration, include=include, exclude=exclude, towers="language")


def prefixed(report: PruneReport, prefix: str) -> PruneReport:
    """``report`` of a tower pruned as a model of its own, with every name made a name of the whole model."""
    def name(n: str) -> str:
        return f"{prefix}.{n}"

    return dataclasses.replace(
        report,
        layers=[dataclasses.replace(layer, name=name(layer.name), site=layer.site and name(layer.site))
                for layer in report.layers],
        sites=[dataclasses.replace(site, name=name(site.name), linears=[name(n) for n in site.linears])
               for site in report.sites],
        training=[dataclasses.replace(t, scope=name(t.scope)) for t in report.training],
        skipped=[name(n) for n in report.skipped], dense=[name(n) for n in report.dense],
        kept_dense={name(n): why for n, why in report.kept_dense.items()},
        uncalibrated=[name(n) for n in report.uncalibrated], kept_start=[name(n) for n in report.kept_start],
        quantized=[dataclasses.replace(q, name=name(q.name)) for q in report.quantized],
        unquantized=[name(n) for n in report.unquantized])


def merged(reports: list[PruneReport]) -> PruneReport:
    """One report of towers pruned one after the other: their records in order, seconds and stages summed, the
    peaks the largest; the hidden permutation is the language tower's (the first)."""
    first, *rest = reports
    out = dataclasses.replace(first, layers=list(first.layers), sites=list(first.sites),
                              training=list(first.training), skipped=list(first.skipped), dense=list(first.dense),
                              uncalibrated=list(first.uncalibrated), kept_start=list(first.kept_start),
                              quantized=list(first.quantized), unquantized=list(first.unquantized),
                              stages=dict(first.stages), kept_dense=dict(first.kept_dense))
    for report in rest:
        for part in ("layers", "sites", "training", "skipped", "dense", "uncalibrated", "kept_start", "quantized",
                     "unquantized"):
            getattr(out, part).extend(getattr(report, part))
        out.kept_dense.update(report.kept_dense)
        for stage, seconds in report.stages.items():
            out.stages[stage] = out.stages.get(stage, 0.0) + seconds
        out.seconds += report.seconds
        out.weights_updated = out.weights_updated or report.weights_updated
        out.peak_rss_mb = max(out.peak_rss_mb, report.peak_rss_mb)
        if report.peak_device_mb is not None:
            out.peak_device_mb = max(out.peak_device_mb or 0.0, report.peak_device_mb)
        if out.distillation is None:
            out.distillation = report.distillation
    return out


@contextmanager
def reading_projector_input(model: nn.Module, tower: nn.Module):
    """While inside, the ``last_hidden_state`` of ``tower`` (the vision tower of ``model``) is what the
    projector reads, where the model's config names it (LLaVA's ``vision_feature_layer``: the hidden states of
    that layer, several concatenated; strategy ``default``: without the class token) instead of the tower's
    own final (normalised) states; models that read those (Idefics3, Gemma 3, PaliGemma) are left as they are."""
    layer = getattr(model.config, "vision_feature_layer", None)
    if layer is None:
        yield
        return
    layers = [layer] if isinstance(layer, int) else list(layer)
    drop_class = getattr(model.config, "vision_feature_select_strategy", "full") == "default"

    def ask(_module, args, kwargs):
        return args, {**kwargs, "output_hidden_states": True}

    def read(_module, _args, _kwargs, out):
        states = torch.cat([out.hidden_states[k] for k in layers], dim=-1)
        out.last_hidden_state = states[:, 1:] if drop_class else states
        return out

    handles = [tower.register_forward_pre_hook(ask, with_kwargs=True),
               tower.register_forward_hook(read, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
