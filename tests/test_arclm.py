"""arcLM (Qwen3.5-hybrid BD3LM): the cached runtime equals the plainly written
uncached reference of dLLM's sampler, on tiny random checkpoints."""

import json
import re
import shutil

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from optiq_dhara.arclm.bd3lm import transfer_schedule
from optiq_dhara.arclm.model import Model, ModelArgs
from optiq_dhara.arclm.reference import block_causal_mask, reference_generate
from optiq_dhara.runtime import decode, generate_batch, generate_ids

VOCAB, MASK, BLOCK = 320, 316, 8  # the golden tokenizer's vocabulary and <|mask|>
CONFIG = {
    "model_type": "arclm",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,  # GDN, attention, GDN, attention
    "full_attention_interval": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.5},
    "mask_token_id": MASK,
    "block_size": BLOCK,
}


@pytest.fixture(scope="module")
def arc_dir(tmp_path_factory, golden_dir):
    """A tiny random arcLM checkpoint, with the golden tokenizer, whose predictions are
    peaked (well-separated confidences, so that no rounding decides which position
    commits first)."""
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(CONFIG))
    head = model.language_model.lm_head
    head.weight = head.weight * 8
    path = tmp_path_factory.mktemp("arclm")
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(golden_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def arc(arc_dir):
    from mlx_lm.utils import load_model

    model, _ = load_model(arc_dir)
    return model


def test_the_checkpoint_loads_through_mlx_lm(arc_dir, arc):
    assert isinstance(arc, Model) and arc.args.block_size == BLOCK
    assert arc.args.modes == ("diffusion",)
    kinds = [layer.is_linear for layer in arc.layers]
    assert kinds == [True, False, True, False]


def test_bad_diffusion_settings_are_refused():
    with pytest.raises(ValueError, match="mask_token_id inside the vocabulary"):
        ModelArgs.from_dict({**CONFIG, "mask_token_id": VOCAB})
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ModelArgs.from_dict({**CONFIG, "block_size": 0})


@pytest.mark.parametrize(
    "masked, steps, expected",
    [
        (8, 8, (1,) * 8),
        (8, 4, (2, 2, 2, 2)),
        (5, 3, (2, 1, 2)),
        (8, 3, (3, 2, 3)),
        (3, 8, (1, 1, 1)),
    ],
)
def test_transfer_schedule_is_dllms_linear_one(masked, steps, expected):
    assert transfer_schedule(masked, steps) == expected
    assert sum(transfer_schedule(masked, steps)) == masked


def test_attention_is_block_causal_and_gdn_causal(arc):
    """Changing a later block changes nothing before it; changing a token changes its
    own block's earlier positions through attention."""
    tokens = list(range(1, 21))
    mask = block_causal_mask(len(tokens), BLOCK, 4)
    base = arc(mx.array([tokens]), mask=mask)[0]
    later = tokens[:12] + [7] * 8  # positions 12.. are the last block under phase 4
    changed = arc(mx.array([later]), mask=mask)[0]
    assert mx.allclose(base[:12], changed[:12], atol=1e-5)
    inside = tokens[:10] + [3] + tokens[11:]  # position 10 is in block [4, 12)
    moved = arc(mx.array([inside]), mask=mask)[0]
    assert not mx.allclose(base[4:10], moved[4:10], atol=1e-3)
    assert mx.allclose(base[:4], moved[:4], atol=1e-5)


PROMPTS = [list(range(3, 19)), list(range(5, 16)), [7], list(range(20, 29))]  # 16, 11, 1, 9 tokens


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"steps": 4},
        {"steps": 3, "temperature": 0.8, "seed": 5},
        {"temperature": 1.0, "seed": 11},
    ],
)
def test_cached_runtime_equals_the_uncached_reference(arc, prompt, options):
    for max_tokens in (8, 13):
        expected = reference_generate(
            arc, prompt, max_tokens=max_tokens, block_len=BLOCK, **options
        )
        got = generate_ids(
            arc, prompt, mode="diffusion", max_tokens=max_tokens, block_len=BLOCK, **options
        )
        assert got == expected and len(got) == max_tokens


