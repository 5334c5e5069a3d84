"""`convert`: float and mixed-precision conversion, reloading with stock mlx-lm, bad input."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.convert import convert, pipeline, source
from optiq_dhara.metrics import compare

TARGET = 7.0  # bf16, group size 32: 4-bit costs 5 bpw, 8-bit 9, the float parts ~0.5
SMALL = dict(num_samples=4, seq_len=64, held_out_samples=2, block_len=16)
MIXED = dict(target_bpw=TARGET, group_size=32, dtype="bfloat16", **SMALL)  # a small 4/8 mix


@pytest.fixture(scope="module")
def mixed(golden_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("mixed") / "out"
    report = convert(str(golden_dir), dst, **MIXED)
    return dst, report


def test_stock_load_gives_each_module_the_reported_bits(mixed):
    dst, report = mixed
    model, _ = load(str(dst))
    quantized = {
        path: (m.bits, m.group_size)
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    expected = {
        path: (layer["bits"], layer["group_size"]) for path, layer in report["layers"].items()
    }
    assert quantized == expected
    assert {bits for bits, _ in quantized.values()} == {4, 8}
    for path, (bits, group) in quantized.items():  # 8 bits: the widest group the rows allow
        assert group == (64 if bits == 8 and "down_proj" not in path else 32), path
    config = json.loads((dst / "config.json").read_text())
    for path, layer in report["layers"].items():
        assert config["quantization"][path]["bits"] == layer["bits"]
    counts = report["modules_per_bits"]
    assert counts["4"] + counts["8"] == 15


def test_without_wide_groups_every_module_keeps_the_group_size(golden_dir, tmp_path):
    report = convert(str(golden_dir), tmp_path / "out", wide_groups=False, **MIXED)
    assert {layer["group_size"] for layer in report["layers"].values()} == {32}
    assert report["wide_group_bits"] is None and report["achieved_bpw"] <= TARGET


def test_canon_norms_and_rope_stay_float(mixed):
    dst, _ = mixed
    weights = mx.load(str(dst / "model.safetensors"))
    floats = [k for k in weights if "canon" in k or "norm" in k]
    assert len(floats) == 2 * (6 + 4) + 1
    for key in floats:
        assert weights[key].dtype == mx.bfloat16, key
        assert f"{key.rsplit('.', 1)[0]}.scales" not in weights
    assert weights["model.layers.0.canon_a.conv.weight"].shape == (64, 4, 1)  # MLX layout
    for i in range(2):
        assert weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"].dtype == mx.float32
    assert "lm_head.weight" not in weights


def test_budget_is_met_by_the_written_files(mixed):
    dst, report = mixed
    data = sum(v.nbytes for v in mx.load(str(dst / "model.safetensors")).values())
    assert report["achieved_bpw"] == pytest.approx(data * 8 / report["parameters"])
    assert TARGET - 0.5 < report["achieved_bpw"] <= TARGET
    assert report["size_mb"] == pytest.approx(data / 1e6)


def test_reloaded_mix_is_close_to_the_float_model(mixed, golden_model, golden):
    dst, report = mixed
    model, _ = load(str(dst))
    tokens = golden["ids_a"]
    mix = compare(model, golden_model, tokens, "ar")
    uniform_4 = report["held_out"]["uniform_4"]["ar"]
    assert mix.mean_kl < 0.5 and mix.top1_agreement > 0.6
    assert report["held_out"]["mix"]["ar"]["mean_kl"] < uniform_4["mean_kl"]
    assert (
        report["held_out"]["mix"]["diffusion"]["mean_kl"]
        < report["held_out"]["uniform_4"]["diffusion"]["mean_kl"]
    )


def test_report_has_the_promised_fields(mixed):
    dst, report = mixed
    on_disk = json.loads((dst / "quantization_report.json").read_text())
    assert on_disk["achieved_bpw"] == report["achieved_bpw"]
    layer = report["layers"]["model.layers.0.mlp.down_proj"]
    assert set(layer) >= {"bits", "group_size", "sensitivity"}
    assert layer["sensitivity"]["4"] > layer["sensitivity"]["8"] > 0
    for name in ("mix", "uniform_4", "uniform_8"):
        for mode in ("ar", "diffusion"):
            assert set(report["held_out"][name][mode]) >= {
                "mean_kl",
                "top1_agreement",
                "perplexity",
            }
        assert report["held_out"][name]["self_spec"]["accepted_per_round"] >= 0
    assert report["sensitivity"]["forwards_per_sample"] > 0
    assert (dst / "sensitivities.json").is_file()
    assert not list(dst.parent.glob(".out.*"))  # no temporary directory left


def test_sensitivities_file_is_reused(mixed, tmp_path):
    dst, report = mixed
    reused = convert(
        report["source"], tmp_path / "again", sensitivities=dst / "sensitivities.json", **MIXED
    )
    assert {p: v["bits"] for p, v in reused["layers"].items()} == {
        p: v["bits"] for p, v in report["layers"].items()
    }
    assert reused["sensitivity"]["reused_from"] == str(dst / "sensitivities.json")


def test_float_conversion_keeps_the_model_exact(golden_dir, golden, tmp_path):
    result = convert(str(golden_dir), tmp_path / "float")
    assert result["quantized"] is False
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization" not in config
    model, _ = load(str(tmp_path / "float"))
    assert mx.abs(model(golden["ids_a"]) - golden["ar_logits"]).max().item() <= 1e-5
    assert (tmp_path / "float" / "tokenizer.json").is_file()


def test_dtype_cast_keeps_inv_freq_float32(golden_dir, tmp_path):
    convert(str(golden_dir), tmp_path / "half", dtype="float16")
    weights = mx.load(str(tmp_path / "half" / "model.safetensors"))
    assert weights["model.layers.0.self_attn.rotary_emb.inv_freq"].dtype == mx.float32
    assert weights["model.embed_tokens.weight"].dtype == mx.float16
    assert weights["model.layers.1.mlp.canon_d.conv.weight"].dtype == mx.float16


def test_tied_lm_head_is_dropped(golden_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(golden_dir, src)
    weights = mx.load(str(src / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    convert(str(src), tmp_path / "out")
    assert "lm_head.weight" not in mx.load(str(tmp_path / "out" / "model.safetensors"))


def test_hub_id_goes_through_snapshot_download(golden_dir, tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(golden_dir)

    monkeypatch.setattr(source, "snapshot_download", fake_download)
    convert("someone/dhara-tiny", tmp_path / "out", revision="main")
    assert calls[0][:2] == ("someone/dhara-tiny", "main")
    assert "model*.safetensors" in calls[0][2]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_hub_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(source, "snapshot_download", offline)
    with pytest.raises(ValueError, match="someone/missing .*could not be fetched.*no network"):
        convert("someone/missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _copy_with(golden_dir, tmp_path, edit) -> Path:
    src = tmp_path / "src"
    shutil.copytree(golden_dir, src)
    edit(src)
    return src


def _set_type(src):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))


def _bad_weights(src):
    (src / "model.safetensors").write_bytes(b"not a safetensors file")


def _missing_weights(src):
    (src / "model.safetensors").unlink()


def _bad_json(src):
    (src / "config.json").write_text("{oops")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set_type, "model_type is 'llama', not 'dhara_ar'"),
        (_bad_weights, "weights cannot be loaded"),
        (_missing_weights, "has no model\\*.safetensors"),
        (_bad_json, "config.json cannot be read as JSON"),
    ],
)
def test_bad_source_is_named(golden_dir, tmp_path, edit, message):
    src = _copy_with(golden_dir, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        convert(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        convert(str(tmp_path / "nowhere"), tmp_path / "out")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(target_bpw=5.0), "below the cost of the lowest candidate"),
        (dict(target_bpw=9.5), "above the cost of the highest candidate"),
        (dict(target_bpw=7.0, candidate_bits=[4, 7]), r"\[7\] not supported"),
        (dict(target_bpw=7.0, group_size=64), r"does not divide .*down_proj \(width 160\)"),
        (dict(group_size=32), "only apply when quantizing"),
        (dict(dtype="float64"), "dtype 'float64' is not one of"),
    ],
)
def test_bad_options_are_named(golden_dir, tmp_path, options, message):
    options = {"dtype": "bfloat16", "group_size": 32, **options}
    with pytest.raises(ValueError, match=message):
        convert(str(golden_dir), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_empty_calibration_file(golden_dir, tmp_path):
    empty = tmp_path / "calib.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="calib.txt is empty"):
        convert(
            str(golden_dir),
            tmp_path / "out",
            target_bpw=7.0,
            group_size=32,
            dtype="bfloat16",
            calibration=empty,
        )


def test_existing_destination_needs_force(golden_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="out already exists: pass --force"):
        convert(str(golden_dir), dst)
    assert (dst / "old.txt").is_file()
    convert(str(golden_dir), dst, force=True)
    assert not (dst / "old.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_leaves_no_destination(golden_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(pipeline, "evaluate_variants", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        convert(str(golden_dir), tmp_path / "out", **MIXED)
    assert list(tmp_path.iterdir()) == []


def test_a_config_that_does_not_match_the_weights_is_caught(golden_dir, tmp_path, monkeypatch):
    """The known defect of an existing tool: the config says uniform bits, the mix is lost."""
    honest = pipeline.quantization_config
    monkeypatch.setattr(
        pipeline, "quantization_config", lambda plan, sizes: honest(dict.fromkeys(plan, 4), sizes)
    )
    with pytest.raises(RuntimeError, match="does not load with mlx_lm"):
        convert(str(golden_dir), tmp_path / "out", **MIXED)
    assert list(tmp_path.iterdir()) == []


def test_cli_converts_and_reports_errors(golden_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(
        app, ["convert", "--hf-path", str(golden_dir), "--mlx-path", str(tmp_path / "o")]
    )
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.output
    bad = runner.invoke(
        app,
        [
            "convert",
            "--hf-path",
            str(golden_dir),
            "--mlx-path",
            str(tmp_path / "p"),
            "--target-bpw",
            "7",
            "--candidate-bits",
            "4,x",
        ],
        env={"COLUMNS": "300"},
    )
    assert bad.exit_code == 2
    assert "comma-separated list of integers" in bad.output
    exists = runner.invoke(
        app,
        ["convert", "--hf-path", str(golden_dir), "--mlx-path", str(tmp_path / "o")],
        env={"COLUMNS": "300"},
    )
    assert exists.exit_code == 2
    assert "already exists: pass --force" in exists.output
    weights = dict(tree_flatten(load(str(tmp_path / "o"))[0].parameters()))
    assert weights["model.embed_tokens.weight"].dtype == mx.float32
