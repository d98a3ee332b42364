"""Text sources for calibration and evaluation, and how they become token windows.

Named sources resolve from ``$PERMSPARSE_DATA``, else a ``shared/data`` folder beside the checkout,
else the Hugging Face hub through ``datasets``. Any existing text file path works too. A source is a
list of documents: tokenised one by one and joined with the tokenizer's EOS token into one stream, so
windows cut from it may span documents as in Wanda's and SparseGPT's C4 recipe, but never glue two
documents without a boundary.

``self`` is no file: its windows are text the dense model samples itself, from BOS at temperature 1
unless asked otherwise (self-calibration, Williams et al., NAACL 2025), the distribution a pruned model
distilled towards the dense one is asked to match, and no evaluation text's domain.

A text that is also evaluated (``Source.evaluated``) is split: its evaluation windows are its first ones,
so calibration draws only from what follows its first ``EVAL_HEAD`` share of tokens, and an evaluation
that reaches further than that head while calibrating on the same text is refused
(:func:`check_disjoint`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SELF, mixture
from ..run import progress

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Source:
    """A named text: its file under the data folder, how to read it, and how the hub serves it."""

    local: str | None
    hub: tuple[str, str | None, str] | None  # (dataset, config, split)
    kind: str = "text"  # text | wikitext-raw | wikitext-tokenised | jsonl | alpaca
    description: str = ""
    evaluated: bool = False  # also an evaluation text: its head is kept from calibration


EVAL_HEAD = 0.1  # share of an evaluated text's tokens, from its start, that calibration never draws from


SOURCES: dict[str, Source] = {
    "wikitext2": Source("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test"), "wikitext-raw",
                        "WikiText-2 raw test (the evaluation text)", evaluated=True),
    "wikitext2-valid": Source("wikitext-2/valid.txt", ("wikitext", "wikitext-2-raw-v1", "validation"),
                              "wikitext-tokenised", "WikiText-2 validation"),
    "shakespeare": Source("tinyshakespeare/input.txt", None, "text", "Tiny Shakespeare", evaluated=True),
    "c4": Source("calib/c4/c4_sample.jsonl", ("allenai/c4", "en", "train"), "jsonl",
                 "C4 en train, shard 00000 (the Wanda/SparseGPT calibration shard): its first 1,000 documents"),
    "c4-demo": Source("calib/c4_demo/c4_demo.jsonl", None, "jsonl", "300 other C4 documents"),
    "c4-validation": Source(None, ("allenai/c4", "en", "validation"), "jsonl",
                            "C4 en validation, shard 00000 (the SparseGPT/Wanda evaluation text; hub only)"),
    "alpaca": Source("calib/alpaca/alpaca_5000.json", None, "alpaca", "5,000 Stanford Alpaca instructions",
                     evaluated=True),
}


def data_dirs() -> list[Path]:
    """Where named sources are looked for, in order."""
    dirs = [Path(os.environ["PERMSPARSE_DATA"])] if os.environ.get("PERMSPARSE_DATA") else []
    dirs += [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return dirs


def _read_local(file: Path, kind: str) -> list[str]:
    text = file.read_text(encoding="utf-8")
    if kind == "wikitext-raw":  # one non-empty row per line, joined with blank lines as the hub rows are
        return ["\n\n".join(line for line in text.splitlines() if line.strip())]
    if kind == "wikitext-tokenised":
        return [text.replace(" <unk>", "")]
    if kind == "jsonl":
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    if kind == "alpaca":
        return ["\n".join(part for part in (item["instruction"], item["input"], item["output"]) if part)
                for item in json.loads(text)]
    return [text]


def _from_hub(source: Source) -> list[str]:
    dataset, config, split = source.hub
    import datasets  # optional: only when no local copy exists

    if dataset == "allenai/c4":  # one shard, as Wanda and SparseGPT use: the full set is terabytes
        shards = {"train": ("00000-of-01024", 1000), "validation": ("00000-of-00008", 1100)}
        shard, count = shards[split]
        rows = datasets.load_dataset(dataset, data_files={split: f"en/c4-{split}.{shard}.json.gz"}, split=split)
        return list(rows["text"][:count])
    return ["\n\n".join(datasets.load_dataset(dataset, config, split=split)["text"])]


def load_documents(source: str) -> list[str]:
    """The documents of a named source or a text file; one clear error when nothing provides it."""
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): give a text file") from None
    if source == SELF:
        raise ValueError(f"{SELF!r} is text sampled from the model, not a document source: calibrate on it "
                         "(--calib self), evaluate on a text")
    if source not in SOURCES:
        raise FileNotFoundError(f"unknown data source {source!r}: not a file, nor one of {', '.join(SOURCES)}, "
                                f"nor {SELF!r} (calibration only)")
    spec = SOURCES[source]
    tried = []
    if spec.local:
        for folder in data_dirs():
            file = folder / spec.local
            if file.is_file():
                return _read_local(file, spec.kind)
            tried.append(str(file))
    if spec.hub:
        try:
            return _from_hub(spec)
        except Exception as err:  # offline, missing package, unknown split: all mean "not reachable"
            tried.append(f"hub {spec.hub[0]} ({type(err).__name__})")
    raise FileNotFoundError(f"data source {source!r} is not reachable; tried: {'; '.join(tried)}")


def sentences(source: str, count: int | None = None, min_words: int = 8) -> list[str]:
    """The first ``count`` lines of a text's documents that hold at least ``min_words`` words, headings
    (``= Title =``) left out: the passages a sentence encoder's embeddings are judged on."""
    lines = (line.strip() for document in load_documents(source) for line in document.splitlines())
    kept = [line for line in lines if len(line.split()) >= min_words and not line.startswith("=")]
    if not kept:
        raise ValueError(f"{source} has no line of {min_words} words or more to embed")
    return kept[:count]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (tokenised once, as the protocol asks)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_stream(tokenizer, source: str) -> torch.Tensor:
    """A source's documents tokenised one by one and joined with EOS (blank lines without one)."""
    documents = load_documents(source)
    if len(documents) == 1 or tokenizer.eos_token_id is None:
        return tokenize(tokenizer, "\n\n".join(documents))
    ids = tokenizer(documents, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def eval_head(source: str, ids: torch.Tensor) -> int:
    """How many leading tokens of ``source``'s stream ``ids`` calibration leaves to evaluation: the first
    ``EVAL_HEAD`` share of a text that is also evaluated, none of any other."""
    spec = SOURCES.get(source)
    return int(ids.numel() * EVAL_HEAD) if spec is not None and spec.evaluated else 0


def calibration_stream(tokenizer, source: str) -> torch.Tensor:
    """The tokens calibration windows of ``source`` are drawn from: its stream after the evaluation head."""
    ids = token_stream(tokenizer, source)
    return ids[eval_head(source, ids):]


def check_disjoint(tokenizer, calibration: str, text: str, seqlen: int, windows: int | None) -> None:
    """Refuse to evaluate ``text`` on more tokens than its head when the calibration (a source or a
    mixture) draws from it: the evaluation would score tokens the model was calibrated on."""
    if text not in (name for name, _ in mixture(calibration)):
        return
    ids = token_stream(tokenizer, text)
    head = eval_head(text, ids)
    needed = ids.numel() if windows is None else windows * seqlen
    if head == 0:
        raise ValueError(f"calibration draws from all of {text!r}: evaluate another text or calibrate on another source")
    if needed > head:
        raise ValueError(f"calibrating on {text!r} leaves only its first {head} tokens to evaluation, and evaluating it "
                         f"reads {needed}: evaluate at most {head // seqlen} windows (--eval-windows / --windows) or "
                         "calibrate on another source")


BOS_PROBE = "The quick brown fox"


def bos_id(tokenizer) -> int | None:
    """The token the tokenizer puts before every text (BOS; [CLS] for BERT-like encoders), or None.

    Found by tokenising a probe with and without special tokens: a model whose tokenizer adds a leading
    token was trained with it at the start of every sequence, so every calibration and evaluation window
    starts with it; a model whose tokenizer adds none never sees one.
    """
    plain = tokenizer(BOS_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(BOS_PROBE, add_special_tokens=True)["input_ids"]
    if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
        return full[0]
    return None


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None, bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows, tail dropped; the first ``windows`` if given.

    With ``bos_id`` every window starts with BOS followed by ``seqlen - 1`` text tokens.
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


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        holdout: int = 0, bos_id: int | None = None, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``nsamples`` random windows of ``seqlen`` tokens (seeded), as SparseGPT and Wanda draw them, and
    ``holdout`` more that overlap none of them (nor each other): text training never sees. ``extra``
    further windows (distillation's), drawn after those and overlapping no held-out one, follow the
    ``nsamples`` in the first tensor; the first ``nsamples`` and the held-out windows are the same
    whatever ``extra`` is. With ``bos_id`` every window is BOS followed by ``seqlen - 1`` text tokens."""
    if bos_id is not None:
        windows, held = calibration_windows(ids, nsamples, seqlen - 1, seed, holdout, extra=extra)
        return tuple(torch.cat([torch.full((len(w), 1), bos_id, dtype=torch.long), w], dim=1) for w in (windows, held))
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text of {ids.numel()} tokens is shorter than seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen).tolist()
    held = _starts_apart(gen, holdout, ids.numel() - seqlen, seqlen, sorted(starts), from_each_other=True)
    if len(held) < holdout:
        raise ValueError(f"calibration text of {ids.numel()} tokens is too short for {holdout} held-out windows of "
                         f"{seqlen} beside {nsamples} training windows; lower --holdout or --nsamples")
    more = _starts_apart(gen, extra, ids.numel() - seqlen, seqlen, held, from_each_other=False)
    if len(more) < extra:
        raise ValueError(f"calibration text of {ids.numel()} tokens leaves too little beside {holdout} held-out "
                         f"windows for {extra} distillation windows of {seqlen}; lower --holdout or --distill-steps")
    cut = lambda ss: torch.stack([ids[s:s + seqlen] for s in ss]) if ss else ids.new_zeros(0, seqlen)  # noqa: E731
    return cut(starts + more), cut(held)


def _starts_apart(gen: torch.Generator, count: int, high: int, seqlen: int, avoid: list[int],
                  from_each_other: bool) -> list[int]:
    """Up to ``count`` seeded window starts in ``[0, high)`` whose windows overlap none of ``avoid``'s (nor,
    ``from_each_other``, each other's); fewer when 100 draws per start find no room."""
    out: list[int] = []
    for _ in range(100 * count):
        if len(out) == count:
            break
        s = int(torch.randint(0, high, (1,), generator=gen))
        if all(abs(s - t) >= seqlen for t in avoid + (out if from_each_other else [])):
            out.append(s)
    return out


def draw_calibration(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                     holdout: int = 0, extra: int = 0, model: torch.nn.Module | None = None,
                     show: bool = True, cache: Path | None = None,
                     sample: bool = True, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out windows of a source or a weighted mixture of sources (see :func:`mixture`):
    each part gives its share of the windows (largest remainders get the rest), drawn from its own stream.
    ``extra`` more training windows (see :func:`calibration_windows`) follow the first ``nsamples``.
    Windows start with the tokenizer's BOS when it adds one (:func:`bos_id`). The part ``self`` samples
    its windows from ``model`` at ``temperature`` (:func:`sampled_windows`), kept in and taken back from the
    folder ``cache`` when one is given (:func:`cached_samples`). With ``sample`` false, that part's windows
    are zeros of the same shape: the places a process fills with another process's samples (a broadcast)
    without sampling text it would discard."""
    parts = mixture(source)
    bos = bos_id(tokenizer)
    counts = [shares(n, [w for _, w in parts]) for n in (nsamples, holdout, extra)]
    windows, held, more = [], [], []
    for k, (name, _) in enumerate(parts):
        if not any(count[k] for count in counts):
            continue
        if name == SELF:
            if model is None:
                raise ValueError(f"calibration {source!r} samples text from the model: pass the model")
            start = bos if bos is not None else tokenizer.eos_token_id
            if start is None:
                raise ValueError(f"calibration {source!r}: the tokenizer has neither BOS nor EOS to start samples from")
            if sample:
                fingerprint = None if cache is None else model_fingerprint(model)
                w, h, x = (cached_samples(cache, fingerprint, model, counts[i][k], seqlen, seed + k + 1000 * i, start,
                                          keep_start=bos is not None, show=show, temperature=temperature)
                           for i in (0, 1, 2))
            else:
                w, h, x = (torch.zeros(counts[i][k], seqlen, dtype=torch.long) for i in (0, 1, 2))
            w = torch.cat([w, x])
        else:
            w, h = calibration_windows(calibration_stream(tokenizer, name), counts[0][k], seqlen, seed + k, counts[1][k],
                                       bos, extra=counts[2][k])
        windows.append(w[:counts[0][k]])
        more.append(w[counts[0][k]:])
        held.append(h)
    return torch.cat(windows + more), torch.cat(held)


@torch.no_grad()
def sampled_windows(model: torch.nn.Module, count: int, seqlen: int, seed: int, start_id: int,
                    keep_start: bool, batch: int = 32, show: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """``count`` windows of ``seqlen`` tokens sampled from ``model`` (seeded; at ``temperature``, no truncation),
    each from ``start_id`` on: kept as the first token when it is the BOS every window starts with,
    dropped when it only opens the sample (an EOS). A sampled EOS does not stop a window: the next
    document follows, as in the EOS-joined streams of the other sources."""
    if count == 0:
        return torch.zeros(0, seqlen, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.get_input_embeddings().parameters()).device  # an offloaded model's blocks visit it
    new = seqlen - 1 if keep_start else seqlen
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.x | 4.x
    out = []
    with progress.bar(total=count * new, desc="sampling calibration text", unit="tok", disable=not show) as tokens_bar:
        for first in range(0, count, batch):
            ids = torch.full((min(batch, count - first), 1), start_id, dtype=torch.long, device=device)
            tokens, cache = ids, None
            for _ in range(new):
                step = model(input_ids=tokens, use_cache=True, **{key: cache})
                cache = getattr(step, key)
                probs = torch.softmax(step.logits[:, -1].float() / temperature, dim=-1).cpu()
                tokens = torch.multinomial(probs, 1, generator=gen).to(device)
                ids = torch.cat([ids, tokens], dim=1)
                tokens_bar.update(len(ids))
            out.append(ids if keep_start else ids[:, 1:])
    return torch.cat(out).cpu()


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of ``model``'s class, parameter and buffer names, shapes, dtypes and every byte of their
    values: two models share it only when they compute the same function."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_samples(cache: Path | None, fingerprint: str | None, model: torch.nn.Module, count: int, seqlen: int,
                   seed: int, start_id: int, keep_start: bool, show: bool = True,
                   temperature: float = 1.0) -> torch.Tensor:
    """:func:`sampled_windows`, kept in ``cache/<key>.pt`` and read back from there by any later run with
    the same key: the model's ``fingerprint`` (:func:`model_fingerprint`), every sampling argument, the
    device type and torch's version (the kernels, hence the draws, may differ between versions and
    devices). Without ``cache``, sampled each time. The file is written whole or not at all (a rename),
    so runs side by side may share it."""
    if cache is None or count == 0:
        return sampled_windows(model, count, seqlen, seed, start_id, keep_start, show=show, temperature=temperature)
    device = next(model.get_input_embeddings().parameters()).device.type
    spec = dict(model=fingerprint, count=count, seqlen=seqlen, seed=seed, start_id=start_id,
                keep_start=keep_start, device=device, torch=torch.__version__)
    if temperature != 1.0:  # files sampled at temperature 1 keep their names
        spec["temperature"] = temperature
    path = Path(cache) / f"{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]}.pt"
    if path.is_file():
        progress.log.info("sampled calibration text: %d windows of %d tokens read from %s", count, seqlen, path)
        return torch.load(path, weights_only=True)
    windows = sampled_windows(model, count, seqlen, seed, start_id, keep_start, show=show, temperature=temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(windows, partial)
    os.replace(partial, path)
    return windows


def shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split by ``weights`` (which sum to 1), the largest remainders rounded up."""
    exact = [total * w for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def text_tokenizer(preprocessor):
    """The tokenizer inside a vision-language model's processor, or ``preprocessor`` itself."""
    return getattr(preprocessor, "tokenizer", None) or preprocessor
