"""Model directories for training: build from a config, open a checkpoint, save atomically."""

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

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


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    out: Path,
    force: bool,
    *,
    option: str,
    checkpoints: Iterable[tuple[str, Optional[Path]]] = (),
    inputs: Iterable[tuple[str, Optional[Path]]] = (),
) -> bool:
    """Refuse an output folder that would write over what the command reads.

    ``checkpoints`` (name, folder): the output may be neither such a folder, nor
    inside it, nor around it. ``inputs`` (name, file or folder): the output may
    not be it nor hold it. An existing output (other than an empty folder) is
    refused unless ``force``; with ``force`` it is replaced, never the inputs.
    Returns whether the output exists, i.e. is to be replaced.
    """
    out = Path(out)
    target = out.resolve()
    for name, folder in checkpoints:
        if folder is None:
            continue
        source = Path(folder).resolve()
        if _within(target, source) or _within(source, target):
            where = (
                "is" if target == source else "is inside" if _within(target, source) else "holds"
            )
            raise ValueError(
                f"{option} {out} {where} {name} ({folder}), which the command reads and must "
                f"not write into; give another {option}"
            )
    for name, path in inputs:
        if path is None:
            continue
        source = Path(path).resolve()
        if _within(source, target):
            where = "is" if target == source else "holds"
            raise ValueError(
                f"{option} {out} {where} {name} ({path}), which the command reads and must "
                f"not write over; give another {option}"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file, not a folder; give another {option}")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{option} {out} already exists: pass --force to replace it")
    return out.exists()


def with_objective(config: dict, diffusion_weight: float, fresh: bool = False) -> dict:
    """``config`` recording what its weights are trained with now (``dhara_objective``,
    ``optiq_dhara.model.OBJECTIVES``), which the quantizer reads to weigh the modes.

    Training with a diffusion weight makes them "joint"; next-token training makes
    fresh weights "ar" and leaves a checkpoint's record as it was.
    """
    if diffusion_weight > 0:
        return {**config, "dhara_objective": "joint"}
    if fresh:
        return {**config, "dhara_objective": "ar"}
    return config


def save_model_atomic(
    model: nn.Module, config: dict, out_dir: Path, tokenizer_dir: Path, replace: bool
) -> None:
    """``save_model_dir`` into a fresh folder that then becomes ``out_dir`` (replacing
    it when ``replace``): the output appears complete or not at all."""
    from optiq_dhara.convert.writer import atomic_directory

    with atomic_directory(Path(out_dir), replace) as temp:
        save_model_dir(model, config, temp, tokenizer_dir)
