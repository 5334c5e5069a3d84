"""`dhara-mlx bench` reports every mode and the uncached diffusion reference."""

import json

import mlx.core as mx
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.runtime.bench import make_prompt, random_model, run_bench, uncached_diffusion


def test_uncached_reference_is_the_golden_semantics(golden_model, golden, golden_settings):
    settings = golden_settings["diffusion_p1_bl8"]
    out = uncached_diffusion(
        golden_model,
        golden["prompt_p1"].tolist(),
        max_tokens=32,
        block_len=8,
        threshold=settings["threshold"],
    )
    assert out == golden["diffusion_p1_bl8"].tolist()


def test_run_bench_on_a_small_random_model():
    model = random_model(
        mx.float32,
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        mask_token_id=63,
    )
    rows, ref = run_bench(
        model, "small", prompt_lengths=(5, 20), max_tokens=6, block_len=4, k=3, repeats=2
    )
    assert [(r.mode, r.prompt_tokens) for r in rows] == [
        (m, n) for n in (5, 20) for m in ("ar", "diffusion", "spec")
    ]
    for row in rows:
        assert row.generated == 6 and row.tokens_per_second > 0 and row.peak_memory_gb > 0
        assert row.bandwidth_gb_s > 0 and row.first_token_seconds > 0
    assert ref.prompt_tokens == 20 and ref.same_output and ref.speedup > 0


def test_prompts_cut_from_text_or_random(golden_model):
    assert make_prompt(golden_model, 5, text_ids=[7, 8]) == [7, 8, 7, 8, 7]
    prompt = make_prompt(golden_model, 50, seed=1)
    assert prompt == make_prompt(golden_model, 50, seed=1) != make_prompt(golden_model, 50, seed=2)
    assert golden_model.args.mask_token_id not in prompt


def test_bench_command_with_a_prompt_file(golden_dir, tmp_path):
    text = tmp_path / "prompt.txt"
    text.write_text("def hello(name):\n    return name\n")
    args = ["bench", "--prompt-len", "8", "--max-tokens", "2", "--block-len", "4", "--mode", "ar"]
    result = CliRunner().invoke(
        app, [*args, "--model", str(golden_dir), "--prompt-file", str(text)]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*args, "--prompt-file", str(text)])
    assert result.exit_code != 0 and "needs --model" in result.output


def test_bench_command(golden_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(golden_dir),
            "--prompt-len",
            "8",
            "--max-tokens",
            "4",
            "--block-len",
            "4",
            "--mode",
            "ar",
            "--mode",
            "spec",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| golden_tiny | spec | 8 | 4 |" in result.output
    data = json.loads(out.read_text())
    assert [row["mode"] for row in data["rows"]] == ["ar", "spec"]
    assert data["reference"]["same_output"] is True
