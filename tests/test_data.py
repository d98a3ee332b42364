"""Calibration and evaluation texts: sources, EOS-joined documents, held-out windows, mixtures."""
import pytest
import torch

from permsparse import Calibration
from permsparse.data.text import (EVAL_HEAD, bos_id, calibration_stream, calibration_windows, check_disjoint,
                             draw_calibration, load_documents, mixture, token_stream)


def test_offline_sources_read_their_documents():
    assert len(load_documents("c4")) == 1000 and len(load_documents("c4-demo")) == 300
    alpaca = load_documents("alpaca")
    assert len(alpaca) == 5000 and all(doc.strip() for doc in alpaca[:50])
    assert len(load_documents("wikitext2")) == 1 and "<unk>" not in load_documents("wikitext2-valid")[0]
    with pytest.raises(FileNotFoundError, match="unknown data source"):
        load_documents("no-such-text")


def test_documents_are_joined_with_eos(tiny_tokenizer):
    ids = token_stream(tiny_tokenizer, "c4-demo")
    eos = tiny_tokenizer.eos_token_id
    assert int((ids == eos).sum()) == 300 and int(ids[-1]) == eos


def test_held_out_windows_overlap_no_training_window():
    ids = torch.arange(5000)
    train, held = calibration_windows(ids, 16, 64, seed=0, holdout=8)
    assert train.shape == (16, 64) and held.shape == (8, 64)
    starts = sorted(int(w[0]) for w in held)
    assert all(abs(int(h[0]) - int(t[0])) >= 64 for h in held for t in train)
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))
    again, _ = calibration_windows(ids, 16, 64, seed=0, holdout=0)
    assert torch.equal(train, again)  # held-out windows do not change the training draw
    with pytest.raises(ValueError, match="too short"):
        calibration_windows(torch.arange(300), 4, 64, seed=0, holdout=8)


def test_mixtures_split_windows_by_weight(tiny_tokenizer):
    assert mixture("c4:3,alpaca:1") == [("c4", 0.75), ("alpaca", 0.25)]
    train, held = draw_calibration(tiny_tokenizer, "c4:3,alpaca:1", 8, 32, seed=0, holdout=4)
    assert train.shape == (8, 32) and held.shape == (4, 32)
    c4_only, _ = draw_calibration(tiny_tokenizer, "c4", 6, 32, seed=0, holdout=0)
    assert torch.equal(train[:6], c4_only)  # the first part's windows are its own draw
    with pytest.raises(ValueError, match="weight"):
        mixture("c4:x")


def test_the_test_text_is_refused_for_calibration_unless_asked():
    with pytest.raises(ValueError, match="--allow-test-calibration"):
        Calibration(source="wikitext2")
    assert Calibration(source="wikitext2", allow_test_text=True).source == "wikitext2"


def test_calibration_on_an_evaluated_text_never_draws_its_evaluation_windows(tiny_tokenizer):
    ids = token_stream(tiny_tokenizer, "shakespeare")
    head = int(ids.numel() * EVAL_HEAD)
    assert torch.equal(calibration_stream(tiny_tokenizer, "shakespeare"), ids[head:])
    assert torch.equal(calibration_stream(tiny_tokenizer, "c4-demo"), token_stream(tiny_tokenizer, "c4-demo"))
    train, held = draw_calibration(tiny_tokenizer, "c4:1,shakespeare:1", 8, 64, seed=0, holdout=4)
    own, own_held = calibration_windows(ids[head:], 4, 64, 1, 2, bos_id(tiny_tokenizer))  # part 2, seed + 1
    assert torch.equal(train[4:], own) and torch.equal(held[2:], own_held)
    check_disjoint(tiny_tokenizer, "c4:1,shakespeare:1", "shakespeare", 64, head // 64)  # fits the head
    check_disjoint(tiny_tokenizer, "c4", "shakespeare", 64, None)  # not calibrated on: the whole text
    with pytest.raises(ValueError, match=f"evaluate at most {head // 64} windows"):
        check_disjoint(tiny_tokenizer, "shakespeare", "shakespeare", 64, head // 64 + 1)
    with pytest.raises(ValueError, match="draws from all of"):
        check_disjoint(tiny_tokenizer, "c4-demo", "c4-demo", 64, 1)


def test_self_calibration_samples_the_model_as_a_full_forward_would(tiny_tokenizer):
    from permsparse.data.text import sampled_windows

    from .conftest import tiny_llama
    model = tiny_llama().eval()
    eos = tiny_tokenizer.eos_token_id
    windows = sampled_windows(model, 3, 12, seed=5, start_id=eos, keep_start=False, batch=2, show=False)
    gen, ids = torch.Generator().manual_seed(5), []
    for first, count in ((0, 2), (2, 1)):  # the same batches, each token drawn from a whole forward pass
        seq = torch.full((count, 1), eos)
        with torch.no_grad():
            for _ in range(12):
                probs = torch.softmax(model(seq, use_cache=False).logits[:, -1].float(), dim=-1)
                seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], dim=1)
        ids.append(seq[:, 1:])
    assert torch.equal(windows, torch.cat(ids))


