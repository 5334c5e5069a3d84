"""The checkpoint to convert: a local directory or a Hugging Face Hub id, checked to be dhara.

Loading goes through the stock ``mlx_lm.utils.load_model``, so the model's
``sanitize`` puts the weights in MLX layout (Canon convs from PyTorch (C, 1, K),
a tied ``lm_head`` dropped, ``inv_freq`` in float32).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import snapshot_download
from mlx.utils import tree_map_with_path
from mlx_lm.utils import load_model, load_tokenizer

from optiq_dhara.registry import MODEL_TYPE

HUB_FILES = ["*.json", "model*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = ("float16", "bfloat16", "float32")


def resolve_source(src: str, revision: Optional[str] = None) -> Path:
    """A local directory as it is; a Hub id ("owner/name") through ``snapshot_download``."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"source {src} is a file; give the checkpoint's directory")
        return path
    if not HUB_ID.match(src):
        raise ValueError(f"source {src} does not exist (nor is it a Hub id like owner/name)")
    try:
        return Path(snapshot_download(src, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # the hub client raises many types; all mean "not fetched"
        raise ValueError(
            f"source {src} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub: {e}"
        ) from e


def read_config(path: Path) -> dict:
    """config.json of a float dhara checkpoint."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"{path} has no config.json: it is not a model checkpoint") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} cannot be read as JSON: {e}") from e
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(
            f"{file}: model_type is {found!r}, not {MODEL_TYPE!r}: this is not a dhara checkpoint"
        )
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(f"{file}: the checkpoint is already quantized; convert the float one")
    return config


@dataclass
class Source:
    path: Path
    config: dict
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper


def load_source(src: str, revision: Optional[str] = None) -> Source:
    """Resolve, check and load the checkpoint ``src`` (weights loaded lazily)."""
    path = resolve_source(src, revision)
    config = read_config(path)
    if not list(path.glob("model*.safetensors")):
        raise ValueError(f"{path} has no model*.safetensors weights")
    try:
        model, _ = load_model(path, lazy=True)
    except Exception as e:  # safetensors, shape and missing-key errors alike
        raise ValueError(f"{path}: the weights cannot be loaded as dhara: {e}") from e
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:
        raise ValueError(f"{path}: the tokenizer cannot be loaded: {e}") from e
    return Source(path, config, model, tokenizer)


def resolve_dtype(name: Optional[str], config: dict, model: nn.Module) -> mx.Dtype:
    """``name``, else config.json's torch_dtype, else the embedding's dtype."""
    if name is None:
        name = config.get("torch_dtype")
        if name not in DTYPES:
            return model.model.embed_tokens.weight.dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(mx, name)


def cast(model: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """Float parameters to ``dtype``, except those the model keeps (``inv_freq``)."""
    keep = model.cast_predicate

    def to_dtype(key: str, value: mx.array) -> mx.array:
        if keep(key) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(dtype)
        return value

    model.update(tree_map_with_path(to_dtype, model.parameters()))
    return model
