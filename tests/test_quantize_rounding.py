"""Rounding each group to its grid: MLX's format kept, never worse than mx.quantize."""

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from conftest import convert_cli

from optiq_dhara.quantize.apply import quantize_to_plan
from optiq_dhara.quantize.modules import Grouping, quantizable_modules
from optiq_dhara.quantize.rounding import fake_quantize, pack, quantize_weight
from optiq_dhara.quantize.sensitivity import load_sensitivities, measure_sensitivities

BITS = (2, 3, 4, 5, 6, 8)
SMALL = ("--group-size", "32", "--num-samples", "2", "--seq-len", "32")


@pytest.mark.parametrize("bits", BITS)
def test_pack_is_the_layout_mlx_dequantizes(bits):
    rng = np.random.default_rng(bits)
    levels = rng.integers(0, 2**bits, size=(3, 128))
    scales = rng.uniform(0.5, 2.0, size=(3, 4)).astype(np.float32)
    biases = rng.normal(size=(3, 4)).astype(np.float32)
    packed = pack(mx.array(levels), bits)
    assert packed.dtype == mx.uint32 and packed.shape == (3, 128 * bits // 32)
    back = mx.dequantize(packed, mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    expected = levels * np.repeat(scales, 32, axis=1) + np.repeat(biases, 32, axis=1)
    np.testing.assert_allclose(np.array(back), expected, rtol=1e-6, atol=1e-6)


def group_errors(weight, packed, scales, biases, bits, group_size):
    back = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    error = (back.astype(mx.float32) - weight.astype(mx.float32)).square()
    return np.array(error.reshape(-1, group_size).sum(axis=-1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", (32, 64, 128))
@pytest.mark.parametrize("dtype", (mx.float32, mx.bfloat16))
def test_best_never_stores_a_group_worse_than_mx_quantize(bits, group_size, dtype):
    mx.random.seed(bits * group_size)
    weight = (mx.random.normal((32, 256)) * 0.02).astype(dtype)
    best = quantize_weight(weight, bits, group_size, "best")
    plain = mx.quantize(weight, group_size=group_size, bits=bits)
    assert [a.shape for a in best] == [a.shape for a in plain]
    assert [a.dtype for a in best] == [a.dtype for a in plain]
    ours = group_errors(weight, *best, bits, group_size)
    theirs = group_errors(weight, *plain, bits, group_size)
    assert (ours <= theirs).all()
    assert ours.sum() < theirs.sum()


def test_a_min_max_grid_at_its_group_size_comes_back_exactly():
    """llama.cpp's Q4_1 stores each group of 32 as d * q + m with q in 0..15."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 16, size=(8, 128))
    levels[:, ::32], levels[:, 1::32] = 0, 15  # every group uses its whole range
    d = rng.uniform(0.01, 0.05, size=(8, 4))
    m = rng.normal(scale=0.1, size=(8, 4))
    weight = mx.array(levels * np.repeat(d, 32, axis=1) + np.repeat(m, 32, axis=1), mx.float32)
    exact = fake_quantize(weight, 4, 32, mx.float32, "best")
    assert mx.abs(exact - weight).max().item() < 1e-6
    assert mx.abs(fake_quantize(weight, 4, 32, mx.float32, "mlx") - weight).max().item() > 1e-3


def test_quantize_to_plan_stores_the_rounding(golden_model):
    plan = {m.path: 4 for m in quantizable_modules(golden_model)[:3]}
    sizes = dict.fromkeys(plan, 32)
    floats = {path: m.weight for path, m in golden_model.named_modules() if path in plan}
    for rounding in ("best", "mlx"):
        quantized = dict(
            quantize_to_plan(copy.deepcopy(golden_model), plan, sizes, rounding).named_modules()
        )
        for path, weight in floats.items():
            module = quantized[path]
            assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            stored = (module.weight, module.scales, module.biases)
            for got, want in zip(stored, quantize_weight(weight, 4, 32, rounding)):
                assert mx.array_equal(got, want).item()
    with pytest.raises(ValueError, match="rounding 'nearest' is not one of best, mlx"):
        quantize_to_plan(copy.deepcopy(golden_model), plan, sizes, "nearest")


def test_sensitivities_remember_their_rounding(golden_model, tmp_path):
    modules = quantizable_modules(golden_model)[:1]
    sens = measure_sensitivities(
        golden_model,
        mx.zeros((1, 8), mx.int32),
        modules,
        (4, 8),
        Grouping(32, None, "mlx"),
        dtype=mx.float32,
        method="exact",
        block_len=4,
    )
    path = tmp_path / "s.json"
    sens.save(path)
    assert json.loads(path.read_text())["rounding"] == "mlx"
    load_sensitivities(path, modules, (4, 8), Grouping(32, None, "mlx"))
    with pytest.raises(ValueError, match="rounding mlx, not best: pass --rounding mlx"):
        load_sensitivities(path, modules, (4, 8), Grouping(32, None, "best"))
    older = json.loads(path.read_text())
    del older["rounding"]  # written before roundings existed: mx.quantize's
    path.write_text(json.dumps(older))
    load_sensitivities(path, modules, (4, 8), Grouping(32, None, "mlx"))
    with pytest.raises(ValueError, match="rounding mlx, not best"):
        load_sensitivities(path, modules, (4, 8), Grouping(32, None))


def test_convert_records_and_applies_the_rounding(golden_dir, tmp_path):
    for rounding in ("best", "mlx"):
        out = tmp_path / rounding
        options = [] if rounding == "best" else ["--rounding", "mlx"]
        result = convert_cli(golden_dir, out, *SMALL, *options)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "quantization_report.json").read_text())
        assert report["rounding"] == rounding
        assert json.loads((out / "sensitivities.json").read_text())["rounding"] == rounding
        model, _ = mlx_lm.load(str(out))
        source, _ = mlx_lm.load(str(golden_dir))
        quantized = dict(model.named_modules())
        for path, module in source.named_modules():
            if path in report["layers"]:
                layer = report["layers"][path]
                expected = quantize_weight(
                    module.weight, layer["bits"], layer["group_size"], rounding
                )
                assert mx.array_equal(quantized[path].scales, expected[1]).item()
    result = convert_cli(golden_dir, tmp_path / "odd", "--rounding", "nearest")
    assert result.exit_code == 2 and "'nearest' is not one of" in result.output
