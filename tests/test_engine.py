"""The batched engine: every row of a batch decodes exactly as it does alone."""

import gc

import mlx.core as mx
import pytest

from optiq_dhara import slot_cache
from optiq_dhara.runtime import PrefixCache, decode, generate_batch, generate_ids
from optiq_dhara.runtime.decode import make_request
from optiq_dhara.runtime.engine import Engine
from optiq_dhara.slot_cache import SlotCache

MODES = [
    ("ar", {}),
    ("spec", {"k": 4}),
    ("spec", {"k": 8, "block_len": 4}),
    ("diffusion", {"block_len": 8, "threshold": 0.5}),
    ("diffusion", {"block_len": 5, "threshold": 0.9}),
]
SAMPLING = [
    {},
    {"repetition_penalty": 1.3},
    {"temperature": 0.9, "top_p": 0.9, "min_p": 0.02, "seed": 3},
    {"temperature": 1.2, "top_k": 40, "repetition_penalty": 1.1, "seed": 8},
    {"presence_penalty": 0.8, "frequency_penalty": 0.4, "logit_bias": {7: 3.0, 11: -2.0}},
]


@pytest.fixture
def prompts(golden):
    return [golden["prompt_p1"].tolist(), golden["prompt_p2"].tolist(), [5], list(range(30, 60))]


def request(model, mode="ar", max_tokens=16, **kwargs):
    return make_request(mode=mode, max_tokens=max_tokens, **kwargs)


def drive(engine, schedule, steps_limit=1000):
    """Step ``engine``, adding the rows of ``schedule`` {step: [(prompt, settings, sampling)]}
    at their step; the tokens of each row, in the order added."""
    rows, outputs = [], {}
    for step in range(steps_limit):
        for prompt, settings, sampling in schedule.get(step, []):
            rows.append(engine.add(prompt, settings, sampling))
            outputs[id(rows[-1])] = []
        if step > max(schedule) and not engine.rows:
            break
        for row, event in engine.step():
            outputs[id(row)] += event.tokens
    return rows, [outputs[id(r)] for r in rows]


@pytest.mark.parametrize("mode, extra", MODES)
@pytest.mark.parametrize("params", SAMPLING)
def test_batch_rows_equal_lone_runs(golden_model, prompts, mode, extra, params):
    batch = generate_batch(golden_model, prompts, mode=mode, max_tokens=14, **extra, **params)
    alone = [
        generate_ids(golden_model, p, mode=mode, max_tokens=14, **extra, **params) for p in prompts
    ]
    assert batch == alone


def test_mixed_modes_joining_and_leaving_mid_flight(golden_model, golden, prompts):
    """Rows of all three modes in one engine, joining at different steps, with
    stops and lengths that end them at different steps."""
    stop = golden["greedy_p1"].tolist()[6]
    asks = [
        (prompts[0], dict(mode="ar", max_tokens=20)),
        (prompts[1], dict(mode="diffusion", max_tokens=13, block_len=8)),
        (prompts[3], dict(mode="spec", max_tokens=17, k=4, temperature=0.8, seed=2)),
        (prompts[2], dict(mode="ar", max_tokens=9, repetition_penalty=1.2)),
        (prompts[0], dict(mode="spec", max_tokens=30, stop_ids=[stop])),
        (prompts[1], dict(mode="diffusion", max_tokens=11, block_len=4, temperature=1.0, seed=5)),
        (prompts[3], dict(mode="ar", max_tokens=12, temperature=0.7, top_k=20, seed=1)),
    ]
    schedule = {}
    for i, (prompt, kwargs) in enumerate(asks):
        schedule.setdefault([0, 0, 1, 3, 3, 6, 9][i], []).append(
            (prompt, *request(golden_model, **kwargs))
        )
    _, outputs = drive(Engine(golden_model, max_batch=4, prefill_step=8), schedule)
    for (prompt, kwargs), out in zip(asks, outputs):
        kwargs = dict(kwargs)
        assert out == generate_ids(
            golden_model, prompt, max_tokens=kwargs.pop("max_tokens"), **kwargs
        )


def test_a_cancelled_row_leaves_and_the_others_go_on(golden_model, prompts):
    engine = Engine(golden_model)
    rows = [
        engine.add(p, *request(golden_model, mode, max_tokens=12))
        for p, mode in zip(prompts, ["ar", "spec", "diffusion", "ar"])
    ]
    out = {id(r): [] for r in rows}
    for _ in range(3):
        for row, step in engine.step():
            out[id(row)] += step.tokens
    engine.cancel(rows[1])
    assert rows[1].done and rows[1] not in engine.rows
    while engine.rows:
        for row, step in engine.step():
            out[id(row)] += step.tokens
    for p, mode, row in zip(prompts, ["ar", "spec", "diffusion", "ar"], rows):
        lone = generate_ids(golden_model, p, mode=mode, max_tokens=12)
        got = out[id(row)]
        assert got == (lone[: len(got)] if row is rows[1] else lone)


def test_rows_beyond_max_batch_wait_their_turn(golden_model, prompts):
    engine = Engine(golden_model, max_batch=2)
    rows = [engine.add(p, *request(golden_model, max_tokens=6)) for p in prompts]
    engine.step()
    assert sum(r in engine.waiting for r in rows) == 2
    out = generate_batch(golden_model, prompts, max_tokens=6, max_batch=2)
    assert out == [generate_ids(golden_model, p, max_tokens=6) for p in prompts]


