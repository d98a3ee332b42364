"""One self-contained HTML page (and its PNG figures) that compares pruned checkpoints.

:func:`write_report` reads each checkpoint's ``permsparse.json`` (through
:func:`permsparse.checkpoint.record.read_record`, nothing else) and writes ``OUT/index.html`` with:

1. a results table, one row per checkpoint: method, calibration, perplexity per evaluation text,
   zero-shot accuracy per task and their mean, pruning time and peak memory;
2. per-layer figures: the share of the host score each linear keeps, with and without its
   permutation, and its output error with and without it where the run recorded one;
3. learning curves of learned permutations: training loss and Sinkhorn temperature per step, the
   judged objective at the judged steps with the kept best marked (per block for blockwise runs);
4. perplexity and accuracy side by side across checkpoints;
5. the exact command line and config of each checkpoint.

The figures are drawn with matplotlib's Agg canvas (no pyplot, so no global backend or figure state
changes), under matplotlib's default style with fixed sizes and no random elements, and saved
without the version stamp: the same records give the same bytes. Each PNG is written under ``OUT/``
and also embedded in the page as a ``data:`` URI, and the page has no script and no external
stylesheet, font or link, so it opens from a file with no server and no network. Data a run did not
record (no training, no zero-shot results, no output errors) gives a short sentence instead of a
figure or a column.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .record import CheckpointRecord, read_record
from ..config import Learned, PruneConfig
from ..report import LayerRecord, TrainingRecord
from ..serial import to_dict

__all__ = ["INDEX", "describe_permutation", "write_report"]

INDEX = "index.html"
DPI = 100
WIDTH = 12.0  # inches: 1200 pixels at DPI
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")  # matplotlib's tab10, one per checkpoint in every figure
PERMUTED, IDENTITY = "#1f77b4", "#8c8c8c"
STYLE = ["default", {"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
                     "legend.fontsize": 8, "legend.framealpha": 0.8, "savefig.dpi": DPI}]


@dataclass
class _Entry:
    """One checkpoint of the report: its label, folder, record, colour, and the slug of its anchors and files."""

    label: str
    folder: Path
    record: CheckpointRecord
    color: str
    slug: str

    @property
    def plot_label(self) -> str:
        """The label for matplotlib, where a ``$`` would start mathtext."""
        return _mpl(self.label)


def _mpl(text: str) -> str:
    return str(text).replace("$", r"\$")


# ----------------------------------------------------------------------------------------------- entry point


def write_report(folders: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
                 title: str = "permsparse report") -> Path:
    """Write ``out/index.html`` and its PNG figures for the checkpoints in ``folders``; return the page's path.

    ``labels`` names the checkpoints in the table and legends (default: each folder's name, with its
    parent folder's name in front where two names collide). Every record is read before anything is
    written, so a folder that is not a checkpoint (``FileNotFoundError`` naming it) or a malformed
    record (``RecordError``) leaves ``out`` untouched. An existing ``out`` is reused: only the files
    this report writes are replaced, others stay.
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("no checkpoint folders given")
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(folders):
            raise ValueError(f"{len(labels)} labels for {len(folders)} checkpoints: give one label per folder")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")
    records = [read_record(folder) for folder in folders]
    labels = labels or _default_labels(folders)
    entries = [_Entry(label, folder, record, COLORS[i % len(COLORS)], f"{i + 1}-{_slug(label)}")
               for i, (label, folder, record) in enumerate(zip(labels, folders, records))]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"report folder {out} exists and is not a folder")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("the HTML report draws its figures with matplotlib: pip install 'permsparse[report]' "
                          "(or pip install matplotlib)") from None
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(out)
    with _style():
        page_html = _render(entries, page, title)
    path = out / INDEX
    path.write_text(page_html, encoding="utf-8")
    return path


def _default_labels(folders: list[Path]) -> list[str]:
    """Folder names; where two collide, ``parent/name``; where those collide too, a running number."""
    names = [f.resolve().name or str(f) for f in folders]
    labels = [f"{f.resolve().parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names)]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return unique


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:40] or "checkpoint"


