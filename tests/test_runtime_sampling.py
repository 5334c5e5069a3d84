"""Sampling: the filters, the (seed, position) randomness, and spec == AR for the same seed."""

import math
import re

import mlx.core as mx
import numpy as np
import pytest

from optiq_dhara.runtime import generate_ids
from optiq_dhara.runtime.sampling import (
    Sampling,
    adjust_logits,
    choose,
    filtered_logprobs,
    token_counts,
)

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
    seen = token_counts([0, 1, 1], prompt_length=1, vocab_size=4)  # prompt and output count
    out = adjust_logits(logits, seen, Sampling(repetition_penalty=2.0), mask_id=3)[0].tolist()
    assert out == [1.0, -4.0, 1.0, -math.inf]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """OpenAI's rule: logit -= presence * (count > 0) + frequency * count, count over the
    generated tokens (token 0 is in the prompt only and keeps its logit)."""
    counts = token_counts([0, 1, 2, 2], prompt_length=1, vocab_size=5)
    sampling = Sampling(presence_penalty=0.5, frequency_penalty=0.25)
    out = adjust_logits(mx.ones((1, 5)), counts, sampling, mask_id=None)[0].tolist()
    assert out == [1.0, 0.25, 0.0, 1.0, 1.0]


def test_logit_bias_adds_to_logits_but_never_unmasks():
    sampling = Sampling(logit_bias=((0, -100.0), (2, 1.5), (3, 100.0)))
    out = adjust_logits(mx.zeros((1, 4)), None, sampling, mask_id=3)[0].tolist()
    assert out == [-100.0, 0.0, 1.5, -math.inf]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
        (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2]"),
        (dict(logit_bias={5: 101.0}), "logit_bias maps token ids"),
        (dict(logit_bias={-1: 1.0}), "logit_bias maps token ids"),
        (dict(logprobs=-1), "logprobs must be >= 0"),
    ],
)
def test_bad_penalties_bias_and_logprobs_are_refused(golden_model, golden, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_ids(golden_model, golden["prompt_p1"].tolist(), max_tokens=2, **kwargs)


def test_a_logit_bias_outside_the_vocabulary_is_refused(golden_model, golden):
    vocab = golden_model.args.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} outside the vocabulary"):
        generate_ids(
            golden_model, golden["prompt_p1"].tolist(), max_tokens=2, logit_bias={vocab: 1}
        )


def reference_penalized(model, prompt, steps, presence, frequency, bias):
    """Greedy AR by full forwards, the penalties applied by hand in numpy."""
    out = []
    for _ in range(steps):
        logits = np.array(model(mx.array([prompt + out]))[0, -1].astype(mx.float32))
        for token in set(out):
            logits[token] -= presence + frequency * out.count(token)
        for token, value in bias.items():
            logits[token] += value
        logits[model.args.mask_token_id] = -np.inf
        out.append(int(np.argmax(logits)))
    return out


def test_penalties_and_bias_match_a_reference_in_every_causal_mode(golden_model, golden):
    prompt = golden["prompt_p1"].tolist()
    plain = generate_ids(golden_model, prompt, max_tokens=12)
    bias = {plain[0]: -100.0, plain[3]: 3.0}
    options = dict(presence_penalty=0.7, frequency_penalty=0.5, logit_bias=bias)
    expected = reference_penalized(golden_model, prompt, 12, 0.7, 0.5, bias)
    assert expected != plain
    assert generate_ids(golden_model, prompt, max_tokens=12, **options) == expected
    for k in (3, 8):
        spec = generate_ids(golden_model, prompt, mode="spec", k=k, max_tokens=12, **options)
        assert spec == expected, k


def test_a_banned_token_never_appears_in_any_mode(golden_model, golden):
    prompt = golden["prompt_p1"].tolist()
    for mode in ("ar", "spec", "diffusion"):
        plain = generate_ids(golden_model, prompt, mode=mode, max_tokens=16, block_len=8)
        banned = max(set(plain), key=plain.count)
        out = generate_ids(
            golden_model, prompt, mode=mode, max_tokens=16, block_len=8, logit_bias={banned: -100}
        )
        assert banned not in out and out != plain, mode


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
    dict(temperature=0.8, presence_penalty=0.6, frequency_penalty=0.4, logit_bias={7: 2.0}),
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
