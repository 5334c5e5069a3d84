"""The quantizer's parts: modules, costs, allocation, calibration, staged forwards, KL."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from optiq_dhara.masks import block_causal_mask
from optiq_dhara.quantize.allocate import allocate, hull_steps, module_points
from optiq_dhara.quantize.calibration import load_calibration, read_calibration_text, split_tokens
from optiq_dhara.quantize.modules import (
    Grouping,
    Quantizable,
    check_candidates,
    check_group_size,
    float_bits,
    parameter_count,
    quantizable_modules,
)
from optiq_dhara.quantize.sensitivity import (
    Calibrator,
    fake_quantize,
    fisher_stride,
    load_sensitivities,
    measure_sensitivities,
    naive_forwards,
)
from optiq_dhara.quantize.staged import forward_from, forward_with_states

UNIFORM = Grouping(32, None)  # group size 32 at every bits


@pytest.fixture(scope="module")
def modules(golden_model):
    return quantizable_modules(golden_model)


@pytest.fixture(scope="module")
def tokens():
    return mx.array(np.random.default_rng(1).integers(0, 300, size=(4, 48)))


# modules and costs


def test_quantizable_modules_are_the_linears_and_the_embedding(modules):
    paths = [m.path for m in modules]
    assert len(paths) == 1 + 2 * 7
    assert paths[0] == "model.embed_tokens"
    assert "model.layers.1.mlp.down_proj" in paths
    assert not any("canon" in p or "norm" in p for p in paths)
    down = next(m for m in modules if m.path == "model.layers.0.mlp.down_proj")
    assert down.shape == (64, 160) and down.layer == 0 and down.kind == "model.layers.mlp.down_proj"


def test_stored_bits_count_weights_scales_and_biases():
    m = Quantizable("x", (8, 128), 0)
    assert m.stored_bits(4, 64, 16) == 8 * 128 * 4 + 2 * 16 * 16


def test_grouping_widens_only_high_bits_and_only_where_rows_divide():
    narrow, wide = Quantizable("a", (8, 352), 0), Quantizable("b", (8, 192), 0)
    grouping = Grouping(32)
    assert [grouping.of(narrow, b) for b in (4, 6, 8)] == [32, 32, 32]  # 352 = 11 x 32
    assert [grouping.of(wide, b) for b in (4, 6, 8)] == [32, 32, 64]
    assert Grouping(32).of(Quantizable("c", (8, 256), 0), 8) == 128
    assert Grouping(32, None).of(Quantizable("c", (8, 256), 0), 8) == 32
    assert grouping.sizes([narrow, wide], {"a": 8, "b": 4}) == {"a": 32, "b": 32}


def test_fisher_stride_keeps_the_estimate_within_half_the_allowance():
    assert fisher_stride(45.2, 4) == 1  # a big model: every sample
    assert fisher_stride(6.0, 16) == 4  # 2 x (1 + 2 / 4) = 3 forwards per sample
    assert fisher_stride(3.2, 16) == 16  # the float forwards alone take half: one sample
    for allowance in (5.0, 6.0, 9.0, 13.0):
        stride = fisher_stride(allowance, 64)
        assert 2 * (1 + 2 / stride) <= allowance / 2 + 1e-9


def test_parameter_count_and_float_bits(golden_model, modules):
    assert parameter_count(golden_model) == 110208  # inv_freq buffers excluded
    quantized = sum(m.numel for m in modules)
    inv_freq_bits = 2 * 8 * 32
    assert (
        float_bits(golden_model, [m.path for m in modules])
        == (110208 - quantized) * 32 + inv_freq_bits
    )


def test_candidate_and_group_size_errors_name_the_value(modules):
    assert check_candidates([8, 4, 4], 64) == (4, 8)
    with pytest.raises(ValueError, match=r"\[7\] not supported"):
        check_candidates([4, 7], 64)
    with pytest.raises(ValueError, match="group size 48 is not supported"):
        check_candidates([4], 48)
    with pytest.raises(ValueError, match=r"mlp.down_proj \(width 160\).*--group-size 32"):
        check_group_size(modules, 64)
    check_group_size(modules, 32)


# allocation


def test_hull_drops_dominated_and_non_convex_points():
    points = {2: (10, 9.0), 3: (20, 8.9), 4: (30, 1.0), 6: (40, 1.5), 8: (50, 0.5)}
    steps = hull_steps("m", points)
    assert [(s.low, s.high) for s in steps] == [(2, 4), (4, 8)]
    assert steps[0].ratio > steps[1].ratio


def test_allocation_takes_the_best_kl_per_bit_within_budget():
    points = {
        "a": {4: (100, 1.0), 8: (200, 0.0)},  # 0.01 KL per bit
        "b": {4: (100, 5.0), 8: (200, 0.0)},  # 0.05
        "c": {4: (100, 3.0), 8: (200, 0.0)},  # 0.03
    }
    plan = allocate(points, 300 + 200)
    assert plan.bits == {"a": 4, "b": 8, "c": 8}
    assert plan.stored_bits == 500
    assert allocate(points, 399).bits == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(ValueError, match="over the budget"):
        allocate(points, 299)


def test_allocation_takes_a_large_module_when_it_saves_more():
    """Greedy by ratio would take the small module first and then have no room for the large one."""
    points = {
        "small": {4: (100, 60.0), 8: (160, 0.0)},  # 1.0 KL per extra bit
        "large": {4: (1000, 90.0), 8: (1100, 0.0)},  # 0.9
    }
    plan = allocate(points, 1100 + 100)
    assert plan.bits == {"small": 4, "large": 8}
    assert allocate(points, 1100 + 160).bits == {"small": 8, "large": 8}


def test_allocation_is_optimal_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(20):
        points = {
            f"m{i}": {
                4: (int(c), float(k)),
                6: (int(c * 1.5), float(k / 16)),
                8: (int(c * 2), k / 256),
            }
            for i, (c, k) in enumerate(zip(rng.integers(10, 100, 6), rng.uniform(0, 1, 6)))
        }
        budget = int(sum(p[4][0] for p in points.values()) * 1.4)
        plan = allocate(points, budget)
        assert plan.stored_bits <= budget
        best = min(
            sum(points[p][b][1] for p, b in zip(points, choice))
            for choice in itertools.product((4, 6, 8), repeat=6)
            if sum(points[p][b][0] for p, b in zip(points, choice)) <= budget
        )
        assert sum(points[p][b][1] for p, b in plan.bits.items()) <= best + 1e-9


# calibration


def test_shipped_corpus_is_small_text(golden_dir):
    text, source = read_calibration_text(None, None)
    assert source.endswith("calibration.txt")
    assert 20_000 < len(text.encode()) < 200_000


def test_held_out_and_calibration_do_not_overlap():
    ids = list(range(1000))
    data = split_tokens(ids, "x", num_samples=5, seq_len=50, held_out_samples=3)
    assert data.calibration.shape == (5, 50) and data.held_out.shape == (3, 50)
    starts = set(np.array(data.calibration[:, 0]).tolist())
    assert not starts & set(np.array(data.held_out[:, 0]).tolist())
    with pytest.raises(ValueError, match=r"gives 1000 tokens.*21 are needed"):
        split_tokens(ids, "x", num_samples=18, seq_len=50, held_out_samples=3)


def test_calibration_file_errors(tmp_path, golden_dir):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(golden_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_calibration(tokenizer, empty)
    with pytest.raises(ValueError, match="missing.txt does not exist"):
        load_calibration(tokenizer, tmp_path / "missing.txt")
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    with pytest.raises(ValueError, match=r"chat.jsonl:2: not valid JSON"):
        load_calibration(tokenizer, bad)


def test_chat_jsonl_is_rendered_through_the_template(tmp_path, golden_dir):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(golden_dir)
    chat = tmp_path / "chat.jsonl"
    record = {
        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    }
    chat.write_text(json.dumps(record) + "\n" + json.dumps({"text": "plain words"}) + "\n")
    text, _ = read_calibration_text(chat, tokenizer)
    assert text.startswith("<|im_start|>user\nhello<|im_end|>") and text.endswith("plain words")


# staged forwards


@pytest.mark.parametrize("block_len", [None, 8])
def test_staged_forward_equals_the_model(golden_model, tokens, block_len):
    mask = None if block_len is None else block_causal_mask(tokens.shape[1], block_len)
    expected = golden_model(tokens, mask=mask)
    logits, states = forward_with_states(golden_model, tokens, mask)
    assert len(states) == 3
    assert mx.array_equal(logits, expected).item()
    for start in range(3):
        assert mx.array_equal(
            forward_from(golden_model, states[start], start, mask), expected
        ).item()


# sensitivities


@pytest.fixture(scope="module")
def calibrator(golden_model, modules, tokens):
    calib = Calibrator(golden_model, tokens, dtype=mx.float32, grouping=UNIFORM, block_len=16)
    fisher = calib.capture_with_fisher(modules)
    return calib, fisher


def test_fisher_pass_leaves_the_model_as_it_was(golden_model, calibrator):
    trainable = {k for k, _ in tree_flatten(golden_model.trainable_parameters())}
    assert not any(k.endswith("inv_freq") for k in trainable)
    assert "model.norm.weight" in trainable


def test_exact_kl_falls_with_bits_and_restores_the_weight(golden_model, calibrator, modules):
    calib, _ = calibrator
    for module in (modules[0], modules[3], modules[-1]):
        before = dict(golden_model.named_modules())[module.path].weight
        kl4, kl8 = calib.exact_kl(module, 4), calib.exact_kl(module, 8)
        assert dict(golden_model.named_modules())[module.path].weight is before
        for mode in ("ar", "diffusion"):
            assert kl4[mode] > 10 * kl8[mode] > 0


def test_fisher_estimate_tracks_exact_kl(calibrator, modules):
    calib, fisher = calibrator
    ratios = []
    for module in modules:
        est, exact = calib.estimated_kl(fisher, module, 4), calib.exact_kl(module, 4)
        ratios.append(sum(exact.values()) / sum(est.values()))
    assert 0.5 < float(np.exp(np.mean(np.log(ratios)))) < 2
    assert max(ratios) / min(ratios) < 6


def test_fake_quantize_matches_mlx_quantization():
    w = mx.random.normal((16, 64))
    expected = mx.dequantize(*mx.quantize(w, group_size=32, bits=4), group_size=32, bits=4)
    assert mx.array_equal(fake_quantize(w, 4, 32, mx.float32, "mlx"), expected).item()
    assert fake_quantize(w, 4, 32, mx.bfloat16).dtype == mx.float32


def test_auto_stays_within_its_forward_allowance(golden_model, modules, tokens, tmp_path):
    sens = measure_sensitivities(
        golden_model,
        tokens,
        modules,
        (4, 8),
        UNIFORM,
        dtype=mx.float32,
        budget=sum(m.stored_bits(6, 32, 32) for m in modules),
        scale_bits=32,
        block_len=16,
        forward_fraction=0.25,
    )
    assert sens.method == "auto"
    assert sens.naive_forwards_per_sample == naive_forwards(15, 2) == 32
    assert sens.forwards_per_sample <= 0.25 * 32 + 1e-9
    measured = [p for p, s in sens.modules.items() if s.measured]
    assert 0 < len(measured) < len(modules)
    for s in sens.modules.values():
        assert s.kl[4] > s.kl[8] > 0
    path = tmp_path / "sens.json"
    sens.save(path)
    again = load_sensitivities(path, modules, (4, 8), UNIFORM)
    assert again.kl() == sens.kl()
    assert again.extra["reused_from"] == str(path)


def test_exact_measures_every_module(golden_model, modules, tokens):
    sens = measure_sensitivities(
        golden_model,
        tokens[:2],
        modules,
        (4, 8),
        UNIFORM,
        dtype=mx.float32,
        method="exact",
        block_len=16,
    )
    assert sens.method == "exact"
    assert all(s.measured for s in sens.modules.values())


def test_sensitivities_file_must_fit(golden_model, modules, tmp_path):
    sens = measure_sensitivities(
        golden_model,
        mx.zeros((1, 8), mx.int32),
        modules[:1],
        (4, 8),
        UNIFORM,
        dtype=mx.float32,
        method="exact",
        block_len=4,
    )
    path = tmp_path / "s.json"
    sens.save(path)
    with pytest.raises(ValueError, match="group size 32, not 64"):
        load_sensitivities(path, modules[:1], (4, 8), Grouping(64, None))
    with pytest.raises(ValueError, match="wide groups from None bits, not 8"):
        load_sensitivities(path, modules[:1], (4, 8), Grouping(32))
    with pytest.raises(ValueError, match=r"no KL for bits \[6\]"):
        load_sensitivities(path, modules[:1], (4, 6, 8), UNIFORM)
    with pytest.raises(ValueError, match="another model"):
        load_sensitivities(path, modules, (4, 8), UNIFORM)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="junk.json is not"):
        load_sensitivities(tmp_path / "junk.json", modules, (4, 8), UNIFORM)
    data = json.loads(path.read_text())
    del data["modules"]["model.embed_tokens"]["ar"]
    (tmp_path / "cut.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cut.json is malformed .*'ar'"):
        load_sensitivities(tmp_path / "cut.json", modules[:1], (4, 8), UNIFORM)


@pytest.fixture(scope="module")
def deep_model():
    """12 thin layers: enough modules that a tenth of the naive cost is below measuring all."""
    from optiq_dhara.model import Model, ModelArgs

    mx.random.seed(3)
    args = ModelArgs(
        hidden_size=64,
        num_hidden_layers=12,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        mask_token_id=316,
    )
    model = Model(args)
    model.update({"model": {"embed_tokens": {"weight": mx.random.normal((320, 64)) * 0.5}}})
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("grouping", [UNIFORM, Grouping(32)], ids=["uniform", "wide"])
def test_auto_reaches_the_exact_allocation_for_a_tenth_of_the_forwards(deep_model, grouping):
    modules = quantizable_modules(deep_model)
    tokens = mx.array(np.random.default_rng(2).integers(0, 300, size=(2, 32)))
    budget = sum(m.stored_bits(5, 32, 32) for m in modules)  # a quarter of the modules at 8 bits
    common = dict(dtype=mx.float32, budget=budget, scale_bits=32, block_len=16)
    auto = measure_sensitivities(deep_model, tokens, modules, (4, 8), grouping, **common)
    exact = measure_sensitivities(
        deep_model, tokens, modules, (4, 8), grouping, method="exact", **common
    )
    assert auto.method == "auto"
    assert auto.forwards_per_sample <= auto.naive_forwards_per_sample / 10
    assert exact.forwards_per_sample > 5 * auto.forwards_per_sample

    def true_kl(sens):
        points = module_points(modules, sens.kl(), (4, 8), grouping, 32)
        plan = allocate(points, budget).bits
        return sum(exact.kl()[path][bits] for path, bits in plan.items())

    assert true_kl(auto) <= 1.1 * true_kl(exact)
