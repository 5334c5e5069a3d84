"""Loading and saving dhara checkpoints through mlx-lm; bad checkpoints fail naming the problem."""

import json
import shutil
import types

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_model, save_config, save_model

import optiq_dhara
from optiq_dhara import checkpoint, registry
from optiq_dhara.model import ModelArgs


def copy_golden(golden_dir, tmp_path, config_changes=None, weight_changes=None):
    """A copy of the golden checkpoint with config keys and tensors replaced (None drops)."""
    path = tmp_path / "ckpt"
    shutil.copytree(golden_dir, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in (config_changes or {}).items():
        config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(path / "model.safetensors"))
    for key, value in (weight_changes or {}).items():
        if value is None:
            weights.pop(key)
        else:
            weights[key] = value
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def logits_of(model, golden):
    return model(golden["ids_a"])


def test_mlx_lm_load_opens_the_hugging_face_directory(golden_dir, golden):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(golden_dir))
    assert mx.abs(logits_of(model, golden) - golden["ar_logits"]).max().item() <= 1e-5
    assert tokenizer.eos_token == "<|im_end|>"


def test_checkpoint_load_checks_then_loads(golden_dir, golden):
    model, _ = checkpoint.load(golden_dir)
    assert mx.abs(logits_of(model, golden) - golden["ar_logits"]).max().item() <= 1e-5


def test_directory_saved_by_mlx_lm_loads_back(golden_model, golden, tmp_path):
    """MLX layout on disk: convs (C, K, 1), no lm_head, inv_freq in float32."""
    save_model(tmp_path, golden_model)
    save_config({**vars(golden_model.args)}, config_path=tmp_path / "config.json")
    saved = mx.load(str(tmp_path / "model.safetensors"))
    assert saved["model.layers.0.canon_a.conv.weight"].shape == (64, 4, 1)
    assert saved["model.layers.1.self_attn.rotary_emb.inv_freq"].dtype == mx.float32
    assert "lm_head.weight" not in saved
    reloaded, _ = load_model(tmp_path)
    assert mx.array_equal(logits_of(reloaded, golden), logits_of(golden_model, golden))


def test_mlx_lm_save_then_load(golden_dir, golden, tmp_path):
    import mlx_lm
    from mlx_lm.utils import save

    model, tokenizer, config = mlx_lm.load(str(golden_dir), return_config=True)
    save(tmp_path / "saved", golden_dir, model, tokenizer, config, donate_model=False)
    reloaded, _ = mlx_lm.load(str(tmp_path / "saved"))
    assert mx.array_equal(logits_of(reloaded, golden), logits_of(model, golden))


def test_quantized_checkpoint_round_trip(golden_dir, golden, tmp_path):
    model, config = load_model(golden_dir)
    nn.quantize(model, group_size=32, bits=4)
    save_model(tmp_path, model)
    quantized_config = {**config, "quantization": {"group_size": 32, "bits": 4}}
    save_config(quantized_config, config_path=tmp_path / "config.json")
    reloaded, _ = load_model(tmp_path)
    assert isinstance(reloaded.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert mx.array_equal(logits_of(reloaded, golden), logits_of(model, golden))


def lora_model(golden_dir):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load_model(golden_dir)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    return model


def test_lora_applies_and_trains_only_adapters(golden_dir, golden):
    model = lora_model(golden_dir)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(".lora_" in key for key in trainable)
    assert "model.layers.0.self_attn.q_proj.lora_a" in trainable
    base = logits_of(model, golden)
    assert mx.abs(base - golden["ar_logits"]).max().item() <= 1e-5  # lora_b starts at zero

    def loss(model):
        ids = golden["ids_a"]
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()

    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    assert set(grads) == set(trainable)
    assert any(mx.abs(g).max().item() > 0 for g in grads.values())


def test_fused_lora_save_keeps_inv_freq(golden_dir, golden, tmp_path):
    """The mlx_lm.fuse flow (fuse the adapters, save) keeps the frozen inv_freq buffers."""
    model = lora_model(golden_dir)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape, key=mx.random.key(0)) * 0.01
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    save_model(tmp_path, model)
    save_config({**vars(model.args)}, config_path=tmp_path / "config.json")
    original = mx.load(str(golden_dir / "model.safetensors"))
    saved = mx.load(str(tmp_path / "model.safetensors"))
    for i in range(2):
        key = f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
        assert mx.array_equal(saved[key], original[key])
    reloaded, _ = load_model(tmp_path)
    assert mx.allclose(logits_of(reloaded, golden), logits_of(model, golden), atol=1e-5)
    assert not mx.allclose(logits_of(reloaded, golden), golden["ar_logits"], atol=1e-3)


