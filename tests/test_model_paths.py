"""The decode step's shortcuts compute exactly what the plain module calls compute.

A layer whose projections are all plain or quantized ``nn.Linear`` runs as two
compiled calls around the attention; any other module (a LoRA layer, say) goes
through the modules' own calls. Canon taps are cut from the conv weights once and
kept while the weight is the same array; layers with equal RoPE frequencies share
one table.
"""

import copy

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import make_prompt_cache

from optiq_dhara.model import Model, ModelArgs

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=80,
    mask_token_id=79,
    rope_theta=10000.0,
)
PROMPT = mx.array([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]])


class Wrapped(nn.Module):
    """A projection behind a module the fused path does not know."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array) -> mx.array:
        return self.inner(x)


def random_model(seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs(**SHAPE))
    for layer in model.layers:  # non-zero canon taps, so every site matters
        for conv in (layer.canon_a, layer.canon_c, layer.mlp.canon_d, layer.self_attn.canon_b_k):
            conv.conv.weight = 0.3 * mx.random.normal(conv.conv.weight.shape)
    mx.eval(model.parameters())
    return model


def with_wrapped_projections(model: Model) -> Model:
    out = copy.deepcopy(model)
    for layer in out.layers:
        layer.self_attn.o_proj = Wrapped(layer.self_attn.o_proj)
    return out


def decoded_logits(model: Model, steps: int = 6) -> list[mx.array]:
    """The prefill's logits, then each greedy decode step's, through mlx-lm's cache."""
    cache = make_prompt_cache(model)
    logits = [model(PROMPT, cache=cache)]
    for _ in range(steps):
        token = mx.argmax(logits[-1][:, -1], axis=-1)[:, None]
        logits.append(model(token, cache=cache))
    mx.eval(logits)
    return logits


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
def test_fused_layers_equal_the_module_calls(quantized):
    model = random_model()
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    fused, modules = decoded_logits(model), decoded_logits(with_wrapped_projections(model))
    assert all(mx.array_equal(a, b).item() for a, b in zip(fused, modules))


def test_canon_taps_follow_a_new_weight():
    model, fresh = random_model(), random_model()
    decoded_logits(model)  # taps cut from the old weights
    weight = 0.5 * mx.random.normal(model.layers[1].canon_c.conv.weight.shape)
    for m in (model, fresh):
        m.layers[1].canon_c.conv.weight = weight
    assert mx.array_equal(model(PROMPT), fresh(PROMPT)).item()
    assert not mx.array_equal(model(PROMPT), random_model()(PROMPT)).item()


def test_layers_with_equal_frequencies_share_one_rope_table(tmp_path):
    model = random_model()
    freqs, tables = model.model._inv_freqs()
    assert freqs.shape[0] == 1 and tables == (0, 0)

    # The same frequencies as separate arrays (as a checkpoint loads them): the same logits.
    separate = copy.deepcopy(model)
    for layer in separate.layers:
        layer.self_attn.rotary_emb.inv_freq = mx.array(layer.self_attn.rotary_emb.inv_freq)
    freqs, tables = separate.model._inv_freqs()
    assert freqs.shape[0] == 2 and tables == (0, 1)
    assert all(mx.array_equal(a, b).item() for a, b in zip(*map(decoded_logits, (model, separate))))

    # Loading makes equal arrays one again; different ones stay apart.
    weights = dict(separate.sanitize(dict(_flat(separate))))
    keys = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]
    assert weights[keys[0]] is weights[keys[1]]
    changed = dict(_flat(separate))
    changed[keys[1]] = changed[keys[1]] * 0.5
    weights = separate.sanitize(changed)
    assert weights[keys[0]] is not weights[keys[1]]


def _flat(model: Model) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())
