"""An independent numpy forward of dhara, written from SPEC.md alone, and checkpoints for it.

The config-switch and YaRN tests compare the port with this reference. It shares
no code with ``optiq_dhara``: explicit loops for the canon convs and attention,
float64 throughout, PyTorch weight layout as stored. That it reproduces the
golden logits (the tests below) is what makes it a reference.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

# SPEC.md's table: the value of a key that config.json leaves out.
SPEC_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 32,
    "intermediate_size": 2176,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": None,
    "vocab_size": 49155,
    "mask_token_id": 49152,
    "rms_norm_eps": 1e-6,
    "rope_theta": 8_000_000.0,
    "tie_word_embeddings": True,
    "use_qk_norm": True,
    "use_logit_softcap": True,
    "logit_softcap": 30.0,
    "canon_set": "ABCD",
    "canon_kernel": 4,
    "canon_residual": True,
    "canon_activation": False,
    "canon_bias": False,
}

TINY = {
    "model_type": "dhara_ar",
    "architectures": ["DharaARForCausalLM"],
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "mask_token_id": 63,
    "rope_theta": 10000.0,
}


class Config:
    def __init__(self, config: dict):
        self.raw = config

    def __getattr__(self, key):
        value = self.raw.get(key, SPEC_DEFAULTS[key])
        if key == "head_dim" and value is None:
            return self.hidden_size // self.num_attention_heads
        return value


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def canon(x: np.ndarray, weights: dict, name: str, cfg: Config) -> np.ndarray:
    """x [B, L, C]; out[t] = x[t] + sum_j w[c, 0, j] x[t - K + 1 + j], zeros before the start."""
    w = weights[f"{name}.conv.weight"]
    kernel = w.shape[-1]
    batch, length, channels = x.shape
    padded = np.concatenate([np.zeros((batch, kernel - 1, channels)), x], axis=1)
    y = np.zeros_like(x)
    for t in range(length):
        for j in range(kernel):
            y[:, t] += w[:, 0, j] * padded[:, t + j]
    if cfg.canon_bias:
        y = y + weights[f"{name}.conv.bias"]
    if cfg.canon_activation:
        y = silu(y)
    return x + y if cfg.canon_residual else y


def rope(x: np.ndarray, inv_freq: np.ndarray, factor: float) -> np.ndarray:
    """Rotate-half RoPE of x [B, H, L, D] at positions 0..L-1."""
    half = x.shape[-1] // 2
    angles = np.arange(x.shape[2])[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles) * factor, np.sin(angles) * factor
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k, v, mask: np.ndarray) -> np.ndarray:
    """Per head, explicitly: q [B, H, L, D], k/v [B, Hkv, L, D] (GQA), mask [L, L] bool."""
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q)
    for head in range(heads):
        scores = q[:, head] @ k[:, head // group].transpose(0, 2, 1) / np.sqrt(dim)
        scores = np.where(mask, scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, head] = (scores / scores.sum(axis=-1, keepdims=True)) @ v[:, head // group]
    return out


def reference_logits(
    config: dict,
    weights: dict,
    ids: np.ndarray,
    mask: Optional[np.ndarray] = None,
    inv_freq: Optional[np.ndarray] = None,
    attention_factor: float = 1.0,
) -> np.ndarray:
    """Logits [B, L, V] in float64. ``inv_freq`` stands in for layers without a buffer."""
    cfg = Config(config)
    w = {key: np.asarray(value, dtype=np.float64) for key, value in weights.items()}
    batch, length = ids.shape
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if mask is None:
        mask = np.tril(np.ones((length, length), dtype=bool))
    if inv_freq is None:
        inv_freq = cfg.rope_theta ** (-np.arange(0, dim, 2) / dim)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        if "A" in cfg.canon_set:
            a = canon(a, w, p + "canon_a", cfg)
        q, k, v = (a @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        if "B" in cfg.canon_set:
            q, k, v = (
                canon(t, w, p + f"self_attn.canon_b_{n}", cfg) for t, n in zip((q, k, v), "qkv")
            )
        q = q.reshape(batch, length, heads, dim).transpose(0, 2, 1, 3)
        k = k.reshape(batch, length, kv_heads, dim).transpose(0, 2, 1, 3)
        v = v.reshape(batch, length, kv_heads, dim).transpose(0, 2, 1, 3)
        layer_freq = w.get(p + "self_attn.rotary_emb.inv_freq", inv_freq)
        q, k = rope(q, layer_freq, attention_factor), rope(k, layer_freq, attention_factor)
        if cfg.use_qk_norm:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
        o = attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(batch, length, heads * dim)
        h = x + o @ w[p + "self_attn.o_proj.weight"].T
        c = rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if "C" in cfg.canon_set:
            c = canon(c, w, p + "canon_c", cfg)
        u = silu(c @ w[p + "mlp.gate_proj.weight"].T) * (c @ w[p + "mlp.up_proj.weight"].T)
        if "D" in cfg.canon_set:
            u = canon(u, w, p + "mlp.canon_d", cfg)
        x = h + u @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    logits = x @ head.T
    if cfg.use_logit_softcap and cfg.logit_softcap:
        logits = cfg.logit_softcap * np.tanh(logits / cfg.logit_softcap)
    return logits


def random_weights(config: dict, seed: int = 0, inv_freq: bool = True) -> dict[str, np.ndarray]:
    """float32 weights of ``config`` in the Hugging Face layout (convs (C, 1, K))."""
    cfg = Config(config)
    rng = np.random.default_rng(seed)
    hidden, inter, dim = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_width, kv_width = cfg.num_attention_heads * dim, cfg.num_key_value_heads * dim

    def matrix(rows, cols):
        return rng.normal(0, 1 / np.sqrt(cols), (rows, cols)).astype(np.float32)

    def norm(size):
        return (1 + 0.1 * rng.normal(size=size)).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": rng.normal(0, 1, (cfg.vocab_size, hidden)).astype(np.float32),
        "model.norm.weight": norm(hidden),
    }
    if not cfg.tie_word_embeddings:
        weights["lm_head.weight"] = matrix(cfg.vocab_size, hidden)
    sites = {
        "canon_a": ("A", hidden),
        "self_attn.canon_b_q": ("B", q_width),
        "self_attn.canon_b_k": ("B", kv_width),
        "self_attn.canon_b_v": ("B", kv_width),
        "canon_c": ("C", hidden),
        "mlp.canon_d": ("D", inter),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm(hidden)
        weights[p + "post_attention_layernorm.weight"] = norm(hidden)
        weights[p + "self_attn.q_proj.weight"] = matrix(q_width, hidden)
        weights[p + "self_attn.k_proj.weight"] = matrix(kv_width, hidden)
        weights[p + "self_attn.v_proj.weight"] = matrix(kv_width, hidden)
        weights[p + "self_attn.o_proj.weight"] = matrix(hidden, q_width)
        weights[p + "mlp.gate_proj.weight"] = matrix(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = matrix(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = matrix(hidden, inter)
        if cfg.use_qk_norm:
            weights[p + "self_attn.q_norm.weight"] = norm(dim)
            weights[p + "self_attn.k_norm.weight"] = norm(dim)
        if inv_freq:  # per layer and not the theta formula, as in the golden checkpoint
            freq = np.sort(rng.uniform(0.001, 1.0, dim // 2))[::-1].astype(np.float32)
            weights[p + "self_attn.rotary_emb.inv_freq"] = freq
        for site, (letter, channels) in sites.items():
            if letter in cfg.canon_set:
                shape = (channels, 1, cfg.canon_kernel)
                weights[p + site + ".conv.weight"] = rng.normal(0, 0.5, shape).astype(np.float32)
                if cfg.canon_bias:
                    bias = rng.normal(0, 0.1, channels).astype(np.float32)
                    weights[p + site + ".conv.bias"] = bias
    return weights


def write_checkpoint(path: Path, config: dict, weights: dict, dtype: mx.Dtype = mx.float32) -> Path:
    """A Hugging Face layout directory: config.json and model.safetensors (inv_freq float32)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    arrays = {
        key: mx.array(value) if key.endswith("inv_freq") else mx.array(value).astype(dtype)
        for key, value in weights.items()
    }
    mx.save_safetensors(str(path / "model.safetensors"), arrays)
    return path


def golden_weights(golden_dir: Path) -> tuple[dict, dict]:
    config = json.loads((golden_dir / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(golden_dir / "model.safetensors")).items()}
    return config, weights


def test_reference_reproduces_golden_ar_logits(golden_dir, golden):
    config, weights = golden_weights(golden_dir)
    logits = reference_logits(config, weights, np.array(golden["ids_a"]))
    assert np.abs(logits - np.array(golden["ar_logits"])).max() < 1e-4


def test_reference_reproduces_golden_block_logits(golden_dir, golden):
    config, weights = golden_weights(golden_dir)
    ids = np.array(golden["ids_b"])[None]
    positions = np.arange(ids.shape[1])
    mask = positions[None, :] // 8 <= positions[:, None] // 8
    logits = reference_logits(config, weights, ids, mask=mask)[0]
    assert np.abs(logits - np.array(golden["block_logits_bl8"])).max() < 1e-4
