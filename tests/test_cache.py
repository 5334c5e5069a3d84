"""The dhara cache through the whole mlx-lm cache protocol gives what a fresh computation gives.

Incremental decode, trim (also as the server's prompt cache trims), save/load,
KV quantization during generation, and batching with prompts of different
lengths (right padding in prefill, left padding when caches are merged).
"""

from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_map_with_path
from mlx_lm.generate import BatchGenerator, batch_generate, generate_step, stream_generate
from mlx_lm.models.cache import (
    LRUPromptCache,
    QuantizedKVCache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.utils import load_model, load_tokenizer

from optiq_dhara import model as dhara
from optiq_dhara.cache import DharaCache, canon_rows, history_array
from optiq_dhara.masks import block_causal_mask

TOLERANCE = 1e-5


def max_error(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    return load_tokenizer(golden_dir)


@pytest.fixture(scope="module")
def eos(tokenizer) -> int:
    return tokenizer.eos_token_id


def chunked(model, ids: mx.array, sizes, cache=None) -> mx.array:
    cache = cache if cache is not None else model.make_cache()
    out, start = [], 0
    for size in sizes:
        out.append(model(ids[:, start : start + size], cache=cache))
        start += size
    return mx.concatenate(out, axis=1)


@given(st.integers(0, 8), st.integers(1, 9))
def test_canon_rows_are_those_of_the_joined_pieces(start, count):
    """An array piece and a piece split by site (widths 2 + 3), then one more array."""
    stop = min(start + count, 9)
    pieces = (
        mx.arange(2 * 3 * 5).reshape(2, 3, 5),
        (mx.arange(2 * 4 * 2).reshape(2, 4, 2) + 100, mx.arange(2 * 4 * 3).reshape(2, 4, 3) + 200),
        mx.arange(2 * 2 * 5).reshape(2, 2, 5) + 300,
    )
    rows = canon_rows(pieces, start, stop)
    assert mx.array_equal(rows, history_array(pieces)[:, start:stop])


@pytest.mark.parametrize(
    "sizes",
    [[29], [1] * 29, [5, 1, 1, 7, 15], [3, 3, 23], [28, 1], [2, 9, 1, 17], [4, 4, 4, 4, 13]],
)
def test_incremental_decode_equals_full_forward(golden_model, golden, sizes):
    logits = chunked(golden_model, golden["ids_a"], sizes)
    assert max_error(logits, golden["ar_logits"]) <= TOLERANCE


@settings(max_examples=40, deadline=None)
@given(
    prefix=st.integers(1, 28),
    decoded=st.integers(0, 3),
    trim=st.integers(0, 34),
    more=st.integers(1, 8),
)
def test_trim_then_continue_equals_fresh(golden_model, golden, prefix, decoded, trim, more):
    """Any trim amount, after a prefill and some one-token steps, then continue."""
    ids = golden["ids_a"]
    total = min(prefix + decoded, 28)
    cache = golden_model.make_cache()
    chunked(golden_model, ids, [prefix] + [1] * (total - prefix), cache)
    trimmed = trim_prompt_cache(cache, trim)
    assert trimmed == min(trim, total)
    kept = total - trimmed
    assert all(c.offset == kept and c.size() == kept for c in cache)
    end = min(kept + more, 29)
    logits = golden_model(ids[:, kept:end], cache=cache)
    assert max_error(logits, golden["ar_logits"][:, kept:end]) <= TOLERANCE


def test_repeated_trims_like_self_speculation(golden_model, golden):
    """Forward k tokens, keep some, trim the rest, again and again."""
    ids, expected = golden["ids_a"], golden["ar_logits"]
    cache = golden_model.make_cache()
    golden_model(ids[:, :6], cache=cache)
    position = 6
    for window, keep in [(4, 1), (5, 5), (3, 0), (6, 2), (2, 1), (4, 3)]:
        logits = golden_model(ids[:, position : position + window], cache=cache)
        assert max_error(logits, expected[:, position : position + window]) <= TOLERANCE
        trim_prompt_cache(cache, window - keep)
        position += keep
    assert cache[0].offset == position


def test_batch_cache_filtered_then_trimmed(golden_model, golden):
    """Caches merged into a batch (left padding), a step, a row dropped, a trim."""
    ids = golden["ids_a"]
    singles = []
    for row, length in ((0, 6), (1, 9)):
        cache = golden_model.make_cache()
        golden_model(ids[row : row + 1, :length], cache=cache)
        singles.append(cache)
    batch = [DharaCache.merge([a, b]) for a, b in zip(*singles)]
    logits = golden_model(mx.array([[ids[0, 6].item()], [ids[1, 9].item()]]), cache=batch)
    assert max_error(logits[1], golden["ar_logits"][1, 9:10]) <= TOLERANCE
    assert max_error(logits[0], golden["ar_logits"][0, 6:7]) <= TOLERANCE
    for cache in batch:
        cache.filter([1])
    assert trim_prompt_cache(batch, 2) == 2
    logits = golden_model(ids[1:2, 8:12], cache=batch)
    assert max_error(logits, golden["ar_logits"][1:2, 8:12]) <= TOLERANCE


def test_server_prompt_cache_trims_a_longer_entry(golden_model, golden):
    """LRUPromptCache: a cached longer prompt serves a prompt sharing a prefix."""
    first = golden["ids_a"][0].tolist()
    cache = golden_model.make_cache()
    golden_model(mx.array(first)[None], cache=cache)
    lru = LRUPromptCache(max_size=4)
    lru.insert_cache("dhara", first, cache)

    second = first[:10] + golden["ids_a"][1, :8].tolist()
    fetched, rest = lru.fetch_nearest_cache("dhara", second)
    assert rest == second[10:] and fetched[0].offset == 10
    logits = golden_model(mx.array(rest)[None], cache=fetched)
    fresh = golden_model(mx.array(second)[None])
    assert max_error(logits, fresh[:, 10:]) <= TOLERANCE

    shorter = first[:15]
    fetched, rest = lru.fetch_nearest_cache("dhara", shorter)
    assert rest == shorter[14:]
    logits = golden_model(mx.array(rest)[None], cache=fetched)
    assert max_error(logits, golden["ar_logits"][:1, 14:15]) <= TOLERANCE

    again, rest = lru.fetch_nearest_cache("dhara", first)
    assert rest == [] and again[0].offset == len(first)


@pytest.mark.parametrize("trim_before_save", [0, 5])
def test_save_load_round_trip_then_continue(golden_model, golden, tmp_path, trim_before_save):
    ids = golden["ids_a"]
    cache = golden_model.make_cache()
    chunked(golden_model, ids, [12, 1, 1], cache)
    trim_prompt_cache(cache, trim_before_save)
    kept = 14 - trim_before_save
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, metadata={"model": "golden"})
    loaded, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"model": "golden"}
    assert all(type(c) is DharaCache and c.offset == kept for c in loaded)
    resumed = chunked(golden_model, ids[:, kept:], [3, 1, 6], loaded)
    uninterrupted = chunked(golden_model, ids[:, kept:], [3, 1, 6], cache)
    assert max_error(resumed, uninterrupted) == 0.0
    assert max_error(resumed, golden["ar_logits"][:, kept : kept + 10]) <= TOLERANCE