def test_rows_share_the_prefix_cache(golden_model, golden):
    """Rows that start together from a cached prefix each reuse it, and decode as alone."""
    cache = PrefixCache()
    prompt = golden["prompt_p2"].tolist()
    generate_ids(golden_model, prompt, max_tokens=4, prefix_cache=cache)
    engine = Engine(golden_model, prefix_cache=cache)
    follow_ups = [prompt + [7, 8], prompt + [9], prompt + [7, 3, 2]]
    rows = [engine.add(p, *request(golden_model, max_tokens=8)) for p in follow_ups]
    out = {id(r): [] for r in rows}
    while engine.rows:
        for row, step in engine.step():
            out[id(row)] += step.tokens
    for row, p in zip(rows, follow_ups):
        assert row.stats.reused_tokens == len(prompt)
        assert out[id(row)] == generate_ids(golden_model, p, max_tokens=8)
    assert len(cache) >= 2


def test_prefix_cache_stays_within_its_bytes(golden_model, golden):
    cache = PrefixCache(max_bytes=1)
    generate_ids(golden_model, golden["prompt_p1"].tolist(), max_tokens=4, prefix_cache=cache)
    assert len(cache) == 0
    cache = PrefixCache()
    for start in range(3):
        generate_ids(golden_model, list(range(start, start + 20)), max_tokens=4, prefix_cache=cache)
    assert len(cache) == 3
    one = cache.nbytes // 3
    small = PrefixCache(max_bytes=2 * one)
    for start in range(3):
        generate_ids(golden_model, list(range(start, start + 20)), max_tokens=4, prefix_cache=small)
    assert len(small) == 2 and small.nbytes <= 2 * one
    assert small.tokens[:20] == list(range(2, 22))


def test_cancelling_an_ar_row_loses_no_token_of_the_others(golden_model, prompts):
    """AR steps are pipelined: a cancel reads the tokens in flight, which the others
    still receive (at the next step)."""
    engine = Engine(golden_model)
    rows = [engine.add(p, *request(golden_model, max_tokens=12)) for p in prompts]
    out = {id(r): [] for r in rows}
    for _ in range(4):
        for row, step in engine.step():
            out[id(row)] += step.tokens
    engine.cancel(rows[0])
    while engine.rows:
        events = engine.step()
        assert len({id(row) for row, _ in events}) == len(events)  # one Step per row
        for row, step in events:
            out[id(row)] += step.tokens
    for p, row in zip(prompts[1:], rows[1:]):
        assert out[id(row)] == generate_ids(golden_model, p, max_tokens=12)


@pytest.mark.parametrize("mode, extra", MODES[:4])
def test_a_prefix_cache_entry_is_never_changed_by_the_rows_using_it(
    golden_model, golden, mode, extra
):
    """A row that reuses a short prefix of an entry writes past it in its own copy:
    a later row reusing the entry's whole prefix still decodes as fresh."""
    cache = PrefixCache()
    prompt = list(range(40, 80))
    kwargs = dict(mode=mode, max_tokens=10, **extra)
    generate_ids(golden_model, prompt, prefix_cache=cache, **kwargs)
    generate_ids(golden_model, prompt[:20] + [3, 1, 4], prefix_cache=cache, **kwargs)
    follow_up = prompt + [9, 9]
    again = generate_ids(golden_model, follow_up, prefix_cache=cache, **kwargs)
    assert again == generate_ids(golden_model, follow_up, **kwargs)


@pytest.mark.parametrize("mode, extra", MODES[:4])
def test_prefix_reuse_cuts_back_to_a_canon_checkpoint_and_replays(
    golden_model, monkeypatch, mode, extra
):
    """Entries keep canon tails only at checkpoints: a cut between two (or before the
    first) replays the tokens from the one before, and decodes as fresh."""
    monkeypatch.setattr(slot_cache, "CHECKPOINT", 8)
    cache = PrefixCache()
    prompt = list(range(20, 70))
    kwargs = dict(mode=mode, max_tokens=12, **extra)
    generate_ids(golden_model, prompt, prefix_cache=cache, **kwargs)
    grid = extra.get("block_len") if mode == "diffusion" else None
    for cut in (45, 33, 16, 8, 3):
        follow_up = prompt[:cut] + [7, 7, 7]
        steps = list(decode(golden_model, follow_up, prefix_cache=cache, **kwargs))
        reused = [t for step in steps for t in step.tokens]
        assert reused == generate_ids(golden_model, follow_up, **kwargs), cut
        assert steps[-1].stats.reused_tokens == (cut // grid * grid if grid else cut)


def test_canon_state_stays_small_next_to_the_kv(golden_model):
    """No canon input is stored: beyond the KV, a row holds its tail and a tail per
    CHECKPOINT positions."""
    cache = SlotCache(golden_model)
    cache.feed(list(range(1, 300)) * 3)
    kv = sum(a.nbytes for a in cache.keys + cache.values)
    assert cache.lengths == [897] and sorted(cache.checkpoints[0]) == [256, 512, 768]
    assert cache.nbytes() - kv <= 0.25 * kv


def test_a_prefill_keeps_none_of_its_canon_inputs_alive(golden_model):
    """Tails and checkpoints are new arrays, not views of a forward's canon inputs:
    after a long prefill the memory in use grows by the cache's own bytes."""
    SlotCache(golden_model).feed(list(range(1, 40)))  # compiles what a forward needs
    gc.collect()
    before = mx.get_active_memory()
    cache = SlotCache(golden_model)
    cache.feed(list(range(1, 300)) * 3)
    gc.collect()
    assert mx.get_active_memory() - before <= 1.05 * cache.nbytes()
