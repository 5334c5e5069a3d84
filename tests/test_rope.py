"""RoPE frequencies: YaRN against transformers' own computation, and a YaRN checkpoint end to end.

transformers' ``_compute_yarn_parameters`` is written with torch tensor calls; when
torch is not installed it runs here on a small numpy stand-in for the four torch
functions it uses (arange, clamp, ``.to``, the float dtype), so the arithmetic is
transformers' own.
"""

import types

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model
from test_model_reference import TINY, random_weights, reference_logits, write_checkpoint

from optiq_dhara.rope import rope_parameters

ORIGINAL = "original_max_position_embeddings"
YARN_CASES = [
    {"type": "yarn", "factor": 4.0, ORIGINAL: 8192},
    {"rope_type": "yarn", "factor": 16.0, ORIGINAL: 4096, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 8.0, ORIGINAL: 2048, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 2.0, ORIGINAL: 1024, "attention_factor": 1.5},
    {"rope_type": "yarn", "factor": 32.0, ORIGINAL: 4096, "truncate": False},
]


class _Tensor(np.ndarray):
    def to(self, device=None, dtype=None):
        return self.astype(np.float32).view(_Tensor)


_TORCH_STANDIN = types.SimpleNamespace(
    float=np.float32,
    float32=np.float32,
    arange=lambda *args, dtype=None, **_: np.arange(*args, dtype=dtype or np.int64).view(_Tensor),
    clamp=lambda x, low, high: np.clip(x, low, high).view(_Tensor),
)


@pytest.fixture
def transformers_yarn(monkeypatch):
    """(head_dim, theta, rope_scaling) -> (inv_freq, attention_factor), by transformers."""
    from transformers import LlamaConfig
    from transformers import modeling_rope_utils as rope_utils

    try:
        import torch  # noqa: F401
    except ImportError:
        monkeypatch.setattr(rope_utils, "torch", _TORCH_STANDIN, raising=False)

    def compute(head_dim: int, theta: float, scaling: dict):
        config = LlamaConfig(
            hidden_size=head_dim * 4,
            num_attention_heads=4,
            head_dim=head_dim,
            max_position_embeddings=int(
                scaling["factor"] * scaling["original_max_position_embeddings"]
            ),
            rope_theta=theta,
            rope_scaling=dict(scaling),
        )
        inv_freq, factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](config, None)
        return np.asarray(inv_freq, dtype=np.float64), float(factor)

    return compute


@pytest.mark.parametrize("scaling", YARN_CASES)
@pytest.mark.parametrize("head_dim,theta", [(64, 8_000_000.0), (16, 10_000.0), (128, 500_000.0)])
def test_yarn_matches_transformers(transformers_yarn, scaling, head_dim, theta):
    expected_freq, expected_factor = transformers_yarn(head_dim, theta, scaling)
    inv_freq, factor = rope_parameters(head_dim, theta, scaling)
    assert inv_freq.dtype == mx.float32
    assert np.allclose(np.array(inv_freq), expected_freq, rtol=2e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_yarn_changes_the_frequencies():
    plain, one = rope_parameters(64, 8_000_000.0)
    yarn, factor = rope_parameters(64, 8_000_000.0, YARN_CASES[0])
    assert one == 1.0 and factor > 1.0
    assert not np.allclose(np.array(plain), np.array(yarn))


def test_yarn_without_original_length_takes_max_position_embeddings():
    scaling = {"rope_type": "yarn", "factor": 4.0}
    freq, _ = rope_parameters(64, 10_000.0, scaling, max_position_embeddings=8192)
    explicit = {**scaling, "original_max_position_embeddings": 8192}
    expected, _ = rope_parameters(64, 10_000.0, explicit)
    assert np.array_equal(np.array(freq), np.array(expected))


@pytest.mark.parametrize(
    "scaling,message",
    [
        ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 4096}, "'factor'"),
        ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ],
)
def test_bad_rope_scaling_is_named(scaling, message):
    with pytest.raises(ValueError, match=message):
        rope_parameters(64, 10_000.0, scaling)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_yarn_checkpoint_loads_and_matches_reference(tmp_path, transformers_yarn, qk_norm):
    """No inv_freq in the checkpoint: YaRN frequencies and attention factor, as
    transformers computes them, in the reference forward. Without QK-norm the
    attention factor reaches the logits (QK-norm after RoPE cancels it)."""
    scaling = YARN_CASES[2]
    config = {**TINY, "rope_scaling": scaling, "use_qk_norm": qk_norm, "rope_theta": 500.0}
    weights = random_weights(config, inv_freq=False)
    model, _ = load_model(write_checkpoint(tmp_path / "yarn", config, weights))
    ids = np.random.default_rng(3).integers(0, TINY["vocab_size"], (1, 16))
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    inv_freq, factor = transformers_yarn(head_dim, 500.0, scaling)
    expected = reference_logits(config, weights, ids, inv_freq=inv_freq, attention_factor=factor)
    logits = np.array(model(mx.array(ids)))
    assert np.abs(logits - expected).max() < 2e-4
    plain = reference_logits(config, weights, ids, inv_freq=inv_freq)
    if not qk_norm:
        assert np.abs(plain - expected).max() > 1e-2


def test_yarn_without_factor_takes_the_length_ratio():
    scaling = {"rope_type": "yarn", "original_max_position_embeddings": 4096}
    freq, attention = rope_parameters(64, 10_000.0, scaling, max_position_embeddings=16384)
    expected, expected_attention = rope_parameters(64, 10_000.0, {**scaling, "factor": 4.0})
    assert np.array_equal(np.array(freq), np.array(expected)) and attention == expected_attention
