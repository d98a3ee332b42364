"""Text sources for calibration and evaluation, and how they become token windows.

Named sources resolve from ``$PERMSPARSE_DATA``, else a ``shared/data`` folder beside the checkout,
else the Hugging Face hub through ``datasets``. Any existing text file path works too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Source:
    """A named text: its file under the data folder, and how the hub serves it (if it does)."""

    local: str | None
    hub: tuple[str, str | None, str] | None  # (dataset, config, split)
    strip_unk: bool = False


SOURCES: dict[str, Source] = {
    "wikitext2": Source("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test")),
    "wikitext2-valid": Source("wikitext-2/valid.txt", ("wikitext", "wikitext-2-raw-v1", "validation"), True),
    "shakespeare": Source("tinyshakespeare/input.txt", None),
    "c4": Source(None, ("allenai/c4", "en", "validation")),
}


def data_dirs() -> list[Path]:
    """Where named sources are looked for, in order."""
    dirs = [Path(os.environ["PERMSPARSE_DATA"])] if os.environ.get("PERMSPARSE_DATA") else []
    dirs += [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return dirs


def _from_hub(name: str, source: Source) -> str:
    dataset, config, split = source.hub
    try:
        import datasets
    except ImportError as err:
        raise FileNotFoundError("the `datasets` package is not installed") from err
    if dataset == "allenai/c4":  # one shard, as in SparseGPT/Wanda: the full set is terabytes
        rows = datasets.load_dataset(
            dataset, data_files={split: f"en/c4-{split}.00000-of-00008.json.gz"}, split=split
        )["text"][:3000]
    else:
        rows = datasets.load_dataset(dataset, config, split=split)["text"]
    return "\n\n".join(rows)


def load_text(source: str) -> str:
    """The text of a named source or a file path; one clear error when nothing provides it."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if source not in SOURCES:
        raise FileNotFoundError(
            f"unknown data source {source!r}: not a file, nor one of {', '.join(SOURCES)}"
        )
    spec = SOURCES[source]
    if spec.local:
        for folder in data_dirs():
            file = folder / spec.local
            if file.is_file():
                text = file.read_text(encoding="utf-8")
                if spec.local.endswith("wiki.test.raw"):
                    # One non-empty row per line; joined with blank lines as the hub rows usually are.
                    text = "\n\n".join(line for line in text.splitlines() if line.strip())
                return text.replace(" <unk>", "") if spec.strip_unk else text
    tried = [str(d / spec.local) for d in data_dirs()] if spec.local else []
    if spec.hub:
        try:
            return _from_hub(source, spec)
        except Exception as err:  # offline, missing package, unknown split: all mean "not reachable"
            tried.append(f"hub {spec.hub[0]} ({type(err).__name__})")
    raise FileNotFoundError(f"data source {source!r} is not reachable; tried: {'; '.join(tried)}")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (tokenised once, as the protocol asks)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None, bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows, tail dropped; the first ``windows`` if given.

    With ``bos_id`` every window starts with BOS followed by ``seqlen - 1`` text tokens (Gemma).
    """
    step = seqlen - (bos_id is not None)
    count = ids.numel() // step
    if windows is not None:
        count = min(count, windows)
    if count == 0:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seqlen}")
    out = ids[: count * step].reshape(count, step)
    if bos_id is not None:
        out = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), out], dim=1)
    return out


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (seeded), as SparseGPT and Wanda draw them."""
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text of {ids.numel()} tokens is shorter than seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