@pytest.fixture(scope="module")
def kv_model():
    """Random dhara whose head_dim (32) admits KV quantization; the golden vocabulary."""
    mx.random.seed(11)
    args = dhara.ModelArgs(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=320,
        mask_token_id=316,
    )
    model = dhara.Model(args)
    for layer in model.layers:  # canon weights large enough to matter
        for canon in (layer.canon_a, layer.canon_c, layer.mlp.canon_d):
            canon.conv.weight = mx.random.normal(canon.conv.weight.shape)
    mx.eval(model.parameters())
    return model


def greedy_with_quantized_kv(model, prompt: mx.array, steps: int, bits: int, zero_canon: bool):
    """Plain loop: float prefill, then only the KV quantized (the canon store kept, or emptied)."""
    cache = model.make_cache()
    model(prompt[None, :-1], cache=cache)
    cache = [c.to_quantized(group_size=32, bits=bits) for c in cache]
    if zero_canon:
        cache = [DharaCache(c.kv) for c in cache]
        for c in cache:
            c.length = c.kv.offset
    token, tokens, logprobs = prompt[-1:], [], []
    for _ in range(steps):
        logits = model(token[None], cache=cache)[0, -1]
        logprobs.append(logits - mx.logsumexp(logits))
        token = mx.argmax(logits, keepdims=True)
        tokens.append(token.item())
    return tokens, logprobs


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_bits_generation_keeps_the_float_canon_history(kv_model, tokenizer, golden, bits):
    prompt, steps = golden["prompt_p1"], 12
    cache = kv_model.make_cache()
    responses = list(
        stream_generate(
            kv_model,
            tokenizer,
            prompt.tolist(),
            max_tokens=steps,
            kv_bits=bits,
            kv_group_size=32,
            quantized_kv_start=0,
            prompt_cache=cache,
        )
    )
    tokens = [r.token for r in responses]
    expected, expected_logprobs = greedy_with_quantized_kv(kv_model, prompt, steps, bits, False)
    assert tokens == expected
    for response, logprobs in zip(responses, expected_logprobs):
        assert max_error(response.logprobs, logprobs) <= TOLERANCE
    for layer in cache:
        assert isinstance(layer, DharaCache) and isinstance(layer.kv, QuantizedKVCache)
        history = history_array(layer.canon_history(mx.zeros((1, 3, 0), mx.float16)))
        assert history.dtype == mx.float32 and history.shape[:2] == (1, 3)
        # generate_step has already run the forward of its last token
        assert layer.size() == layer.offset == prompt.size + steps

    _, zeroed = greedy_with_quantized_kv(kv_model, prompt, steps, bits, True)
    assert max(max_error(a, b) for a, b in zip(expected_logprobs, zeroed)) > 1e-2
    plain = stream_generate(kv_model, tokenizer, prompt.tolist(), max_tokens=steps)
    unquantized = [r.logprobs for r in plain]
    assert max(max_error(a, b) for a, b in zip(expected_logprobs, unquantized)) > 0


