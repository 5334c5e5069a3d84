"""Shared fixtures: the golden checkpoint (copied from the independent reference)."""

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest

import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)

# The commands' fast-BLAS hint (cli/hints.py) depends on the machine; tests that
# check it turn it back on themselves.
os.environ.setdefault("DHARA_NO_BLAS_HINT", "1")

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_DIR = FIXTURES / "golden_tiny"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden() -> dict:
    return mx.load(str(GOLDEN_DIR / "golden.safetensors"))


@pytest.fixture(scope="session")
def golden_settings() -> dict:
    return json.loads((GOLDEN_DIR / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden_model():
    from mlx_lm.utils import load_model

    model, _ = load_model(GOLDEN_DIR)
    return model


def write_tokenizer_without_mask(golden_dir: Path, path: Path, vocab: int = 316) -> None:
    """The golden tokenizer without its <|mask|> (ids below ``vocab``), chat template kept."""
    tokenizer = json.loads((golden_dir / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < vocab]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    settings = json.loads((golden_dir / "tokenizer_config.json").read_text())
    del settings["mask_token"]
    settings["additional_special_tokens"].remove("<|mask|>")
    (path / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
