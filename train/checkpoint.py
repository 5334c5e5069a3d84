"""Model directories for training: build from a config, open a checkpoint, save atomically."""

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from optiq_dhara.model import Model, ModelArgs, RotaryEmbedding

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp)`` and rename the result onto ``path``."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def model_from_config(config: dict) -> Model:
    """A freshly initialized dhara for a config.json dict."""
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def freeze_rope(model: nn.Module) -> None:
    """Keep every layer's RoPE ``inv_freq`` frozen (a buffer, never trained)."""
    model.apply_to_modules(
        lambda _, module: module.freeze() if isinstance(module, RotaryEmbedding) else None
    )


def save_model_dir(model: nn.Module, config: dict, out_dir: Path, tokenizer_dir: Path) -> None:
    """config.json, model.safetensors and the tokenizer files of ``tokenizer_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    atomic_write(
        out_dir / "model.safetensors",
        lambda temp: mx.save_safetensors(str(temp), weights, metadata={"format": "mlx"}),
    )
    atomic_write(
        out_dir / "config.json", lambda temp: temp.write_text(json.dumps(config, indent=2) + "\n")
    )
    if Path(tokenizer_dir).resolve() == out_dir.resolve():
        return
    for name in TOKENIZER_FILES:
        source = Path(tokenizer_dir) / name
        if source.is_file():
            atomic_write(out_dir / name, lambda temp, source=source: shutil.copyfile(source, temp))
