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
ARCLM_TYPE = "arclm"  # a Qwen3.5-hybrid BD3LM checkpoint (optiq_dhara.arclm): decoding only
DECODING_TYPES = (MODEL_TYPE, ARCLM_TYPE)  # what generate, chat and serve run
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


def read_config(file: Union[str, Path], model_types: tuple[str, ...] = (MODEL_TYPE,)) -> dict:
    """A dhara config.json, or a ValueError naming the file and what is wrong with it."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{file}: no such config.json")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{file} cannot be read as JSON: {e}; restore it from the model it came from"
        ) from e
    found = config.get("model_type") if isinstance(config, dict) else None
    if found not in model_types:
        wanted = " or ".join(repr(t) for t in model_types)
        raise ValueError(
            f"{file}: model_type is {found!r}, not {wanted}: this is not a dhara "
            "checkpoint (dhara-mlx runs dhara models only; `mlx_lm` runs the others)"
        )
    return config


def check_directory(path: Union[str, Path], model_types: tuple[str, ...] = (MODEL_TYPE,)) -> dict:
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
    config = read_config(file, model_types)
    if not any(path.glob("model*.safetensors")):
        raise ValueError(f"{path} has no model*.safetensors weights")
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_tokenizer(path: Union[str, Path]) -> None:
    """Raise ValueError unless ``path`` holds a tokenizer whose JSON files parse."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the "
            "tokenizer files of the model it was made from into it"
        )
    for name in JSON_TOKENIZER_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{file} cannot be read as JSON: {e}; copy it again from the model it came from"
            ) from e


def load(path: Union[str, Path], model_types: tuple[str, ...] = (MODEL_TYPE,), **kwargs):
    """``mlx_lm.load`` of a local dhara checkpoint directory, checked first.

    Returns what ``mlx_lm.load`` returns, (model, tokenizer) by default. Every
    failure is a ValueError naming the directory or file: not a dhara checkpoint
    (model_type), no or unreadable config.json, no weights, no or unreadable
    tokenizer, weights that do not match the config. ``model_types``: the
    model types accepted (DECODING_TYPES adds arcLM, for the decoding commands).
    """
    import mlx_lm

    check_directory(path, model_types)
    check_tokenizer(path)
    try:
        return mlx_lm.load(str(path), **kwargs)
    except ValueError as e:  # ours (config, weights against config): add the folder
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # the libraries' own errors (safetensors, tokenizers, ...)
        raise ValueError(f"{path}: loading failed: {type(e).__name__}: {e}") from e
