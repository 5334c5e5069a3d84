"""Full-parameter training: every weight but the RoPE frequencies learns, from a
config or a checkpoint, and the command line drives it."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.train.checkpoint import model_from_config
from optiq_dhara.train.full import read_texts, train_full
from optiq_dhara.train.trainer import TrainConfig

CORPUS = "\n".join(f"def f{i % 4}(x):\n    return x + {i % 4}\n" for i in range(60))


@pytest.fixture
def config_dir(golden_dir, tmp_path) -> Path:
    """The golden config and tokenizer, without weights: a fresh model to train."""
    folder = tmp_path / "fresh"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(golden_dir / name, folder / name)
    return folder


def test_full_training_learns_and_keeps_rope_frozen(golden_dir):
    config = json.loads((golden_dir / "config.json").read_text())
    mx.random.seed(0)
    model = model_from_config(config)
    before = dict(tree_flatten(model.parameters()))
    rng = np.random.default_rng(0)
    ids = np.tile(rng.integers(0, 300, size=40), 20).astype(np.int32)
    settings = TrainConfig(
        iters=15,
        learning_rate=1e-2,
        warmup=2,
        diffusion_weight=0.3,
        block_len=16,
        steps_per_report=5,
        steps_per_eval=15,
    )
    history = train_full(model, ids, 32, 4, settings, valid_ids=ids, report=lambda e: None)
    evaluations = [e for e in history if "val_ar_loss" in e]
    assert evaluations[-1]["val_ar_loss"] < evaluations[0]["val_ar_loss"] - 1.0
    assert evaluations[-1]["val_diffusion_loss"] < evaluations[0]["val_diffusion_loss"] - 1.0
    after = dict(tree_flatten(model.parameters()))
    for key, value in before.items():
        if key.endswith("inv_freq"):
            assert mx.array_equal(after[key], value), key
        else:
            assert not mx.array_equal(after[key], value), key


def test_train_command_from_config_then_from_checkpoint(config_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    runner = CliRunner()
    options = [
        "--data",
        str(corpus),
        "--iters",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--block-len",
        "16",
        "--steps-per-report",
        "2",
        "--held-out",
        "0.2",
    ]
    first = tmp_path / "first"
    result = runner.invoke(
        app, ["train", "--config", str(config_dir / "config.json"), "--out", str(first), *options]
    )
    assert result.exit_code == 0, result.output
    reports = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", result.output)]
    assert any("val_diffusion_loss" in r for r in reports)
    assert all(r["train_diffusion_loss"] > 0 for r in reports if "train_diffusion_loss" in r)
    model, tokenizer = mlx_lm.load(str(first))
    assert tokenizer.encode("def f1(x):")

    second = tmp_path / "second"
    result = runner.invoke(app, ["train", "--model", str(first), "--out", str(second), *options])
    assert result.exit_code == 0, result.output
    continued, _ = mlx_lm.load(str(second))
    a = dict(tree_flatten(model.parameters()))
    b = dict(tree_flatten(continued.parameters()))
    assert not mx.array_equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_train_command_names_what_is_wrong(config_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "none.txt"),
            "--out",
            str(tmp_path / "o"),
            "--config",
            str(config_dir / "config.json"),
        ],
    )
    assert result.exit_code != 0 and "none.txt" in result.output
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    result = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "--config" in result.output


def test_read_texts_reads_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text('{"text": "beta"}\n{"text": "gamma"}\n')
    assert read_texts(tmp_path) == ["alpha", "beta", "gamma"]
    (tmp_path / "c.jsonl").write_text('{"body": "delta"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        read_texts(tmp_path / "c.jsonl")


def test_train_refuses_a_quantized_checkpoint(golden_dir, tmp_path):
    import mlx.nn as nn
    from mlx_lm.utils import load_model, save_config, save_model

    model, config = load_model(golden_dir)
    nn.quantize(model, group_size=32, bits=4)
    folder = tmp_path / "q4"
    save_model(folder, model)
    save_config({**config, "quantization": {"group_size": 32, "bits": 4}}, folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(golden_dir / name, folder / name)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    result = CliRunner().invoke(
        app, ["train", "--model", str(folder), "--data", str(corpus), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0
    message = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # unwrap rich's box
    assert "is quantized" in message and "dhara-mlx lora" in message
