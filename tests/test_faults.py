"""Bad inputs and faults: each is one line of error and a non-zero exit, or a correct resume; nothing is lost.

Kills are injected at every write of the progress files (:data:`permsparse.run.resume.fault`), never timed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from permsparse import PruneConfig, Search, prune
from permsparse.run import resume
from permsparse.run.resume import MANIFEST, Progress

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
              "from permsparse.run import resume\n"
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
    from permsparse.cli import main

    assert main([*args[:-3], "--out", str(tmp_path / "whole"), "--quiet"]) == 0  # the same run, never killed
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the command line: one line of error, a non-zero exit, nothing lost or changed ----

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def prune_args(model, out, *extra):
    return ["prune", "--model", str(model), "--calib", SHAKESPEARE, "--nsamples", "4", "--seqlen", "32",
            "--eval-windows", "0", "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def checkpoint(model_dir, tmp_path_factory):
    """A pruned checkpoint (2:4, RIA permutations, folded), made once; tests tamper with copies."""
    from permsparse.cli import main

    out = tmp_path_factory.mktemp("checkpoint") / "pruned"
    assert main(prune_args(model_dir, out, "--perm", "ria", "--binding", "shared", "--export", "folded")) == 0
    return out


def interrupted_after_first_block(args: list[str]) -> int:
    """``permsparse ARGS``, stopped as Ctrl-C would once its first block's progress is committed."""
    from permsparse.cli import main

    def interrupt(point, path):
        if point == "folder synced":
            raise KeyboardInterrupt

    resume.fault = interrupt
    try:
        return main(args)
    finally:
        resume.fault = None


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / folder.name))


def fails(argv, capsys, code=2, message=""):
    """Run the command; assert it exits ``code`` with exactly one error line (holding ``message``) and no
    traceback; return that line."""
    from permsparse.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("permsparse: error:")]
    assert len(errors) == 1, err
    assert message in errors[0], errors[0]
    return errors[0]


def unchanged(before: dict[str, bytes], folder: Path) -> None:
    """``folder`` holds what it held (its run log may only have grown)."""
    after = snapshot(folder) if folder.exists() else {}
    assert set(after) == set(before)
    for name, data in before.items():
        if name.endswith("log.txt"):
            assert after[name].startswith(data), name
        else:
            assert after[name] == data, name


ARGUMENT_ERRORS = [
    ("pattern-5:4", ["--pattern", "5:4"], "pattern 5:4 is invalid"),
    ("pattern-0:4", ["--pattern", "0:4"], "pattern 0:4 is invalid"),
    ("pattern-words", ["--pattern", "half"], "is not of the form N:M"),
    ("pattern-100%", ["--pattern", "100%"], "must be between 0% and 100%"),
    ("distill-lr-alone", ["--distill-lr", "1e-3"], "--distill-lr only apply with --distill-steps"),
    ("distill-masks-alone", ["--distill-masks", "dynamic", "--distill-batch", "4"],
     "--distill-batch, --distill-masks only apply with --distill-steps"),
    ("fold-fallback-masked", ["--fold-fallback", "gather"], "--fold-fallback only applies to --export folded"),
    ("update-mask-wanda", ["--update-mask", "permutation"], "--update-mask only applies to the weight-updating"),
    ("compensate-ria", ["--perm", "ria", "--no-compensate"], "--no-compensate only applies to --perm output"),
    ("steps-search", ["--perm", "ria", "--steps", "3"], "--steps only apply to --perm learned"),
    ("chunks-learned", ["--perm", "learned", "--chunks", "2"], "--chunks only apply to a permutation search"),
    ("eval-limit-alone", ["--eval-limit", "3"], "--eval-limit only applies with --eval-tasks"),
    ("unknown-task", ["--eval-tasks", "no_such_task"], "unknown task"),
    ("temperature-file", ["--sample-temperature", "2"], "--sample-temperature applies to text the model samples"),
    ("test-calibration", ["--calib", "wikitext2"], "--allow-test-calibration"),
    ("nsamples-0", ["--nsamples", "0"], "need nsamples >= 1"),
    ("seqlen-1", ["--seqlen", "1"], "seqlen >= 2"),
    ("folded-unstructured", ["--pattern", "50%", "--export", "folded"], "the folded export needs an N:M pattern"),
    ("perm-unstructured", ["--pattern", "50%", "--perm", "ria"], "permutations only matter for N:M"),
    ("empty-objective", ["--perm", "learned", "--ce", "0", "--kl", "0", "--hidden", "0"], "objective is empty"),
    ("holdout-0-learned", ["--perm", "learned", "--holdout", "0"], "--holdout must be at least 1"),
]