def one_by_one(model, prompts, max_tokens: int, eos: int) -> list[list[int]]:
    """Greedy generation of each prompt alone, stopping before the end-of-sequence token."""
    results = []
    for prompt in prompts:
        tokens = []
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
            if token == eos:
                break
            tokens.append(token)
        results.append(tokens)
    return results


def batch_prompts(golden) -> list[list[int]]:
    ids = golden["ids_a"]
    p1 = golden["prompt_p1"].tolist()
    return [ids[0, :5].tolist(), ids[1, :13].tolist(), p1, ids[0, 3:12].tolist()]


@pytest.mark.parametrize("prefill_step_size", [2048, 4])
def test_batch_generate_with_right_padded_prefill(
    golden_model, golden, tokenizer, eos, prefill_step_size
):
    prompts = batch_prompts(golden)
    response = batch_generate(
        golden_model,
        tokenizer,
        prompts,
        max_tokens=10,
        return_token_ids=True,
        prefill_step_size=prefill_step_size,
    )
    assert response.token_ids == one_by_one(golden_model, prompts, 10, eos)


def test_batch_generate_merging_caches_of_different_lengths(golden_model, golden, tokenizer, eos):
    """Left padding: each prompt's prefix is already cached, each of a different length."""
    prompts = batch_prompts(golden)
    caches, rests = [], []
    for prompt, cached in zip(prompts, [3, 10, 7, 8]):
        cache = golden_model.make_cache()
        golden_model(mx.array(prompt[:cached])[None], cache=cache)
        caches.append(cache)
        rests.append(prompt[cached:])
    response = batch_generate(
        golden_model, tokenizer, rests, prompt_caches=caches, max_tokens=10, return_token_ids=True
    )
    assert response.token_ids == one_by_one(golden_model, prompts, 10, eos)


def run_batch_generator(model, prompts, max_tokens: int, prefill_step_size: int = 2048):
    """The server's continuous batching: a second group joins while the first decodes."""
    generator = BatchGenerator(model, max_tokens=max_tokens, prefill_step_size=prefill_step_size)
    results = defaultdict(list)
    uids = generator.insert(prompts[:1])
    for _ in range(3):
        for response in generator.next_generated():
            results[response.uid].append(response.token)
    uids += generator.insert(prompts[1:])
    while responses := generator.next_generated():
        for response in responses:
            results[response.uid].append(response.token)
    generator.close()
    return [results[uid] for uid in uids]


