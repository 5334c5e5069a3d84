"""The port reproduces the independent reference's float32 logits."""

import mlx.core as mx
import pytest

TOLERANCE = 1e-5


def block_causal(length: int, block_len: int) -> mx.array:
    positions = mx.arange(length)
    return (positions[None, :] // block_len) <= (positions[:, None] // block_len)


def test_ar_logits_match_golden(golden_model, golden):
    logits = golden_model(golden["ids_a"])
    assert mx.abs(logits - golden["ar_logits"]).max().item() <= TOLERANCE


@pytest.mark.parametrize("block_len", [8, 16])
def test_block_diffusion_logits_match_golden(golden_model, golden, block_len):
    ids = golden["ids_b"]
    logits = golden_model(ids[None], mask=block_causal(ids.size, block_len))[0]
    expected = golden[f"block_logits_bl{block_len}"]
    assert mx.abs(logits - expected).max().item() <= TOLERANCE


def suppress_mask(mask_id: int):
    """mlx-lm logits processor: the MASK token is never predicted."""

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[:, mask_id] = -mx.inf
        return logits

    return processor


def greedy_with_mlx_lm(model, prompt: mx.array, processors: list, max_tokens: int) -> list[int]:
    from mlx_lm.generate import generate_step

    steps = generate_step(prompt, model, max_tokens=max_tokens, logits_processors=processors)
    return [token for token, _ in steps]


def test_greedy_matches_golden_through_mlx_lm(golden_model, golden, golden_settings):
    expected = golden["greedy_p1"].tolist()
    mask_id = golden_settings["mask_token_id"]
    processors = [suppress_mask(mask_id)]
    tokens = greedy_with_mlx_lm(golden_model, golden["prompt_p1"], processors, len(expected))
    assert tokens == expected


def test_greedy_rep13_matches_golden_through_mlx_lm(golden_model, golden, golden_settings):
    """mlx-lm's penalty is SPEC's (l/p if l > 0 else l*p; at 0 both give 0) over
    its context window; a window covering prompt + generated is SPEC's "tokens seen"."""
    from mlx_lm.sample_utils import make_repetition_penalty

    expected = golden["greedy_p1_rep13"].tolist()
    prompt = golden["prompt_p1"]
    window = prompt.size + len(expected)
    processors = [
        suppress_mask(golden_settings["mask_token_id"]),
        make_repetition_penalty(1.3, window),
    ]
    assert greedy_with_mlx_lm(golden_model, prompt, processors, len(expected)) == expected


def test_greedy_rep13_matches_golden_with_a_plain_loop(golden_model, golden, golden_settings):
    """SPEC's formula written out, independent of mlx-lm's processor."""
    import numpy as np

    expected = golden["greedy_p1_rep13"].tolist()
    mask_id = golden_settings["mask_token_id"]
    cache = golden_model.make_cache()
    seen = golden["prompt_p1"].tolist()
    inputs = golden["prompt_p1"]
    generated = []
    for _ in expected:
        logits = np.array(golden_model(inputs[None], cache=cache)[0, -1])
        for token in set(seen):
            value = logits[token]
            logits[token] = value / 1.3 if value > 0 else value * 1.3
        logits[mask_id] = -np.inf
        token = int(np.argmax(logits))
        generated.append(token)
        seen.append(token)
        inputs = mx.array([token])
    assert generated == expected
