"""Batched AR equals decoding each prompt alone."""

import pytest

from optiq_dhara.runtime import generate_batch, generate_ids


@pytest.fixture
def prompts(golden):
    return [golden["prompt_p1"].tolist(), golden["prompt_p2"].tolist(), [5], list(range(30, 60))]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"repetition_penalty": 1.3},
        {"temperature": 0.9, "top_p": 0.9, "min_p": 0.02, "seed": 3},
        {
            "temperature": 1.2,
            "top_k": 40,
            "repetition_penalty": 1.1,
            "seed": 8,
            "stop_ids": [263, 105],
        },
    ],
)
def test_batch_equals_one_by_one(golden_model, prompts, params):
    batch = generate_batch(golden_model, prompts, max_tokens=16, **params)
    assert batch == [generate_ids(golden_model, p, max_tokens=16, **params) for p in prompts]


def test_rows_stop_independently(golden_model, golden, prompts):
    stop = golden["greedy_p1"].tolist()[3]
    batch = generate_batch(golden_model, prompts, max_tokens=16, stop_ids=[stop])
    assert batch[0] == golden["greedy_p1"].tolist()[:4]
    assert max(len(row) for row in batch) == 16


def test_zero_tokens(golden_model, prompts):
    assert generate_batch(golden_model, prompts, max_tokens=0) == [[], [], [], []]


@pytest.mark.parametrize(
    "batch, kwargs, message",
    [
        ([], {}, "prompts is empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 2], [3, 999]], {}, "prompt 1 has token id 999 outside the vocabulary"),
        ([[1]], {"max_tokens": -3}, "max_tokens must be >= 0"),
        ([[1]], {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ],
)
def test_bad_batches_raise(golden_model, batch, kwargs, message):
    with pytest.raises(ValueError) as error:
        generate_batch(golden_model, batch, **{"max_tokens": 4, **kwargs})
    assert message in str(error.value)
