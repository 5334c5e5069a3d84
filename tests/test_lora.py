"""LoRA and QLoRA with the joint loss: training lowers both losses, adapters load in
mlx-lm, fusing keeps every layer's bits."""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import quantize_model, save
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.runtime import generate_ids
from optiq_dhara.train.data import dataset_batches, load_jsonl_splits
from optiq_dhara.train.lora import LoraConfig, fuse, run_lora

PROMPT = [40, 41, 42, 43, 44, 45]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """A tiny, very regular text task: a few LoRA steps must fit it."""
    folder = tmp_path_factory.mktemp("text_data")
    lines = [f"the cat sat on the mat {i % 3}. the cat sat on the mat {i % 3}." for i in range(8)]
    write_jsonl(folder / "train.jsonl", [{"text": line} for line in lines])
    write_jsonl(folder / "valid.jsonl", [{"text": line} for line in lines[:4]])
    return folder


def small_config(**changes) -> LoraConfig:
    settings = dict(
        iters=12,
        batch_size=2,
        learning_rate=1e-2,
        num_layers=-1,
        rank=4,
        steps_per_report=4,
        steps_per_eval=12,
        val_batches=2,
        spec_prompts=1,
        spec_tokens=8,
    )
    return LoraConfig(**{**settings, **changes})


def evaluations(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "val_ar_loss" in entry]


