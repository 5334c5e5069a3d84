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


def convert_cli(source, out, *options: str):
    """``dhara-mlx convert`` of ``source`` into ``out`` at 7 bpw, with more ``options``."""
    from typer.testing import CliRunner

    from optiq_dhara.cli import app

    command = ["convert", "--hf-path", str(source), "--mlx-path", str(out), "--target-bpw", "7"]
    return CliRunner().invoke(app, [*command, *options])


def write_tokenizer_without_mask(golden_dir: Path, path: Path, vocab: int = 316) -> None:
    """The golden tokenizer without its <|mask|> (ids below ``vocab``), chat template kept."""
    tokenizer = json.loads((golden_dir / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < vocab]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    settings = json.loads((golden_dir / "tokenizer_config.json").read_text())
    del settings["mask_token"]
    settings["additional_special_tokens"].remove("<|mask|>")
    (path / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


@pytest.fixture
def scripted_tool_call(monkeypatch) -> dict:
    """Servers started in this test write a Hermes tool call, whatever the model decodes.

    The random tiny model never writes one: the worker's ``TextStream`` is replaced
    by one that hands out these pieces, one per step, and the prompt encoding
    records what the server handed it (in the dict returned).
    """
    import optiq_dhara.serve.app as app_module
    import optiq_dhara.serve.engine as engine_module
    from optiq_dhara.runtime import TextChunk
    from optiq_dhara.runtime.text import encode_prompt

    seen = {}
    pieces = [
        "Let me check. <tool",
        '_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    ]

    class ScriptedText:
        def __init__(self, tokenizer, *, stop=(), stop_ids=()):
            self.stop_ids, self.left = frozenset(stop_ids), list(pieces)
            self.finished = self.stopped_by_string = False

        def feed(self, step):
            ends = len(self.left) == 1 or step.stats.finish_reason is not None
            text = "".join(self.left) if ends else self.left.pop(0)
            if ends:  # as a stop string would end it
                self.finished = self.stopped_by_string = True
                step.stats.finish_reason = "stop"
            return TextChunk(text, step.tokens, step.stats, step.stats.finish_reason)

    def recording_encode(tokenizer, prompt, *, chat, tools=None):
        seen.update(prompt=prompt, tools=tools, chat=chat)
        return encode_prompt(tokenizer, prompt, chat=chat, tools=tools)

    monkeypatch.setattr(engine_module, "TextStream", ScriptedText)
    monkeypatch.setattr(app_module, "encode_prompt", recording_encode)
    return seen
