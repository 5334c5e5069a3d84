"""The scripts in examples/ run as documented and print what they promise."""

import json
import runpy
import sys
from pathlib import Path

import mlx.core as mx

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_three_modes_prints_each_mode_and_spec_matches_ar(monkeypatch, capsys):
    out = run_example("three_modes.py", monkeypatch, capsys)
    sections = dict(part.split("\n", 1) for part in out.split("--- ")[1:])
    assert [s.split(":")[0] for s in sections] == ["ar", "diffusion", "spec"]
    ar, diffusion, spec = sections.values()
    assert spec == ar and "self.value = value" in ar
    assert float(list(sections)[1].split(": ")[1].split()[0]) > 1.5  # diffusion tokens/forward


def test_mixed_precision_writes_a_mix_that_stock_mlx_lm_loads(monkeypatch, capsys):
    out = run_example("mixed_precision.py", monkeypatch, capsys)
    assert "modules at 4 bits" in out and "modules at 8 bits" in out
    achieved = float(out.split(" bits per weight")[0].split()[-1])
    assert achieved <= 5.8


def a2d_tiny(tmp_path: Path) -> list[str]:
    """examples/a2d.py's arguments for a two-step run on the trained fixture."""
    fixture = EXAMPLES.parent / "tests" / "fixtures" / "dhara_tiny_trained"
    tiny = ["--model", str(fixture), "--work", str(tmp_path), "--iters", "2", "--batch-size", "2"]
    tiny += ["--num-layers", "-1", "--prompts", "2", "--prompt-tokens", "16", "--new-tokens", "8"]
    return tiny + ["--code-modules", "4"]


def test_a2d_measures_before_and_after_a_joint_lora(monkeypatch, capsys, tmp_path):
    out = run_example("a2d.py", monkeypatch, capsys, *a2d_tiny(tmp_path))
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    labels = [row[0] for row in rows[1:]]  # after the header
    assert [label.split(",")[0].split(" (")[0] for label in labels] == [
        "AR perplexity",
        "AR perplexity",
        "diffusion tokens per forward",
        "diffusion tokens equal to AR's",
        "self-spec drafts accepted per round",
    ]
    assert all(len(row) == 3 for row in rows[1:])  # a figure before and after
    fused = json.loads((tmp_path / "joint" / "config.json").read_text())
    assert fused["dhara_objective"] == "joint"


def test_a2d_full_training_changes_canon_taps_and_the_mask_row(monkeypatch, capsys, tmp_path):
    from mlx_lm import load

    out = run_example("a2d.py", monkeypatch, capsys, *a2d_tiny(tmp_path), "--full")
    assert "joint full training: 2 steps" in out
    assert (tmp_path / "adapters").exists() is False  # no LoRA involved
    trained, _ = load(str(tmp_path / "joint"))
    source, _ = load(str(EXAMPLES.parent / "tests" / "fixtures" / "dhara_tiny_trained"))
    mask = source.args.mask_token_id
    embed = trained.model.embed_tokens.weight, source.model.embed_tokens.weight
    assert not mx.array_equal(embed[0][mask], embed[1][mask]).item()
    taps = [
        layer.canon_a.conv.weight for layer in (trained.model.layers[0], source.model.layers[0])
    ]
    assert not mx.array_equal(*taps).item()
    config = json.loads((tmp_path / "joint" / "config.json").read_text())
    assert config["dhara_objective"] == "joint"
