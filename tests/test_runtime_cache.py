"""A prefix cache kept across requests changes nothing but the work done."""

import pytest

from optiq_dhara.runtime import PrefixCache, decode, generate_ids

MODES = [("ar", {}), ("spec", {"k": 4}), ("diffusion", {"block_len": 8})]


def run(model, prompt, **kwargs):
    steps = list(decode(model, prompt, **kwargs))
    return [t for step in steps for t in step.tokens], steps[-1].stats


@pytest.mark.parametrize("mode, extra", MODES)
def test_follow_up_prompt_reuses_the_shared_prefix(golden_model, golden, mode, extra):
    cache = PrefixCache()
    first = golden["prompt_p1"].tolist()
    answer, _ = run(golden_model, first, mode=mode, max_tokens=12, prefix_cache=cache, **extra)
    follow_up = first + answer[:9] + [5, 6, 7, 8]  # 26 tokens, diverging after 22
    fresh = generate_ids(golden_model, follow_up, mode=mode, max_tokens=12, **extra)
    reused, stats = run(
        golden_model, follow_up, mode=mode, max_tokens=12, prefix_cache=cache, **extra
    )
    assert reused == fresh
    assert stats.reused_tokens == (16 if mode == "diffusion" else 22)


@pytest.mark.parametrize("mode, extra", MODES)
def test_same_prompt_twice(golden_model, golden, mode, extra):
    cache = PrefixCache()
    prompt = golden["prompt_p2"].tolist()  # 16 tokens: two whole blocks of 8
    outs = [
        run(golden_model, prompt, mode=mode, max_tokens=10, prefix_cache=cache, **extra)
        for _ in range(2)
    ]
    assert (
        outs[0][0]
        == outs[1][0]
        == generate_ids(golden_model, prompt, mode=mode, max_tokens=10, **extra)
    )
    assert outs[1][1].reused_tokens == (16 if mode == "diffusion" else 15)


def test_switching_modes_never_reuses_the_other_kind_of_state(golden_model, golden):
    """Causal KV is not block-causal KV: a diffusion request after an AR one starts fresh,
    and a spec request after that reuses the AR request's state, not the diffusion one's."""
    cache = PrefixCache()
    prompt = golden["prompt_p2"].tolist()
    run(golden_model, prompt, max_tokens=8, prefix_cache=cache)
    out, stats = run(
        golden_model, prompt, mode="diffusion", max_tokens=32, block_len=8, prefix_cache=cache
    )
    assert out == golden["diffusion_p2_bl8"].tolist()
    assert stats.reused_tokens == 0
    _, stats = run(golden_model, prompt, mode="spec", max_tokens=8, prefix_cache=cache)
    assert stats.reused_tokens == 15
    _, stats = run(golden_model, prompt, mode="ar", max_tokens=8, prefix_cache=cache)
    assert stats.reused_tokens == 15  # spec and AR share causal state


@pytest.mark.parametrize("mode, extra", MODES)
def test_a_run_closed_early_leaves_a_usable_cache(golden_model, golden, mode, extra):
    cache = PrefixCache()
    prompt = golden["prompt_p1"].tolist()
    steps = decode(golden_model, prompt, mode=mode, max_tokens=30, prefix_cache=cache, **extra)
    partial = []
    for step in steps:
        partial += step.tokens
        if len(partial) >= 5:
            break
    steps.close()
    follow_up = prompt + partial + [42]
    out, stats = run(golden_model, follow_up, mode=mode, max_tokens=10, prefix_cache=cache, **extra)
    assert out == generate_ids(golden_model, follow_up, mode=mode, max_tokens=10, **extra)
    assert stats.reused_tokens > 0


@pytest.mark.parametrize("k", [2, 16])
def test_spec_stopping_mid_round_leaves_a_consistent_cache(golden_model, golden, k):
    cache = PrefixCache()
    prompt = golden["prompt_p1"].tolist()
    stop = golden["greedy_p1"].tolist()[3]
    out, _ = run(
        golden_model, prompt, mode="spec", k=k, max_tokens=30, stop_ids=[stop], prefix_cache=cache
    )
    assert out == golden["greedy_p1"].tolist()[:4]
    held = cache.tokens
    assert held == (prompt + out)[: len(held)] and len(held) >= len(prompt + out) - 1
    follow_up = prompt + out + [42]
    again = generate_ids(
        golden_model, follow_up, mode="spec", k=k, max_tokens=10, prefix_cache=cache
    )
    assert again == generate_ids(golden_model, follow_up, mode="spec", k=k, max_tokens=10)


class FailsAfter:
    """The golden model, raising at its ``calls``-th forward."""

    def __init__(self, model, calls: int):
        self.golden, self.args, self.calls = model, model.args, calls
        self.head = model.head

    def model(self, inputs, cache=None, mask=None):
        self.calls -= 1
        if self.calls == 0:
            raise RuntimeError("boom")
        return self.golden.model(inputs, cache=cache, mask=mask)


def test_a_failed_run_leaves_nothing_behind(golden_model, golden):
    cache = PrefixCache()
    prompt = golden["prompt_p1"].tolist()
    run(golden_model, prompt, mode="spec", max_tokens=5, prefix_cache=cache)
    assert cache.tokens
    failing = FailsAfter(golden_model, 4)
    with pytest.raises(RuntimeError, match="boom"):
        generate_ids(failing, prompt, mode="spec", max_tokens=20, prefix_cache=cache)
    assert cache.tokens == []
    out, stats = run(failing.golden, prompt, mode="spec", max_tokens=20, prefix_cache=cache)
    assert out == golden["greedy_p1"].tolist()[:20] and stats.reused_tokens == 0
