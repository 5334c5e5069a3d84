"""Log-probabilities of generated tokens: the distribution each token was drawn from,
the same in every causal mode, batched or alone."""

import math

import mlx.core as mx
import pytest

from optiq_dhara.runtime import decode, generate_batch
from optiq_dhara.runtime.decode import make_request
from optiq_dhara.runtime.engine import Engine


def run(model, prompt, **options):
    """Tokens and TokenLogprobs of one decode."""
    tokens, logprobs = [], []
    for step in decode(model, prompt, **options):
        tokens += step.tokens
        logprobs += step.logprobs
    assert [entry.token for entry in logprobs] == tokens
    return tokens, logprobs


def reference(model, prompt, tokens, penalty=None):
    """log_softmax of full forwards at each generated position (MASK excluded), with an
    optional presence penalty applied by hand."""
    rows = []
    for i in range(len(tokens)):
        logits = model(mx.array([prompt + tokens[:i]]))[0, -1].astype(mx.float32)
        if penalty:
            for token in set(tokens[:i]):
                logits[token] = logits[token] - penalty
        logits[model.args.mask_token_id] = -math.inf
        rows.append(logits - mx.logsumexp(logits))
    return mx.stack(rows)


@pytest.fixture
def prompt(golden):
    return golden["prompt_p1"].tolist()


@pytest.mark.parametrize("penalty", [None, 0.9])
def test_ar_logprobs_are_the_models_distribution(golden_model, prompt, penalty):
    options = {"presence_penalty": penalty} if penalty else {}
    tokens, logprobs = run(golden_model, prompt, max_tokens=10, logprobs=4, **options)
    expected = reference(golden_model, prompt, tokens, penalty)
    for i, entry in enumerate(logprobs):
        assert entry.logprob == pytest.approx(expected[i, entry.token].item(), abs=1e-4)
        assert len(entry.top) == 4
        assert entry.top[0][0] == entry.token  # greedy: the likeliest token
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True)
        for token, value in entry.top:
            assert value == pytest.approx(expected[i, token].item(), abs=1e-4)


@pytest.mark.parametrize(
    "params",
    [{}, {"temperature": 0.9, "seed": 4, "repetition_penalty": 1.2, "frequency_penalty": 0.3}],
)
def test_spec_reports_ar_logprobs(golden_model, prompt, params):
    ar_tokens, ar = run(golden_model, prompt, max_tokens=12, logprobs=2, **params)
    for k in (3, 8):
        tokens, spec = run(
            golden_model, prompt, mode="spec", k=k, max_tokens=12, logprobs=2, **params
        )
        assert tokens == ar_tokens
        for a, s in zip(ar, spec):
            assert s.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert [t for t, _ in s.top] == [t for t, _ in a.top]


def test_diffusion_reports_the_distribution_a_token_was_committed_from(golden_model, prompt):
    tokens, logprobs = run(
        golden_model, prompt, mode="diffusion", block_len=8, max_tokens=20, logprobs=3
    )
    assert len(tokens) == 20
    for entry in logprobs:
        assert entry.top[0][0] == entry.token  # greedy commits the likeliest token
        assert entry.logprob == pytest.approx(entry.top[0][1])
        assert -50 < entry.logprob <= 0


def test_batched_rows_report_their_lone_logprobs(golden_model, golden, prompt):
    prompts = [prompt, golden["prompt_p2"].tolist(), [5]]
    engine = Engine(golden_model)
    rows = [
        engine.add(p, *make_request(mode="ar", max_tokens=8, logprobs=1 if i else 0))
        for i, p in enumerate(prompts)
    ]
    got = {id(r): [] for r in rows}
    while engine.rows:
        for row, step in engine.step():
            got[id(row)] += step.logprobs
    for i, (p, row) in enumerate(zip(prompts, rows)):
        _, alone = run(golden_model, p, max_tokens=8, logprobs=1 if i else 0)
        assert [e.token for e in got[id(row)]] == [e.token for e in alone]
        for b, a in zip(got[id(row)], alone):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert len(b.top) == len(a.top) == (1 if i else 0)


def test_no_logprobs_unless_asked(golden_model, prompt):
    assert all(step.logprobs is None for step in decode(golden_model, prompt, max_tokens=4))
    assert generate_batch(golden_model, [prompt], max_tokens=3) == [
        [e.token for e in run(golden_model, prompt, max_tokens=3, logprobs=0)[1]]
    ]
