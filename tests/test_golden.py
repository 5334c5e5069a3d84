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
