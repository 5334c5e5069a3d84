"""Checks that make a bad dhara checkpoint fail with a message naming the problem.

mlx-lm's own load errors name a parameter and two shapes in MLX layout; these
name the config.json key that disagrees with the tensors, and the directory or
file that is missing. ``check_weights`` runs inside ``Model.sanitize``, so every
loading path (``mlx_lm.load``, ``mlx_lm.utils.load_model``) gets it.
"""

import json
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

MODEL_TYPE = "dhara_ar"
QUANTIZATION_PARTS = ("scales", "biases")

# What config.json decides the shape (or presence) of a tensor, by name fragment.
CONFIG_KEYS = (
    ("embed_tokens.", "vocab_size, hidden_size"),
    ("lm_head.", "vocab_size, hidden_size, tie_word_embeddings"),
    ("conv.bias", "canon_set, canon_bias"),
    ("conv.weight", "canon_set, canon_kernel, hidden_size, intermediate_size, head_dim"),
    ("_norm.weight", "head_dim, use_qk_norm"),
    ("rotary_emb.", "head_dim"),
    ("mlp.", "hidden_size, intermediate_size"),
    ("self_attn.", "hidden_size, num_attention_heads, num_key_value_heads, head_dim"),
    ("layers.", "num_hidden_layers"),
)


def config_keys(name: str) -> str:
    for fragment, keys in CONFIG_KEYS:
        if fragment in name:
            return keys
    return "hidden_size"


def _quantized_modules(weights: dict[str, mx.array]) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in weights if key.endswith(".scales")}


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Raise ValueError listing every tensor that is missing, unexpected or misshapen.

    ``weights`` are in the model's names and MLX layout (after sanitizing);
    quantized modules (``.scales`` present) are checked for presence only.
    """
    expected = dict(tree_flatten(model.parameters()))
    quantized = _quantized_modules(weights)
    args = model.args
    problems = []
    embedding = weights.get("model.embed_tokens.weight")
    if embedding is not None and "model.embed_tokens" not in quantized:
        if embedding.shape[0] != args.vocab_size:
            problems.append(
                f"model.embed_tokens.weight has {embedding.shape[0]} rows but config.json "
                f"vocab_size is {args.vocab_size}: set vocab_size to the embedding's row count"
            )
    for key, param in expected.items():
        if key not in weights:
            problems.append(f"missing {key} (config.json: {config_keys(key)})")
        elif key.rsplit(".", 1)[0] in quantized or key == "model.embed_tokens.weight":
            continue
        elif weights[key].shape != param.shape:
            problems.append(
                f"{key} has shape {tuple(weights[key].shape)}, the config needs "
                f"{tuple(param.shape)} (config.json: {config_keys(key)})"
            )
    for key in sorted(set(weights) - set(expected)):
        module, part = key.rsplit(".", 1)
        if part in QUANTIZATION_PARTS and f"{module}.weight" in expected:
            continue
        problems.append(
            f"unexpected {key}: the config has no such tensor (config.json: {config_keys(key)})"
        )
    if problems:
        listed = "\n  ".join(problems)
        raise ValueError(f"the dhara checkpoint does not match its config.json:\n  {listed}")


def check_directory(path: Union[str, Path]) -> dict:
    """config.json of a dhara checkpoint directory, after checking what loading needs."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint directory")
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(
            f"{path} has no config.json: a dhara checkpoint directory holds config.json "
            "and model*.safetensors"
        )
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} cannot be read as JSON: {e}") from e
    found = config.get("model_type") if isinstance(config, dict) else None
    if found != MODEL_TYPE:
        raise ValueError(
            f"{file}: model_type is {found!r}, not {MODEL_TYPE!r}: this is not a dhara checkpoint"
        )
    if not any(path.glob("model*.safetensors")):
        raise ValueError(f"{path} has no model*.safetensors weights")
    return config


def load(path: Union[str, Path], **kwargs):
    """``mlx_lm.load`` of a local dhara checkpoint directory, checked first.

    Returns what ``mlx_lm.load`` returns, (model, tokenizer) by default.
    """
    import mlx_lm

    check_directory(path)
    return mlx_lm.load(str(path), **kwargs)
