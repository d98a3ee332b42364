"""Short checks on the real SmolLM2-135M (the embedded default), with real WikiText-2 text."""
import pytest

from permsparse import Calibration, PruneConfig, load_model, perplexity, prune
from permsparse.evaluate.measures import eval_tokens

pytestmark = pytest.mark.real
SEQLEN, WINDOWS = 256, 4


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer, {k: v.clone() for k, v in model.state_dict().items()}, eval_tokens(tokenizer)


def pruned_ppl(smollm2, **config):
    model, tokenizer, dense_state, ids = smollm2
    model.load_state_dict(dense_state)
    if config:
        prune(model, tokenizer, PruneConfig(calibration=Calibration(nsamples=8, seqlen=SEQLEN), **config),
              progress=False)
    return perplexity(model, tokenizer, seqlen=SEQLEN, windows=WINDOWS, ids=ids, progress=False).ppl


def test_wanda_beats_magnitude_and_dense_is_in_band(smollm2):
    dense = pruned_ppl(smollm2)
    magnitude = pruned_ppl(smollm2, score="magnitude")
    wanda = pruned_ppl(smollm2, score="wanda")
    assert 15 < dense < 60, dense  # SmolLM2-135M measures 28.7 at seqlen 512 over the full set
    assert dense < wanda < 0.5 * magnitude, (dense, wanda, magnitude)
