"""Cached block diffusion equals the plain, uncached semantics of SPEC.md at any prompt length."""

import mlx.core as mx
from hypothesis import given, settings
from hypothesis import strategies as st

from optiq_dhara.masks import block_causal_mask
from optiq_dhara.runtime import decode, generate_ids
from optiq_dhara.runtime.diffusion import denoise
from optiq_dhara.runtime.sampling import Sampling


def reference_diffusion(model, prompt, max_tokens, block_len, threshold, sampling=None):
    """Append a block of MASKs; run the whole sequence under the block mask until none is left.

    Every block is a whole block, the last one too; the output is cut to ``max_tokens``.

    Greedy: commit every masked position whose top probability (float32, MASK
    excluded) is >= threshold, and at least the most confident one. With
    ``sampling``, the runtime's commit rule picks the tokens instead.
    """
    mask_id = model.args.mask_token_id
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        start = len(seq)
        seq += [mask_id] * block_len
        while mask_id in seq[start:]:
            logits = model(mx.array([seq]), mask=block_causal_mask(len(seq), block_len))[0]
            masked = [p for p in range(start, len(seq)) if seq[p] == mask_id]
            rows = logits[mx.array(masked)].astype(mx.float32)
            if sampling is None:
                rows[:, mask_id] = -mx.inf
                probs = mx.softmax(rows, axis=-1)
                tokens = mx.argmax(probs, axis=-1).tolist()
                confidence = probs.max(axis=-1).tolist()
                best = confidence.index(max(confidence))
                commit = [c >= threshold or i == best for i, c in enumerate(confidence)]
            else:
                tokens, commit = denoise(rows, None, masked, sampling, threshold, mask_id)
            for p, token, flag in zip(masked, tokens, commit):
                if flag:
                    seq[p] = token
        out += seq[start:]
    return out[:max_tokens]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    prompt=st.lists(st.integers(0, 319), min_size=1, max_size=40),
    block_len=st.integers(1, 12),
    threshold=st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9, 1.0]),
    max_tokens=st.integers(1, 20),
    temperature=st.sampled_from([0.0, 0.0, 0.8]),
)
def test_cached_diffusion_equals_uncached_reference(
    golden_model, prompt, block_len, threshold, max_tokens, temperature
):
    sampling = Sampling(temperature=temperature, seed=9) if temperature else None
    expected = reference_diffusion(golden_model, prompt, max_tokens, block_len, threshold, sampling)
    got = generate_ids(
        golden_model,
        prompt,
        mode="diffusion",
        max_tokens=max_tokens,
        block_len=block_len,
        threshold=threshold,
        temperature=temperature,
        seed=9,
    )
    assert got == expected


def test_threshold_one_commits_one_token_per_step(golden_model, golden):
    """Two whole blocks take 8 steps; the third (cut to 2 tokens) ends as soon as
    its first two positions are committed, after 2 to 4 steps."""
    steps = list(
        decode(
            golden_model,
            golden["prompt_p1"].tolist(),
            mode="diffusion",
            max_tokens=10,
            block_len=4,
            threshold=1.0,
        )
    )
    assert 10 <= steps[-1].stats.forwards <= 12
    assert sum(len(step.tokens) for step in steps) == 10
    assert all(len(step.tokens) <= 4 for step in steps)


def test_a_run_is_a_prefix_of_a_longer_run(golden_model, golden):
    """The last block is always a whole block, cut to max_tokens (not a shorter block)."""
    prompt = golden["prompt_p1"].tolist()
    for block_len, threshold in ((4, 0.5), (8, 0.9), (5, 0.2)):
        kwargs = dict(mode="diffusion", block_len=block_len, threshold=threshold)
        longest = generate_ids(golden_model, prompt, max_tokens=24, **kwargs)
        for m in range(1, 24):
            assert generate_ids(golden_model, prompt, max_tokens=m, **kwargs) == longest[:m]


def test_threshold_zero_commits_a_block_per_step(golden_model, golden):
    steps = list(
        decode(
            golden_model,
            golden["prompt_p1"].tolist(),
            mode="diffusion",
            max_tokens=12,
            block_len=4,
            threshold=0.0,
        )
    )
    assert [len(step.tokens) for step in steps] == [4, 4, 4]


def test_tokens_stream_in_order_as_soon_as_final(golden_model, golden):
    """Each step emits the newly final run at the front of the block; together, the output."""
    prompt = golden["prompt_p2"].tolist()
    steps = list(decode(golden_model, prompt, mode="diffusion", max_tokens=32, block_len=8))
    assert [t for step in steps for t in step.tokens] == golden["diffusion_p2_bl8"].tolist()
    assert any(0 < len(step.tokens) < 8 for step in steps)


def test_steps_show_the_block_being_denoised(golden_model, golden):
    """Each step carries the block after it (MASK where still masked) and the step
    that committed each position: enough to draw the denoising."""
    mask_id = golden_model.args.mask_token_id
    prompt = golden["prompt_p2"].tolist()  # 16 tokens: blocks of 8 start at 16 and 24
    steps = list(
        decode(golden_model, prompt, mode="diffusion", max_tokens=16, block_len=8, threshold=0.9)
    )
    assert all(step.block is not None and len(step.block) == 8 for step in steps)
    assert [s.block_start for s in steps] == sorted(s.block_start for s in steps)
    first_block = [s for s in steps if s.block_start == 16]
    assert len(first_block) >= 2
    masked = [sum(t == mask_id for t in s.block) for s in first_block]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    last = first_block[-1]
    assert sorted(set(last.committed)) == list(range(1, len(first_block) + 1))
    out = [t for s in steps for t in s.tokens]
    assert out[:8] == last.block