@pytest.mark.parametrize("extra, message", [c[1:] for c in ARGUMENT_ERRORS], ids=[c[0] for c in ARGUMENT_ERRORS])
def test_a_bad_argument_is_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch, extra, message):
    from permsparse.cli import commands

    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "pruned"
    fails(prune_args(model_dir, out, *extra), capsys, message=message)
    assert not out.exists() and not out.with_name("pruned.partial").exists()


def test_an_existing_output_file_is_refused_even_with_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "result"
    out.write_text("mine")
    for extra in ([], ["--overwrite"]):
        fails(prune_args(model_dir, out, *extra), capsys, message="is a file, not a folder")
        assert out.read_text() == "mine" and not (tmp_path / "result.partial").exists()


def test_an_existing_output_folder_is_left_as_it_was(model_dir, checkpoint, tmp_path, capsys):
    out = copy_of(checkpoint, tmp_path)
    before = snapshot(out)
    fails(prune_args(model_dir, out), capsys, message="exists; pass --overwrite")
    unchanged(before, out)


def broken_model(model_dir: Path, tmp_path: Path, how: str) -> Path:
    folder = copy_of(model_dir, tmp_path)
    weights = folder / "model.safetensors"
    if how == "corrupt-config":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    elif how == "no-config":
        (folder / "config.json").unlink()
    elif how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "empty-weights":
        weights.write_bytes(b"")
    elif how == "garbage-weights":
        weights.write_bytes(b"\xff" * 64)
    elif how == "pickle-only":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    elif how == "pickle-beside":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    return folder


BROKEN_MODELS = [
    ("corrupt-config", "config.json is not a readable model config"),
    ("no-config", "holds no config.json"),
    ("truncated-weights", "model.safetensors is truncated"),
    ("empty-weights", "model.safetensors is truncated or not a safetensors file"),
    ("garbage-weights", "model.safetensors is truncated or not a safetensors file"),
    ("pickle-only", "pytorch_model.bin holds pickled weights"),
    ("pickle-beside", "pytorch_model.bin holds pickled weights"),
]


@pytest.mark.parametrize("how, message", BROKEN_MODELS, ids=[c[0] for c in BROKEN_MODELS])
def test_a_broken_model_folder_is_named_in_one_line(model_dir, tmp_path, capsys, how, message):
    folder = broken_model(model_dir, tmp_path, how)
    before = snapshot(folder)
    out = tmp_path / "pruned"
    fails(prune_args(folder, out), capsys, message=message)
    unchanged(before, folder)
    assert not out.exists() and not (tmp_path / "pruned.partial").exists()  # no log.txt left behind


@pytest.mark.parametrize("how, message", BROKEN_MODELS[:3] + BROKEN_MODELS[5:],
                         ids=[c[0] for c in BROKEN_MODELS[:3] + BROKEN_MODELS[5:]])
def test_eval_names_a_broken_model_in_one_line(model_dir, tmp_path, capsys, how, message):
    folder = broken_model(model_dir, tmp_path, how)
    fails(["eval", str(folder), "--seqlen", "32", "--windows", "1"], capsys, message=message)


LIMITS = [
    ("seqlen-past-context", ["--seqlen", "100000"], "--seqlen 100000 is longer than LlamaForCausalLM's context of 256"),
    ("nsamples-past-memory", ["--nsamples", "10000000"], "out of memory: this run needs about"),
    ("pattern-prunes-nothing", ["--pattern", "2:5"], "--pattern 2:5 prunes no linear of LlamaForCausalLM"),
    ("include-matches-nothing", ["--include", "no.such.*"], "prunes no linear"),
    ("unknown-calibration", ["--calib", "no-such-set"], "unknown data source 'no-such-set'"),
]


