"""The three decoding modes reproduce the golden token sequences; bad arguments fail clearly."""

import mlx.core as mx
import pytest

from optiq_dhara.runtime import decode, generate_ids

DIFFUSION_CASES = ["diffusion_p1_bl8", "diffusion_p1_bl16", "diffusion_p2_bl8", "diffusion_p2_bl16"]


def ids(golden, key: str) -> list[int]:
    return golden[key].tolist()


def run(model, prompt, **kwargs):
    """(tokens, last step's stats) of one decode."""
    steps = list(decode(model, prompt, **kwargs))
    return [t for step in steps for t in step.tokens], steps[-1].stats


class MaskLover:
    """The golden model with a huge MASK logit: MASK would win everywhere if allowed."""

    def __init__(self, model):
        self.golden, self.args, self.model = model, model.args, model.model

    def head(self, hidden):
        logits = self.golden.head(hidden)
        return logits + 1000.0 * (mx.arange(logits.shape[-1]) == self.args.mask_token_id)


@pytest.mark.parametrize("penalty, key", [(1.0, "greedy_p1"), (1.3, "greedy_p1_rep13")])
def test_ar_reproduces_golden(golden_model, golden, penalty, key):
    out, stats = run(
        golden_model, ids(golden, "prompt_p1"), max_tokens=40, repetition_penalty=penalty
    )
    assert out == ids(golden, key)
    assert (stats.generated, stats.forwards, stats.finish_reason) == (40, 40, "length")


@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("penalty, key", [(1.0, "greedy_p1"), (1.3, "greedy_p1_rep13")])
def test_spec_reproduces_greedy_ar(golden_model, golden, k, penalty, key):
    out, stats = run(
        golden_model,
        ids(golden, "prompt_p1"),
        mode="spec",
        k=k,
        max_tokens=40,
        repetition_penalty=penalty,
    )
    assert out == ids(golden, key)
    assert stats.generated == 40
    # every round emits its accepted drafts plus one anchor; the prefill's anchor is round 1
    assert stats.generated == stats.rounds + stats.accepted_drafts
    assert stats.tokens_per_round == pytest.approx(1 + stats.accepted_per_round)
    assert stats.forwards <= 2 * stats.rounds - 1


@pytest.mark.parametrize("case", DIFFUSION_CASES)
def test_diffusion_reproduces_golden(golden_model, golden, golden_settings, case):
    settings = golden_settings[case]
    prompt = ids(golden, "prompt_p1" if "_p1_" in case else "prompt_p2")
    out, stats = run(
        golden_model,
        prompt,
        mode="diffusion",
        max_tokens=settings["max_new_tokens"],
        block_len=settings["block_len"],
        threshold=settings["threshold"],
    )
    assert out == ids(golden, case)
    assert stats.rounds == stats.forwards == sum(settings["steps_per_block"])
    assert stats.tokens_per_forward == pytest.approx(32 / stats.forwards)


@pytest.mark.parametrize(
    "mode, extra",
    [("ar", {}), ("spec", {"k": 4}), ("diffusion", {"block_len": 8}), ("ar", {"temperature": 0.9})],
)
def test_mask_is_never_emitted(golden_model, golden, mode, extra):
    """With MASK suppressed, a model that loves MASK decodes exactly like the plain one."""
    prompt = ids(golden, "prompt_p1")
    kwargs = dict(mode=mode, max_tokens=20, seed=3, **extra)
    out = generate_ids(MaskLover(golden_model), prompt, **kwargs)
    assert golden_model.args.mask_token_id not in out
    assert out == generate_ids(golden_model, prompt, **kwargs)


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_causal_modes_stop_after_the_first_stop_token(golden_model, golden, mode):
    expected = ids(golden, "greedy_p1")
    stop = expected[3]  # 191, first generated at index 3
    out, stats = run(
        golden_model, ids(golden, "prompt_p1"), mode=mode, max_tokens=40, stop_ids=[stop]
    )
    assert out == expected[:4]
    assert stats.finish_reason == "stop"


def test_diffusion_stops_inside_a_block(golden_model, golden, golden_settings):
    """A stop token ends the output right after it; the tokens before it are unchanged."""
    expected = ids(golden, "diffusion_p1_bl8")
    stop = expected[12]  # 213, first at index 12 (in the second block)
    out, stats = run(
        golden_model,
        ids(golden, "prompt_p1"),
        mode="diffusion",
        max_tokens=32,
        block_len=8,
        threshold=golden_settings["diffusion_p1_bl8"]["threshold"],
        stop_ids=[stop],
    )
    assert out == expected[:13]
    assert stats.finish_reason == "stop"


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
@pytest.mark.parametrize("max_tokens", [0, 1, 7])
def test_max_tokens_is_respected(golden_model, golden, mode, max_tokens):
    out, stats = run(
        golden_model, ids(golden, "prompt_p1"), mode=mode, max_tokens=max_tokens, block_len=4
    )
    assert len(out) == max_tokens
    assert stats.finish_reason == "length"
    if mode != "diffusion":
        assert out == ids(golden, "greedy_p1")[:max_tokens]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "spec", "k": 1}, "k must be >= 2"),
        ({"block_len": 0}, "block_len must be >= 1"),
        ({"threshold": 1.5}, "threshold must be in [0, 1]"),
        ({"threshold": -0.1}, "threshold must be in [0, 1]"),
        ({"max_tokens": -1}, "max_tokens must be >= 0"),
        ({"mode": "beam"}, "mode must be one of ar, diffusion, spec"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"min_p": 2.0}, "min_p must be in [0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ],
)
def test_bad_arguments_raise_before_decoding(golden_model, kwargs, message):
    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises(ValueError) as error:
        decode(golden_model, [1, 2, 3], **kwargs)  # raises at the call, not at the first step
    assert message in str(error.value)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "prompt is empty"),
        ([1, 320], "token id 320 outside the vocabulary [0, 320)"),
        ([-1], "token id -1"),
    ],
)
def test_bad_prompts_raise(golden_model, prompt, message):
    with pytest.raises(ValueError) as error:
        generate_ids(golden_model, prompt, max_tokens=4)
    assert message in str(error.value)


def test_stats_report_timings(golden_model, golden):
    _, stats = run(golden_model, ids(golden, "prompt_p1"), mode="spec", k=4, max_tokens=12)
    assert stats.prompt_tokens == 13 and stats.reused_tokens == 0
    assert 0 < stats.time_to_first_token and 0 < stats.prompt_seconds <= stats.time_to_first_token
    assert stats.tokens_per_second == pytest.approx(12 / stats.decode_seconds)
    assert stats.accepted_per_round == pytest.approx(stats.accepted_drafts / stats.rounds)
