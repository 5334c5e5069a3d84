"""The dhara cache keeps a bounded canon state and stays exact.

A trim inside the recent window costs nothing; a deeper one (past the window,
past a checkpoint, to 0) goes back to a checkpoint and the next forward replays
the tokens from there. Each case is checked against a fresh forward, with the
window and the checkpoint interval made small enough for the golden sequences.
"""

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.generate import batch_generate
from mlx_lm.models import llama
from mlx_lm.models.cache import (
    LRUPromptCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.utils import load_tokenizer

from optiq_dhara import cache as dhara_cache
from optiq_dhara import model as dhara
from optiq_dhara.masks import block_causal_mask

TOLERANCE = 1e-5


def max_error(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.fixture
def small_window(monkeypatch):
    """A window of 2 tokens and a checkpoint every 8th position."""
    monkeypatch.setattr(dhara_cache, "RECENT", 2)
    monkeypatch.setattr(dhara_cache, "CHECKPOINT", 8)


def prefill(model, ids: mx.array, sizes) -> list:
    cache = model.make_cache()
    start = 0
    for size in sizes:
        if start < ids.shape[1]:
            model(ids[:, start : start + size], cache=cache)
        start += size
    return cache


chunkings = st.lists(st.integers(1, 9), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(sizes=chunkings, trims=st.lists(st.integers(0, 29), min_size=1, max_size=3))
def test_deep_trims_then_decoding_equal_a_fresh_forward(golden_model, golden, sizes, trims):
    """Any chunking, then one to three trims of any depth, then the rest in one forward."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dhara_cache, "RECENT", 2)
        patch.setattr(dhara_cache, "CHECKPOINT", 8)
        ids, expected = golden["ids_a"], golden["ar_logits"]
        held = min(sum(sizes), 28)
        cache = prefill(golden_model, ids[:, :held], sizes)
        for trim in trims:
            held -= trim_prompt_cache(cache, trim)
        assert all(c.offset == held and c.size() == held for c in cache)
        logits = golden_model(ids[:, held:], cache=cache)
        assert max_error(logits, expected[:, held:]) <= TOLERANCE


@pytest.mark.parametrize("target", [0, 3, 7, 8, 9, 16, 20, 23])
def test_a_deep_trim_replays_from_the_checkpoint_before_it(
    small_window, golden_model, golden, target
):
    ids = golden["ids_a"]
    cache = prefill(golden_model, ids[:, :27], [27])
    trim_prompt_cache(cache, 27 - target)
    replayed = []
    original = dhara_cache.prepare_forward

    def spy(model, caches, inputs, own_mask, shape):
        replayed.append(shape[1])
        original(model, caches, inputs, own_mask, shape)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dhara, "prepare_forward", spy)
        logits = golden_model(ids[:, target:], cache=cache)
    assert max_error(logits, golden["ar_logits"][:, target:]) <= TOLERANCE
    start = target // 8 * 8
    assert replayed == ([29 - target, target - start] if target > start else [29 - target])


def test_trims_inside_the_window_replay_nothing(small_window, golden_model, golden):
    ids = golden["ids_a"]
    cache = prefill(golden_model, ids, [20, 1, 1, 1])
    trim_prompt_cache(cache, 2)
    assert cache[0]._replay is None
    logits = golden_model(ids[:, 21:], cache=cache)
    assert max_error(logits, golden["ar_logits"][:, 21:]) <= TOLERANCE


@pytest.mark.parametrize("trim", [0, 2, 5, 12, 23])
def test_save_load_round_trips_the_bounded_state(
    small_window, golden_model, golden, tmp_path, trim
):
    """Checkpoints, window, token ids and a pending replay all survive a save and load."""
    ids = golden["ids_a"]
    cache = prefill(golden_model, ids, [10, 1, 1, 9, 2])
    trim_prompt_cache(cache, trim)
    held = 23 - trim
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert all(type(c) is dhara_cache.DharaCache and c.size() == held for c in loaded)
    resumed = golden_model(ids[:, held:], cache=loaded)
    uninterrupted = golden_model(ids[:, held:], cache=cache)
    assert max_error(resumed, uninterrupted) == 0.0
    assert max_error(resumed, golden["ar_logits"][:, held:]) <= TOLERANCE
    trim_prompt_cache(loaded, 20)  # the loaded checkpoints serve a deeper trim
    logits = golden_model(ids[:, 9:], cache=loaded)
    assert max_error(logits, golden["ar_logits"][:, 9:]) <= TOLERANCE


def test_a_forward_under_the_callers_mask_is_never_replayed(small_window, golden_model, golden):
    """Block diffusion's forwards cannot be repeated from token ids: a trim into one is
    refused with a clear message; trims to either end of it are exact."""
    ids = golden["ids_b"][None]
    cache = golden_model.make_cache()
    golden_model(ids[:, :13], cache=cache)
    golden_model(ids[:, 13:29], cache=cache, mask=block_causal_mask(16, 8, offset=13))
    golden_model(ids[:, 29:33], cache=cache)
    with pytest.raises(ValueError, match="its own attention mask or with input embeddings"):
        trim_prompt_cache(cache, 33 - 20)
    assert cache[0].size() == 33  # nothing changed
    trim_prompt_cache(cache, 33 - 29)
    assert cache[0]._replay is None or cache[0]._replay >= 29
    again = golden_model(ids[:, 29:33], cache=cache)
    fresh = golden_model.make_cache()
    golden_model(ids[:, :13], cache=fresh)
    golden_model(ids[:, 13:29], cache=fresh, mask=block_causal_mask(16, 8, offset=13))
    assert max_error(again, golden_model(ids[:, 29:33], cache=fresh)) <= TOLERANCE
    trim_prompt_cache(cache, 33 - 11)
    logits = golden_model(ids[:, 11:20], cache=cache)
    assert max_error(logits, golden_model(ids[:, :20])[:, 11:]) <= TOLERANCE


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    return load_tokenizer(golden_dir)


def alone(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of ``prompt`` decoded alone, uncached."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(mx.argmax(model(mx.array(tokens)[None])[0, -1]).item())
    return tokens[len(prompt) :]


def test_batches_of_deep_trimmed_caches_decode_like_fresh_prompts(
    small_window, golden_model, golden, tokenizer
):
    """The server's flow: cached entries trimmed deeply (each waiting to replay from a
    different checkpoint) merged into one batch, decoded, extracted, trimmed again."""
    ids = golden["ids_a"].tolist()
    sources = [ids[0], ids[1], ids[0]]
    prompts = [ids[0][:25], ids[1][:22], ids[0][:13]]
    caches = []
    for source, cached, trim in zip(sources, [22, 20, 12], [9, 3, 11]):
        cache = golden_model.make_cache()
        golden_model(mx.array(source[:cached])[None], cache=cache)
        trim_prompt_cache(cache, trim)
        caches.append((cache, cached - trim))
    rests = [p[held:] for p, (_, held) in zip(prompts, caches)]
    response = batch_generate(
        golden_model,
        tokenizer,
        rests,
        prompt_caches=[c for c, _ in caches],
        max_tokens=6,
        return_token_ids=True,
        return_prompt_caches=True,
    )
    expected = [alone(golden_model, p, 6) for p in prompts]
    assert response.token_ids == expected
    for prompt, tokens, cache in zip(prompts, expected, response.caches):
        sequence = prompt + tokens
        held = cache[0].size()
        assert len(prompt) < held <= len(sequence)
        trim_prompt_cache(cache, held - 9)  # back past the window and a checkpoint
        logits = golden_model(mx.array(sequence[9:])[None], cache=cache)
        fresh = golden_model(mx.array(sequence)[None])[:, 9:]
        assert max_error(logits, fresh) <= TOLERANCE


def test_the_server_prompt_cache_reuses_a_deeply_trimmed_entry(small_window, golden_model, golden):
    first = golden["ids_a"][0].tolist()
    cache = golden_model.make_cache()
    golden_model(mx.array(first)[None], cache=cache)
    lru = LRUPromptCache(max_size=2)
    lru.insert_cache("dhara", first, cache)
    second = first[:11] + golden["ids_a"][1, :6].tolist()
    fetched, rest = lru.fetch_nearest_cache("dhara", second)
    assert rest == second[11:]
    logits = golden_model(mx.array(rest)[None], cache=fetched)
    assert max_error(logits, golden_model(mx.array(second)[None])[:, 11:]) <= TOLERANCE


def canon_bound(args: dhara.ModelArgs, tokens: int, itemsize: int) -> int:
    """Canon bytes of one layer: the window, a tail per checkpoint, the token ids."""
    width = sum(dhara.canon_widths(args).values())
    kept = args.canon_kernel - 1
    rows = dhara_cache.RECENT + kept + kept * (tokens // dhara_cache.CHECKPOINT)
    return rows * width * itemsize + 4 * tokens


def test_cache_bytes_per_token_stay_within_the_bound_at_the_250m_widths():
    """One layer of dhara-250m's widths after 2,048 tokens: the canon state is within
    its bound, and the whole cache within 1.25x the KV of llama of the same widths."""
    widths = dict(
        hidden_size=768,
        num_hidden_layers=1,
        intermediate_size=2176,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=64,
    )
    args = dhara.ModelArgs(mask_token_id=63, **widths)
    twin_args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-6, **widths)
    model, twin = dhara.Model(args), llama.Model(twin_args)
    ids = mx.random.randint(0, 63, (1, 2048), key=mx.random.key(0))
    caches = [make_prompt_cache(model), make_prompt_cache(twin)]
    for m, cache in zip((model, twin), caches):
        for start in range(0, 2048, 512):
            m(ids[:, start : start + 512], cache=cache)
            mx.eval([c.state for c in cache])
    layer, kv = caches[0][0], caches[1][0]
    assert layer.kv.nbytes == kv.nbytes
    assert 0 < layer.nbytes - layer.kv.nbytes <= canon_bound(args, 2048, 4)
    assert layer.nbytes <= 1.25 * kv.nbytes


def test_decoding_does_not_grow_the_canon_state(golden_model, golden):
    """Between checkpoints the canon state of a decoding cache stays the same size."""
    cache = golden_model.make_cache()
    token = golden["ids_a"][:1, :5]
    sizes = []
    for _ in range(40):
        token = mx.argmax(golden_model(token, cache=cache)[:, -1:], axis=-1)
        mx.eval([c.state for c in cache])
        sizes.append(cache[0].nbytes - cache[0].kv.nbytes - 4 * cache[0].size())
    width = sum(dhara.canon_widths(golden_model.args).values())
    assert sizes[-1] == (dhara_cache.RECENT + 3) * width * 4
    assert len(set(sizes[-15:])) == 1 and max(sizes) < sizes[-1] + 5 * width * 4