@pytest.mark.parametrize("extra, message", [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_a_limit_is_refused_after_loading_and_before_the_work(model_dir, tmp_path, capsys, monkeypatch, extra,
                                                               message):
    import shutil
    from collections import namedtuple

    from permsparse import pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**60, 0, 2**60))  # these are other limits
    monkeypatch.setattr(pipeline, "capture_block_inputs", lambda *a, **k: pytest.fail("the work started"))
    out = tmp_path / "pruned"
    fails(prune_args(model_dir, out, *extra), capsys, message=message)
    assert not out.exists() and not (tmp_path / "pruned.partial").exists()


def test_allow_dense_saves_a_model_no_pattern_prunes(model_dir, tmp_path, capsys):
    from permsparse.cli import main

    out = tmp_path / "dense"
    assert main(prune_args(model_dir, out, "--pattern", "2:5", "--allow-dense")) == 0
    from safetensors.torch import load_file

    saved, dense = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert all(torch.equal(saved[k], dense[k]) for k in dense)


def test_a_binary_calibration_file_is_named(model_dir, tmp_path, capsys):
    blob = tmp_path / "calib.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "pruned"
    fails(prune_args(model_dir, out, "--calib", str(blob)), capsys, message=f"{blob} is not UTF-8 text")
    assert not (tmp_path / "pruned.partial").exists()


def test_a_read_only_output_is_refused_before_loading(model_dir, tmp_path, capsys, monkeypatch):
    import errno

    from permsparse.cli import commands

    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    fails(prune_args(model_dir, tmp_path / "ro" / "out"), capsys,
          message=f"cannot create {tmp_path / 'ro' / 'out.partial'} for --out {tmp_path / 'ro' / 'out'}: Read-only")


def test_an_unwritable_output_folder_is_refused_before_loading(model_dir, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    from permsparse.cli import commands

    def no_write(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_write)
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    fails(prune_args(model_dir, tmp_path / "out"), capsys, message="cannot write in")
    assert not (tmp_path / "out.partial").exists()


def test_a_full_disk_is_refused_before_the_work(model_dir, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    from permsparse import pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    monkeypatch.setattr(pipeline, "capture_block_inputs", lambda *a, **k: pytest.fail("the work started"))
    fails(prune_args(model_dir, tmp_path / "out"), capsys, message="GiB free, and the checkpoint and the run's "
                                                                   "progress need about")
    assert not (tmp_path / "out.partial").exists()


def enospc(path):
    import errno

    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_disk_full_at_export_keeps_the_progress_and_the_same_command_finishes(model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    from transformers import PreTrainedModel

    from permsparse.cli import main

    out = tmp_path / "out"
    real = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, folder, **k: (_ for _ in ()).throw(
        enospc(Path(folder) / "model.safetensors")))
    line = fails(prune_args(model_dir, out), capsys, message="No space left on device")
    assert "out.partial/model.safetensors" in line and "keeps the progress: rerun the same command" in line
    assert (tmp_path / "out.partial" / ".resume" / MANIFEST).is_file() and not out.exists()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert main(prune_args(model_dir, out)) == 0
    assert "resuming from" in capsys.readouterr().out and (out / "permsparse.json").is_file()
    assert not (tmp_path / "out.partial").exists()


def test_a_disk_full_at_a_progress_write_keeps_the_blocks_before(model_dir, tmp_path, capsys):
    from permsparse.cli import main

    out = tmp_path / "out"
    seen = []

    def full(point, path):
        seen.append(point)
        if point == "file written" and seen.count("manifest renamed") == 1:
            raise enospc(path)

    resume.fault = full
    try:
        fails(prune_args(model_dir, out), capsys, message="No space left on device")
    finally:
        resume.fault = None
    manifest = json.loads((tmp_path / "out.partial" / ".resume" / MANIFEST).read_text())
    assert manifest["note"] == "1 of 2 blocks pruned"
    assert main(prune_args(model_dir, out)) == 0
    assert "resuming from" in capsys.readouterr().out


def test_an_interrupt_before_any_progress_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    from permsparse import pipeline
    from permsparse.cli import main

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "capture_block_inputs", interrupt)
    assert main(prune_args(model_dir, tmp_path / "out")) == 130
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "out.partial").exists()