class _Page:
    """Writes each figure as a PNG under the report folder and returns its ``<img>`` tag (a data URI)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def image(self, fig, name: str, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
        data = buf.getvalue()
        (self.folder / name).write_bytes(data)
        width, height = (round(v) for v in fig.get_size_inches() * DPI)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure><img src="{uri}" width="{width}" height="{height}" alt="{_e(alt)}" '
                f'data-file="{_e(name)}"><figcaption>{_e(alt)} (<code>{_e(name)}</code>)</figcaption></figure>')


def _style():
    import matplotlib.style

    return matplotlib.style.context(STYLE)


def _figure(height: float, width: float = WIDTH):
    """A matplotlib figure on its own Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------------------------- the page


def _render(entries: list[_Entry], page: _Page, title: str) -> str:
    """The whole page: a header with links to the five sections, then the sections in order."""
    sections = [
        ("results", "Results", _results_section(entries)),
        ("layers", "Per-layer score and output error", _layers_section(entries, page)),
        ("training", "Learning curves", _training_section(entries, page)),
        ("compare", "Perplexity and accuracy across checkpoints", _compare_section(entries, page)),
        ("commands", "Commands and configs", _commands_section(entries)),
    ]
    nav = "".join(f'<li>{k}. <a href="#{key}">{_e(name)}</a></li>' for k, (key, name, _) in enumerate(sections, 1))
    body = "".join(f'<section id="{key}"><h2>{_e(name)}</h2>{content}</section>' for key, name, content in sections)
    count = f"{len(entries)} checkpoint{'s' if len(entries) != 1 else ''}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><p>{count}: "
            + ", ".join(f'<span class="swatch" style="background:{e.color}"></span>{_e(e.label)}' for e in entries)
            + f"</p><nav><ol>{nav}</ol></nav></header><main>{body}</main></body></html>\n")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0 auto;
