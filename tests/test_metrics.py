"""optiq_dhara.metrics: KL, top-1 agreement and perplexity in AR and diffusion forwards."""

import math

import mlx.core as mx
import numpy as np
import pytest

from optiq_dhara.masks import block_causal_mask
from optiq_dhara.metrics import (
    ar_scoring,
    compare,
    diffusion_scoring,
    kl_divergence,
    make_scoring,
    scored_log_probs,
)

MASK = 316


@pytest.fixture(scope="module")
def tokens():
    return mx.array(np.random.default_rng(0).integers(0, 300, size=(3, 40)))


class Uniform:
    """Equal logits everywhere: perplexity is the vocabulary size without MASK."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, inputs, mask=None):
        return mx.zeros((*inputs.shape, self.vocab))


class Scaled:
    """Another model's logits times a factor: a known, different distribution."""

    def __init__(self, model, factor: float):
        self.model, self.factor = model, factor

    def __call__(self, inputs, mask=None):
        return self.model(inputs, mask=mask) * self.factor


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_model_against_itself(golden_model, tokens, mode):
    result = compare(golden_model, golden_model, tokens, mode, block_len=8)
    assert result.mean_kl == 0.0
    assert result.top1_agreement == 1.0
    assert result.perplexity == result.reference_perplexity
    assert result.positions > 0


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_uniform_model_perplexity_is_vocab_without_mask(golden_model, tokens, mode):
    result = compare(Uniform(320), golden_model, tokens, mode, block_len=8)
    assert math.isclose(result.perplexity, 319, rel_tol=1e-4)
    assert result.mean_kl > 0


def test_kl_and_agreement_of_a_different_model(golden_model, tokens):
    result = compare(Scaled(golden_model, 0.5), golden_model, tokens, "ar")
    assert result.mean_kl > 0.01
    # halving the logits keeps every argmax
    assert result.top1_agreement == 1.0
    assert result.perplexity != result.reference_perplexity


def test_kl_divergence_matches_hand_computation():
    p = mx.log(mx.array([[0.5, 0.5, 0.0]]))
    q = mx.log(mx.array([[0.25, 0.75, 0.0]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(kl_divergence(p, q).item(), expected, rel_tol=1e-6)
    assert kl_divergence(p, p).item() == 0.0


def test_mask_token_is_never_predicted(golden_model, tokens):
    scoring = ar_scoring(tokens, MASK)
    lp = scored_log_probs(golden_model(tokens), scoring, MASK)
    assert mx.all(lp[:, MASK] == -mx.inf).item()
    assert mx.allclose(mx.exp(lp).sum(axis=-1), mx.ones(lp.shape[0]), atol=1e-5).item()


def test_ar_scoring_scores_next_tokens(tokens):
    scoring = ar_scoring(tokens, MASK)
    batch, length = tokens.shape
    assert scoring.size == batch * (length - 1)
    assert scoring.mask is None
    expected = np.array(tokens[:, 1:]).reshape(-1)
    assert np.array_equal(np.array(scoring.targets), expected)


def test_diffusion_scoring_masks_every_block(tokens):
    scoring = diffusion_scoring(tokens, MASK, block_len=8, seed=3)
    inputs = np.array(scoring.inputs)
    masked = inputs == MASK
    length = tokens.shape[1]
    for start in range(0, length, 8):
        assert masked[:, start : start + 8].any(axis=1).all()
    flat = np.array(scoring.positions)
    assert np.array_equal(np.sort(flat), np.nonzero(masked.reshape(-1))[0])
    clean = np.array(tokens).reshape(-1)
    assert np.array_equal(np.array(scoring.targets), clean[flat])
    assert np.array_equal(inputs[~masked], np.array(tokens)[~masked])
    assert mx.array_equal(scoring.mask, block_causal_mask(length, 8)).item()
    again = diffusion_scoring(tokens, MASK, block_len=8, seed=3)
    assert mx.array_equal(again.inputs, scoring.inputs).item()
    other = diffusion_scoring(tokens, MASK, block_len=8, seed=4)
    assert not mx.array_equal(other.inputs, scoring.inputs).item()


def test_bad_input_is_named(golden_model):
    with pytest.raises(ValueError, match="unknown mode 'spec'"):
        make_scoring(mx.zeros((1, 4), mx.int32), "spec", MASK)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length >= 2\]"):
        compare(golden_model, golden_model, mx.zeros((4,), mx.int32))
