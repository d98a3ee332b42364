"""What the lent GPU machine needs of the checkout: it runs from PYTHONPATH (not installed), without scipy,
platformdirs or pytest until the carried wheels are installed, and a part of ``bench/gpu_check.py`` that runs
out of time leaves nothing running. ``make rehearse`` runs these tests with that machine's software."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_export_and_version_without_an_installed_distribution(tmp_path, monkeypatch, capsys):
    """A checkout on PYTHONPATH has no distribution metadata: the export's record and ``--version`` say the
    version of its pyproject.toml."""
    import importlib.metadata as metadata

    from permsparse import PruneConfig, Search, export_checkpoint, prune
    from permsparse.checkpoint.record import read_record
    from permsparse.cli import main

    from .conftest import CALIB, HOLDOUT, tiny_llama

    found = metadata.Distribution.from_name

    def from_name(name: str):
        if name == "permsparse":
            raise metadata.PackageNotFoundError(name)
        return found(name)

    monkeypatch.setattr(metadata.Distribution, "from_name", staticmethod(from_name))
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("permsparse")
    expected = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    model, config = tiny_llama(), PruneConfig(permutation=Search("none"))
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    export_checkpoint(model, None, tmp_path / "out", config, report)
    assert read_record(tmp_path / "out").permsparse_version == expected
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == expected


# scipy and platformdirs, absent for permsparse's imports (those of other packages, such as transformers
# checking what is installed, go on as they would: on the lent machine they find neither anyway)
HIDE = """
import sys
class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in ("scipy", "platformdirs"):
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
            frame = frame.f_back
        if frame is not None and frame.f_globals.get("__name__", "").startswith("permsparse"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hidden())
"""


def test_permsparse_imports_without_scipy_and_only_an_assignment_needs_it():
    code = HIDE + """
import permsparse, permsparse.cli, permsparse.deploy.speed, permsparse.run.placement, permsparse.run.cache
import torch
from permsparse import find_permutation
from permsparse.run.cache import cache_dir
assert str(cache_dir()) == "/tmp/rehearsal-cache"
hidden = ("scipy", "platformdirs")  # nothing of theirs bound in a permsparse module (were they loaded already)
bound = [f"{name}.{key}" for name, module in list(sys.modules.items()) if name.startswith("permsparse")
         for key, value in vars(module).items()
         if str(getattr(value, "__module__", None) or getattr(value, "__name__", "")).split(".")[0] in hidden]
assert not bound, f"bound at import time: {bound}"
scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
assert find_permutation(scores, 2, 4, "cp").shape == (16,)
for name in [m for m in sys.modules if m.split(".")[0] == "scipy"]:  # loaded by another package: gone too
    del sys.modules[name]
try:
    find_permutation(scores, 2, 4, "ria")
except ImportError as err:
    print("ria:", err)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERMSPARSE_CACHE": "/tmp/rehearsal-cache"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("ria: ") and "need scipy" in line and "No module named 'scipy'" in line


def test_the_70b_block_is_made_on_the_target_device_in_bfloat16(monkeypatch):
    """No float32 weight is ever made (a 70B block's random initialisation in float32 on the host outlasts the
    part's budget), and the offloading part makes its model on the GPU, not on the host."""
    import torch

    made = []
    init = torch.nn.Linear.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append((self.weight.dtype, self.weight.device.type))

    monkeypatch.setattr(torch.nn.Linear, "__init__", recording)
    model = gpu_check.random_llama(gpu_check.TINY, 1, "cpu")
    assert made and all(dtype == torch.bfloat16 for dtype, _ in made)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    devices = []

    class Made(Exception):
        pass

    def record(fields, layers, device):
        devices.append(device)
        raise Made

    monkeypatch.setattr(gpu_check, "random_llama", record)
    with pytest.raises(Made):
        gpu_check.part_70b(gpu_check.Setup("cuda"))
    assert devices == ["cuda"]


def _sleeping_grandchild(setup):
    """A part that starts a process which sleeps on, reports its pid, and sleeps too."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield {"grandchild": sleeper.pid}
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_part_out_of_time_leaves_no_process_behind():
    part = gpu_check.run_part("sleeper", 8, gpu_check.Setup("cpu", dry_run=True), part=_sleeping_grandchild)
    assert part["error"] == "stopped after its limit of 8 s"
    pid = part["result"]["grandchild"]
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _gpu_only(node: ast.AST) -> bool:
    """Whether a decorator or pytestmark entry skips without CUDA (``skipif(not torch.cuda.is_available()...``)."""
    return isinstance(node, ast.Call) and "skipif" in ast.unparse(node.func) and "cuda.is_available" in ast.unparse(node)


def _marked_gpu(nodes: list[ast.AST]) -> bool:
    return any(ast.unparse(n).startswith("pytest.mark.gpu") for n in nodes)


def test_every_test_that_needs_a_gpu_carries_the_gpu_mark():
    """``pytest -m gpu`` (what gpu_check's tests part runs) selects every test that skips without CUDA."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = [el for node in tree.body if isinstance(node, ast.Assign)
                        and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                        for el in (node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value])]
        if _marked_gpu(module_marks):
            continue
        gpu_module = any(_gpu_only(m) for m in module_marks)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if (gpu_module or any(_gpu_only(d) for d in node.decorator_list)) and not _marked_gpu(node.decorator_list):
                    unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"skip without CUDA but lack @pytest.mark.gpu: {unmarked}"