@pytest.fixture(scope="module")
def float_run(golden_dir, text_data, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("float_adapters")
    model, history = run_lora(
        golden_dir, text_data, adapters, small_config(), report=lambda e: None
    )
    return model, history, adapters


@pytest.fixture(scope="module")
def mixed_dir(golden_dir, tmp_path_factory) -> Path:
    """The golden model quantized 8-bit in attention and the embedding, 4-bit in the MLP."""
    model, tokenizer, config = mlx_lm.load(str(golden_dir), return_config=True)

    def predicate(path, module):
        if "mlp" in path:
            return {"group_size": 32, "bits": 4}
        return {"group_size": 32, "bits": 8}

    model, config = quantize_model(model, config, 32, 4, quant_predicate=predicate)
    out = tmp_path_factory.mktemp("mixed")
    save(out, golden_dir, model, tokenizer, config)
    return out


def quantized_bits(model) -> dict[str, tuple[int, int]]:
    return {
        name: (module.bits, module.group_size)
        for name, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def test_lora_steps_lower_both_losses(float_run):
    _, history, _ = float_run
    first, last = evaluations(history)[0], evaluations(history)[-1]
    assert first["step"] == 0 and last["step"] == 12
    assert last["val_ar_loss"] < first["val_ar_loss"] - 0.5
    assert last["val_diffusion_loss"] < first["val_diffusion_loss"] - 0.5
    assert 0.0 <= last["val_spec_accepted_k8"] <= 7.0
    trained = [entry for entry in history if "train_ar_loss" in entry]
    assert all(entry["train_diffusion_loss"] > 0 for entry in trained)
    assert all(entry["tokens_per_s"] > 0 and entry["peak_memory_gb"] > 0 for entry in trained)


def test_lora_trains_adapters_only(float_run, golden_model):
    model, _, _ = float_run
    lora = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(lora) == len(LINEARS) * len(model.layers)
    base = dict(tree_flatten(golden_model.parameters()))
    trained = dict(tree_flatten(model.trainable_parameters()))
    assert trained and all(key.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for key in trained)
    weight = model.layers[0].self_attn.q_proj.linear.weight
    assert mx.array_equal(weight, base["model.layers.0.self_attn.q_proj.weight"])


def test_adapters_round_trip_through_mlx_lm_load(float_run, golden_dir):
    model, _, adapters = float_run
    assert (adapters / "adapters.safetensors").is_file()
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["training"]["objective"] == "joint"
    loaded, _ = mlx_lm.load(str(golden_dir), adapter_path=str(adapters))
    base, _ = mlx_lm.load(str(golden_dir))
    ids = mx.array([PROMPT])
    assert mx.array_equal(loaded(ids), model(ids))
    assert not mx.allclose(base(ids), model(ids), atol=1e-3)
    # The runtime decodes the adapted model in every mode; spec's output is AR's.
    ar = generate_ids(loaded, PROMPT, mode="ar", max_tokens=12)
    assert generate_ids(loaded, PROMPT, mode="spec", max_tokens=12) == ar
    assert len(generate_ids(loaded, PROMPT, mode="diffusion", max_tokens=12, block_len=8)) == 12


def test_ar_objective_has_no_diffusion_term(golden_dir, text_data, tmp_path):
    _, history = run_lora(
        golden_dir,
        text_data,
        tmp_path,
        small_config(iters=4, objective="ar", spec_prompts=0),
        report=lambda e: None,
    )
    trained = [entry for entry in history if "train_ar_loss" in entry]
    assert all(entry["train_diffusion_loss"] == 0.0 for entry in trained)
    assert all(entry["loss"] == pytest.approx(entry["train_ar_loss"]) for entry in trained)
    # The diffusion loss is still measured at validation.
    assert evaluations(history)[-1]["val_diffusion_loss"] > 0


def test_qlora_on_mixed_precision_model_trains(mixed_dir, text_data, tmp_path):
    model, history = run_lora(
        mixed_dir, text_data, tmp_path, small_config(spec_prompts=0), report=lambda e: None
    )
    wrapped = {
        type(m.linear).__name__ + str(m.linear.bits)
        for _, m in model.named_modules()
        if isinstance(m, LoRALinear)
    }
    assert wrapped == {"QuantizedLinear4", "QuantizedLinear8"}
    first, last = evaluations(history)[0], evaluations(history)[-1]
    assert last["val_ar_loss"] < first["val_ar_loss"] - 0.5
    assert last["val_diffusion_loss"] < first["val_diffusion_loss"] - 0.5


@pytest.fixture(scope="module")
def mixed_adapters(mixed_dir, text_data, tmp_path_factory) -> Path:
    adapters = tmp_path_factory.mktemp("mixed_adapters")
    run_lora(
        mixed_dir, text_data, adapters, small_config(iters=6, spec_prompts=0), report=lambda e: None
    )
    return adapters


def test_fuse_keeps_per_layer_bits(mixed_dir, mixed_adapters, tmp_path):
    fuse(mixed_dir, mixed_adapters, tmp_path)
    fused, _ = mlx_lm.load(str(tmp_path))
    original, _ = mlx_lm.load(str(mixed_dir))
    assert quantized_bits(fused) == quantized_bits(original)
    assert {bits for bits, _ in quantized_bits(fused).values()} == {4, 8}
    adapted, _ = mlx_lm.load(str(mixed_dir), adapter_path=str(mixed_adapters))
    ids = mx.array([PROMPT])
    moved = mx.abs(adapted(ids) - original(ids)).max().item()
    error = mx.abs(fused(ids) - adapted(ids)).max().item()
    assert error < moved / 2


def test_fuse_dequantize_writes_float_weights_equal_to_the_adapted_model(
    mixed_dir, mixed_adapters, tmp_path
):
    fuse(mixed_dir, mixed_adapters, tmp_path, dequantize=True)
    fused, _, config = mlx_lm.load(str(tmp_path), return_config=True)
    assert "quantization" not in config and not quantized_bits(fused)
    adapted, _ = mlx_lm.load(str(mixed_dir), adapter_path=str(mixed_adapters))
    ids = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(fused(ids)), np.array(adapted(ids)), atol=1e-3)


def test_chat_batches_mask_the_prompt_and_pad_with_mask(golden_dir, tmp_path):
    _, tokenizer = mlx_lm.load(str(golden_dir))
    chats = [
        {
            "messages": [
                {"role": "user", "content": "hi" * n},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for n in (1, 4)
    ]
    write_jsonl(tmp_path / "train.jsonl", chats)
    splits = load_jsonl_splits(tmp_path, tokenizer, mask_prompt=True)
    tokens, mask = next(dataset_batches(splits["train"], 2, pad_id=316))
    for row in range(2):
        ids, offset = splits["train"][row]
        trained = np.flatnonzero(np.array(mask[row]))
        assert trained.tolist() == list(range(offset, len(ids)))
        assert np.array(tokens[row, len(ids) :]).tolist() == [316] * (tokens.shape[1] - len(ids))


def test_bad_data_folder_is_named(golden_dir, tmp_path):
    with pytest.raises(ValueError, match="train.jsonl"):
        run_lora(golden_dir, tmp_path, tmp_path / "a", small_config())
    write_jsonl(tmp_path / "train.jsonl", [{"question": "?"}])
    with pytest.raises(ValueError, match="train.jsonl"):
        run_lora(golden_dir, tmp_path, tmp_path / "a", small_config())


def test_lora_and_fuse_commands(golden_dir, text_data, tmp_path):
    runner = CliRunner()
    adapters = tmp_path / "adapters"
    result = runner.invoke(
        app,
        [
            "lora",
            "--model",
            str(golden_dir),
            "--data",
            str(text_data),
            "--iters",
            "4",
            "--batch-size",
            "2",
            "--learning-rate",
            "1e-2",
            "--rank",
            "4",
            "--num-layers",
            "1",
            "--objective",
            "joint",
            "--steps-per-report",
            "2",
            "--steps-per-eval",
            "4",
            "--val-batches",
            "1",
            "--spec-prompts",
            "1",
            "--adapter-path",
            str(adapters),
        ],
    )
    assert result.exit_code == 0, result.output
    reports = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", result.output)]
    trained = [r for r in reports if "train_ar_loss" in r]
    assert trained and all(r["train_diffusion_loss"] > 0 and r["tokens_per_s"] > 0 for r in trained)
    assert "val_spec_accepted_k8" in reports[-1]
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["rank"] == 4

    fused = tmp_path / "fused"
    result = runner.invoke(
        app,
        [
            "fuse",
            "--model",
            str(golden_dir),
            "--adapter-path",
            str(adapters),
            "--save-path",
            str(fused),
        ],
    )
    assert result.exit_code == 0, result.output
    adapted, _ = mlx_lm.load(str(golden_dir), adapter_path=str(adapters))
    model, _ = mlx_lm.load(str(fused))
    ids = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(model(ids)), np.array(adapted(ids)), rtol=1e-4, atol=1e-3)


def test_commands_reject_bad_options(golden_dir, text_data, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["lora", "--model", str(golden_dir), "--data", str(text_data), "--objective", "diffusion"],
    )
    assert result.exit_code != 0 and "joint" in result.output
    result = runner.invoke(
        app,
        [
            "lora",
            "--model",
            str(golden_dir),
            "--data",
            str(text_data),
            "--num-layers",
            "9",
            "--adapter-path",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code != 0 and "num_layers 9" in result.output
    result = runner.invoke(
        app, ["fuse", "--model", str(golden_dir), "--adapter-path", str(tmp_path)]
    )
    assert result.exit_code != 0 and "adapter_config.json" in result.output


def test_same_seed_gives_the_same_adapters(golden_dir, text_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_lora(
            golden_dir,
            text_data,
            tmp_path / name,
            small_config(iters=2, spec_prompts=0),
            report=lambda e: None,
        )
        runs.append(mx.load(str(tmp_path / name / "adapters.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    assert all(mx.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