max-width:1260px;padding:0 16px 48px;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin:24px 0 4px}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:1.08em;margin:24px 0 6px}
nav ol{display:flex;flex-wrap:wrap;gap:4px 24px;list-style:none;padding:0;margin:4px 0}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #d6d6d6;padding:4px 8px;vertical-align:top}
th{background:#f3f3f5;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.na{color:#999;text-align:center}.small{color:#666;font-size:.85em}.note{color:#555;font-style:italic}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin:0 4px 0 8px;vertical-align:-1px}
figure{margin:8px 0}figure img{max-width:100%;height:auto;display:block}figcaption{color:#666;font-size:.85em}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:8px;overflow-x:auto;white-space:pre-wrap;word-break:break-all;
font-size:.85em}details{margin:6px 0}.nowrap{white-space:nowrap}summary{cursor:pointer;color:#333}
.scroll{overflow-x:auto}
""".replace("\n", "")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _na(why: str = "not measured") -> str:
    return f'<td class="na" title="{_e(why)}">&ndash;</td>'


def _num(text: str, title: str = "") -> str:
    """A right-aligned number cell; ``text`` is HTML already, ``title`` (the exact value) is escaped here."""
    tip = f' title="{_e(title)}"' if title else ""
    return f'<td class="num"{tip}>{text}</td>'


def _heading(entry: _Entry) -> str:
    return (f'<h3 id="{_e(entry.slug)}"><span class="swatch" style="background:{entry.color}"></span>'
            f"{_e(entry.label)}</h3>")


# ----------------------------------------------------------------------------------------------- 1. results table


def describe_permutation(config: PruneConfig) -> str:
    """The permutation in a few words: ``no permutation``, ``search ria``, ``learned e2e from ria, 30 steps``."""
    perm = config.permutation
    if isinstance(perm, Learned):
        text = f"learned {perm.scope} from {perm.init}, {perm.steps} steps"
        if perm.scope == "e2e":
            terms = (("ce", perm.ce), ("kl", perm.kl), ("hidden", perm.hidden))
            weights = ", ".join(f"{k} {v:g}" for k, v in terms if v)
            text += f" ({weights})"
        return text
    if perm.method == "none":
        return "no permutation"
    return f"search {perm.method}" + (f", {perm.chunks} chunks" if perm.chunks > 1 else "")


def _describe_calibration(config: PruneConfig) -> str:
    cal = config.calibration
    text = f'{_e(cal.source)}, <span class="nowrap">{cal.nsamples} &times; {cal.seqlen}</span>'
    if config.learned is not None:
        text += f'<br><span class="small">{cal.holdout} held-out windows</span>'
    return text


def _texts(entries: list[_Entry]) -> list[str]:
    return list(dict.fromkeys(name for e in entries for name in e.record.metrics))


def _tasks(entries: list[_Entry]) -> list[str]:
    return list(dict.fromkeys(r.task for e in entries for r in e.record.zero_shot))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


def _memory(mb: float) -> str:
    return f"{mb:.0f} MB" if mb < 10240 else f"{mb / 1024:.1f} GB"


def _mean_accuracy(entry: _Entry) -> float | None:
    accs = [r.acc for r in entry.record.zero_shot if r.acc is not None and not math.isnan(r.acc)]
    return sum(accs) / len(accs) if accs else None


def _results_section(entries: list[_Entry]) -> str:
    """One row per checkpoint; a column per evaluation text and task that any checkpoint measured."""
    texts, tasks = _texts(entries), _tasks(entries)
    head = ["checkpoint", "method", "calibration"]
    head += [f"ppl {_e(t)}" for t in texts]
    head += [f"{_e(t)} acc %" for t in tasks] + (["mean acc %"] if tasks else [])
    head += ["pruning", "peak RSS"]
    rows = []
    for entry in entries:
        record, config = entry.record, entry.record.config
        cells = [f'<td><span class="nowrap"><span class="swatch" style="background:{entry.color}"></span>'
                 f'<a href="#{_e(entry.slug)}">'
                 f'{_e(entry.label)}</a></span>'
                 + (f'<br><span class="small">{_e(record.model)}</span>' if record.model else "") + "</td>",
                 f"<td>{_e(config.pattern)} &middot; {_e(config.score)}<br>{_e(describe_permutation(config))}"
                 f'<br><span class="small">{_e(config.binding)} binding</span></td>',
                 f"<td>{_describe_calibration(config)}</td>"]
        for text in texts:
            m = record.metrics.get(text)
            cells.append(_na() if m is None else _num(
                f'{m.ppl:.2f}<br><span class="small">{m.windows} &times; {m.seqlen}</span>',
                f"{m.source}: ppl {m.ppl!r}, nll {m.nll:.5f}, {m.tokens} predicted tokens"))
        by_task = {r.task: r for r in record.zero_shot}
        for task in tasks:
            r = by_task.get(task)
            cells.append(_na() if r is None else _num(
                f"{100 * r.acc:.1f}", f"acc {r.acc:.4f} ± {r.acc_stderr:.4f}"
                + ("" if r.acc_norm is None else f", acc_norm {r.acc_norm:.4f}")
                + f", {r.items} items, {r.num_fewshot}-shot"))
        if tasks:
            mean = _mean_accuracy(entry)
            partial = len(by_task) < len(tasks)
            cells.append(_na("no zero-shot results") if mean is None else _num(
                f"{100 * mean:.1f}" + ("*" if partial else ""),
                f"mean over {len(by_task)} of {len(tasks)} tasks"))
        cells.append(_num(_duration(record.report.seconds), f"{record.report.seconds:.1f} s"))
        cells.append(_num(_memory(record.report.peak_rss_mb)))
        rows.append(f'<tr data-label="{_e(entry.label)}">' + "".join(cells) + "</tr>")
    notes = []
    if not texts:
        notes.append("No perplexity was recorded for any checkpoint.")
    else:
        notes.append("Perplexity cells show windows &times; tokens per window below the value; compare runs on the "
                     "same protocol only.")
    if not tasks:
        notes.append("No zero-shot accuracy was recorded for any checkpoint.")
    elif any(len(e.record.zero_shot) < len(tasks) for e in entries):
        notes.append("* the mean covers only the tasks that checkpoint was scored on.")
    return ('<div class="scroll"><table id="results-table"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
            + "".join(f'<p class="note">{n}</p>' for n in notes))


# ----------------------------------------------------------------------------------------------- 2. per layer


def _block_of(name: str) -> str:
    """The block a linear belongs to: its name up to the first numeric part (``model.layers.3``)."""
    match = re.search(r"^(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def _block_axis(ax, layers: list[LayerRecord]) -> None:
    """Layers on the x axis: a labelled tick at each block's first linear, alternate blocks shaded."""
    import matplotlib.ticker as ticker

    starts, labels = [], []
    for i, layer in enumerate(layers):
        block = _block_of(layer.name)
        if not labels or block != labels[-1]:
            starts.append(i)
            labels.append(block)
    every = max(1, math.ceil(len(starts) / 30))
    ax.set_xticks([s for k, s in enumerate(starts) if k % every == 0])
    ax.set_xticklabels([re.sub(r"^.*?(\d+)$", r"\1", b) for k, b in enumerate(labels) if k % every == 0], fontsize=7)
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    if len(layers) <= 600:  # a short mark per linear: one line collection, far cheaper than minor tick artists
        ax.vlines(range(len(layers)), 0, 0.012, transform=ax.get_xaxis_transform(), color="#444444", linewidth=0.5,
                  clip_on=False, zorder=3)
    ends = starts[1:] + [len(layers)]
    for k, (a, b) in enumerate(zip(starts, ends)):
        if k % 2 == 1:
            ax.axvspan(a - 0.5, b - 0.5, color="#000000", alpha=0.04, lw=0, zorder=0)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.grid(axis="x", which="both", visible=False)


def _layers_figure(entry: _Entry):
    """Kept score share per linear (with, without), the gain in points, and output errors where recorded."""
    import numpy as np

    layers = entry.record.report.layers
    x = np.arange(len(layers))

    def values(field: str):
        return np.array([np.nan if getattr(l, field) is None else getattr(l, field) for l in layers], dtype=float)

    kept, ident = values("kept_score"), values("kept_score_identity")
    err, err_id = values("output_error"), values("output_error_identity")
    has_identity, has_errors = bool(np.isfinite(ident).any()), bool(np.isfinite(err).any() or np.isfinite(err_id).any())
    panels = ["kept"] + (["gain"] if has_identity else []) + (["error"] if has_errors else [])
    heights = {"kept": 2.6, "gain": 1.7, "error": 2.4}
    fig = _figure(sum(heights[p] for p in panels) + 0.5)
    axes = fig.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": [heights[p] for p in panels]},
                        squeeze=False)[:, 0]
    marker = dict(marker="o", markersize=2.5 if len(layers) > 60 else 4, linewidth=0.8)
    for ax, panel in zip(axes, panels):
        _block_axis(ax, layers)
        if panel == "kept":
            if has_identity:
                ax.plot(x, ident, color=IDENTITY, label="without permutation (identity)", **marker)
            ax.plot(x, kept, color=PERMUTED, label="with the permutation", **marker)
            ax.set_ylabel("kept host score share")
            ax.set_title(f"share of each linear's host score ({entry.record.config.score}) kept by the "
                         f"{entry.record.config.pattern} mask")
        elif panel == "gain":
            gain = 100 * (kept - ident)
            ax.bar(x, np.nan_to_num(gain), width=0.8, color=np.where(gain >= 0, "#2ca02c", "#d62728"))
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_ylabel("gain (pp)")
            ax.set_title("kept share gained by the permutation, percentage points", fontsize=9)
        else:
            positive = (np.nan_to_num(np.concatenate([err, err_id]), nan=0.0) > 0).any()
            if np.isfinite(err_id).any():
                ax.plot(x, err_id, color=IDENTITY, label="without permutation (identity)", **marker)
            ax.plot(x, err, color=PERMUTED, label="with the permutation", **marker)
            if positive:
                _log_y(ax)
            ax.set_ylabel("relative output error")
            ax.set_title("output error of each linear relative to its dense output energy (lower is better)",
                         fontsize=9)
    axes[-1].set_xlabel("pruned linears in execution order (ticks: block index)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.suptitle(entry.plot_label, fontsize=11, x=0.01, ha="left")
    fig.legend(handles[::-1], names[::-1], loc="outside upper right", ncols=2)
    return fig, has_identity, has_errors


def _layer_summary(entry: _Entry, has_identity: bool, has_errors: bool) -> str:
    """The per-layer figure in one paragraph: means with and without the permutation, and how often it helps."""
    report = entry.record.report
    layers = report.layers
    blocks = len(dict.fromkeys(_block_of(l.name) for l in layers))
    parts = [f"{len(layers)} pruned linears in {blocks} blocks."]
    mean_kept = sum(l.kept_score for l in layers) / len(layers)
    if has_identity:
        pairs = [(l.kept_score, l.kept_score_identity) for l in layers if l.kept_score_identity is not None]
        mean_id = sum(p[1] for p in pairs) / len(pairs)
        better = sum(a > b for a, b in pairs)
        parts.append(f"Mean kept host score share {mean_kept:.4f} with the permutation, {mean_id:.4f} without "
                     f"({100 * (mean_kept - mean_id):+.2f} pp); the permutation raises it on {better} of "
                     f"{len(pairs)} linears.")
    else:
        parts.append(f"Mean kept host score share {mean_kept:.4f}; no identity baseline was recorded "
                     "(an unstructured pattern has none).")
    if has_errors:
        pairs = [(l.output_error, l.output_error_identity) for l in layers
                 if l.output_error is not None and l.output_error_identity is not None]
        if pairs:
            mean_err, mean_err_id = (sum(p[k] for p in pairs) / len(pairs) for k in (0, 1))
            lower = sum(a < b for a, b in pairs)
            parts.append(f"Mean relative output error {mean_err:.4g} with the permutation, {mean_err_id:.4g} without; "
                         f"lower on {lower} of {len(pairs)} linears.")
        else:
            parts.append("Output errors were recorded for only one side of the comparison.")
    else:
        parts.append("Output error: not recorded for this run (only runs that collect each linear's input Gram "
                     "matrix, such as the output search, record it).")
    if report.skipped:
        parts.append(f"{len(report.skipped)} linears were left dense: " + ", ".join(report.skipped) + ".")
    if report.dense:
        parts.append(f"{len(report.dense)} mixture-of-experts routers stay dense: " + ", ".join(report.dense) + ".")
    if report.kept_dense:
        parts.append(f"{len(report.kept_dense)} parameters of no linear layer stay dense: "
                     + ", ".join(f"{name} ({why})" for name, why in report.kept_dense.items()) + ".")
    if report.kept_start:
        parts.append(f"{len(report.kept_start)} sites kept the warm start's search, which the weight update "
                     "reconstructed better than the learned permutation: " + ", ".join(report.kept_start) + ".")
    if report.uncalibrated:
        parts.append(f"{len(report.uncalibrated)} expert linears saw no calibration token and were scored as if "
                     "their inputs were white (Wanda: by magnitude): " + ", ".join(report.uncalibrated) + ".")
    return "<p>" + " ".join(_e(p) for p in parts) + "</p>"


def _layer_table(layers: list[LayerRecord]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return _na("not recorded") if v is None else _num(format(v, fmt))

    rows = "".join(
        f"<tr><td>{_e(l.name)}</td>{_num(f'{l.shape[0]}&times;{l.shape[1]}')}{f(l.kept_score, '.4f')}"
        f"{f(l.kept_score_identity, '.4f')}{f(l.output_error, '.4g')}{f(l.output_error_identity, '.4g')}"
        f"{f(l.search_seconds, '.2f')}</tr>"
        for l in layers)
    return ("<details><summary>per-layer numbers</summary><div class=\"scroll\"><table><thead><tr><th>linear</th>"
            "<th>shape</th><th>kept share</th><th>kept share, identity</th><th>output error</th>"
            "<th>output error, identity</th><th>search s</th></tr></thead><tbody>" + rows
            + "</tbody></table></div></details>")


def _per_checkpoint(entries: list[_Entry], render) -> str:
    """A heading per checkpoint followed by what ``render(entry)`` gives (a list of HTML parts)."""
    return "".join(_heading(entry) + "".join(render(entry)) for entry in entries)


def _layers_section(entries: list[_Entry], page: _Page) -> str:
    """Per checkpoint: a summary sentence, the per-layer figure and, folded away, the numbers behind it."""

    def render(entry: _Entry) -> list[str]:
        layers = entry.record.report.layers
        if not layers:
            return ['<p class="note">No pruned linears were recorded for this run.</p>']
        fig, has_identity, has_errors = _layers_figure(entry)
        return [_layer_summary(entry, has_identity, has_errors),
                page.image(fig, f"layers-{entry.slug}.png", f"{entry.label}: per-layer kept score share"
                           + (" and output error" if has_errors else "")),
                _layer_table(layers)]

    return _per_checkpoint(entries, render)


# ----------------------------------------------------------------------------------------------- 3. training


def _integer_locator():
    import matplotlib.ticker as ticker

    return ticker.MaxNLocator(integer=True)


def _log_y(ax) -> None:
    """A log y axis with plain tick labels (``0.2``, not ``2e-01``); on a short range the 2s, 3s and 5s too."""
    import matplotlib.ticker as ticker

    def major(value, _pos):
        return f"{value:.3g}"

    def minor(value, _pos):
        low, high = ax.get_ylim()
        if value <= 0 or low <= 0 or high / low > 300:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:.3g}" if mantissa in (2.0, 3.0, 5.0) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(major))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def _eps_axis(ax, steps, eps):
    """The Sinkhorn temperature on a secondary, logarithmic y axis (it anneals geometrically)."""
    twin = ax.twinx()
    twin.plot(steps, eps, color="#7f7f7f", linestyle="--", linewidth=1, label="Sinkhorn temperature eps")
    _log_y(twin)
    twin.set_ylabel("eps (dashed)")
    twin.grid(False)
    return twin


def _curve_figure(entry: _Entry, record: TrainingRecord):
    """One learned scope: loss and eps per step; the judged objective at the judged steps, best marked."""
    fig = _figure(3.4)
    ax_loss, ax_judged = fig.subplots(1, 2)
    steps = list(range(len(record.loss)))
    ax_loss.plot(steps, record.loss, color=entry.color, linewidth=1.2, marker="o" if len(steps) <= 60 else None,
                 markersize=3, label="training loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(f"{entry.plot_label} ({_mpl(record.scope)}): training loss per step")
    if record.eps:
        twin = _eps_axis(ax_loss, list(range(len(record.eps))), record.eps)
        lines = ax_loss.get_lines() + twin.get_lines()
        ax_loss.legend(lines, [l.get_label() for l in lines], loc="upper right")
    last = max([len(record.loss), 1] + [step for step, _ in record.judged])
    for ax in (ax_loss, ax_judged):
        ax.set_xlim(-0.5, last + 0.5)
        ax.xaxis.set_major_locator(_integer_locator())
    if record.judged:
        js, jv = zip(*record.judged)
        ax_judged.plot(js, jv, color=entry.color, marker="o", markersize=4, linewidth=1, label="judged (held-out)")
        ax_judged.axhline(record.init_judged, color=IDENTITY, linestyle=":", linewidth=1,
                          label=f"warm start {record.init_judged:.4g}")
        ax_judged.plot([record.best_step], [record.best_judged], marker="*", markersize=14, color="#d62728",
                       linestyle="none", label=f"kept best {record.best_judged:.4g} (step {record.best_step})")
        ax_judged.legend(loc="upper right")
    else:
        ax_judged.text(0.5, 0.5, "no judgment recorded", ha="center", va="center", transform=ax_judged.transAxes)
    ax_judged.set_xlabel("step")
    ax_judged.set_ylabel("judged objective")
    ax_judged.set_title("judged objective of the hard permutations (lower is better)")
    return fig


def _blocks_figure(entry: _Entry, records: list[TrainingRecord]):
    """Blockwise runs: warm start vs kept best per block, its change, and the loss curves of a few blocks."""
    import numpy as np

    fig = _figure(6.2)
    axes = fig.subplot_mosaic([["bars", "bars"], ["curves", "change"]], height_ratios=[1, 1])
    x = np.arange(len(records))
    init = np.array([r.init_judged for r in records], dtype=float)
    best = np.array([r.best_judged for r in records], dtype=float)
    names = [_mpl(re.sub(r"^.*?(\d+)$", r"\1", r.scope)) for r in records]
    ax = axes["bars"]
    ax.bar(x - 0.2, init, width=0.4, color=IDENTITY, label="warm start (judged)")
    ax.bar(x + 0.2, best, width=0.4, color=entry.color, label="kept best (judged)")
    low, high = min(init.min(), best.min()), max(init.max(), best.max())
    if low > 0 and high / low > 20:
        _log_y(ax)
    every = max(1, math.ceil(len(records) / 40))
    ax.set_xticks(x[::every])
    ax.set_xticklabels(names[::every], fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("judged objective")
    ax.set_title(f"{entry.plot_label}: judged objective per block, warm start vs kept best (lower is better)")
    ax.legend(loc="upper left")
    ax = axes["change"]
    change = 100 * (best - init) / np.where(np.abs(init) > 0, np.abs(init), 1.0)
    ax.bar(x, change, width=0.8, color=np.where(change <= 0, "#2ca02c", "#d62728"))
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x[::every])
    ax.set_xticklabels(names[::every], fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("change vs warm start (%)")
    ax.set_title("kept best relative to the warm start, per block")
    ax = axes["curves"]
    picks = sorted(set(np.linspace(0, len(records) - 1, min(4, len(records))).round().astype(int).tolist()))
    for k, i in enumerate(picks):
        loss = np.asarray(records[i].loss, dtype=float)
        if loss.size:
            scale = loss[0] if loss[0] != 0 else 1.0
            ax.plot(np.arange(loss.size), loss / scale, linewidth=1.2, color=COLORS[(k + 1) % len(COLORS)],
                    label=f"block {names[i]}")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel("training loss / loss at step 0")
    ax.set_title("training loss of a few blocks (relative to its first step)")
    eps = next((r.eps for r in records if r.eps), None)
    if eps:
        twin = _eps_axis(ax, list(range(len(eps))), eps)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [l.get_label() for l in lines], loc="upper right", fontsize=7)
    return fig


def _training_table(records: list[TrainingRecord]) -> str:
    rows = []
    for r in records:
        change = 100 * (r.best_judged - r.init_judged) / abs(r.init_judged) if r.init_judged else 0.0
        rows.append(f"<tr><td>{_e(r.scope)}</td>{_num(str(len(r.loss)))}{_num(str(len(r.judged)))}"
                    f"{_num(f'{r.init_judged:.5g}')}{_num(f'{r.best_judged:.5g}')}{_num(f'{change:+.2f}')}"
                    f"{_num(str(r.best_step))}{_num(f'{r.seconds:.1f}')}</tr>")
    return ('<div class="scroll"><table class="training"><thead><tr><th>scope</th><th>steps</th><th>judgments</th>'
            "<th>warm start (judged)</th><th>kept best (judged)</th><th>change %</th><th>best step</th><th>seconds</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _training_section(entries: list[_Entry], page: _Page) -> str:
    """Per checkpoint: its learning curves, or a sentence saying why there are none."""

    def render(entry: _Entry) -> list[str]:
        records = entry.record.report.training
        if not records:
            what = ("a learned permutation, but no training was recorded" if entry.record.config.learned is not None
                    else f"{describe_permutation(entry.record.config)}")
            return [f'<p class="note no-training">No training for this run ({_e(what)}): only learned '
                    "permutations train.</p>"]
        total = sum(r.seconds for r in records)
        kept_better = sum(r.best_judged < r.init_judged for r in records)
        parts = [f'<p class="training-summary">{len(records)} learned scope{"s" if len(records) > 1 else ""}, '
                 f"{_duration(total)} of training; the kept permutations beat the warm start on the held-out "
                 f"judgment in {kept_better} of {len(records)}.</p>"]
        if len(records) == 1:
            fig = _curve_figure(entry, records[0])
            parts += [page.image(fig, f"training-{entry.slug}.png", f"{entry.label}: learning curves"),
                      _training_table(records)]
        else:
            fig = _blocks_figure(entry, records)
            parts += [page.image(fig, f"training-{entry.slug}.png", f"{entry.label}: learning per block"),
                      "<details><summary>per-block numbers</summary>" + _training_table(records) + "</details>"]
        return parts

    return _per_checkpoint(entries, render)


# ----------------------------------------------------------------------------------------------- 4. comparison


def _grouped_bars(ax, groups: list[str], entries: list[_Entry], value) -> None:
    """A bar per checkpoint in each group, ``value(entry, group)`` on top; a missing value leaves a gap."""
    import numpy as np

    width = 0.8 / len(entries)
    x = np.arange(len(groups))
    for k, entry in enumerate(entries):
        values = np.array([np.nan if value(entry, g) is None else value(entry, g) for g in groups], dtype=float)
        bars = ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(values), width=width * 0.95, color=entry.color,
                      label=entry.plot_label)
        labels = ["" if np.isnan(v) else (f"{v:.1f}" if v < 1000 else f"{v:.3g}") for v in values]
        ax.bar_label(bars, labels=labels, fontsize=6 if len(entries) * len(groups) > 12 else 7, padding=1)
    ax.set_xticks(x)
    ax.set_xticklabels([_mpl(g) for g in groups], fontsize=8)
    ax.grid(axis="x", visible=False)


def _compare_section(entries: list[_Entry], page: _Page) -> str:
    """Grouped bars: perplexity per text and accuracy per task (and their mean), one colour per checkpoint."""
    texts, tasks = _texts(entries), _tasks(entries)
    if not texts and not tasks:
        return '<p class="note">No perplexity and no zero-shot accuracy were recorded for any checkpoint.</p>'
    panels = (["ppl"] if texts else []) + (["acc"] if tasks else [])
    fig = _figure(4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel == "ppl":
            _grouped_bars(ax, texts, entries, lambda e, t: e.record.metrics[t].ppl if t in e.record.metrics else None)
            values = [m.ppl for e in entries for m in e.record.metrics.values()]
            if min(values) > 0 and max(values) / min(values) > 10:
                _log_y(ax)
            ax.set_ylabel("perplexity (lower is better)")
            ax.set_title("perplexity per evaluation text")
        else:
            groups = tasks + ["mean"]

            def acc(e: _Entry, task: str):
                if task == "mean":
                    mean = _mean_accuracy(e)
                    return None if mean is None else 100 * mean
                r = next((r for r in e.record.zero_shot if r.task == task), None)
                return None if r is None else 100 * r.acc

            _grouped_bars(ax, groups, entries, acc)
            ax.set_ylim(0, 100)
            ax.set_ylabel("accuracy % (higher is better)")
            ax.set_title("zero-shot accuracy per task")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=min(len(entries), 6))
    notes = []
    if not texts:
        notes.append("No perplexity was recorded for any checkpoint.")
    else:
        protocols = {(m.source, m.windows, m.seqlen) for e in entries for m in e.record.metrics.values()}
        texts_protocols = {}
        for source, windows, seqlen in protocols:
            texts_protocols.setdefault(source, set()).add((windows, seqlen))
        differ = [s for s, p in texts_protocols.items() if len(p) > 1]
        if differ:
            notes.append("The perplexity protocol (windows x tokens per window) differs between checkpoints on "
                         + ", ".join(sorted(differ)) + ": those bars are not directly comparable.")
    if not tasks:
        notes.append("No zero-shot accuracy was recorded for any checkpoint.")
    missing = [e.label for e in entries if not e.record.metrics and not e.record.zero_shot]
    if missing:
        notes.append("Nothing measured for " + ", ".join(missing) + ".")
    return (page.image(fig, "compare.png", "perplexity and zero-shot accuracy across checkpoints")
            + "".join(f'<p class="note">{_e(n)}</p>' for n in notes))


# ----------------------------------------------------------------------------------------------- 5. commands


def _commands_section(entries: list[_Entry]) -> str:
    """Per checkpoint: where it is, how it was exported, the exact command line and the config as JSON."""
    parts = []
    for entry in entries:
        record = entry.record
        facts = [f"folder {entry.folder}", f"model {record.model or '(not recorded)'}",
                 f"permsparse {record.permsparse_version}", f"{record.export} export"]
        if record.fold is not None:
            facts.append(f"{100 * record.fold.folded_share:.0f}% of permutations folded, "
                         f"{100 * record.fold.storage_nm_share:.0f}% of pruned linears N:M in storage order")
        facts.append("loads with plain from_pretrained" if record.plain_hf
                     else "needs permsparse.load (compressed weights)" if record.export == "compressed"
                     else "needs permsparse.load (runtime gathers)")
        if record.storage is not None:
            facts.append(f"{record.storage.dtype} weights, {record.storage.weights_bytes / 1e6:.1f} MB; pruned linears "
                         f"{record.storage.pruned_ratio:.3f}x their dense bf16 bytes")
        command = (f'<pre class="command">{_e(record.command)}</pre>' if record.command
                   else '<p class="note">No command line was recorded (the checkpoint was written through the '
                        "Python API).</p>")
        config = json.dumps(to_dict(record.config), indent=2)
        parts.append(_heading(entry) + f'<p class="small">{_e("; ".join(facts))}</p>' + command
                     + f'<details><summary>config</summary><pre class="config">{_e(config)}</pre></details>')
    return "".join(parts)
