"""Several processes on torchrun (gloo, CPU) give the model one process gives; a killed run resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import DATA

SHAKESPEARE = str(DATA / "tinyshakespeare" / "input.txt")


def command(model, out, *extra, processes: int = 1) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1
                else [sys.executable])
    return [*launcher, "-m", "permsparse", "prune", "--model", str(model), "--calib", SHAKESPEARE, "--nsamples", "8",
            "--seqlen", "64", "--holdout", "4", "--eval-windows", "0", "--quiet", "--out", str(out), *extra]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def same_checkpoint(a, b) -> None:
    sites = [[s["perm"] for s in json.loads((d / "permsparse.json").read_text())["report"]["sites"]] for d in (a, b)]
    assert sites[0] == sites[1]
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)


@pytest.mark.parametrize("extra", [
    ("--perm", "learned", "--init", "ria", "--steps", "4", "--judge-every", "2", "--tile", "16", "--batch", "4"),
    ("--perm", "learned", "--scope", "blockwise", "--init", "ria", "--steps", "3", "--tile", "16", "--batch", "4"),
    ("--perm", "output", "--binding", "shared"),
    ("--calib", "self", "--perm", "ria"),  # sampled calibration text: rank 0's on every rank
], ids=["e2e", "blockwise", "output-search", "self-calibration"])
def test_two_processes_give_the_permutations_and_weights_of_one(tiny_llama_dir, tmp_path, extra):
    run(command(tiny_llama_dir, tmp_path / "one", *extra))
    run(command(tiny_llama_dir, tmp_path / "two", *extra, processes=2))
    same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tiny_llama_dir, tmp_path):
    extra = ("--perm", "learned", "--init", "ria", "--steps", "40", "--judge-every", "5", "--tile", "16", "--batch", "4")
    run(command(tiny_llama_dir, tmp_path / "whole", *extra))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command(tiny_llama_dir, tmp_path / "killed", *extra), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed.partial" / ".resume" / "progress.json"

    def saved_training() -> bool:  # the committed manifest names the learner's state
        try:
            return "training" in json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.time() + 300
    while not saved_training() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert saved_training(), "the learner saved no state before the run ended"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed").exists()
    run(command(tiny_llama_dir, tmp_path / "killed", *extra))
    same_checkpoint(tmp_path / "whole", tmp_path / "killed")


@pytest.mark.parametrize("masks", ["fixed", "joint"])
def test_two_processes_distil_the_weights_of_one_up_to_rounding(tiny_llama_dir, tmp_path, masks):
    """Each process takes half of every distillation step's windows and the gradients (of the weights, and with
    joint masks of the permutations' costs) are summed: the same masks and permutations, and the same weights
    up to the order of float additions."""
    extra = ("--perm", "ria", "--distill-steps", "6", "--distill-batch", "4", "--distill-judge-every", "3",
             "--distill-lr", "3e-4", "--distill-masks", masks)
    run(command(tiny_llama_dir, tmp_path / "one", *extra))
    run(command(tiny_llama_dir, tmp_path / "two", *extra, processes=2))
    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in wa:
        assert bool(((wa[k] == 0) == (wb[k] == 0)).all()), k
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k
    reports = [json.loads((tmp_path / d / "permsparse.json").read_text())["report"] for d in ("one", "two")]
    assert [s["perm"] for s in reports[0]["sites"]] == [s["perm"] for s in reports[1]["sites"]]
    judged = [report["distillation"]["judged"] for report in reports]
    assert [s for s, _ in judged[0]] == [s for s, _ in judged[1]] == [0, 3, 6]