def test_a_stop_token_ends_the_output(arc):
    prompt = PROMPTS[1]
    free = reference_generate(arc, prompt, max_tokens=16, block_len=BLOCK)
    stop = free[5]
    expected = reference_generate(arc, prompt, max_tokens=16, block_len=BLOCK, stop_ids=[stop])
    got = generate_ids(
        arc, prompt, mode="diffusion", max_tokens=16, block_len=BLOCK, stop_ids=[stop]
    )
    assert got == expected == free[: free.index(stop) + 1]


def test_batched_rows_equal_lone_rows(arc):
    options = dict(
        mode="diffusion", max_tokens=13, block_len=BLOCK, steps=4, temperature=0.7, seed=2
    )
    batch = generate_batch(arc, PROMPTS, **options)
    assert batch == [generate_ids(arc, p, **options) for p in PROMPTS]


def test_the_recurrent_state_after_a_block_equals_a_fresh_causal_pass(arc):
    """Decode two blocks, then compare the cache with one fed the same tokens at once."""
    from optiq_dhara.runtime.decode import make_request
    from optiq_dhara.runtime.engine import Engine

    prompt = PROMPTS[1]
    engine = Engine(arc, max_batch=1)
    row = engine.add(prompt, *make_request(mode="diffusion", max_tokens=24, block_len=BLOCK))
    while len(row.seq) < len(prompt) + 2 * BLOCK:
        engine.step()
    cache = engine.groups["diffusion"].cache
    held = cache.lengths[row.slot]
    assert held == len(prompt) + 2 * BLOCK  # the prompt and two committed blocks
    fresh = arc.row_cache()
    fresh.phases = [-len(prompt) % BLOCK]
    fresh.feed(row.seq[:held], BLOCK)
    for mine, theirs in zip(cache.recurrent, fresh.recurrent):
        if theirs is not None:
            for a, b in zip(mine, theirs):
                assert mx.allclose(a[row.slot], b[0], atol=1e-4)
    for mine, theirs in zip(cache.keys, fresh.keys):
        if theirs is not None:
            assert mx.allclose(mine[row.slot, :, :held], theirs[0, :, :held], atol=1e-4)


def test_modes_it_lacks_are_refused(arc):
    with pytest.raises(ValueError, match="not in mode 'ar'"):
        list(decode(arc, [1, 2], mode="ar", max_tokens=2))


def test_generate_and_the_server_run_it(arc_dir):
    """`dhara-mlx generate` and the OpenAI server decode an arcLM checkpoint in its
    one mode (diffusion, the default), with the model's block size."""
    import openai
    from typer.testing import CliRunner

    from optiq_dhara.cli import app
    from optiq_dhara.runtime import stream_text
    from optiq_dhara.serve.app import ServerConfig, background_server, create_app
    from optiq_dhara.serve.engine import Worker

    model, tokenizer = mlx_lm.load(str(arc_dir))
    assert isinstance(mlx_lm.generate(model, tokenizer, "Hello", max_tokens=2), str)  # its caches
    expected = "".join(
        c.text
        for c in stream_text(model, tokenizer, "Hello", chat=False, mode="diffusion", max_tokens=12)
    )
    ids = tokenizer.encode("Hello")
    plain = reference_generate(model, ids, max_tokens=12, block_len=BLOCK)
    assert expected == tokenizer.decode(plain) or plain[-1] in tokenizer.eos_token_ids
    result = CliRunner().invoke(
        app, ["generate", "-m", str(arc_dir), "-p", "Hello", "--max-tokens", "12", "--steps", "8"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(expected)
    refused = CliRunner().invoke(
        app, ["generate", "-m", str(arc_dir), "-p", "Hi", "--mode", "spec"]
    )
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.output).split())
    assert refused.exit_code == 2 and "not in mode 'spec'" in text
    worker = Worker(lambda: mlx_lm.load(str(arc_dir))).start()
    try:
        with background_server(create_app(worker, ServerConfig("arc", max_tokens=12))) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            reply = client.completions.create(model="arc", prompt="Hello")
            assert reply.choices[0].text == expected
            assert client.models.list().data[0].modes == ["diffusion"]
    finally:
        worker.close()
