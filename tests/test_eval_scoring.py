"""Log-likelihood scoring of the eval adapter: AR and diffusion against plain computations."""

import math

import mlx.core as mx
import numpy as np
import pytest

from optiq_dhara.evaluate.scoring import loglikelihoods
from optiq_dhara.masks import block_causal_mask


def random_pairs(seed: int, count: int = 7) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs of varied lengths; ids below the MASK id.

    The last four share a context, as the choices of one question do: two one-token
    answers (one AR forward) and two two-token answers (one diffusion forward).
    """
    rng = np.random.default_rng(seed)
    pairs = [
        (
            rng.integers(0, 300, size=int(rng.integers(1, 30))).tolist(),
            rng.integers(0, 300, size=int(rng.integers(1, 20))).tolist(),
        )
        for _ in range(count)
    ]
    question = rng.integers(0, 300, size=11).tolist()
    return pairs + [(question, [12]), (question, [250]), (question, [3, 4]), (question, [5, 6])]


def log_softmax(logits: mx.array) -> np.ndarray:
    logits = np.array(logits.astype(mx.float32), dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def direct_ar(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One causal forward over context + continuation; position p predicts token p + 1."""
    tokens = context + continuation
    logp = log_softmax(model(mx.array([tokens]))[0])
    total, greedy = 0.0, True
    for j, token in enumerate(continuation):
        row = logp[len(context) + j - 1]
        total += row[token]
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


def direct_diffusion(model, context, continuation, block_len: int) -> tuple[float, bool]:
    """Per block_len chunk of the continuation: the chunk masked, earlier chunks true,
    block-causal forward; a MASK position predicts its own token, MASK id excluded."""
    mask_id = model.args.mask_token_id
    tokens = context + continuation
    total, greedy = 0.0, True
    for lo in range(len(context), len(tokens), block_len):
        hi = min(lo + block_len, len(tokens))
        inputs = tokens[:lo] + [mask_id] * (hi - lo)
        logits = model(mx.array([inputs]), mask=block_causal_mask(len(inputs), block_len))[0]
        logits = np.array(logits.astype(mx.float32))
        logits[:, mask_id] = -np.inf
        logp = log_softmax(mx.array(logits))
        for p in range(lo, hi):
            total += logp[p, tokens[p]]
            greedy = greedy and int(logp[p].argmax()) == tokens[p]
    return total, greedy


def assert_scores_equal(got, want):
    assert [g for _, g in got] == [g for _, g in want]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-5, atol=1e-4)


def test_ar_loglikelihood_equals_direct_causal_computation(golden_model):
    pairs = random_pairs(0)
    want = [direct_ar(golden_model, c, x) for c, x in pairs]
    assert_scores_equal(loglikelihoods(golden_model, pairs, mode="ar", batch_size=3), want)


def test_ar_greedy_flag_is_true_for_the_models_own_greedy_continuation(golden_model):
    context = [5, 17, 42, 99]
    continuation = []
    for _ in range(4):
        logits = golden_model(mx.array([context + continuation]))[0, -1]
        continuation.append(int(mx.argmax(logits).item()))
    [(score, greedy)] = loglikelihoods(golden_model, [(context, continuation)], mode="ar")
    assert greedy and score < 0


@pytest.mark.parametrize("block_len", [4, 8, 32])
def test_diffusion_score_equals_direct_masked_computation(golden_model, block_len):
    pairs = random_pairs(1)
    want = [direct_diffusion(golden_model, c, x, block_len) for c, x in pairs]
    got = loglikelihoods(golden_model, pairs, mode="diffusion", batch_size=4, block_len=block_len)
    assert_scores_equal(got, want)


def test_diffusion_masks_a_short_answer_at_once(golden_model):
    """An answer shorter than a block is scored by one forward: no answer token sees another."""
    context, continuation = [7, 8, 9, 10, 11], [20, 21, 22]
    [(with_answer, _)] = loglikelihoods(
        golden_model, [(context, continuation)], mode="diffusion", block_len=32
    )
    changed = [(context, [20, 250, 22])]
    [(other, _)] = loglikelihoods(golden_model, changed, mode="diffusion", block_len=32)
    mask_id = golden_model.args.mask_token_id
    logits = golden_model(mx.array([context + [mask_id] * 3]), mask=block_causal_mask(8, 32))[
        0
    ].astype(mx.float32)
    logits[:, mask_id] = -mx.inf
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    # the middle token is the only change, so the difference is its own log-prob change
    assert with_answer - other == pytest.approx((logp[6, 21] - logp[6, 250]).item(), abs=1e-4)


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_batching_and_padding_do_not_change_scores(golden_model, mode):
    pairs = random_pairs(2, count=9)
    one = loglikelihoods(golden_model, pairs, mode=mode, batch_size=1, block_len=8)
    many = loglikelihoods(golden_model, pairs, mode=mode, batch_size=9, block_len=8)
    assert_scores_equal(many, one)


def test_long_context_keeps_its_last_tokens(golden_model):
    context, continuation = list(range(1, 40)), [50, 60, 70]
    [(score, _)] = loglikelihoods(golden_model, [(context, continuation)], max_length=12)
    kept = (context + continuation)[-13:]
    want, _ = direct_ar(golden_model, kept[:-3], kept[-3:])
    assert score == pytest.approx(want, abs=1e-4)


def test_diffusion_and_ar_scores_differ(golden_model):
    pairs = random_pairs(3, count=2)
    ar = loglikelihoods(golden_model, pairs, mode="ar")
    diffusion = loglikelihoods(golden_model, pairs, mode="diffusion")
    assert all(not math.isclose(a, d, abs_tol=1e-3) for (a, _), (d, _) in zip(ar, diffusion))


@pytest.mark.parametrize(
    "pairs, options, message",
    [
        ([([1, 2], [])], {}, "continuation is empty"),
        ([([], [3])], {"mode": "ar"}, "at least one context token"),
        ([([1], [3] * 5)], {"max_length": 4}, "more than max_length 4"),
        ([([1], [3])], {"mode": "spec"}, "mode must be one of ar, diffusion"),
        ([([1], [3])], {"mode": "diffusion", "block_len": 0}, "block_len must be >= 1"),
    ],
)
def test_bad_requests_name_the_problem(golden_model, pairs, options, message):
    with pytest.raises(ValueError, match=message):
        loglikelihoods(golden_model, pairs, **options)


class CountingModel:
    """The model, counting its forwards."""

    def __init__(self, model):
        self.model, self.args, self.calls = model, model.args, 0

    def __call__(self, inputs, mask=None):
        self.calls += 1
        return self.model(inputs, mask=mask)


@pytest.mark.parametrize(
    "mode, answers, forwards",
    [("ar", [[12], [250], [3, 4]], 2), ("diffusion", [[12], [250], [3, 4], [5, 6]], 2)],
)
def test_choices_with_the_same_inputs_share_a_forward(golden_model, mode, answers, forwards):
    question = [9, 8, 7, 6, 5]
    model = CountingModel(golden_model)
    pairs = [(question, answer) for answer in answers]
    scores = loglikelihoods(model, pairs, mode=mode, batch_size=1)
    assert model.calls == forwards
    if mode == "ar":
        want = [direct_ar(golden_model, c, x) for c, x in pairs]
    else:
        want = [direct_diffusion(golden_model, c, x, 32) for c, x in pairs]
    assert_scores_equal(scores, want)
