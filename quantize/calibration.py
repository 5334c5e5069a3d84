"""Calibration and held-out token sequences, from text that needs no network.

The text is the corpus shipped in the package (written for this project), a
user's text file, or a chat JSONL file (one ``{"messages": [...]}`` or
``{"text": ...}`` object per line) rendered through the tokenizer's chat
template. It is tokenized as one stream and cut into sequences of ``seq_len``
tokens; the held-out sequences are spread evenly over the stream and the
calibration sequences are spread over the rest, so the two never overlap.
"""

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

DEFAULT_CORPUS = "calibration.txt"


def default_corpus() -> str:
    return resources.files("optiq_dhara").joinpath("data", DEFAULT_CORPUS).read_text("utf-8")


def _render_chat(path: Path, tokenizer) -> str:
    parts = []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if isinstance(record, dict) and "messages" in record:
            parts.append(tokenizer.apply_chat_template(record["messages"], tokenize=False))
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            parts.append(record["text"])
        else:
            raise ValueError(f'{path}:{number}: expected an object with "messages" or "text"')
    return "".join(parts)


def read_calibration_text(path: Optional[Path], tokenizer) -> tuple[str, str]:
    """(text, where it came from): the shipped corpus, or ``path`` (.jsonl = chat)."""
    if path is None:
        return default_corpus(), f"optiq_dhara/data/{DEFAULT_CORPUS}"
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file {path} does not exist")
    try:
        text = _render_chat(path, tokenizer) if path.suffix == ".jsonl" else path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file {path} is not UTF-8 text ({e.reason})") from e
    if not text.strip():
        raise ValueError(f"calibration file {path} is empty: give it text to calibrate on")
    return text, str(path)


@dataclass(frozen=True)
class CalibrationData:
    calibration: mx.array  # [num_samples, seq_len]
    held_out: mx.array  # [held_out_samples, seq_len]
    source: str
    tokens: int  # in the whole stream


def _spread(count: int, available: list[int]) -> list[int]:
    picks = np.linspace(0, len(available), count, endpoint=False).astype(int)
    return [available[i] for i in picks]


def split_tokens(
    ids: list[int], source: str, num_samples: int, seq_len: int, held_out_samples: int
) -> CalibrationData:
    """Cut ``ids`` into sequences and split them into calibration and held-out sets."""
    if num_samples < 1 or seq_len < 2 or held_out_samples < 1:
        raise ValueError(
            f"need num_samples >= 1, seq_len >= 2 and held-out samples >= 1; got "
            f"{num_samples}, {seq_len}, {held_out_samples}"
        )
    chunks = len(ids) // seq_len
    needed = num_samples + held_out_samples
    if chunks < needed:
        raise ValueError(
            f"calibration text {source} gives {len(ids)} tokens, {chunks} sequences of "
            f"{seq_len}; {needed} are needed ({num_samples} calibration + {held_out_samples} "
            "held out): give more text, fewer --num-samples or a shorter --seq-len"
        )
    stream = np.array(ids[: chunks * seq_len], dtype=np.int32).reshape(chunks, seq_len)
    held = _spread(held_out_samples, list(range(chunks)))
    rest = [i for i in range(chunks) if i not in set(held)]
    calib = _spread(num_samples, rest)
    return CalibrationData(mx.array(stream[calib]), mx.array(stream[held]), source, len(ids))


def load_calibration(
    tokenizer,
    path: Optional[Path] = None,
    num_samples: int = 16,
    seq_len: int = 256,
    held_out_samples: int = 8,
) -> CalibrationData:
    """Calibration and held-out sequences from ``path`` or the shipped corpus."""
    text, source = read_calibration_text(path, tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return split_tokens(ids, source, num_samples, seq_len, held_out_samples)
