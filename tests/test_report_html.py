"""The HTML report: real tiny checkpoints in, one self-contained page (and its PNGs) out.

The checkpoints are pruned and exported with the package's own API: no permutation, the output
search (which records output errors), a learned e2e permutation and a learned blockwise one. The
page is parsed and checked for what a reader relies on: one row per checkpoint with its numbers,
decodable embedded figures identical to the PNG files, no reference to anything outside the page,
escaped commands, and a sentence wherever a run has nothing to show. A last test opens the page in
a real headless Chromium (through Playwright) when both are installed, and skips otherwise.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser

import pytest
import torch

pytest.importorskip("matplotlib", reason="the HTML report needs matplotlib (the [report] extra)")

from permsparse import Learned, Perplexity, PruneConfig, Search, export_checkpoint, perplexity, prune  # noqa: E402
from permsparse.checkpoint.record import read_record  # noqa: E402
from permsparse.data.text import tokenize  # noqa: E402
from permsparse.checkpoint.compare import INDEX, write_report  # noqa: E402
from permsparse.serial import to_dict  # noqa: E402
from permsparse.evaluate.zeroshot import TaskResult  # noqa: E402
from tests.conftest import CALIB, DATA, HOLDOUT, tiny_llama  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
NASTY = "--out '<script>alert(\"x\")</script> & <b>bold</b>'"
RUNS = {  # name: (permutation, made-up WikiText-2 perplexity or None, zero-shot tasks)
    "none": (Search("none"), 812.25, ("arc_easy", "piqa")),
    "output": (Search("output"), 640.5, ("arc_easy",)),
    "learned": (Learned(init="ria", steps=6, judge_every=2, tile=16, batch=2, lr=1.0), None, ()),
    "blockwise": (Learned(init="ria", scope="blockwise", steps=4, judge_every=2, tile=16, batch=2), None, ()),
}
ACC = {"arc_easy": 0.3125, "piqa": 0.5625}


def made_up(ppl: float) -> Perplexity:
    return Perplexity(ppl, float(torch.tensor(ppl).log()), 32, 2, 62, "wikitext2", 0.1)


def task(name: str) -> TaskResult:
    return TaskResult(name, ACC[name], 0.02, None, None, 64, 0, 1.5, source="made up")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """Four real tiny checkpoints: their folders and, per name, the perplexities recorded in each."""
    root = tmp_path_factory.mktemp("checkpoints")
    ids = tokenize(tiny_tokenizer, (DATA / "tinyshakespeare" / "input.txt").read_text()[:4000])
    folders, metrics = [], {}
    for name, (perm, wiki, tasks) in RUNS.items():
        config = PruneConfig(permutation=perm)
        model = tiny_llama()
        report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
        metrics[name] = {"shakespeare": perplexity(model, tiny_tokenizer, seqlen=32, windows=2, ids=ids,
                                                   source="shakespeare", progress=False)}
        if wiki is not None:
            metrics[name]["wikitext2"] = made_up(wiki)
        folders.append(export_checkpoint(model, None, root / name, config, report, model_name="tiny-llama",
                                         metrics=metrics[name], zero_shot=[task(t) for t in tasks],
                                         command=f"permsparse prune tiny --perm {name} {NASTY}"))
    return folders, metrics


@pytest.fixture(scope="module")
def report(checkpoints, tmp_path_factory):
    """The report of the four checkpoints: its folder and the parsed page."""
    folders, _ = checkpoints
    out = tmp_path_factory.mktemp("report")
    path = write_report(folders, out)
    assert path == out / INDEX
    return out, Page.parse(path.read_text(encoding="utf-8"))


class Page(HTMLParser):
    """The parts of the page the tests look at: tags with attributes, table rows, and text per element id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: list[tuple[dict[str, str], list[str]]] = []  # results table: row attributes, cell texts
        self.headers: list[str] = []
        self.pres: list[tuple[str, str]] = []  # (class, text) of every <pre>
        self.paragraphs: list[tuple[str, str, str]] = []  # (section id, class, text) of every <p>
        self.images: list[tuple[str, dict[str, str]]] = []  # (section id, attributes)
        self.section = ""
        self._in_results = False
        self._cell: list[str] | None = None
        self._text: list[str] | None = None
        self._collect = ""
        self._attrs: dict[str, str] = {}
        self.raw = ""

    @classmethod
    def parse(cls, text: str) -> "Page":
        page = cls()
        page.raw = text
        page.feed(text)
        page.close()
        return page

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if tag == "section":
            self.section = attrs.get("id", "")
        if tag == "table":
            self._in_results = attrs.get("id") == "results-table"
        if self._in_results and tag == "tr" and "data-label" in attrs:
            self.rows.append((attrs, []))
        if self._in_results and tag in ("td", "th"):
            self._cell = []
        if tag == "br" and self._cell is not None:
            self._cell.append(" ")
        if tag == "img":
            self.images.append((self.section, attrs))
        if tag in ("pre", "p"):
            self._text, self._collect, self._attrs = [], tag, attrs

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_results = False
        if tag in ("td", "th") and self._cell is not None:
            text = " ".join("".join(self._cell).split())
            if tag == "th":
                self.headers.append(text)
            elif self.rows:
                self.rows[-1][1].append(text)
            self._cell = None
        if tag == self._collect and self._text is not None:
            text = "".join(self._text)
            if tag == "pre":
                self.pres.append((self._attrs.get("class", ""), text))
            else:
                self.paragraphs.append((self.section, self._attrs.get("class", ""), " ".join(text.split())))
            self._text, self._collect = None, ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._text is not None:
            self._text.append(data)

    def sentences(self, section: str) -> list[str]:
        return [text for sec, _, text in self.paragraphs if sec == section]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and, where Pillow is installed, from decoding it whole)."""
    assert data.startswith(PNG) and data[12:16] == b"IHDR"
    size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    try:
        from PIL import Image
    except ImportError:
        return size
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes every pixel: a truncated or corrupt file raises here
        assert image.size == size and image.format == "PNG"
    return size


# ----------------------------------------------------------------------------------------------- the page


def test_results_table_has_one_row_per_checkpoint_with_its_numbers(checkpoints, report):
    folders, metrics = checkpoints
    _, page = report
    assert [attrs["data-label"] for attrs, _ in page.rows] == [f.name for f in folders]
    headers = page.headers[:page.headers.index("peak RSS") + 1]
    for column in ("ppl shakespeare", "ppl wikitext2", "arc_easy acc %", "piqa acc %", "mean acc %", "pruning"):
        assert column in headers
    for (_, cells), folder in zip(page.rows, folders):
        assert len(cells) == len(headers)
        row = dict(zip(headers, cells))
        name = folder.name
        shakespeare = metrics[name]["shakespeare"]
        assert row["ppl shakespeare"] == f"{shakespeare.ppl:.2f} {shakespeare.windows} × {shakespeare.seqlen}"
        if name in ("none", "output"):
            assert row["ppl wikitext2"] == f"{RUNS[name][1]:.2f} 2 × 32"
        else:
            assert row["ppl wikitext2"] == "–"  # not measured for this run
        tasks = RUNS[name][2]
        for t in ACC:
            assert row[f"{t} acc %"] == (f"{100 * ACC[t]:.1f}" if t in tasks else "–")
        if tasks:
            mean = 100 * sum(ACC[t] for t in tasks) / len(tasks)
            assert row["mean acc %"] == f"{mean:.1f}" + ("*" if len(tasks) < len(ACC) else "")
        assert row["method"].startswith("2:4 · wanda")
        assert row["calibration"].startswith("c4, 32 × 512")
        assert re.fullmatch(r"\d+(\.\d)? s", row["pruning"]) and re.fullmatch(r"\d+ MB", row["peak RSS"])
    learned_method = dict(zip(headers, page.rows[2][1]))["method"]
    assert "learned e2e from ria, 6 steps" in learned_method
    assert "no permutation" in dict(zip(headers, page.rows[0][1]))["method"]


def test_every_image_is_an_embedded_png_identical_to_its_file(report):
    out, page = report
    assert page.images, "the page has no figure"
    names = []
    for _, attrs in page.images:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert len(data) > 1000
        width, height = png_size(data)
        assert width > 0 and height > 0
        assert (width, height) == (int(attrs["width"]), int(attrs["height"]))
        assert (out / attrs["data-file"]).read_bytes() == data
        assert attrs["alt"]
        names.append(attrs["data-file"])
    # per layer: one figure per checkpoint; learning curves: the two learned runs; comparison: one
    assert sorted(names) == sorted([f"layers-{i}-{n}.png" for i, n in enumerate(RUNS, 1)]
                                   + ["training-3-learned.png", "training-4-blockwise.png", "compare.png"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)


def test_the_page_references_nothing_outside_itself(report):
    _, page = report
    assert not re.search(r"(?i)https?:", page.raw)  # ':' is not a base64 character, so no false alarm there
    assert not re.search(r"(?i)url\(|@import|<script|<link|<iframe|<object|<embed", page.raw)
    for tag, attrs in page.tags:
        for key in ("href", "src", "srcset", "data", "action", "poster"):
            if key in attrs:
                value = attrs[key]
                assert value.startswith("#") or value.startswith("data:image/png;base64,"), (tag, key, value[:80])
    anchors = {attrs["id"] for _, attrs in page.tags if "id" in attrs}
    links = {attrs["href"][1:] for tag, attrs in page.tags if tag == "a" and "href" in attrs}
    assert links and links <= anchors  # every in-page link lands somewhere


def test_learning_curves_only_for_learned_runs(report):
    _, page = report
    training = [attrs["data-file"] for section, attrs in page.images if section == "training"]
    assert training == ["training-3-learned.png", "training-4-blockwise.png"]
    no_training = [text for _, cls, text in page.paragraphs if "no-training" in cls]
    assert len(no_training) == 2 and all("No training for this run" in t for t in no_training)
    assert "no permutation" in no_training[0] and "search output" in no_training[1]
    summaries = [text for _, cls, text in page.paragraphs if cls == "training-summary"]
    assert summaries[0].startswith("1 learned scope") and summaries[1].startswith("2 learned scopes")


def test_output_errors_shown_where_recorded_else_said(checkpoints, report):
    folders, _ = checkpoints
    _, page = report
    sentences = page.sentences("layers")
    assert len(sentences) == len(folders)
    for folder, sentence in zip(folders, sentences):
        if folder.name == "output":
            assert "Mean relative output error" in sentence and "not recorded" not in sentence
        else:
            assert "Output error: not recorded for this run" in sentence
        assert "14 pruned linears in 2 blocks" in sentence


def test_commands_and_configs_are_escaped_and_exact(checkpoints, report):
    folders, _ = checkpoints
    _, page = report
    assert "<script>alert" not in page.raw and "<b>bold</b>" not in page.raw
    commands = [text for cls, text in page.pres if cls == "command"]
    assert commands == [f"permsparse prune tiny --perm {f.name} {NASTY}" for f in folders]
    configs = [json.loads(text) for cls, text in page.pres if cls == "config"]
    assert configs == [to_dict(read_record(f).config) for f in folders]


# ----------------------------------------------------------------------------------------------- files and errors


def test_same_records_same_bytes_and_only_its_own_files_replaced(checkpoints, tmp_path):
    folders, _ = checkpoints
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "index.html").write_text("stale")
    label = "learned <e2e> $5"  # markup for the page, mathtext for matplotlib: both shown as written
    write_report(folders[2:3], out, labels=[label])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["compare.png", "index.html", "layers-1-learned-e2e-5.png", "notes.txt",
                             "training-1-learned-e2e-5.png"]
    assert first["notes.txt"] == b"mine" and first["index.html"] != b"stale"
    write_report(folders[2:3], out, labels=[label])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    page = Page.parse(first["index.html"].decode())
    assert [attrs["data-label"] for attrs, _ in page.rows] == [label]
    assert "<e2e>" not in page.raw  # labels are escaped too


def test_missing_measurements_give_sentences_not_errors(checkpoints, tmp_path):
    folders, _ = checkpoints
    bare = tmp_path / "bare"
    shutil.copytree(folders[0], bare)
    record = json.loads((bare / "permsparse.json").read_text())
    record["metrics"], record["zero_shot"], record["command"] = {}, [], ""
    (bare / "permsparse.json").write_text(json.dumps(record))
    page = Page.parse(write_report([bare], tmp_path / "out").read_text())
    assert len(page.rows) == 1
    assert "No perplexity was recorded for any checkpoint." in page.sentences("results")
    assert "No zero-shot accuracy was recorded for any checkpoint." in page.sentences("results")
    assert page.sentences("compare") == ["No perplexity and no zero-shot accuracy were recorded for any checkpoint."]
    assert not (tmp_path / "out" / "compare.png").exists()
    assert any("No command line was recorded" in s for s in page.sentences("commands"))


def test_unstructured_sparsity_has_no_identity_baseline(tmp_path):
    config = PruneConfig(pattern="50%")
    model = tiny_llama()
    report = prune(model, None, config, windows=CALIB, progress=False)
    folder = export_checkpoint(model, None, tmp_path / "unstructured", config, report)
    page = Page.parse(write_report([folder], tmp_path / "out").read_text())
    [sentence] = page.sentences("layers")
    assert "no identity baseline was recorded" in sentence and "Output error: not recorded" in sentence
    assert [attrs["data-file"] for _, attrs in page.images] == ["layers-1-unstructured.png"]
    assert dict(zip(page.headers, page.rows[0][1]))["method"].startswith("50% · wanda no permutation")


def test_a_folder_that_is_not_a_checkpoint_is_named_and_nothing_is_written(checkpoints, tmp_path):
    folders, _ = checkpoints
    plain = tmp_path / "just-a-folder"
    plain.mkdir()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="just-a-folder"):
        write_report([folders[0], plain], out)
    with pytest.raises(FileNotFoundError, match="missing"):
        write_report([tmp_path / "missing"], out)
    assert not out.exists()
    with pytest.raises(ValueError, match="one label per folder"):
        write_report(folders[:2], out, labels=["a"])
    with pytest.raises(ValueError, match="unique"):
        write_report(folders[:2], out, labels=["a", "a"])
    with pytest.raises(ValueError, match="no checkpoint"):
        write_report([], out)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_report(folders[:1], tmp_path / "a-file")


def test_colliding_folder_names_get_distinct_labels(checkpoints, tmp_path):
    folders, _ = checkpoints
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(folders[0], a)
    shutil.copytree(folders[0], b)
    page = Page.parse(write_report([a, b], tmp_path / "out").read_text())
    assert [attrs["data-label"] for attrs, _ in page.rows] == ["a/run", "b/run"]


# ----------------------------------------------------------------------------------------------- in a browser


def chromium() -> str | None:
    """A Chromium to drive: ``$PERMSPARSE_CHROMIUM``, else ``chromium`` on the PATH (Debian's package)."""
    return os.environ.get("PERMSPARSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_renders_in_a_real_browser_without_errors(request):
    """Opens ``file://.../index.html`` in headless Chromium: no console message, no page error, no request
    outside the file itself, and every figure decoded (``complete`` and ``naturalWidth > 0``)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser check needs the playwright package")
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set PERMSPARSE_CHROMIUM)")
    out, page_html = request.getfixturevalue("report")  # built only once the browser is known to be there
    url = (out / INDEX).resolve().as_uri()
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=executable, headless=True, timeout=60_000,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync"])
        except sync_api.Error as err:
            pytest.skip(f"Chromium at {executable} does not start under Playwright: {err}")
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            messages, errors, requests = [], [], []
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load", timeout=60_000)
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({complete: e.complete, width: e.naturalWidth, height: e.naturalHeight,"
                       " file: e.dataset.file}))")
            rows = page.locator("#results-table tbody tr").count()
            title = page.title()
        finally:
            browser.close()
    assert messages == [] and errors == []
    assert all(r == url or r.startswith("data:") for r in requests), requests
    assert len(images) == len(page_html.images) > 0
    for image in images:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert rows == len(RUNS) and title == "permsparse report"
