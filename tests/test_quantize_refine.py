"""``convert --refine dwq``: mlx-lm's DWQ trains the mix's quantized scales and biases.

The refinement keeps every module's bits, writes a checkpoint mlx-lm loads, and
brings the quantized model closer to the float model on the calibration text than
round-to-nearest at the same allocation.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from typer.testing import CliRunner

import optiq_dhara  # noqa: F401  (registers the dhara model types with mlx-lm)
from optiq_dhara.cli import app
from optiq_dhara.convert import convert
from optiq_dhara.metrics import compare
from optiq_dhara.quantize import load_calibration
from optiq_dhara.quantize.apply import as_float32, module_bits

COMMON = dict(target_bpw=7.0, group_size=32, dtype="bfloat16", num_samples=8, seq_len=32)
runner = CliRunner()


@pytest.fixture(scope="module")
def ar_graft(golden_dir, tmp_path_factory) -> Path:
    """The golden model recorded as trained for next-token only (as graft writes it)."""
    path = tmp_path_factory.mktemp("refine") / "src"
    shutil.copytree(golden_dir, path, ignore=shutil.ignore_patterns("golden*"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dhara_objective": "ar"}))
    return path


def calibration_kl(path: Path, reference, tokens: mx.array) -> float:
    model, _ = load(str(path))
    return compare(as_float32(model), reference, tokens, "ar").mean_kl


def test_dwq_keeps_the_bits_and_lowers_the_kl(ar_graft, tmp_path):
    plain = convert(str(ar_graft), tmp_path / "rtn", **COMMON)
    result = runner.invoke(
        app,
        [
            "convert",
            "--hf-path",
            str(ar_graft),
            "--mlx-path",
            str(tmp_path / "dwq"),
            "--target-bpw",
            "7.0",
            "--group-size",
            "32",
            "--dtype",
            "bfloat16",
            "--num-samples",
            "8",
            "--seq-len",
            "32",
            "--refine",
            "dwq",
            "--refine-epochs",
            "4",
            "--refine-lr",
            "1e-3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "refined: dwq" in result.output
    report = json.loads((tmp_path / "dwq" / "quantization_report.json").read_text())
    assert report["refine"]["method"] == "dwq"
    assert report["refine"]["steps"] == 8  # 8 sequences x 4 epochs in batches of 4
    assert plain["refine"] == {"method": "none"}

    planned = {path: layer["bits"] for path, layer in report["layers"].items()}
    assert planned == {path: layer["bits"] for path, layer in plain["layers"].items()}
    assert set(planned.values()) == {4, 8}  # some modules are trained, some kept
    model, _ = load(str(tmp_path / "dwq"))
    assert module_bits(model) == planned
    assert report["achieved_bpw"] == pytest.approx(plain["achieved_bpw"])

    reference, tokenizer = load(str(ar_graft))
    tokens = load_calibration(tokenizer, None, 8, 32, 8).calibration
    before = calibration_kl(tmp_path / "rtn", reference, tokens)
    after = calibration_kl(tmp_path / "dwq", reference, tokens)
    assert after < 0.8 * before, (before, after)
    assert report["held_out"]["mix_unrefined"]["ar"]["mean_kl"] == pytest.approx(
        plain["held_out"]["mix"]["ar"]["mean_kl"]
    )


def test_refine_is_checked_before_any_work(ar_graft, tmp_path):
    with pytest.raises(ValueError, match="refinement 'gptq' is not one of none, dwq"):
        convert(str(ar_graft), tmp_path / "a", refine="gptq", **COMMON)
    with pytest.raises(ValueError, match="only apply when quantizing"):
        convert(str(ar_graft), tmp_path / "b", refine="dwq")
    with pytest.raises(ValueError, match="refine_samples only applies with a refinement"):
        convert(str(ar_graft), tmp_path / "c", refine_samples=4, **COMMON)
