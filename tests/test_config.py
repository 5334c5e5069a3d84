"""Every config switch of SPEC.md, loaded through mlx-lm and checked against the numpy reference.

Each case writes a random Hugging Face layout checkpoint, loads it with
``mlx_lm.utils.load_model``, compares the float32 logits with
``test_model_reference.reference_logits``, and checks that decoding in chunks
through the cache gives the full forward's logits.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model
from test_model_reference import TINY, random_weights, reference_logits, write_checkpoint

IDS = np.random.default_rng(7).integers(0, TINY["vocab_size"] - 1, (2, 11))

SWITCHES = {
    "spec defaults": {},
    "canon none": {"canon_set": ""},
    "canon A": {"canon_set": "A"},
    "canon B": {"canon_set": "B"},
    "canon C": {"canon_set": "C"},
    "canon D": {"canon_set": "D"},
    "canon BD": {"canon_set": "BD"},
    "canon ACD": {"canon_set": "ACD"},
    "canon DCBA order": {"canon_set": "DCBA"},
    "kernel 1": {"canon_kernel": 1},
    "kernel 2": {"canon_kernel": 2},
    "kernel 4": {"canon_kernel": 4},
    "residual off": {"canon_residual": False},
    "activation on": {"canon_activation": True},
    "bias on": {"canon_bias": True},
    "bias activation no residual": {
        "canon_bias": True,
        "canon_activation": True,
        "canon_residual": False,
    },
    "qk-norm off": {"use_qk_norm": False},
    "soft-cap off": {"use_logit_softcap": False},
    "soft-cap 0": {"logit_softcap": 0.0},
    "soft-cap 5": {"logit_softcap": 5.0},
    "untied head": {"tie_word_embeddings": False},
    "MHA": {"num_key_value_heads": 4},
    "GQA 2": {"num_key_value_heads": 2},
    "GQA 4": {"num_key_value_heads": 1},
    "GQA 4 of 8 heads": {"num_attention_heads": 8, "num_key_value_heads": 2},
    "head_dim 16 != 32/4": {"head_dim": 16},
    "head_dim 4": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4},
}


def load(tmp_path, config: dict, weights: dict, dtype=mx.float32):
    model, _ = load_model(write_checkpoint(tmp_path / "ckpt", config, weights, dtype))
    return model


@pytest.mark.parametrize("switch", SWITCHES)
def test_switch_matches_reference(tmp_path, switch):
    config = {**TINY, **SWITCHES[switch]}
    weights = random_weights(config)
    model = load(tmp_path, config, weights)
    logits = np.array(model(mx.array(IDS)))
    assert np.abs(logits - reference_logits(config, weights, IDS)).max() < 2e-4


CACHED = ["spec defaults", "canon none", "canon BD", "kernel 1", "kernel 2", "GQA 4"]


@pytest.mark.parametrize("switch", CACHED + ["bias activation no residual"])
def test_switch_decodes_in_chunks_like_the_full_forward(tmp_path, switch):
    config = {**TINY, **SWITCHES[switch]}
    model = load(tmp_path, config, random_weights(config))
    ids = mx.array(IDS)
    full = model(ids)
    cache = model.make_cache()
    chunks, start = [], 0
    for size in (4, 1, 1, 3, 2):
        chunks.append(model(ids[:, start : start + size], cache=cache))
        start += size
    assert np.abs(np.array(mx.concatenate(chunks, axis=1) - full)).max() < 1e-5


def test_inv_freq_absent_uses_the_theta_formula(tmp_path):
    config = {**TINY, "rope_theta": 500.0}
    weights = random_weights(config, inv_freq=False)
    model = load(tmp_path, config, weights)
    logits = np.array(model(mx.array(IDS)))
    assert np.abs(logits - reference_logits(config, weights, IDS)).max() < 2e-4
    dim = config["hidden_size"] // config["num_attention_heads"]
    expected = 500.0 ** (-np.arange(0, dim, 2) / dim)
    for layer in model.layers:
        assert np.allclose(np.array(layer.self_attn.rotary_emb.inv_freq), expected, rtol=1e-6)


def test_inv_freq_present_is_used_per_layer(tmp_path):
    config = dict(TINY)
    weights = random_weights(config)
    model = load(tmp_path, config, weights)
    for i, layer in enumerate(model.layers):
        stored = weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"]
        assert np.array_equal(np.array(layer.self_attn.rotary_emb.inv_freq), stored)
    first, second = (weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] for i in (0, 1))
    assert not np.array_equal(first, second)


def test_tied_head_drops_a_stray_lm_head(tmp_path):
    config = dict(TINY)
    weights = random_weights(config)
    weights["lm_head.weight"] = np.ones((TINY["vocab_size"], TINY["hidden_size"]), np.float32)
    model = load(tmp_path, config, weights)
    assert "lm_head" not in model
    logits = np.array(model(mx.array(IDS)))
    assert np.abs(logits - reference_logits(config, weights, IDS)).max() < 2e-4


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_checkpoint_dtypes(tmp_path, dtype):
    """The weights keep the checkpoint's dtype (inv_freq stays float32) and the
    forward matches the reference computed from the same rounded weights."""
    config = dict(TINY)
    weights = random_weights(config)
    model = load(tmp_path, config, weights, dtype)
    assert model.model.embed_tokens.weight.dtype == dtype
    assert model.layers[0].canon_a.conv.weight.dtype == dtype
    assert model.layers[0].self_attn.rotary_emb.inv_freq.dtype == mx.float32
    rounded = {
        k: v if k.endswith("inv_freq") else np.array(mx.array(v).astype(dtype).astype(mx.float32))
        for k, v in weights.items()
    }
    expected = reference_logits(config, rounded, IDS)
    logits = model(mx.array(IDS))
    assert logits.dtype == dtype
    tolerance = {mx.float32: 2e-4, mx.bfloat16: 0.5, mx.float16: 0.1}[dtype]
    assert np.abs(np.array(logits.astype(mx.float32)) - expected).max() < tolerance
    model.set_dtype(mx.float32)
    assert np.abs(np.array(model(mx.array(IDS))) - expected).max() < 2e-4


def test_unknown_canon_letters_are_rejected(tmp_path):
    config = {**TINY, "canon_set": "ABXD"}
    weights = random_weights({**TINY})
    with pytest.raises(ValueError, match=r"canon_set 'ABXD' has unknown letters 'X'"):
        load(tmp_path, config, weights)
