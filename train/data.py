"""Batches for training: (tokens [B, L], loss mask [B, L]).

Fine-tuning data is mlx-lm's local format (``train/valid/test.jsonl`` with text,
chat ``messages`` or prompt/completion records), read by mlx-lm's own dataset
classes; pretraining data is a token stream cut into random windows.
"""

import json
import types
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import iterate_batches

SPLITS = ("train", "valid", "test")


def load_jsonl_splits(data_dir: Path, tokenizer, mask_prompt: bool = False) -> dict:
    """The splits of ``data_dir`` that exist, as mlx-lm datasets; ``train`` is required."""
    data_dir = Path(data_dir)
    if not (data_dir / "train.jsonl").is_file():
        raise ValueError(
            f"{data_dir / 'train.jsonl'} not found: --data must hold train.jsonl "
            "(and optionally valid.jsonl, test.jsonl)."
        )
    options = types.SimpleNamespace(mask_prompt=mask_prompt)
    splits = {}
    for name in SPLITS:
        path = data_dir / f"{name}.jsonl"
        if not path.is_file():
            continue
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{path} is empty.")
        try:
            records = [json.loads(line) for line in lines]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON lines ({error}).") from error
        try:
            splits[name] = CacheDataset(create_dataset(records, tokenizer, options))
        except ValueError as error:
            raise ValueError(
                f"{path}: {error} Records need 'text', 'messages', or 'prompt' and 'completion'."
            ) from error
    return splits


def dataset_batches(
    dataset,
    batch_size: int,
    pad_id: int,
    max_seq_length: int = 2048,
    loop: bool = False,
    seed: int = 0,
    multiple: int = 32,
) -> Iterator[tuple[mx.array, mx.array]]:
    """mlx-lm's length-sorted batches; prompt and padding masked out.

    Rows are padded with ``pad_id`` to a ``multiple`` of tokens, so that few
    shapes (few compilations of the training step) occur. Pad with the MASK id: a
    noisy block that ends a record then sees MASK tokens after it, as the last
    block does while it is decoded.
    """
    for tokens, lengths in iterate_batches(dataset, batch_size, max_seq_length, loop, seed):
        longest = lengths[:, 1].max().item()
        width = -(-longest // multiple) * multiple
        tokens = mx.pad(tokens[:, :longest], [(0, 0), (0, width - longest)])
        positions = mx.arange(width)[None]
        mask = (positions >= lengths[:, :1]) & (positions < lengths[:, 1:])
        yield mx.where(positions < lengths[:, 1:], tokens, pad_id), mask


def encode_documents(texts: Iterable[str], tokenizer, separator: int) -> np.ndarray:
    """One token stream of all ``texts``, each followed by the ``separator`` id."""
    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(separator)
    return np.array(ids, dtype=np.int32)


def window_batches(
    ids: np.ndarray, seq_len: int, batch_size: int, seed: int = 0
) -> Iterator[tuple[mx.array, mx.array]]:
    """Endless batches of random windows of the stream (every token trained on)."""
    if len(ids) <= seq_len:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one window of {seq_len}.")
    rng = np.random.default_rng(seed)
    mask = mx.ones((batch_size, seq_len), dtype=mx.bool_)
    while True:
        starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
        yield mx.array(np.stack([ids[s : s + seq_len] for s in starts])), mask


def tiled_batches(
    ids: np.ndarray, seq_len: int, batch_size: int
) -> list[tuple[mx.array, mx.array]]:
    """The stream cut into consecutive windows, once (for held-out losses)."""
    count = len(ids) // seq_len
    windows = ids[: count * seq_len].reshape(count, seq_len)
    return [
        (
            mx.array(windows[i : i + batch_size]),
            mx.ones(windows[i : i + batch_size].shape, mx.bool_),
        )
        for i in range(0, count, batch_size)
    ]