def test_batch_generator_continuous_batching(golden_model, golden):
    prompts = batch_prompts(golden)
    expected = one_by_one(golden_model, prompts, 8, -1)
    assert run_batch_generator(golden_model, prompts, 8, 4) == expected


def cast_copy(model, dtype):
    """A copy with its float parameters in ``dtype`` (inv_freq kept, as mlx-lm's convert does)."""
    copy = dhara.Model(model.args)
    keep = copy.cast_predicate
    copy.update(
        tree_map_with_path(lambda key, v: v.astype(dtype) if keep(key) else v, model.parameters())
    )
    return copy


def quantized_copy(model, dtype=mx.float32):
    copy = cast_copy(model, dtype)
    nn.quantize(copy, group_size=32, bits=4)
    mx.eval(copy.parameters())
    return copy


@pytest.fixture
def attention_masks(monkeypatch):
    """Every mask the model hands to attention: None, "causal", or an array's dtype."""
    seen = []
    original = dhara.scaled_dot_product_attention

    def spy(queries, keys, values, cache, scale, mask):
        seen.append(mask.dtype if isinstance(mask, mx.array) else mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask)

    monkeypatch.setattr(dhara, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("variant", ["bf16", "q4", "q4 bf16"])
def test_masks_are_bool_for_every_weight_format(golden_model, golden, attention_masks, variant):
    if variant == "bf16":
        model = cast_copy(golden_model, mx.bfloat16)
    else:
        model = quantized_copy(golden_model, mx.bfloat16 if "bf16" in variant else mx.float32)
    ids = golden["ids_b"]
    cache = model.make_cache()
    model(ids[None, :13], cache=cache)  # causal prefill
    model(ids[None, 13:14], cache=cache)  # one token
    block = model(ids[None, 14:37], cache=cache, mask=block_causal_mask(23, 8, offset=14))
    assert mx.isfinite(block.astype(mx.float32)).all().item()
    prompts = batch_prompts(golden)
    run_batch_generator(model, prompts, 3, 4)  # right padding
    caches = []
    for prompt, cached in zip(prompts, [3, 10, 7, 8]):
        cache = model.make_cache()
        model(mx.array(prompt[:cached])[None], cache=cache)
        caches.append(cache)
    generator = BatchGenerator(model, max_tokens=3)
    generator.insert([p[c:] for p, c in zip(prompts, [3, 10, 7, 8])], caches=caches)  # left padding
    while generator.next_generated():
        pass
    generator.close()
    arrays = [m for m in attention_masks if not (m is None or isinstance(m, str))]
    assert arrays and all(dtype == mx.bool_ for dtype in arrays)
    assert set(m for m in attention_masks if isinstance(m, str)) <= {"causal"}


def test_quantized_model_batches_like_one_by_one(golden_model, golden):
    model = quantized_copy(golden_model)
    prompts = batch_prompts(golden)
    assert run_batch_generator(model, prompts, 6, 4) == one_by_one(model, prompts, 6, -1)


def test_to_quantized_keeps_the_canon_state(kv_model, golden):
    cache = kv_model.make_cache()
    kv_model(golden["ids_a"][:, :5], cache=cache)
    quantized = cache[0].to_quantized(group_size=32, bits=8)
    zeros = mx.zeros((2, 3, 0))
    history = [history_array(c.canon_history(zeros)) for c in (quantized, cache[0])]
    assert mx.array_equal(*history)
    assert isinstance(quantized.kv, QuantizedKVCache) and quantized.offset == 5
    assert quantized.to_quantized(group_size=32, bits=8) is quantized


def test_a_cached_forward_leaves_no_state_in_the_model(golden_dir, golden):
    """The canon state lives in the cache only: forwards without one are unaffected."""
    model, _ = load_model(golden_dir)
    first = model(golden["ids_a"])
    cache = model.make_cache()
    model(golden["ids_a"], cache=cache)
    assert max_error(model(golden["ids_a"]), first) == 0.0