def test_sampling_temperature_scales_the_logits(tiny_tokenizer, tmp_path):
    """A temperature near 0 samples the greedy continuation; another temperature draws other text from the same
    seed, kept in its own cache file; and a temperature without sampled text is refused."""
    from permsparse import Calibration
    from permsparse.data.text import sampled_windows

    from .conftest import tiny_llama
    model = tiny_llama().eval()
    eos = tiny_tokenizer.eos_token_id
    cold = sampled_windows(model, 2, 10, seed=5, start_id=eos, keep_start=False, show=False, temperature=1e-4)
    seq = torch.full((2, 1), eos)
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cold, seq[:, 1:])
    warm, _ = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, model=model, show=False, cache=tmp_path)
    hot, _ = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, model=model, show=False, cache=tmp_path,
                              temperature=2.0)
    assert not torch.equal(hot, warm) and len(list(tmp_path.glob("*.pt"))) == 2
    assert Calibration(source="c4:1,self:1", temperature=1.5).temperature == 1.5
    with pytest.raises(ValueError, match="applies to text the model samples"):
        Calibration(source="c4", temperature=1.5)
    with pytest.raises(ValueError, match="temperature above 0"):
        Calibration(source="self", temperature=0.0)


def test_self_calibration_is_seeded_and_keeps_training_and_held_out_apart(tiny_tokenizer):
    from .conftest import tiny_llama
    model = tiny_llama().eval()
    train, held = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, holdout=2, model=model, show=False)
    assert train.shape == (4, 16) and held.shape == (2, 16)
    again, held_again = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, holdout=2, extra=3, model=model,
                                         show=False)
    assert again.shape == (7, 16) and torch.equal(again[:4], train) and torch.equal(held_again, held)
    other, _ = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=1, model=model, show=False)
    assert not torch.equal(other, train)
    assert not any(torch.equal(h, t) for h in held for t in again)
    mixed, _ = draw_calibration(tiny_tokenizer, "c4:1,self:1", 4, 16, seed=0, model=model, show=False)
    c4_part, _ = draw_calibration(tiny_tokenizer, "c4", 2, 16, seed=0)
    assert mixed.shape == (4, 16) and torch.equal(mixed[:2], c4_part)
    with pytest.raises(ValueError, match="pass the model"):
        draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0)
    with pytest.raises(ValueError, match="not a document source"):
        load_documents("self")


def test_a_process_that_receives_the_samples_draws_the_other_parts_and_samples_nothing(tiny_tokenizer, monkeypatch):
    """``sample=False`` (a rank that rank 0's broadcast fills) gives the same shapes and the same windows of
    the other sources as a sampling draw, zeros in the sampled part, and never runs the model."""
    from permsparse.data import text as data

    from .conftest import tiny_llama
    model = tiny_llama().eval()
    train, held = draw_calibration(tiny_tokenizer, "c4:1,self:1", 4, 16, seed=0, holdout=2, extra=2, model=model,
                                   show=False)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(data, "sampled_windows", no_sampling)
    places, held_places = draw_calibration(tiny_tokenizer, "c4:1,self:1", 4, 16, seed=0, holdout=2, extra=2,
                                           model=model, show=False, sample=False)
    assert places.shape == train.shape == (6, 16) and held_places.shape == held.shape == (2, 16)
    c4_rows, self_rows = [0, 1, 4], [2, 3, 5]  # training windows by part, then the extra ones by part
    assert torch.equal(places[c4_rows], train[c4_rows]) and torch.equal(held_places[:1], held[:1])
    assert not places[self_rows].any() and not held_places[1:].any() and train[self_rows].any()


def test_sampled_calibration_text_is_kept_and_read_back_for_the_same_model_only(tiny_tokenizer, tmp_path, monkeypatch):
    from permsparse.data import text as data

    from .conftest import tiny_llama
    model = tiny_llama().eval()
    first, held = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, holdout=2, model=model, show=False,
                                   cache=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2  # training and held-out windows
    fresh, _ = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, holdout=2, model=model, show=False)
    assert torch.equal(fresh, first)  # the file holds what sampling gives

    def no_sampling(model, count, seqlen, *args, **kwargs):
        if count:
            raise AssertionError("sampled again")
        return torch.zeros(0, seqlen, dtype=torch.long)

    monkeypatch.setattr(data, "sampled_windows", no_sampling)
    again, held_again = draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, holdout=2, model=model, show=False,
                                         cache=tmp_path)
    assert torch.equal(again, first) and torch.equal(held_again, held)
    other = tiny_llama().eval()
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3  # one value changed: another model
    with pytest.raises(AssertionError, match="sampled again"):
        draw_calibration(tiny_tokenizer, "self", 4, 16, seed=0, model=other, show=False, cache=tmp_path)
    with pytest.raises(AssertionError, match="sampled again"):
        draw_calibration(tiny_tokenizer, "self", 4, 16, seed=1, model=model, show=False, cache=tmp_path)
