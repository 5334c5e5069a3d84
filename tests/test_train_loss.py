"""The joint loss equals a plain, block-by-block computation of its definition."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from optiq_dhara.masks import block_causal_mask, causal_mask
from optiq_dhara.train.loss import Noise, joint_loss, sample_noise

BLOCK = 8


def direct_joint_loss(model, tokens, loss_mask, noise: Noise, weight: float, block: int):
    """SPEC's joint loss written out: for every sequence and block, one forward of
    [clean tokens before the block, the noisy block] with the block bidirectional
    and the clean tokens causal or block-causal, as the noise draws."""
    mask_id = model.args.mask_token_id
    batch, length = tokens.shape
    logits = model(tokens)
    ce = nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:])
    targets = loss_mask[:, 1:]
    ar = (ce * targets).sum() / targets.sum()

    blocks = -(-length // block)
    padded = mx.pad(tokens, [(0, 0), (0, blocks * block - length)], constant_values=mask_id)
    trained = mx.pad(loss_mask, [(0, 0), (0, blocks * block - length)])
    total = mx.array(0.0)
    for i in range(batch):
        for b in range(blocks):
            span = slice(b * block, (b + 1) * block)
            masked = noise.masked[i, span] & trained[i, span]
            noisy = mx.where(masked, mask_id, padded[i, span])
            sequence = mx.concatenate([padded[i, : b * block], noisy])[None]
            context = (
                block_causal_mask(b * block, block)
                if noise.block_context[i, b].item()
                else causal_mask(b * block)
            )
            prefix = mx.concatenate([context, mx.zeros((b * block, block), dtype=mx.bool_)], axis=1)
            attend = mx.concatenate([prefix, mx.ones((block, (b + 1) * block), dtype=mx.bool_)])
            block_logits = model(sequence, mask=attend)[0, b * block :]
            block_ce = nn.losses.cross_entropy(block_logits, padded[i, span])
            total = total + (block_ce * masked).sum() / noise.rate[i, b]
    diffusion = total / loss_mask.sum()
    return ar, diffusion, ar + weight * diffusion


def _case(length: int, prompt: int, seed: int, block_context: float = 0.0):
    tokens = mx.random.randint(0, 300, (2, length), key=mx.random.key(seed))
    positions = np.arange(length)[None]
    loss_mask = mx.array(positions >= np.array([[0], [prompt]]))
    blocks = -(-length // BLOCK)
    noise = sample_noise(
        (2, blocks * BLOCK), BLOCK, block_context=block_context, key=mx.random.key(seed + 1)
    )
    return tokens, loss_mask, noise


@pytest.mark.parametrize(
    "length, prompt, block_context",
    [(24, 5, 0.0), (24, 5, 1.0), (32, 0, 0.5), (21, 0, 0.5), (8, 3, 1.0)],
)
def test_joint_loss_equals_direct_computation(golden_model, length, prompt, block_context):
    tokens, loss_mask, noise = _case(length, prompt, length, block_context)
    got = joint_loss(golden_model, tokens, loss_mask, 0.3, BLOCK, noise, block_context)
    ar, diffusion, total = direct_joint_loss(golden_model, tokens, loss_mask, noise, 0.3, BLOCK)
    assert noise.masked.sum().item() > 0
    if block_context == 0.5:  # both contexts occur (blocks after the first)
        assert len(set(np.array(noise.block_context[:, 1:]).ravel().tolist())) == 2
    np.testing.assert_allclose(got.ar.item(), ar.item(), rtol=1e-5)
    np.testing.assert_allclose(got.diffusion.item(), diffusion.item(), rtol=1e-5)
    np.testing.assert_allclose(got.total.item(), total.item(), rtol=1e-5)
    assert got.ar_tokens.item() == loss_mask[:, 1:].sum().item()


def test_concatenated_forward_would_not_be_exact(golden_model):
    """Why two forwards: one forward over [clean ; noisy] lets canon read the noisy
    copy of the previous block, which changes the diffusion logits."""
    length = 16
    tokens, _, noise = _case(length, 0, seed=3)
    noisy = mx.where(noise.masked, golden_model.args.mask_token_id, tokens)
    block = mx.arange(length) // BLOCK
    clean_rows = mx.concatenate([causal_mask(length), mx.zeros((length, length), mx.bool_)], axis=1)
    noisy_rows = mx.concatenate(
        [block[None] < block[:, None], block[None] == block[:, None]], axis=1
    )
    attend = mx.concatenate([clean_rows, noisy_rows])
    concatenated = golden_model(mx.concatenate([tokens, noisy], axis=1), mask=attend)
    tokens_, mask_ = tokens, mx.ones(tokens.shape, mx.bool_)
    _, exact, _ = direct_joint_loss(golden_model, tokens_, mask_, noise, 0.0, BLOCK)
    masked = noise.masked[:, BLOCK:]
    ce = nn.losses.cross_entropy(concatenated[:, length + BLOCK :], tokens[:, BLOCK:])
    first_block = nn.losses.cross_entropy(
        concatenated[:, length : length + BLOCK], tokens[:, :BLOCK]
    )
    weights = noise.masked.astype(mx.float32) / mx.repeat(noise.rate, BLOCK, axis=1)
    joined = mx.concatenate([first_block, ce], axis=1)
    via_concatenation = (joined * weights).sum() / tokens.size
    assert masked.sum().item() > 0
    assert abs(via_concatenation.item() - exact.item()) > 1e-3


def test_ar_objective_runs_the_clean_forward_only(golden_model):
    tokens, loss_mask, _ = _case(24, 5, seed=7)
    got = joint_loss(golden_model, tokens, loss_mask, diffusion_weight=0.0, block_len=BLOCK)
    ar, _, _ = direct_joint_loss(golden_model, tokens, loss_mask, _case(24, 5, 7)[2], 0.0, BLOCK)
    np.testing.assert_allclose(got.total.item(), ar.item(), rtol=1e-5)
    assert got.diffusion.item() == 0.0


def test_noise_rate_is_per_block_and_bounded():
    noise = sample_noise((64, 32 * 8), 32, min_rate=0.01, block_context=0.25, key=mx.random.key(0))
    assert 0.15 < noise.block_context.astype(mx.float32).mean().item() < 0.35
    assert noise.rate.shape == (64, 8)
    assert noise.rate.min().item() >= 0.01 and noise.rate.max().item() <= 1.0
    blocks = noise.masked.reshape(64, 8, 32).astype(mx.float32).mean(axis=-1)
    # Within a block the masking rate follows that block's t.
    assert mx.abs(blocks - noise.rate).mean().item() < 0.1
    assert 0.4 < noise.masked.astype(mx.float32).mean().item() < 0.6


def test_loss_gradient_reaches_every_trained_weight(golden_model):
    tokens, loss_mask, noise = _case(16, 0, seed=11)

    def loss(model):
        return joint_loss(model, tokens, loss_mask, 0.3, BLOCK, noise).total

    grads = dict(tree_flatten(nn.value_and_grad(golden_model, loss)(golden_model)[1]))
    assert not any(key.endswith("inv_freq") for key in grads)
    assert all(mx.abs(g).max().item() > 0 for g in grads.values())