def test_an_interrupt_after_a_block_resumes_and_quiet_still_says_so(model_dir, checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    from permsparse.cli import main

    out = tmp_path / "out"

    assert interrupted_after_first_block(prune_args(model_dir, out, "--perm", "ria", "--binding", "shared", "--export", "folded")) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert main(prune_args(model_dir, out, "--perm", "ria", "--binding", "shared", "--export", "folded")) == 0
    assert f"resuming from {tmp_path / 'out.partial'}: 1 of 2 blocks pruned" in capsys.readouterr().out  # --quiet
    a, b = load_file(out / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def interrupted(model_dir, tmp_path):
    """An output whose run was interrupted after its first block: ``(out, partial folder)``."""
    out = tmp_path / "out"

    assert interrupted_after_first_block(prune_args(model_dir, out)) == 130
    return out, tmp_path / "out.partial"


def other_tokenizer(model_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = copy_of(model_dir, tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    tokenizer.save_pretrained(folder)
    return folder


def other_weights(model_dir, tmp_path):
    folder = copy_of(model_dir, tmp_path / "weights")
    tiny_llama(seed=1).save_pretrained(folder)
    return folder


MISMATCHES = [
    ("model", lambda model_dir, tmp_path: (other_weights(model_dir, tmp_path), []), "another model"),
    ("tokenizer", lambda model_dir, tmp_path: (other_tokenizer(model_dir, tmp_path), []), "another tokenizer"),
    ("calibration-mixture", lambda model_dir, tmp_path: (model_dir, ["--calib", SHAKESPEARE + ":1,c4-demo:1"]),
     "other calibration data"),  # and another configuration: the source is part of it
    ("config", lambda model_dir, tmp_path: (model_dir, ["--score", "ria"]), "another configuration"),
    ("seed", lambda model_dir, tmp_path: (model_dir, ["--seed", "1"]), "another configuration"),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in MISMATCHES], ids=[c[0] for c in MISMATCHES])
def test_progress_of_another_run_is_refused_and_kept(model_dir, interrupted, tmp_path, capsys, make, words):
    out, partial = interrupted
    (tmp_path / "tok").mkdir(exist_ok=True)
    (tmp_path / "weights").mkdir(exist_ok=True)
    model, extra = make(model_dir, tmp_path)
    before = snapshot(partial)
    fails(prune_args(model, out, *extra), capsys, message=f"holds progress of another run ({words}: ")
    unchanged(before, partial)


def test_progress_of_another_permsparse_version_is_refused(model_dir, interrupted, capsys, monkeypatch):
    from permsparse import pipeline

    out, partial = interrupted
    before = snapshot(partial)
    monkeypatch.setattr(pipeline, "permsparse_version", lambda: "0.0.0-other")
    fails(prune_args(model_dir, out), capsys, message="another permsparse version")
    unchanged(before, partial)


def test_another_calibration_text_of_the_same_name_is_refused(model_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text((DATA / "tinyshakespeare" / "input.txt").read_text()[:100_000])
    out = tmp_path / "out"
    assert interrupted_after_first_block(prune_args(model_dir, out, "--calib", str(text))) == 130
    text.write_text((DATA / "tinyshakespeare" / "input.txt").read_text()[100_000:200_000])  # edited in place
    fails(prune_args(model_dir, out, "--calib", str(text)), capsys, message="other calibration data")


@pytest.mark.parametrize("damage, message", [
    ("manifest-json", "progress.json is not a readable progress manifest"),
    ("manifest-old", "holds progress of an older permsparse"),
    ("value-torn", "is not a readable progress file"),
    ("pickles", "pickle files"),
], ids=["manifest-json", "manifest-old-format", "value-file-torn", "pickle-files"])
def test_damaged_progress_is_named_and_left_alone(model_dir, interrupted, capsys, damage, message):
    out, partial = interrupted
    state = partial / ".resume"
    if damage == "manifest-json":
        (state / MANIFEST).write_text("{")
    elif damage == "manifest-old":
        (state / MANIFEST).write_text(json.dumps({"fingerprint": "abc"}))
    elif damage == "value-torn":
        name = json.loads((state / MANIFEST).read_text())["files"]["blocks"]
        (state / name).write_bytes((state / name).read_bytes()[:100])
    else:
        (state / "blocks.pt").write_bytes(b"\x80\x04")
    before = snapshot(partial)
    fails(prune_args(model_dir, out), capsys, message=message)
    unchanged(before, partial)


def test_a_second_run_on_a_locked_output_is_refused_at_once(model_dir, tmp_path, capsys):
    from permsparse.cli import main

    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("the first run's")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(600)\n", str(partial)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(partial)
        for extra in ([], ["--overwrite"]):
            fails(prune_args(model_dir, out, *extra), capsys, message=f"{partial} is locked by another permsparse run")
            unchanged(before, partial)
    finally:
        holder.kill()  # the kernel releases a dead process's lock
        holder.wait()
    assert main(prune_args(model_dir, out, "--overwrite")) == 0 and (out / "permsparse.json").is_file()


# ---- check: content, not only behaviour ----

def digest_of(folder):
    from permsparse.checkpoint.digest import record_digest

    return record_digest(folder)


def test_check_prints_the_record_digest_and_expect_pins_it(checkpoint, capsys):
    from permsparse.cli import main

    digest = digest_of(checkpoint)
    assert main(["check", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f"record digest: {digest}" in out and "match the digests recorded at export" in out
    assert main(["check", str(checkpoint), "--expect", digest]) == 0
    assert main(["check", str(checkpoint), "--expect", "0" * 64]) == 1
    assert f"record digest {digest} is not the expected {'0' * 64}" in capsys.readouterr().err


def rewrite_weights(folder, change):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


NAME = "model.layers.0.mlp.down_proj.weight"


def scale_kept(weights):
    weights[NAME] = weights[NAME] * 1.5  # every kept weight: the same N:M pattern


def scale_one(weights):
    row = weights[NAME][0]
    weights[NAME][0, int(row.nonzero()[0])] *= 1.0001  # far inside the logits tolerance


TAMPERS = [
    ("kept-weight-x1.5", lambda w: scale_kept(w), f"tensor {NAME}: its content differs"),
    ("one-weight-x1.0001", lambda w: scale_one(w), f"tensor {NAME}: its content differs"),
    ("tensor-removed", lambda w: w.pop("model.norm.weight"), "tensor model.norm.weight: recorded at export, missing"),
    ("tensor-added", lambda w: w.update(extra=torch.zeros(2)), "tensor extra: in the weight files, not recorded"),
    ("dtype-changed", lambda w: w.update({NAME: w[NAME].double()}), f"tensor {NAME}: its content differs"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in TAMPERS], ids=[c[0] for c in TAMPERS])
def test_check_fails_a_weight_changed_after_export(checkpoint, tmp_path, capsys, change, message):
    from permsparse.cli import main

    folder = copy_of(checkpoint, tmp_path)
    rewrite_weights(folder, change)
    assert main(["check", str(folder)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def edit_record(folder, change):
    path = folder / "permsparse.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=1))


def test_check_never_takes_its_tolerance_from_the_checked_record(checkpoint, tmp_path, capsys):
    from permsparse.cli import main

    folder = copy_of(checkpoint, tmp_path)

    def loosen(record):
        record["reference"]["tolerance"] = 1e9
        record["reference"]["logits"]["sample"] = [x * 1.01 for x in record["reference"]["logits"]["sample"]]

    edit_record(folder, loosen)
    assert main(["check", str(folder)]) == 1
    assert "logits: do not match the recorded reference" in capsys.readouterr().err
    assert main(["check", str(folder), "--tolerance", "0.5"]) == 0  # the user's own tolerance is taken


def test_a_record_without_digests_fails_the_check(checkpoint, tmp_path, capsys):
    from permsparse.cli import main

    folder = copy_of(checkpoint, tmp_path)
    edit_record(folder, lambda record: record.update(tensors={}))
    assert main(["check", str(folder)]) == 1
    assert "holds no tensor digests" in capsys.readouterr().err


CHECK_ERRORS = [
    ("record-not-json", lambda f: (f / "permsparse.json").write_text("{"), "permsparse.json is not a readable"),
    ("record-binary", lambda f: (f / "permsparse.json").write_bytes(b"\xff\xfe\x00"), "permsparse.json is not a readable"),
    ("record-missing", lambda f: (f / "permsparse.json").unlink(), "has no permsparse.json"),
    ("record-old-version", lambda f: edit_record(f, lambda r: r.update(format_version=4)), "format version 4"),
    ("record-field-missing", lambda f: edit_record(f, lambda r: r.pop("layouts")), "missing field(s) ['layouts']"),
    ("weights-truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]),
     "model.safetensors is truncated"),
    ("weights-missing", lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
    ("pickle-added", lambda f: (f / "pytorch_model.bin").write_bytes(b"\x80\x04"), "pytorch_model.bin holds pickled"),
    ("config-corrupt", lambda f: (f / "config.json").write_text("[1, 2"), "config.json is not a readable model config"),
]


@pytest.mark.parametrize("damage, message", [c[1:] for c in CHECK_ERRORS], ids=[c[0] for c in CHECK_ERRORS])
def test_check_and_eval_name_a_damaged_checkpoint_in_one_line(checkpoint, tmp_path, capsys, damage, message):
    folder = copy_of(checkpoint, tmp_path)
    damage(folder)
    before = snapshot(folder)
    fails(["check", str(folder)], capsys, message=message)
    if (folder / "permsparse.json").is_file() and "record" not in message:
        fails(["eval", str(folder), "--seqlen", "32", "--windows", "1"], capsys, message=message)
    unchanged(before, folder)


def test_check_of_a_folder_that_does_not_exist(tmp_path, capsys):
    fails(["check", str(tmp_path / "nowhere")], capsys, message="has no permsparse.json")


EVAL_ERRORS = [
    ("seqlen-past-context", ["--seqlen", "100000"], "--seqlen 100000 is longer than LlamaForCausalLM's context of 256"),
    ("binary-source", ["--source", "BLOB"], "is not UTF-8 text"),
    ("unknown-source", ["--source", "no-such-text"], "unknown data source"),
    ("unknown-task", ["--tasks", "no_such_task"], "unknown task"),
]


@pytest.mark.parametrize("extra, message", [c[1:] for c in EVAL_ERRORS], ids=[c[0] for c in EVAL_ERRORS])
def test_eval_refuses_in_one_line(checkpoint, tmp_path, capsys, monkeypatch, extra, message):
    from permsparse.cli import commands

    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 16)
    if "--seqlen" in extra:  # refused before evaluating (the texts are read as evaluation starts)
        monkeypatch.setattr(commands, "perplexity", lambda *a, **k: pytest.fail("evaluation ran"))
    extra = [str(blob) if e == "BLOB" else e for e in extra]
    args = ["eval", str(checkpoint), "--windows", "2", *(["--seqlen", "32"] if "--seqlen" not in extra else []), *extra]
    fails(args, capsys, message=message)


@pytest.mark.parametrize("argv, code", [(["prune", "--help"], 0), (["prune", "--pattern", "5:4", "--out", "x"], 2),
                                        (["prune", "--distill-steps", "0", "--distill-kl", "2", "--out", "x"], 2),
                                        (["check", "--help"], 0)],
                         ids=["prune-help", "bad-pattern", "distill-flag-without-steps", "check-help"])
def test_arguments_are_answered_before_torch_is_imported(argv, code, tmp_path):
    """The command line parses and refuses its arguments with neither torch nor transformers imported
    (bench/cli_latency.py measures how long that takes)."""
    script = ("import sys\nfrom permsparse.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit_:\n    code = exit_.code\n"
              "print('HEAVY', sorted({'torch', 'transformers'} & set(sys.modules)), file=sys.stderr)\n"
              "sys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == code, done.stderr
    assert "HEAVY []" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()
