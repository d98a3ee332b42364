"""Progress files: every kind of saved value comes back as it was, and nothing read back can run code."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from permsparse.report import DistillRecord, LayerRecord, PruneReport, SiteRecord, TrainingRecord
from permsparse.run.identity import ResumeKey
from permsparse.run.resume import Progress, pack_mask, unpack_mask

KEY = ResumeKey("model", "tokenizer", "data", "config", "version")

ROOT = Path(__file__).resolve().parents[1]


def same(a, b, where="value"):
    """``a`` and ``b`` are equal with the same types all the way down, tensors bitwise and of one dtype."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and b.device.type == "cpu", where
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert type(k) is type(next(x for x in b if x == k)), f"{where}: key {k!r}"
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def bits(tensor):
    return tensor.cpu().reshape(-1).contiguous().view(torch.uint8)


def every_kind(device="cpu"):
    base = torch.arange(24, dtype=torch.float32, device=device).reshape(4, 6)
    report = PruneReport(layers=[LayerRecord("a.q", (4, 8), "a.attn", 0.75, None, 1.5, output_error=0.1)],
                         sites=[SiteRecord("a.attn", ["a.q", "a.k"], [1, 0, 3, 2])], hidden_perm=[0, 1],
                         training=[TrainingRecord("model", [1.0, 0.5], [0.1, 0.05], [(0, 2.0), (2, 1.5)], 2.0, 1.5,
                                                  2, 3.25)],
                         distillation=DistillRecord([0.3], [(0, 1.0)], 1.0, 0, 0.5), weights_updated=True)
    return {
        "none": None, "bools": [True, False], "int": -(2 ** 62), "floats": (0.1, -0.0, 1e300, math.inf, math.nan),
        "str": "model.layers.0/ü", 3: "an int key", 0: {1: (2, [3, None])}, "empty": {}, "empty list": [],
        "empty tuple": (),
        "tensors": {str(dtype): (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
                    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                                  torch.uint8, torch.int32, torch.int64)},
        "bool": torch.rand(7, 3) > 0.5, "scalar": torch.tensor(2.5), "no elements": torch.empty(0, 4),
        "on device": base, "a view": base[1:3, 2:5], "transposed": base.t(), "again": base,
        "mask": pack_mask(torch.rand(3, 10) > 0.3),
        "records": [report, TrainingRecord("b", [], [], [], 0.0, 0.0, 0, 0.0)], "distill": report.distillation,
        "best": (1.5, 4, [base.clone(), base[0]]),
    }


def test_every_kind_of_value_comes_back_as_it_was(tmp_path):
    value = every_kind()
    progress = Progress(tmp_path, KEY)
    progress.save("stream-0", value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json", "stream-0.1.safetensors"]
    back = Progress(tmp_path, KEY).load("stream-0")
    same(value, back)
    assert unpack_mask(back["mask"]).tolist() == unpack_mask(value["mask"]).tolist()
    with safe_open(tmp_path / "stream-0.1.safetensors", framework="pt") as file:  # tensors named by their path
        assert {"/tensors/torch.bfloat16", "/mask/1", "/best/2/1"} <= set(file.keys())
        assert set(file.metadata()) == {"permsparse"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tensors_on_a_gpu_come_back_on_the_cpu(tmp_path):
    value = every_kind("cuda")
    Progress(tmp_path, KEY).save("blocks", value)
    same(value, Progress(tmp_path, KEY).load("blocks"))  # ``same`` asks for CPU tensors back


def test_values_without_tensors_and_a_lone_tensor(tmp_path):
    progress = Progress(tmp_path, KEY)
    for key, value in [("starts", {}), ("x", [1, (2.0, "3")]), ("y", None), ("hidden", torch.randperm(64))]:
        progress.save(key, value)
        same(value, progress.load(key), key)
    assert progress.load("never saved") is None
    assert Progress(None, KEY).load("hidden") is None


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 10), (2, 3, 5), (0, 4)])
def test_a_packed_mask_is_a_tensor_an_eighth_its_size(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    dims, bits = pack_mask(mask)
    assert dims == list(shape) and bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask((dims, bits)), mask)


