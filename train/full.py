"""Full-parameter training of dhara on a text corpus, with the joint loss.

Starts from a config.json (fresh weights) or a checkpoint directory; every
parameter trains except the RoPE frequencies.
"""

import json
from pathlib import Path
from typing import Callable, Optional

import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load_model, load_tokenizer

from optiq_dhara.checkpoint import check_directory, read_config

from .checkpoint import (
    check_output,
    freeze_rope,
    model_from_config,
    save_model_atomic,
    with_objective,
)
from .data import encode_documents, tiled_batches, window_batches
from .loss import require_joint
from .trainer import TrainConfig, evaluate_losses, train

SEPARATOR = "<|endoftext|>"


def read_texts(path: Path) -> list[str]:
    """Documents of a corpus: a .txt file (one document), a .jsonl of {"text": ...}, or a folder of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"{path} holds no .txt or .jsonl files.")
        return [text for file in files for text in read_texts(file)]
    if not path.is_file():
        raise ValueError(f"corpus {path} not found.")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" not in record:
                raise ValueError(f"{path}:{number}: a record without a 'text' key.")
            texts.append(record["text"])
        return texts
    return [path.read_text()]


def split_held_out(ids: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``fraction`` of the stream is held out."""
    cut = int(len(ids) * (1 - fraction))
    return ids[:cut], ids[cut:]


def train_full(
    model: nn.Module,
    train_ids: np.ndarray,
    seq_len: int,
    batch_size: int,
    config: TrainConfig,
    valid_ids: Optional[np.ndarray] = None,
    val_batches: int = 8,
    report: Callable[[dict], None] = print,
    save: Optional[Callable[[int], None]] = None,
) -> list[dict]:
    """Train every parameter but the RoPE frequencies on random windows of the stream."""
    require_joint(model, config.diffusion_weight)
    model.unfreeze()
    freeze_rope(model)
    evaluate = None
    if valid_ids is not None:
        held_out = tiled_batches(valid_ids, seq_len, batch_size)[:val_batches]

        def evaluate(step: int) -> dict:
            losses = evaluate_losses(
                model,
                held_out,
                config.diffusion_weight,
                config.block_len,
                block_context=config.block_context,
            )
            return {f"val_{name}": value for name, value in losses.items()}

    batches = window_batches(train_ids, seq_len, batch_size, config.seed)
    return train(model, batches, config, report, evaluate, save)


def open_start(model: Optional[Path], config: Optional[Path]) -> tuple[nn.Module, dict, Path]:
    """(model, config dict, tokenizer folder) from a checkpoint folder or a config.json."""
    if (model is None) == (config is None):
        raise ValueError(
            "give exactly one of --model (a checkpoint folder) or --config (a config.json)."
        )
    if model is not None:
        check_directory(model)
        loaded, settings = load_model(Path(model))
        if "quantization" in settings:
            raise ValueError(
                f"{model} is quantized ({Path(model) / 'config.json'} has a 'quantization' entry): "
                "full training updates float weights. Fine-tune it with `dhara-mlx lora`, or "
                "train a float checkpoint (convert without --target-bpw)."
            )
        return loaded, settings, Path(model)
    settings = read_config(config)
    return model_from_config(settings), settings, Path(config).parent


def run(
    data: Path,
    out_dir: Path,
    model: Optional[Path] = None,
    config: Optional[Path] = None,
    tokenizer: Optional[Path] = None,
    seq_len: int = 256,
    batch_size: int = 8,
    held_out: float = 0.05,
    train_config: TrainConfig = TrainConfig(),
    report: Callable[[dict], None] = print,
    force: bool = False,
) -> list[dict]:
    """``dhara-mlx train``: open, tokenize the corpus, train, save to ``out_dir``.

    ``out_dir`` is written atomically at the end; it may not be (or hold) the
    starting checkpoint, config, tokenizer or corpus, and an existing one is
    replaced only with ``force``.
    """
    replace_out = check_output(
        out_dir,
        force,
        option="--out",
        checkpoints=[("the --model checkpoint", model)],
        inputs=[
            ("the --config file's folder", Path(config).parent if config else None),
            ("the --tokenizer folder", tokenizer),
            ("the --data corpus", data),
        ],
    )
    network, settings, tokenizer_dir = open_start(model, config)
    require_joint(network, train_config.diffusion_weight)  # before the corpus is read
    settings = with_objective(settings, train_config.diffusion_weight, fresh=model is None)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else tokenizer_dir
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer.json in {tokenizer_dir}: pass --tokenizer DIR.")
    encoder = load_tokenizer(tokenizer_dir)
    separator = encoder.convert_tokens_to_ids(SEPARATOR)
    ids = encode_documents(read_texts(data), encoder, separator)
    train_ids, valid_ids = split_held_out(ids, held_out)

    def save(step: int) -> None:
        nonlocal replace_out
        save_model_atomic(network, settings, out_dir, tokenizer_dir, replace_out)
        replace_out = True  # a later save replaces this one

    return train_full(
        network,
        train_ids,
        seq_len,
        batch_size,
        train_config,
        valid_ids if len(valid_ids) > seq_len else None,
        report=report,
        save=save,
    )