BAD_CHECKPOINTS = {
    "missing tensor": (
        {},
        {"model.layers.1.mlp.canon_d.conv.weight": None},
        r"missing model\.layers\.1\.mlp\.canon_d\.conv\.weight \(config\.json: canon_set",
    ),
    "misshapen conv": (
        {},
        {"model.layers.0.canon_a.conv.weight": mx.zeros((64, 1, 3))},
        r"model\.layers\.0\.canon_a\.conv\.weight has shape \(64, 3, 1\), the config needs "
        r"\(64, 4, 1\) \(config\.json: canon_set, canon_kernel",
    ),
    "misshapen projection": (
        {},
        {"model.layers.1.self_attn.k_proj.weight": mx.zeros((16, 64))},
        r"model\.layers\.1\.self_attn\.k_proj\.weight has shape \(16, 64\), the config needs "
        r"\(32, 64\) \(config\.json: hidden_size, num_attention_heads, num_key_value_heads",
    ),
    "canon weights the config does not use": (
        {"canon_set": "ABC"},
        {},
        r"unexpected model\.layers\.0\.mlp\.canon_d\.conv\.weight",
    ),
    "untied head without lm_head": (
        {"tie_word_embeddings": False},
        {},
        r"missing lm_head\.weight \(config\.json: vocab_size, hidden_size, tie_word_embeddings\)",
    ),
    "vocab_size smaller than the embedding": (
        {"vocab_size": 300, "mask_token_id": 200},
        {},
        r"model\.embed_tokens\.weight has 320 rows but config\.json vocab_size is 300",
    ),
    "unknown canon_set letters": (
        {"canon_set": "ABCE"},
        {},
        r"canon_set 'ABCE' has unknown letters 'E'",
    ),
    "negative mask token": (  # one outside the vocabulary means AR-only (test_ar_only.py)
        {"mask_token_id": -1},
        {},
        r"mask_token_id -1 is not a token id; leave it out for a checkpoint without a MASK",
    ),
    "bad GQA ratio": (
        {"num_key_value_heads": 3},
        {},
        r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)",
    ),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_fails_naming_the_problem(golden_dir, tmp_path, case):
    config_changes, weight_changes, message = BAD_CHECKPOINTS[case]
    path = copy_golden(golden_dir, tmp_path, config_changes, weight_changes)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_every_problem_is_listed(golden_dir, tmp_path):
    path = copy_golden(
        golden_dir,
        tmp_path,
        weight_changes={
            "model.norm.weight": None,
            "model.layers.0.self_attn.q_norm.weight": mx.zeros((8,)),
        },
    )
    with pytest.raises(ValueError) as error:
        load_model(path)
    assert "missing model.norm.weight" in str(error.value)
    assert "model.layers.0.self_attn.q_norm.weight has shape (8,)" in str(error.value)


def test_missing_config_json(golden_dir, tmp_path):
    path = copy_golden(golden_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(path)


def test_missing_weights(golden_dir, tmp_path):
    path = copy_golden(golden_dir, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no model\*\.safetensors"):
        checkpoint.load(path)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"no such checkpoint directory"):
        checkpoint.load(tmp_path / "nowhere")


def test_non_dhara_model_type(golden_dir, tmp_path):
    path = copy_golden(golden_dir, tmp_path, {"model_type": "llama"})
    with pytest.raises(ValueError, match=r"model_type is 'llama', not 'dhara_ar'"):
        checkpoint.load(path)
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model_type 'llama' is not 'dhara_ar'"):
        ModelArgs.from_dict(config)


def test_unreadable_config(golden_dir, tmp_path):
    path = copy_golden(golden_dir, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json cannot be read as JSON"):
        checkpoint.load(path)


def test_registration_puts_model_and_cache_in_place():
    import mlx_lm.models
    import mlx_lm.models.cache as mlx_cache

    registry.register()
    assert mlx_lm.models.dhara_ar is optiq_dhara.model
    assert mlx_cache.DharaCache is optiq_dhara.cache.DharaCache


def test_registration_failure_is_loud(monkeypatch):
    monkeypatch.setattr(registry.importlib, "import_module", lambda name: types.ModuleType(name))
    with pytest.raises(RuntimeError, match=r"could not register mlx_lm\.models\.dhara_ar"):
        registry.register()


def test_registration_failure_in_the_cache_module_is_loud(monkeypatch):
    class Locked(types.ModuleType):
        def __setattr__(self, name, value):
            raise AttributeError(f"{name} cannot be set")

    monkeypatch.setattr(registry, "mlx_cache", Locked("mlx_lm.models.cache"))
    with pytest.raises(AttributeError, match="DharaCache cannot be set"):
        registry.register()


def test_inv_freq_is_frozen(golden_model):
    trainable = dict(tree_flatten(golden_model.trainable_parameters()))
    assert not any(key.endswith("inv_freq") for key in trainable)
    assert golden_model.cast_predicate("model.layers.0.self_attn.rotary_emb.inv_freq") is False
    assert golden_model.cast_predicate("model.layers.0.canon_a.conv.weight") is True