def test_a_resumed_optimiser_takes_the_uninterrupted_step(tmp_path):
    def model():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5).to(torch.float64))]

    def grads(step):
        g = torch.Generator().manual_seed(step)
        return [torch.randn(4, 3, generator=g), torch.randn(5, generator=g).to(torch.float64)]

    def step(params, optimiser, i):
        for p, g in zip(params, grads(i)):
            p.grad = g
        optimiser.step()

    params = model()
    optimiser = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, betas=(0.8, 0.99))
    for i in range(3):
        step(params, optimiser, i)
    Progress(tmp_path, KEY).save("training", {"weights": [p.detach() for p in params],
                                                "optimiser": optimiser.state_dict(), "step": 3})
    step(params, optimiser, 3)

    state = Progress(tmp_path, KEY).load("training")
    assert all(type(k) is int for k in state["optimiser"]["state"])
    assert state["optimiser"]["param_groups"][0]["betas"] == (0.8, 0.99)
    resumed = model()
    with torch.no_grad():
        for p, saved in zip(resumed, state["weights"]):
            p.copy_(saved)
    fresh = torch.optim.AdamW(resumed, lr=0.1, weight_decay=0.01, betas=(0.8, 0.99))
    fresh.load_state_dict(state["optimiser"])
    step(resumed, fresh, state["step"])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["os.system", "PruneConfig", "Path", "__builtins__.eval"])
def test_a_record_class_outside_the_allow_list_is_refused(tmp_path, name):
    Progress(tmp_path, KEY).save("blocks", {"done": 1})
    tree = {"dict": [["report", {"record": name, "fields": {"args": ["echo owned"]}}]]}
    save_file({}, tmp_path / "blocks.1.safetensors", metadata={"permsparse": json.dumps(tree)})
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "blocks.1.safetensors")) + ".*not one of"):
        Progress(tmp_path, KEY).load("blocks")


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "],
                         ids=["empty", "pickle-like", "bad-header"])
def test_a_corrupt_progress_file_names_itself(tmp_path, content):
    Progress(tmp_path, KEY).save("hidden", torch.arange(8))
    (tmp_path / "hidden.1.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "hidden.1.safetensors"))):
        Progress(tmp_path, KEY).load("hidden")


@pytest.mark.parametrize("tree", [{"tensor": "missing"}, {"dict": [[True, 1]]}, {"what": 1}, {"record": "PruneReport",
                                                                                             "fields": {"x": 1}}],
                         ids=["missing-tensor", "bool-key", "unknown-node", "bad-fields"])
def test_a_malformed_tree_names_the_file(tmp_path, tree):
    Progress(tmp_path, KEY).save("k", None)
    save_file({}, tmp_path / "k.1.safetensors", metadata={"permsparse": json.dumps(tree)})
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "k.1.safetensors"))):
        Progress(tmp_path, KEY).load("k")


def test_values_that_could_not_come_back_are_not_saved(tmp_path):
    progress = Progress(tmp_path, KEY)
    for value in [{(1, 2): 3}, {"a": {1, 2}}, [Path("x")], {"cfg": pytest.importorskip("permsparse").PruneConfig()}]:
        with pytest.raises(TypeError, match="progress at"):
            progress.save("x", value)


def test_a_folder_of_pickle_files_is_refused(tmp_path):
    (tmp_path / "progress.json").write_text(json.dumps({"fingerprint": "abc"}))
    (tmp_path / "blocks.pt").write_bytes(b"\x80\x04")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path} holds progress of an older permsparse "
                                                        "(pickle files), which is never read")):
        Progress(tmp_path, KEY)


@pytest.mark.parametrize("part, words", [("model", "another model"), ("tokenizer", "another tokenizer"),
                                         ("data", "other calibration data"), ("config", "another configuration"),
                                         ("permsparse", "another permsparse version")])
def test_progress_of_another_run_is_refused_naming_what_differs(tmp_path, part, words):
    import dataclasses

    Progress(tmp_path, KEY).save("hidden", torch.arange(4))
    other = dataclasses.replace(KEY, **{part: "changed"})
    with pytest.raises(FileExistsError, match=f"holds progress of another run \\({words}: {getattr(KEY, part)} there, "
                                              "changed here\\): remove it or pass --overwrite"):
        Progress(tmp_path, other)


def test_progress_of_an_older_manifest_format_is_refused(tmp_path):
    (tmp_path / "progress.json").write_text(json.dumps({"fingerprint": "abc"}))
    with pytest.raises(FileExistsError, match="older permsparse"):
        Progress(tmp_path, KEY)


def test_a_broken_manifest_names_itself(tmp_path):
    Progress(tmp_path, KEY).save("hidden", torch.arange(4))
    (tmp_path / "progress.json").write_text("{")
    with pytest.raises(ValueError, match="progress.json"):
        Progress(tmp_path, KEY)


def test_nothing_in_the_package_unpickles():
    source = (ROOT / "permsparse" / "run" / "resume.py").read_text()
    assert "torch.load" not in source and "pickle" not in source.replace("pickle files", "")
    for path in (ROOT / "permsparse").rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text and "pickle.load" not in text, path
