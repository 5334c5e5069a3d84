"""The modes the quantizer's sensitivities weigh: those the weights were trained for.

A checkpoint records its training in config.json's ``dhara_objective`` ("ar" after
graft, "joint" after joint training, joint when absent as for the shipped
models). ``convert`` measures the sensitivities in AR alone for an "ar" model and
in AR and diffusion for a tri-mode one; ``--sensitivity-modes`` overrides that.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import convert_cli

from optiq_dhara.convert import convert
from optiq_dhara.model import ModelArgs
from optiq_dhara.quantize import measure_sensitivities, quantizable_modules
from optiq_dhara.quantize.modules import Grouping
from optiq_dhara.quantize.sensitivity import choose_modes
from optiq_dhara.train.checkpoint import with_objective
from optiq_dhara.train.lora import LoraConfig, fuse, run_lora

SMALL = dict(
    target_bpw=7.0, group_size=32, dtype="bfloat16", num_samples=4, seq_len=32, block_len=16
)


def with_config(golden_dir: Path, path: Path, **changes) -> Path:
    """The golden checkpoint with config.json changed."""
    shutil.copytree(golden_dir, path, ignore=shutil.ignore_patterns("golden*"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}, indent=2))
    return path


@pytest.fixture(scope="module")
def ar_trained(golden_dir, tmp_path_factory) -> Path:
    """The golden model recorded as trained for next-token only (as graft writes it)."""
    return with_config(golden_dir, tmp_path_factory.mktemp("ar") / "src", dhara_objective="ar")


def test_trained_modes_follow_the_objective():
    tri_mode = ModelArgs(vocab_size=400, mask_token_id=316)
    assert tri_mode.dhara_objective == "joint"  # absent from config.json: the shipped models
    assert tri_mode.trained_modes == ("ar", "diffusion", "spec")
    grafted = ModelArgs(vocab_size=400, mask_token_id=316, dhara_objective="ar")
    assert grafted.modes == ("ar", "diffusion", "spec") and grafted.trained_modes == ("ar",)
    assert ModelArgs(vocab_size=316, mask_token_id=316).trained_modes == ("ar",)  # no MASK
    with pytest.raises(ValueError, match=r"dhara_objective 'diffusion' is not one of joint, ar"):
        ModelArgs(dhara_objective="diffusion")


def test_choose_modes_auto_and_overrides():
    tri_mode = ModelArgs(vocab_size=400, mask_token_id=316)
    grafted = ModelArgs(vocab_size=400, mask_token_id=316, dhara_objective="ar")
    ar_only = ModelArgs(vocab_size=316, mask_token_id=316)
    assert choose_modes(tri_mode) == ("ar", "diffusion")
    assert choose_modes(grafted) == ("ar",) and choose_modes(ar_only) == ("ar",)
    assert choose_modes(tri_mode, "ar") == ("ar",)
    assert choose_modes(grafted, "ar,diffusion") == ("ar", "diffusion")
    with pytest.raises(ValueError, match=r"sensitivity modes 'ar,diffusion' needs the MASK"):
        choose_modes(ar_only, "ar,diffusion")
    with pytest.raises(ValueError, match=r"'diffusion' is not one of auto, ar, ar,diffusion"):
        choose_modes(tri_mode, "diffusion")


def test_an_ar_trained_model_is_measured_in_ar_alone(golden_model, monkeypatch):
    common = dict(
        tokens=mx.zeros((2, 16), mx.int32),
        candidate_bits=(4, 8),
        grouping=Grouping(32, None),
        dtype=mx.float32,
        method="exact",
        block_len=8,
    )
    modules = quantizable_modules(golden_model)[:3]
    both = measure_sensitivities(golden_model, modules=modules, **common)
    monkeypatch.setattr(golden_model.args, "dhara_objective", "ar")
    ar = measure_sensitivities(golden_model, modules=modules, **common)
    assert both.modes == ("ar", "diffusion") and ar.modes == ("ar",)
    for path, sens in ar.modules.items():
        assert set(sens.by_mode) == {"ar"}
        assert sens.kl == both.modules[path].by_mode["ar"]  # the AR KL alone, not the mean
    assert ar.forwards_per_sample == pytest.approx(both.forwards_per_sample / 2)
    assert ar.as_dict()["modes"] == ["ar"]


def test_convert_weighs_the_trained_modes_and_the_flag_overrides(golden_dir, ar_trained, tmp_path):
    report = convert(str(ar_trained), tmp_path / "auto", **SMALL)
    assert report["sensitivity"]["modes"] == ["ar"]
    assert report["modes"] == ["ar", "diffusion", "spec"]  # it still decodes in every mode
    assert "diffusion" in report["held_out"]["mix"]  # and is scored in them
    stored = json.loads((tmp_path / "auto" / "sensitivities.json").read_text())
    assert stored["modes"] == ["ar"]
    assert all(set(m) & {"ar", "diffusion"} == {"ar"} for m in stored["modules"].values())
    tri_mode = convert(str(golden_dir), tmp_path / "tri", **SMALL)
    assert tri_mode["sensitivity"]["modes"] == ["ar", "diffusion"]

    result = convert_cli(
        ar_trained,
        tmp_path / "both",
        *("--group-size", "32", "--num-samples", "4", "--seq-len", "32"),
        *("--sensitivity-modes", "ar,diffusion"),
    )
    assert result.exit_code == 0, result.output
    assert "in modes ar, diffusion" in result.output
    both = json.loads((tmp_path / "both" / "quantization_report.json").read_text())
    assert both["sensitivity"]["modes"] == ["ar", "diffusion"]

    # a file measured in AR and diffusion serves AR alone; one measured in AR alone cannot
    # serve both
    reused = convert(
        str(golden_dir),
        tmp_path / "reused",
        sensitivities=tmp_path / "tri" / "sensitivities.json",
        sensitivity_modes="ar",
        **SMALL,
    )
    assert reused["sensitivity"]["modes"] == ["ar"]
    with pytest.raises(ValueError, match=r"measured in modes ar, not ar,diffusion"):
        convert(
            str(ar_trained),
            tmp_path / "refused",
            sensitivities=tmp_path / "auto" / "sensitivities.json",
            sensitivity_modes="ar,diffusion",
            **SMALL,
        )
    with pytest.raises(ValueError, match=r"sensitivity_modes only apply when quantizing"):
        convert(str(ar_trained), tmp_path / "float", sensitivity_modes="ar")


def test_cli_refuses_an_unknown_choice(ar_trained, tmp_path):
    result = convert_cli(ar_trained, tmp_path / "out", "--sensitivity-modes", "diffusion")
    assert result.exit_code == 2 and "--sensitivity-modes" in result.output


def test_training_records_the_objective(ar_trained, tmp_path):
    assert with_objective({"a": 1}, 0.3) == {"a": 1, "dhara_objective": "joint"}
    assert with_objective({"dhara_objective": "ar"}, 0.0) == {"dhara_objective": "ar"}
    assert with_objective({}, 0.0) == {}  # AR fine-tuning keeps a checkpoint's record
    assert with_objective({}, 0.0, fresh=True) == {"dhara_objective": "ar"}

    data = tmp_path / "data"
    data.mkdir()
    line = json.dumps({"text": "the cat sat on the mat. the cat sat on the mat."}) + "\n"
    for name in ("train.jsonl", "valid.jsonl"):
        (data / name).write_text(line * 4)
    settings = dict(iters=2, batch_size=2, num_layers=1, rank=2, spec_prompts=0, val_batches=1)
    for objective, expected in (("ar", "ar"), ("joint", "joint")):
        adapters = tmp_path / f"adapters_{objective}"
        config = LoraConfig(objective=objective, **settings)
        run_lora(ar_trained, data, adapters, config, report=lambda e: None)
        fuse(ar_trained, adapters, tmp_path / f"fused_{objective}")
        fused = json.loads((tmp_path / f"fused_{objective}" / "config.json").read_text())
        assert fused["dhara_objective"] == expected
