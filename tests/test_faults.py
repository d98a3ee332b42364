"""Bad inputs and faults: each is one line of error and a non-zero exit, or a correct resume; nothing is lost.

Kills are injected at every write of the progress files (:data:`permsparse.resume.fault`), never timed.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from permsparse import PruneConfig, Search, prune
from permsparse import resume
from permsparse.adapters import linear_weight
from permsparse.resume import MANIFEST, Progress

from .conftest import CALIB, DATA, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = str(DATA / "tinyshakespeare" / "input.txt")


class Killed(BaseException):
    """A process death at a write (nothing in permsparse catches a BaseException that is not its own)."""


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what a failed command must leave as it was."""
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- kills at every write of the progress: the committed step survives, the resumed run is the same model ----

FAULT_CONFIGS = {"wanda-ria": PruneConfig(permutation=Search("ria")),
                 "sparsegpt": PruneConfig(score="sparsegpt", permutation=Search("ria"), binding="shared")}


@pytest.fixture(scope="module")
def uninterrupted():
    """Per config: the model pruned without a kill, and the write points of its progress, in order."""
    out = {}
    for name, config in FAULT_CONFIGS.items():
        points: list[tuple[str, str]] = []
        resume.fault = lambda point, path: points.append((point, path.name))
        try:
            model = tiny_llama(layers=3)
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                prune(model, None, config, windows=CALIB, state_dir=folder, progress=False)
        finally:
            resume.fault = None
        out[name] = weights(model), points
    return out


def kill_at(index: int):
    """A fault hook that kills the ``index``-th write point; a kill while a file is being written leaves it
    torn (its first half), as a process dying mid-write would."""
    seen = {"n": 0}

    def hook(point: str, path: Path) -> None:
        seen["n"] += 1
        if seen["n"] - 1 == index:
            if point in ("file written", "manifest written") and path.is_file():
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
            raise Killed(f"{point} {path.name}")

    return hook


@pytest.mark.parametrize("name", sorted(FAULT_CONFIGS))
def test_a_kill_at_every_write_resumes_to_the_uninterrupted_model(name, uninterrupted, tmp_path, monkeypatch):
    from permsparse import pipeline

    blocks_run = []
    original = pipeline.collect_input_stats
    monkeypatch.setattr(pipeline, "collect_input_stats", lambda *a, **k: blocks_run.append(1) or original(*a, **k))
    expected, points = uninterrupted[name]
    config = FAULT_CONFIGS[name]
    commits = [i for i, (point, _) in enumerate(points) if point == "manifest renamed"]
    assert len(commits) == 3 and len(points) >= 3 * 6, points  # one commit per block, several writes each
    for index in range(len(points)):
        folder = tmp_path / f"kill-{index}"
        resume.fault = kill_at(index)
        try:
            with pytest.raises(Killed):
                prune(tiny_llama(layers=3), None, config, windows=CALIB, state_dir=folder, progress=False)
        finally:
            resume.fault = None
        committed = sum(1 for c in commits if c <= index)  # commits done before the kill (the rename is the commit)
        saved = Progress(folder, None).load("blocks")
        assert (0 if saved is None else saved["done"]) == committed, (index, points[index])
        blocks_run.clear()
        resumed = tiny_llama(layers=3)
        prune(resumed, None, config, windows=CALIB, state_dir=folder, progress=False)
        got = weights(resumed)
        assert all(torch.equal(got[k], v) for k, v in expected.items()), (index, points[index])
        assert len(blocks_run) == 3 - committed, (index, points[index], "committed blocks were redone")
        assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, *Progress(folder, None).files.values()])


def test_a_sigkill_between_two_progress_files_resumes(tiny_llama_dir, tmp_path):
    """The reported case: a real process killed (os._exit) after one process's inputs were written and
    before the blocks file: the manifest still names the previous step, and the same command resumes."""
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny_llama_dir), "--calib", SHAKESPEARE, "--nsamples", "4", "--seqlen", "32",
            "--eval-windows", "0", "--out", str(out), "--quiet"]
    script = ("import os, sys\n"
              "from permsparse import resume\n"
              "from permsparse.cli import main\n"
              "def die(point, path):\n"
              "    if point == 'file synced' and path.name.startswith('stream-0.2'):\n"
              "        os._exit(137)\n"
              "resume.fault = die\n"
              f"sys.exit(main({args!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr
    state = tmp_path / "pruned.partial" / ".resume"
    manifest = json.loads((state / MANIFEST).read_text())
    assert manifest["note"] == "1 of 2 blocks pruned" and manifest["files"]["stream-0"] == "stream-0.1.safetensors"
    again = subprocess.run([sys.executable, "-m", "permsparse", *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and "1 of 2 blocks pruned" in again.stdout
    whole = subprocess.run([sys.executable, "-m", "permsparse", *args[:-3], str(tmp_path / "whole"), "--quiet"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
