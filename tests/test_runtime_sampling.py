"""Sampling: the filters, the (seed, position) randomness, and spec == AR for the same seed."""

import math

import mlx.core as mx
import pytest

from optiq_dhara.runtime import generate_ids
from optiq_dhara.runtime.sampling import Sampling, adjust_logits, choose, filtered_logprobs

PROBS = [0.5, 0.25, 0.15, 0.1]
LOGITS = mx.log(mx.array([PROBS]))


def kept(sampling: Sampling) -> list[int]:
    logprobs = filtered_logprobs(LOGITS, sampling)[0]
    return [i for i, value in enumerate(logprobs.tolist()) if value > -math.inf]


@pytest.mark.parametrize(
    "sampling, expected",
    [
        (Sampling(temperature=1.0), [0, 1, 2, 3]),
        (Sampling(temperature=1.0, top_k=2), [0, 1]),
        (Sampling(temperature=1.0, top_p=0.5), [0]),
        (Sampling(temperature=1.0, top_p=0.6), [0, 1]),
        (Sampling(temperature=1.0, top_p=0.8), [0, 1, 2]),
        (Sampling(temperature=1.0, min_p=0.4), [0, 1]),
        (Sampling(temperature=1.0, min_p=0.25), [0, 1, 2]),
        (Sampling(temperature=1.0, top_p=0.8), [0, 1, 2]),
        (Sampling(temperature=1.0, top_k=3, top_p=0.8), [0, 1]),  # top-p of the renormalized top 3
    ],
)
def test_filters_keep_the_right_tokens(sampling, expected):
    assert kept(sampling) == expected
    total = mx.exp(filtered_logprobs(LOGITS, sampling)).sum().item()
    assert total == pytest.approx(1.0, abs=1e-6)


def test_temperature_sharpens():
    hot = mx.exp(filtered_logprobs(LOGITS, Sampling(temperature=2.0)))[0].tolist()
    cold = mx.exp(filtered_logprobs(LOGITS, Sampling(temperature=0.5)))[0].tolist()
    assert cold[0] > PROBS[0] > hot[0]


def test_adjust_suppresses_mask_and_penalizes_seen_tokens():
    logits = mx.array([[2.0, -2.0, 1.0, 3.0]])
    seen = mx.array([True, True, False, False])
    out = adjust_logits(logits, seen, Sampling(repetition_penalty=2.0), mask_id=3)[0].tolist()
    assert out == [1.0, -4.0, 1.0, -math.inf]


def test_draws_follow_the_distribution():
    """Gumbel-max with the (seed, position) keys samples the filtered distribution."""
    n = 4000
    tokens = choose(mx.repeat(LOGITS, n, axis=0), Sampling(temperature=1.0, seed=7), range(n))
    counts = [(tokens == i).sum().item() / n for i in range(4)]
    for count, prob in zip(counts, PROBS):
        assert abs(count - prob) < 0.03


def test_draws_depend_on_seed_and_position_only():
    sampling = Sampling(temperature=1.0, seed=11)
    logits = mx.zeros((6, 50))
    once = choose(logits, sampling, [5, 6, 7, 8, 9, 10]).tolist()
    singly = [choose(logits[:1], sampling, [p]).item() for p in range(5, 11)]
    assert once == singly
    other_seed = choose(logits, Sampling(temperature=1.0, seed=12), range(5, 11)).tolist()
    assert once != other_seed


SAMPLED = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9, repetition_penalty=1.15),
    dict(temperature=1.2, top_k=20, min_p=0.05),
]


@pytest.mark.parametrize("params", SAMPLED)
def test_spec_sampling_equals_ar_sampling(golden_model, golden, params):
    """For every seed, self-speculation draws exactly AR's tokens."""
    prompt = golden["prompt_p1"].tolist()
    for seed in range(6):
        ar = generate_ids(golden_model, prompt, max_tokens=12, seed=seed, **params)
        for k in (3, 8):
            spec = generate_ids(
                golden_model, prompt, mode="spec", k=k, max_tokens=12, seed=seed, **params
            )
            assert spec == ar, (seed, k)


def test_seeded_runs_repeat_and_seeds_differ(golden_model, golden):
    prompt = golden["prompt_p1"].tolist()
    runs = [
        generate_ids(golden_model, prompt, max_tokens=16, temperature=1.0, seed=s)
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_unseeded_runs_follow_mlx_global_seed(golden_model, golden):
    prompt = golden["prompt_p1"].tolist()
    outs = []
    for _ in range(2):
        mx.random.seed(5)
        outs.append(generate_ids(golden_model, prompt, max_tokens=16, temperature=1.0))
    assert outs[0] == outs[1]


def test_top_k_one_is_greedy(golden_model, golden):
    prompt = golden["prompt_p1"].tolist()
    out = generate_ids(golden_model, prompt, max_tokens=20, temperature=1.5, top_k=1, seed=4)
    assert out == golden["greedy_p1"].tolist()[:20]
