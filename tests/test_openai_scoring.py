"""OpenAI prompt scoring (echo + logprobs), token-id prompts, models.retrieve, top_p 0
and n > 1 on /v1/completions; lm-eval's ``local-completions`` against the in-process
server scores the local task as ``dhara-mlx eval --mode ar`` does."""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import httpx  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
import openai  # noqa: E402

from optiq_dhara.serve.app import ServerConfig, background_server, create_app  # noqa: E402
from optiq_dhara.serve.engine import Worker  # noqa: E402

TRAINED = Path(__file__).parent / "fixtures" / "dhara_tiny_trained"
TASK_DIR = Path(__file__).parent / "fixtures" / "eval_task"
NAME = "dhara-tiny"


@contextmanager
def serving(path: Path, api_key=None):
    worker = Worker(lambda: mlx_lm.load(str(path)), max_batch=4).start()
    config = ServerConfig(NAME, mode="ar", api_key=api_key, max_tokens=16, max_context=512)
    try:
        with background_server(create_app(worker, config)) as url:
            yield url
    finally:
        worker.close()


@pytest.fixture(scope="module")
def url():
    with serving(TRAINED) as running:
        yield running


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def trained():
    return mlx_lm.load(str(TRAINED))


def reference(model, ids):
    """Each prompt token's log-probability given the ones before (full softmax)."""
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return [logprobs[p - 1, ids[p]].item() for p in range(1, len(ids))], logprobs


def test_echo_logprobs_equal_a_direct_forward(client, trained):
    model, tokenizer = trained
    text = "Question: What do bees make?\nAnswer: honey"
    ids = tokenizer.encode(text)
    reply = client.completions.create(
        model=NAME, prompt=text, echo=True, max_tokens=0, logprobs=3, temperature=0
    )
    assert reply.model == NAME
    [choice] = reply.choices
    lp = choice.logprobs
    want, full = reference(model, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for p, top in enumerate(lp.top_logprobs[1:], 1):
        assert len(top) <= 3
        assert max(top.values()) == pytest.approx(mx.max(full[p - 1]).item(), abs=1e-4)
    # max_tokens 1 adds the greedy next token; token ids give the same numbers
    extra = client.completions.create(
        model=NAME, prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0
    )
    lp1 = extra.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(ids) + 1
    assert lp1.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    assert lp1.token_logprobs[-1] == pytest.approx(max(lp1.top_logprobs[-1].values()))
    # a batch of token-id prompts (lm-eval's local-completions with batch_size > 1)
    batch = client.completions.create(
        model=NAME, prompt=[ids, ids[:5]], echo=True, max_tokens=1, logprobs=1, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].logprobs.token_logprobs[1:5] == pytest.approx(want[:4], abs=1e-4)


def test_token_id_and_batch_prompts(client, trained):
    model, tokenizer = trained
    ids = tokenizer.encode("Question: What color is the sky?\nAnswer:")
    by_text = client.completions.create(model=NAME, prompt=tokenizer.decode(ids), max_tokens=6)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=NAME, prompt=[ids, ids[:-1]], max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_ids.choices[0].text
    strings = client.completions.create(model=NAME, prompt=["a b", "c d"], max_tokens=3)
    assert len(strings.choices) == 2 and strings.model == NAME


def test_models_retrieve(client, url):
    model = client.models.retrieve(NAME)
    assert model.id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_top_p_zero_is_greedy_and_n_gives_n_choices(client):
    prompt = "Question: What do cows drink?\nAnswer:"
    greedy = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    zero = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0
    )
    assert zero.choices[0].text == greedy.choices[0].text
    two = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.text == greedy.choices[0].text for c in two.choices)
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2
    )
    assert len(chat.choices) == 2 and chat.model == NAME


def test_refusals(url):
    def post(**body):
        return httpx.post(f"{url}/v1/completions", json={"model": NAME, **body}, timeout=30)

    echo_and_generate = post(prompt="hi", echo=True, logprobs=1, max_tokens=5)
    assert echo_and_generate.status_code == 400 and "prompt scoring" in echo_and_generate.text
    assert post(prompt="hi", max_tokens=0).status_code == 400


def test_lm_eval_local_completions_matches_eval_ar(url, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from typer.testing import CliRunner

    from optiq_dhara.cli import app
    from optiq_dhara.evaluate.harness import task_manager

    limit = 40  # every item of the local task
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(TRAINED),
            "--tasks",
            "dhara_mc_local",
            "--include-path",
            str(TASK_DIR),
            "--mode",
            "ar",
            "--batch-size",
            "8",
            "--limit",
            str(limit),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    want = json.loads(out.read_text())["results"]["dhara_mc_local"]

    lm = LocalCompletionsAPI(
        model=NAME,
        base_url=f"{url}/v1/completions",
        tokenizer=str(TRAINED),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        num_concurrent=1,
        max_retries=1,
    )
    got = simple_evaluate(
        model=lm,
        tasks=["dhara_mc_local"],
        task_manager=task_manager(["dhara_mc_local"], [str(TASK_DIR)]),
        limit=limit,
    )["results"]["dhara_mc_local"]
    assert got["acc,none"] == pytest.approx(want["acc,none"])
    assert got["acc_norm,none"] == pytest.approx(want["acc_norm,none"])
