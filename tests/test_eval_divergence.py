"""`dhara-mlx eval --perplexity FILE [--reference PATH]`: through optiq_dhara.metrics."""

import json
import math
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.evaluate.divergence import text_divergence, text_rows

TEXT = "The quick brown fox jumps over the lazy dog. A bee makes honey in the hive. " * 6


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def perturbed_dir(golden_dir, tmp_path_factory):
    """A copy of the golden checkpoint with noise on one weight: a 'quantized' model."""
    out = tmp_path_factory.mktemp("perturbed")
    for f in golden_dir.iterdir():
        shutil.copy(f, out / f.name)
    weights = mx.load(str(golden_dir / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    noise = mx.random.normal(weights[key].shape, key=mx.random.key(0))
    weights[key] = weights[key] + 0.05 * noise
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def run_eval(*args: str):
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return result


def test_model_against_itself_has_zero_kl_and_full_agreement(golden_dir, text_file, tmp_path):
    out = tmp_path / "r.json"
    run_eval(
        "--model",
        str(golden_dir),
        "--perplexity",
        str(text_file),
        "--reference",
        str(golden_dir),
        "--seq-len",
        "32",
        "--output",
        str(out),
    )
    report = json.loads(out.read_text())["perplexity"]
    assert report["reference"] == str(golden_dir)
    for mode in ("ar", "diffusion"):
        assert report[mode]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
        assert report[mode]["top1_agreement"] == 1.0
        assert report[mode]["perplexity_ratio"] == pytest.approx(1.0)
        assert report[mode]["positions"] > 0


def test_perturbed_model_diverges_from_its_reference(
    golden_dir, perturbed_dir, text_file, tmp_path
):
    out = tmp_path / "r.json"
    result = run_eval(
        "--model",
        str(perturbed_dir),
        "--perplexity",
        str(text_file),
        "--reference",
        str(golden_dir),
        "--seq-len",
        "32",
        "--output",
        str(out),
    )
    report = json.loads(out.read_text())["perplexity"]
    for mode in ("ar", "diffusion"):
        assert report[mode]["mean_kl"] > 1e-4
        assert report[mode]["top1_agreement"] < 1.0
        assert report[mode]["perplexity_ratio"] != pytest.approx(1.0)
    assert "mean KL" in result.output and "diffusion" in result.output


def test_ar_perplexity_is_the_exp_mean_causal_nll_of_the_rows(golden_dir, text_file):
    model, tokenizer = mlx_lm.load(str(golden_dir))
    report = text_divergence(model, tokenizer, text_file, seq_len=32, modes=["ar"])
    rows = text_rows(tokenizer, text_file, 32)
    logits = np.array(model(rows).astype(mx.float32), dtype=np.float64)
    logits[..., model.args.mask_token_id] = -np.inf  # metrics drops MASK in both modes
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.array(rows)[:, 1:]
    nll = -np.take_along_axis(logp[:, :-1], targets[..., None], axis=-1).mean()
    assert report["ar"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert report["rows"] == rows.shape[0] and report["seq_len"] == 32


def test_text_rows_cut_the_file_into_whole_rows(golden_dir, text_file, tmp_path):
    _, tokenizer = mlx_lm.load(str(golden_dir))
    n = len(tokenizer.encode(TEXT, add_special_tokens=False))
    rows = text_rows(tokenizer, text_file, 32)
    assert rows.shape == (n // 32, 32)
    short = tmp_path / "short.txt"
    short.write_text("a bee")
    assert text_rows(tokenizer, short, 512).shape[0] == 1
    with pytest.raises(ValueError, match="no such text file"):
        text_rows(tokenizer, tmp_path / "missing.txt", 32)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--tasks and/or --perplexity"),
        (["--reference", "x"], "--perplexity FILE too"),
    ],
)
def test_missing_inputs_are_usage_errors(golden_dir, args, message):
    result = CliRunner().invoke(
        app, ["eval", "--model", str(golden_dir), *args], env={"COLUMNS": "300"}
    )
    assert result.exit_code != 0
    assert message in result.output
