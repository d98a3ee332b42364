"""The command line end to end on a tiny model saved as a Hugging Face folder."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from permsparse.cli import main
from permsparse.sparsity.masks import is_nm

from .conftest import DATA

SHAKESPEARE = str(DATA / "tinyshakespeare" / "input.txt")


def prune_args(model, out, *extra):
    return ["prune", "--model", str(model), "--calib", SHAKESPEARE, "--nsamples", "4", "--seqlen", "64",
            "--eval-windows", "2", "--out", str(out), *extra]


def test_prune_writes_a_plain_checkpoint_that_reloads_to_the_same_logits(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_llama_dir, out)) == 0
    meta = json.loads((out / "permsparse.json").read_text())
    assert meta["config"]["pattern"] == "2:4" and meta["export"] == "masked"
    assert len(meta["report"]["layers"]) == 14 and meta["metrics"]["wikitext2"]["windows"] == 2
    assert meta["metrics"]["shakespeare"]["windows"] == 2 and meta["zero_shot"] == []
    assert meta["command"].startswith("permsparse prune --model")
    assert not (tmp_path / "pruned.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert is_nm(model.model.layers[1].mlp.down_proj.weight, 2, 4)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    x = torch.randint(0, 512, (1, 16))
    assert not torch.allclose(model(x).logits, dense(x).logits)
    # the same command gives the same model
    again = tmp_path / "again"
    assert main(prune_args(tiny_llama_dir, again)) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    assert torch.equal(model(x).logits, reloaded(x).logits)


def test_existing_output_is_refused_unless_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(prune_args(tiny_llama_dir, out)) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(prune_args(tiny_llama_dir, out, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "permsparse.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--pattern", "5:4"], "pattern 5:4 is invalid"),
    (["--pattern", "0:4"], "pattern 0:4 is invalid"),
    (["--pattern", "2:48", "--strict"], "not divisible by M=48"),
    (["--calib", "shakespeare", "--eval-texts", "shakespeare", "--eval-windows", "100000"], "evaluate at most"),
])
def test_bad_input_is_one_clear_error(tiny_llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_llama_dir, out, *args)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("permsparse: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()


def test_unknown_model_unknown_data_and_test_text_calibration(tmp_path, tiny_llama_dir, capsys):
    assert main(prune_args(tmp_path / "nowhere", tmp_path / "o")) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_llama_dir), "--calib", "no-such-set", "--seqlen", "64", "--out",
                 str(tmp_path / "o")]) == 2
    assert "unknown data source" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_llama_dir), "--calib", "wikitext2", "--out", str(tmp_path / "o")]) == 2
    assert "--allow-test-calibration" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_flags_of_the_other_permutation_kind_are_refused(tiny_llama_dir, tmp_path, capsys):
    assert main(prune_args(tiny_llama_dir, tmp_path / "o", "--perm", "ria", "--steps", "3")) == 2
    assert "--steps only apply to --perm learned" in capsys.readouterr().err
    assert main(prune_args(tiny_llama_dir, tmp_path / "o", "--perm", "learned", "--chunks", "2")) == 2
    assert "--chunks only apply to a permutation search" in capsys.readouterr().err


def test_eval_prints_and_writes_perplexity(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", str(tiny_llama_dir), "--seqlen", "64", "--windows", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["perplexity"]
    assert result["windows"] == 3 and result["seqlen"] == 64 and result["tokens"] == 3 * 63
    assert result["ppl"] > 100  # a random 512-token model is close to uniform (ppl ~ 512)
    assert "ppl" in capsys.readouterr().out


def test_quiet_silences_the_hugging_face_bars_too_and_only_for_its_call(tiny_llama_dir, capsys):
    assert main(["eval", str(tiny_llama_dir), "--seqlen", "64", "--windows", "1", "--quiet"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored for the caller
    assert main(["eval", str(tiny_llama_dir), "--seqlen", "64", "--windows", "1"]) == 0
    assert "Loading weights" in capsys.readouterr().err


def test_folded_export_checks_and_a_tampered_one_fails(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "folded"
    assert main(prune_args(tiny_llama_dir, out, "--perm", "ria", "--binding", "shared", "--export", "folded")) == 0
    meta = json.loads((out / "permsparse.json").read_text())
    assert meta["export"] == "folded" and meta["fold"]["verified"]
    assert main(["check", str(out)]) == 0
    weights = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    row = weights[name][0]
    weights[name][0, int((row == 0).nonzero()[0])] = 1.0  # a weight in a pruned slot
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert main(["check", str(out)]) == 1
    assert "model.layers.0.mlp.down_proj" in capsys.readouterr().err


def test_learned_end_to_end_from_the_command_line_records_its_training(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "e2e"
    assert main(prune_args(tiny_llama_dir, out, "--perm", "learned", "--scope", "e2e", "--init", "ria", "--steps", "3",
                           "--hidden", "0.5", "--batch", "2", "--export", "folded", "--binding", "shared")) == 0
    meta = json.loads((out / "permsparse.json").read_text())
    permutation = meta["config"]["permutation"]
    assert permutation["kind"] == "learned" and permutation["scope"] == "e2e" and permutation["hidden"] == 0.5
    (training,) = meta["report"]["training"]
    assert training["scope"] == "model" and training["best_judged"] <= training["init_judged"]
    log = (out / "log.txt").read_text()  # every step's bar leaves its final state in the run's log
    for line in ("config: {", "statistics and starts: 2/2", "learn permutations (e2e): 3/3", "saved "):
        assert line in log, line
    assert main(["check", str(out)]) == 0
    assert main(prune_args(tiny_llama_dir, tmp_path / "o", "--perm", "learned", "--ce", "0", "--kl", "0", "--hidden", "0")) == 2
    assert "objective is empty" in capsys.readouterr().err


def test_eval_runs_zero_shot_tasks_on_a_pruned_checkpoint(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_llama_dir, out, "--perm", "ria")) == 0
    result = tmp_path / "zs.json"
    assert main(["eval", str(out), "--windows", "0", "--tasks", "arc_easy,piqa", "--limit", "3", "--json",
                 str(result), "--quiet"]) == 0
    scores = json.loads(result.read_text())["zero_shot"]
    assert [s["task"] for s in scores] == ["arc_easy", "piqa"] and all(s["items"] == 3 for s in scores)
    assert all(0 <= s["acc"] <= 1 for s in scores) and "arc_easy" in capsys.readouterr().out
    assert main(["eval", str(out), "--tasks", "arc_hard"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_help_lists_every_config_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--pattern", "--score", "--perm", "--chunks", "--scope", "--kl", "--tile", "--calib", "--holdout",
                 "--allow-test-calibration", "--export", "--fold-fallback", "--update-mask"):
        assert flag in text, flag
    assert "(default: 2:4)" in text and "50%" in text


def test_an_encoder_is_pruned_and_judged_by_its_embeddings(tmp_path, tiny_tokenizer, capsys):
    from .conftest import tiny_family

    folder = tmp_path / "bert"
    tiny_family("bert").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "pruned"
    assert main(prune_args(folder, out, "--perm", "ria", "--eval-texts", "shakespeare")) == 0
    assert "no language-model head" in capsys.readouterr().out
    similarity = json.loads((out / "permsparse.json").read_text())["metrics"]["shakespeare"]
    assert 0 < similarity["cosine"] < 1 and similarity["windows"] == 2
    assert main(["check", str(out)]) == 0
    assert main(["eval", str(out), "--seqlen", "64", "--windows", "2", "--source", "shakespeare"]) == 0
    assert "embedding cosine" in capsys.readouterr().out


def test_self_calibration_prunes_the_same_model_twice(tiny_llama_dir, tmp_path, capsys):
    args = ["prune", "--model", str(tiny_llama_dir), "--calib", "self", "--nsamples", "4", "--seqlen", "32",
            "--eval-texts", "shakespeare", "--eval-windows", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "a" / "permsparse.json").read_text())
    assert meta["config"]["calibration"]["source"] == "self"
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in "ab")
    assert is_nm(a.model.layers[0].mlp.up_proj.weight, 2, 4)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
