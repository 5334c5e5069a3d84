"""The real server on a loopback port, driven by the official ``openai`` client.

Every answer is compared with what the runtime gives for the same request alone,
without a prefix cache, in this thread: the server must add nothing and lose nothing.
"""

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import mlx_lm
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optiq_dhara.serve.engine as engine_module
from optiq_dhara.runtime import stream_text
from optiq_dhara.runtime.text import encode_prompt
from optiq_dhara.serve.app import ServerConfig, background_server, create_app
from optiq_dhara.serve.engine import Worker

KEY = "test-key"
CONTEXT = 1024
DEFAULT_MAX_TOKENS = 12
MODES = ["ar", "diffusion", "spec"]
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def steps(monkeypatch):
    """Control over the batch steps of every worker: clear ``go`` to hold them, set it to
    let them run; ``delay`` seconds are added to each (a slow model); ``widest`` is the
    most requests one step has had in its batch."""
    control = SimpleNamespace(go=threading.Event(), delay=0.0, widest=0)
    control.go.set()
    step = engine_module.Engine.step

    def controlled(engine):
        control.go.wait(timeout=30)
        time.sleep(control.delay)
        control.widest = max(control.widest, len(engine.rows))
        return step(engine)

    monkeypatch.setattr(engine_module.Engine, "step", controlled)
    yield control
    control.go.set()


async def until(condition, timeout=10.0):
    """Wait, without blocking the event loop, for ``condition()`` to hold."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@contextmanager
def serving(load, worker=None, **config):
    """A Worker and a uvicorn server on a free 127.0.0.1 port, in background threads."""
    engine = Worker(load, **(worker or {})).start()
    config = ServerConfig(
        "golden_tiny", api_key=KEY, max_tokens=DEFAULT_MAX_TOKENS, max_context=CONTEXT, **config
    )
    try:
        with background_server(create_app(engine, config)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
            yield SimpleNamespace(url=url, engine=engine, client=client)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tiny(golden_dir):
    """The model and tokenizer for reference answers, in the test thread."""
    return mlx_lm.load(str(golden_dir))


@pytest.fixture(scope="module")
def server(golden_dir):
    with serving(lambda: mlx_lm.load(str(golden_dir))) as running:
        yield running


def alone(tiny, prompt, *, chat, mode="spec", max_tokens=DEFAULT_MAX_TOKENS, tools=None, **options):
    """(text, finish_reason, stats) of the request run alone by the runtime, no prefix cache."""
    model, tokenizer = tiny
    chunks = list(
        stream_text(
            model,
            tokenizer,
            prompt,
            chat=chat,
            tools=tools,
            mode=mode,
            max_tokens=max_tokens,
            **options,
        )
    )
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].stats


def stream_chat(client, **request):
    """Content, finish reason, usage and number of content chunks of a streamed chat."""
    text, finish, usage, pieces = "", None, None, 0
    for chunk in client.chat.completions.create(
        model="golden_tiny", stream=True, stream_options={"include_usage": True}, **request
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                text, pieces = text + choice.delta.content, pieces + 1
            finish = choice.finish_reason or finish
    return text, finish, usage, pieces


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["golden_tiny"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "golden_tiny"
    assert (health["queued"], health["running"]) == (0, 0)
    assert set(health["requests"]) == {"completed", "cancelled", "failed"}


@pytest.mark.parametrize("mode", MODES)
def test_chat_is_the_runtime_answer(server, tiny, mode):
    reply = server.client.chat.completions.create(
        model="golden_tiny", messages=HELLO, extra_body={"mode": mode}
    )
    text, finish, stats = alone(tiny, HELLO, chat=True, mode=mode)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (text, finish)
    assert reply.usage.prompt_tokens == len(encode_prompt(tiny[1], HELLO, chat=True))
    assert reply.usage.completion_tokens == stats.generated
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + stats.generated


@pytest.mark.parametrize("mode", MODES)
def test_streamed_chat_sends_the_same_text_in_pieces(server, tiny, mode):
    text, finish, usage, pieces = stream_chat(
        server.client, messages=HELLO, max_tokens=16, extra_body={"mode": mode}
    )
    expected, expected_finish, stats = alone(tiny, HELLO, chat=True, mode=mode, max_tokens=16)
    assert (text, finish) == (expected, expected_finish)
    assert pieces > 1  # sent as tokens become final, not at the end
    assert usage.completion_tokens == stats.generated


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_completion_is_the_runtime_answer(server, tiny, mode, stream):
    request = dict(model="golden_tiny", prompt="Once upon a time", max_tokens=10)
    expected = alone(tiny, "Once upon a time", chat=False, mode=mode, max_tokens=10)
    if stream:
        chunks = list(
            server.client.completions.create(stream=True, extra_body={"mode": mode}, **request)
        )
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = server.client.completions.create(extra_body={"mode": mode}, **request)
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert (text, finish) == expected[:2]


def test_finish_reason_is_what_happened(server, tiny):
    short = server.client.completions.create(model="golden_tiny", prompt="Hello", max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    # greedy AR after "Hello" reaches the end-of-turn token after 64 tokens
    text, finish, stats = alone(tiny, "Hello", chat=False, mode="ar", max_tokens=100)
    assert finish == "stop" and stats.generated < 100
    full = server.client.completions.create(
        model="golden_tiny", prompt="Hello", max_tokens=100, extra_body={"mode": "ar"}
    )
    assert (full.choices[0].text, full.choices[0].finish_reason) == (text, "stop")
    assert full.usage.completion_tokens == stats.generated


def test_stop_strings_end_the_text_before_them(server, tiny):
    full, _, _ = alone(tiny, "Once upon a time", chat=False, max_tokens=16)
    stop = full[6:9]
    reply = server.client.completions.create(
        model="golden_tiny", prompt="Once upon a time", max_tokens=16, stop=[stop, "never-seen"]
    )
    text = reply.choices[0].text
    expected = alone(tiny, "Once upon a time", chat=False, max_tokens=16, stop=(stop, "never-seen"))
    assert (
        (text, reply.choices[0].finish_reason) == expected[:2] == (full[: full.find(stop)], "stop")
    )
    streamed, finish, _, _ = stream_chat(server.client, messages=HELLO, stop=stop)
    assert (streamed, finish) == alone(tiny, HELLO, chat=True, stop=(stop,))[:2]


def test_the_same_greedy_request_twice_gives_the_same_text(server):
    replies = [
        server.client.chat.completions.create(model="golden_tiny", messages=HELLO, max_tokens=16)
        for _ in range(2)
    ]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[1].usage.prompt_tokens_details.cached_tokens > 0  # the prefix was reused


def sampled(server, seed, mode="spec"):
    reply = server.client.completions.create(
        model="golden_tiny",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0.9,
        top_p=0.95,
        seed=seed,
        extra_body={"mode": mode, "repetition_penalty": 1.1},
    )
    return reply.choices[0].text


def test_same_seed_same_text_and_seeds_matter(server, tiny):
    assert sampled(server, 7) == sampled(server, 7)
    assert len({sampled(server, seed) for seed in range(4)}) > 1
    options = dict(temperature=0.9, top_p=0.95, seed=7, repetition_penalty=1.1)
    assert sampled(server, 7) == alone(tiny, "Once upon a time", chat=False, **options)[0]


def test_sampled_self_speculation_is_served_and_follows_ar(server):
    for seed in range(3):
        assert sampled(server, seed, "spec") == sampled(server, seed, "ar")


def test_prefix_reuse_gives_the_answer_without_it(server, tiny):
    system = {"role": "system", "content": "You are a terse assistant. " * 4}
    first = [system, {"role": "user", "content": "Hi"}]
    second = [system, {"role": "user", "content": "Hi there, how are you"}]
    for mode in MODES:
        for messages in (first, second, first):
            reply = server.client.chat.completions.create(
                model="golden_tiny", messages=messages, extra_body={"mode": mode, "block_len": 8}
            )
            expected = alone(tiny, messages, chat=True, mode=mode, block_len=8)
            assert reply.choices[0].message.content == expected[0]
        assert reply.usage.prompt_tokens_details.cached_tokens > 0


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tools_go_into_the_chat_template(server, tiny):
    reply = server.client.chat.completions.create(
        model="golden_tiny", messages=HELLO, tools=[WEATHER], max_tokens=8
    )
    prompt = encode_prompt(tiny[1], HELLO, chat=True, tools=[WEATHER])
    assert reply.usage.prompt_tokens == len(prompt)
    assert "get_weather" in tiny[1].decode(prompt)
    expected = alone(tiny, HELLO, chat=True, tools=[WEATHER], max_tokens=8)
    assert reply.choices[0].message.content == expected[0]


def test_tool_results_go_back_into_the_template(server, tiny):
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = HELLO + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    reply = server.client.chat.completions.create(
        model="golden_tiny", messages=messages, tools=[WEATHER], max_tokens=4
    )
    rendered = [
        HELLO[0],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny, 21 C"},
    ]
    prompt = encode_prompt(tiny[1], rendered, chat=True, tools=[WEATHER])
    assert reply.usage.prompt_tokens == len(prompt)
    text = tiny[1].decode(prompt)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in text


@pytest.fixture
def scripted_server(golden_dir, scripted_tool_call):
    """A server whose text is a scripted tool call, for tool-call routing only."""
    with serving(lambda: mlx_lm.load(str(golden_dir))) as running:
        running.seen = scripted_tool_call
        yield running


def test_generated_tool_calls_come_back_as_openai_tool_calls(scripted_server):
    client = scripted_server.client
    reply = client.chat.completions.create(model="golden_tiny", messages=HELLO, tools=[WEATHER])
    choice = reply.choices[0]
    assert scripted_server.seen["tools"] == [WEATHER] and scripted_server.seen["chat"] is True
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(
        model="golden_tiny", messages=HELLO, tools=[WEATHER], stream=True
    ):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, [call.function.name, ""])[1] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check. " and finish == "tool_calls"
    assert calls[0][0] == "get_weather" and json.loads(calls[0][1]) == {"city": "Paris"}

    plain = client.chat.completions.create(model="golden_tiny", messages=HELLO)
    assert plain.choices[0].finish_reason == "stop"  # without tools the text stays content
    assert "<tool_call>" in plain.choices[0].message.content


def load_mix():
    """32 requests: every mode, chat and text, greedy and seeded sampling."""
    prompts = ["Hello", "Once upon a time", "The capital of France", "1 2 3 4"]
    requests = []
    for i in range(32):
        sampling = {"temperature": 0.8, "seed": i} if i % 4 == 3 else {}
        requests.append(
            dict(
                mode=MODES[i % 3],
                chat=i % 2 == 0,
                prompt=prompts[i % 4],
                max_tokens=6 + i % 5,
                **sampling,
            )
        )
    return requests


async def streamed(client, request):
    options = {k: request[k] for k in ("temperature", "seed") if k in request}
    common = dict(model="golden_tiny", stream=True, max_tokens=request["max_tokens"])
    extra = {"extra_body": {"mode": request["mode"]}}
    if request["chat"]:
        messages = [{"role": "user", "content": request["prompt"]}]
        stream = await client.chat.completions.create(
            messages=messages, **common, **options, **extra
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    stream = await client.completions.create(prompt=request["prompt"], **common, **options, **extra)
    return "".join([c.choices[0].text async for c in stream])


def test_32_concurrent_streams_each_get_their_lone_answer(server, tiny, steps):
    requests = load_mix()
    expected = []
    for r in requests:
        options = {k: r[k] for k in ("temperature", "seed") if k in r}
        prompt = [{"role": "user", "content": r["prompt"]}] if r["chat"] else r["prompt"]
        expected.append(
            alone(
                tiny, prompt, chat=r["chat"], mode=r["mode"], max_tokens=r["max_tokens"], **options
            )[0]
        )

    async def all_at_once():
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60
        )
        async with client:
            steps.go.clear()  # hold the batch until every request has arrived
            texts = asyncio.gather(*(streamed(client, r) for r in requests))
            worker = server.engine
            await until(lambda: worker.running + worker.pending == len(requests))
            steps.go.set()
            return await asyncio.wait_for(texts, timeout=120)

    assert asyncio.run(all_at_once()) == expected
    assert steps.widest == len(requests)  # decoded together, in one batch


def test_a_client_leaving_mid_stream_disturbs_no_one(server, tiny):
    before = dict(server.engine.counts)
    long_request = {
        "model": "golden_tiny",
        "prompt": "Hello",
        "max_tokens": 400,
        "stream": True,
        "mode": "diffusion",
    }
    headers = {"Authorization": f"Bearer {KEY}"}

    async def leave_early_while_others_run():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
            async with http.stream("POST", "/v1/completions", json=long_request) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # leave after the first chunk
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
            async with client:
                return await asyncio.gather(*(streamed(client, r) for r in load_mix()[:4]))

    texts = asyncio.run(leave_early_while_others_run())
    for text, r in zip(texts, load_mix()[:4]):
        options = {k: r[k] for k in ("temperature", "seed") if k in r}
        prompt = [{"role": "user", "content": r["prompt"]}] if r["chat"] else r["prompt"]
        assert (
            text
            == alone(
                tiny, prompt, chat=r["chat"], mode=r["mode"], max_tokens=r["max_tokens"], **options
            )[0]
        )
    counts = server.engine.counts
    wait_until(lambda: counts["completed"] == before["completed"] + 4)
    assert counts["cancelled"] == before["cancelled"] + 1  # the worker stopped the abandoned job
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_rows_that_end_early_take_no_tokens_from_the_others(server, tiny, steps):
    """AR rows decode one step ahead; a row cut by a stop string, or by its client,
    leaves the batch while the others' next tokens are in flight."""
    full = alone(tiny, "Once upon a time", chat=False, mode="ar", max_tokens=16)[0]
    cut = dict(prompt="Once upon a time", max_tokens=16, stop=[full[6:9]])
    others = [dict(prompt=p, max_tokens=16) for p in ("Hello", "1 2 3 4", "The capital")]
    gone = {"prompt": "Once upon a time", "max_tokens": 400, "mode": "ar", "stream": True}
    before = server.engine.counts["cancelled"]

    async def together():
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60
        )
        async with client, httpx.AsyncClient(base_url=server.url, headers=AUTH) as http:
            steps.go.clear()
            leaving = asyncio.create_task(http.post("/v1/completions", json=gone))
            replies = asyncio.gather(
                *(
                    client.completions.create(model="golden_tiny", extra_body={"mode": "ar"}, **r)
                    for r in [cut, *others]
                )
            )
            await until(lambda: server.engine.running + server.engine.pending == 5)
            steps.delay = 0.005
            steps.go.set()
            await asyncio.sleep(0.03)
            leaving.cancel()
            await asyncio.wait({leaving})
            return await replies

    texts = [reply.choices[0].text for reply in asyncio.run(together())]
    assert texts[0] == full[: full.find(full[6:9])]
    for text, r in zip(texts[1:], others, strict=True):
        assert text == alone(tiny, r["prompt"], chat=False, mode="ar", max_tokens=16)[0]
    wait_until(lambda: server.engine.counts["cancelled"] == before + 1)


AUTH = {"Authorization": f"Bearer {KEY}"}
ONCE = {"prompt": "Once upon a time", "mode": "ar", "max_tokens": 8}


def once_alone(tiny):
    return alone(tiny, ONCE["prompt"], chat=False, mode="ar", max_tokens=8)[0]


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(golden_dir, tiny, steps, stream):
    """One batch slot, slow steps: the abandoned request would hold the slot for 9 s."""
    steps.delay = 0.01
    long_request = {**ONCE, "max_tokens": 900, "stream": stream}

    async def leave_then_ask(worker, url):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
            if stream:
                async with http.stream("POST", "/v1/completions", json=long_request) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            break  # leave after the first chunk
            else:
                waiting = asyncio.create_task(http.post("/v1/completions", json=long_request))
                await until(lambda: worker.running == 1)
                await asyncio.sleep(0.1)  # a few steps into it
                waiting.cancel()  # the client hangs up
                await asyncio.wait({waiting})
            await until(lambda: worker.counts["cancelled"] == 1 and worker.running == 0)
            health = (await http.get("/health")).json()
            start = time.monotonic()
            reply = await http.post("/v1/completions", json=ONCE)
            return health, reply.json(), time.monotonic() - start

    with serving(lambda: mlx_lm.load(str(golden_dir)), worker={"max_batch": 1}) as running:
        health, reply, seconds = asyncio.run(leave_then_ask(running.engine, running.url))
        counts = running.engine.counts
    assert (health["running"], health["queued"]) == (0, 0)
    assert health["requests"] == {"completed": 0, "cancelled": 1, "failed": 0}
    assert counts == {"completed": 1, "cancelled": 1, "failed": 0}
    assert reply["choices"][0]["text"] == once_alone(tiny)
    assert seconds < 5


def test_a_full_queue_answers_429_with_retry_after(golden_dir, tiny, steps):
    """One request decoding, one waiting: the third is refused, and the two are served."""

    async def three(worker, url):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
            steps.go.clear()
            first = asyncio.create_task(http.post("/v1/completions", json=ONCE))
            await until(lambda: worker.running == 1)
            second = asyncio.create_task(http.post("/v1/completions", json={**ONCE, "stream": 1}))
            await until(lambda: worker.pending == 1)
            third = await http.post("/v1/completions", json=ONCE)
            health = (await http.get("/health")).json()
            steps.go.set()
            return third, health, (await first).json(), await second

    config = {"max_batch": 1, "max_queue": 1}
    with serving(lambda: mlx_lm.load(str(golden_dir)), worker=config) as running:
        third, health, first, second = asyncio.run(three(running.engine, running.url))
    assert third.status_code == 429 and third.headers["retry-after"] == "1"
    error = error_of(third)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert (health["running"], health["queued"]) == (1, 1)
    expected = once_alone(tiny)
    assert first["choices"][0]["text"] == expected
    streamed_text = "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in second.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert streamed_text == expected


def test_the_openai_client_sees_a_rate_limit_error(golden_dir, steps):
    config = {"max_batch": 1, "max_queue": 0}
    with serving(lambda: mlx_lm.load(str(golden_dir)), worker=config) as running:

        async def two():
            client = openai.AsyncOpenAI(
                base_url=f"{running.url}/v1", api_key=KEY, max_retries=0, timeout=60
            )
            async with client:
                steps.go.clear()
                first = asyncio.create_task(
                    client.completions.create(model="golden_tiny", prompt="Once", max_tokens=4)
                )
                await until(lambda: running.engine.running == 1)
                try:
                    with pytest.raises(openai.RateLimitError):
                        await client.completions.create(model="golden_tiny", prompt="x")
                finally:
                    steps.go.set()
                return await first

        assert asyncio.run(two()).choices[0].finish_reason == "length"


def test_worker_bounds_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        Worker(lambda: None, max_batch=0)
    with pytest.raises(ValueError, match="max_queue"):
        Worker(lambda: None, max_queue=-1)
    assert Worker(lambda: None, max_batch=8).max_queue == 32


def wait_until(condition, timeout=10.0):
    """The worker counts a job just after its client has the last byte: allow it a moment."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def post(server, path, body, key=KEY):
    headers = {"Content-Type": "application/json"}  # the server takes JSON bodies only
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)  # NaN stays NaN
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)


def generated(tiny, prompt, *, chat, mode, **options):
    """(text, TokenLogprobs) of the request run alone by the runtime."""
    model, tokenizer = tiny
    chunks = list(
        stream_text(
            model, tokenizer, prompt, chat=chat, mode=mode, max_tokens=DEFAULT_MAX_TOKENS, **options
        )
    )
    return "".join(c.text for c in chunks), [e for c in chunks for e in c.logprobs or []]


def assert_same_logprobs(tokenizer, served, entries, top):
    """OpenAI chat logprob entries against the runtime's TokenLogprobs."""
    assert [s.token for s in served] == [tokenizer.decode([e.token]) for e in entries]
    for s, e in zip(served, entries):
        assert s.logprob == pytest.approx(e.logprob, abs=1e-3)
        assert s.bytes == list(s.token.encode("utf-8"))
        assert len(s.top_logprobs) == top
        assert [t.token for t in s.top_logprobs] == [tokenizer.decode([t]) for t, _ in e.top]


@pytest.mark.parametrize("mode", MODES)
def test_chat_logprobs_are_the_runtime_ones_whole_and_streamed(server, tiny, mode):
    text, entries = generated(tiny, HELLO, chat=True, mode=mode, logprobs=3)
    request = dict(
        model="golden_tiny",
        messages=HELLO,
        logprobs=True,
        top_logprobs=3,
        extra_body={"mode": mode},
    )
    reply = server.client.chat.completions.create(**request)
    assert reply.choices[0].message.content == text and entries
    assert_same_logprobs(tiny[1], reply.choices[0].logprobs.content, entries, 3)
    streamed = [
        entry
        for chunk in server.client.chat.completions.create(stream=True, **request)
        for choice in chunk.choices
        if choice.logprobs
        for entry in choice.logprobs.content
    ]
    assert_same_logprobs(tiny[1], streamed, entries, 3)
    plain = server.client.chat.completions.create(model="golden_tiny", messages=HELLO)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_of_generated_tokens(server, tiny):
    _, tokenizer = tiny
    _, entries = generated(tiny, "Once upon", chat=False, mode="ar", logprobs=2)
    reply = server.client.completions.create(
        model="golden_tiny", prompt="Once upon", logprobs=2, extra_body={"mode": "ar"}
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([e.token]) for e in entries]
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in entries], abs=1e-3)
    for top, entry in zip(logprobs.top_logprobs, entries):
        assert list(top) == [tokenizer.decode([t]) for t, _ in entry.top][: len(top)]
        assert entry.logprob <= max(top.values()) + 1e-6
    lengths = [len(token) for token in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]


def test_penalties_and_logit_bias_reach_the_runtime(server, tiny):
    plain, _, _ = alone(tiny, HELLO, chat=True, mode="ar")
    options = dict(presence_penalty=1.5, frequency_penalty=0.8)
    bias = {5: 4.0, 9: -100.0}
    expected, _, _ = alone(tiny, HELLO, chat=True, mode="ar", logit_bias=bias, **options)
    assert expected != plain
    for mode in ("ar", "spec"):  # spec is AR token for token, penalties included
        reply = server.client.chat.completions.create(
            model="golden_tiny",
            messages=HELLO,
            logit_bias={str(t): b for t, b in bias.items()},
            extra_body={"mode": mode},
            **options,
        )
        assert reply.choices[0].message.content == expected, mode


def streamed_choices(stream) -> tuple[dict, dict]:
    """Text and finish reason of each choice index of a streamed completion or chat."""
    texts, finishes = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                assert choice.index not in finishes  # one finish per choice
                finishes[choice.index] = choice.finish_reason
    return texts, finishes


def test_n_choices_and_prompts_stream_interleaved(server):
    request = dict(model="golden_tiny", prompt="Once upon", n=3, temperature=1.0, seed=5)
    whole = server.client.completions.create(**request)
    texts, finishes = streamed_choices(server.client.completions.create(stream=True, **request))
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert [finishes[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert len(set(texts.values())) > 1  # each choice its own seed
    prompts = dict(model="golden_tiny", prompt=["Once upon", "Hello"], extra_body={"mode": "ar"})
    whole = server.client.completions.create(**prompts)
    texts, _ = streamed_choices(server.client.completions.create(stream=True, **prompts))
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    chat = dict(model="golden_tiny", messages=HELLO, n=2, temperature=0.8, seed=1)
    whole = server.client.chat.completions.create(**chat)
    texts, finishes = streamed_choices(server.client.chat.completions.create(stream=True, **chat))
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert set(finishes) == {0, 1}


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/v1/chat/completions", b'{"messages": [', 400, None, "invalid_json"),
        ("/v1/completions", b"\xff\xfe", 400, None, "invalid_json"),
        (
            "/v1/completions",
            b'{"prompt": "x", "temperature": NaN}',
            400,
            "temperature",
            "invalid_value",
        ),
        ("/v1/completions", [1, 2], 400, None, "invalid_value"),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "mode": "turbo"},
            400,
            "mode",
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "max_tokens": -5},
            400,
            "max_tokens",
            "invalid_value",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": -1, "stream": True},
            400,
            "max_tokens",
            "invalid_value",
        ),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
            "invalid_value",
        ),
        ("/v1/completions", {"prompt": "word " * 1200}, 400, "prompt", "context_length_exceeded"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "word " * 1200}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": CONTEXT},
            400,
            "max_tokens",
            "context_length_exceeded",
        ),
        ("/v1/completions", {"prompt": "", "stream": True}, 400, None, None),
        ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n", "invalid_value"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "invalid_value"),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "top_logprobs": 2},
            400,
            None,
            "invalid_value",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "presence_penalty": 2.5},
            400,
            "presence_penalty",
            "invalid_value",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "logit_bias": {"the": 1}},
            400,
            "logit_bias",
            "invalid_value",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "logit_bias": {"5": 101}},
            400,
            "logit_bias.5",
            "invalid_value",
        ),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, None, None),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ],
)
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, path, body, status, param, code):
    response = post(server, path, body)
    assert response.status_code == status
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_the_api_key_is_required(server):
    for key in ("wrong", None):
        response = post(server, "/v1/completions", {"prompt": "x"}, key=key)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    bad_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # health stays open


def test_unknown_paths_and_methods_get_error_bodies(server):
    assert error_of(post(server, "/v1/embeddings", {}))["type"] == "invalid_request_error"
    response = httpx.get(f"{server.url}/v1/chat/completions")
    assert response.status_code == 405 and error_of(response)


def test_the_openai_client_raises_its_bad_request_error(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client.chat.completions.create(
            model="golden_tiny", messages=HELLO, extra_body={"mode": "turbo"}
        )
    assert info.value.body["param"] == "mode"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
        optional={"content": st.text(max_size=20)},
    ),
    min_size=1,
    max_size=3,
)
fields = {
    "model": st.text(max_size=8),
    "max_tokens": st.integers(-2, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 400),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(-(2**64), 2**65),
    "stop": st.text(max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "mode": st.sampled_from(MODES + ["bogus"]),
    "block_len": st.integers(1, 40),
    "threshold": st.floats(0, 1),
    "k": st.integers(2, 12),
    "tools": st.just([WEATHER]),
    "tool_choice": st.sampled_from(["none", "auto", "required"]),
    "n": st.integers(0, 3),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "logit_bias": st.dictionaries(
        st.sampled_from(["0", "5", "²", "-1", "99999", " 7", "x"]), st.floats(-150, 150), max_size=3
    ),
    "logprobs": st.booleans() | st.integers(-1, 22),
    "top_logprobs": st.integers(-1, 22),
    "echo": st.booleans(),
}


@st.composite
def bodies(draw):
    """Mostly well-formed requests with a field or two replaced by any JSON; or junk."""
    kind = draw(st.sampled_from(["request", "request", "request", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "json":
        return draw(json_values)
    required = {"messages": messages, "prompt": st.text(max_size=30)}
    body = draw(st.fixed_dictionaries(required, optional=fields))
    for name in draw(st.lists(st.sampled_from([*required, *fields]), max_size=2)):
        body[name] = draw(json_values)
    return body


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies(), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzzed_bodies_never_get_a_5xx(server, body, path):
    response = post(server, path, body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error_of(response)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e[:12] for e in events)
    else:
        assert response.json()["choices"]


def test_the_server_is_still_up_and_right_after_all_that(server, tiny):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    reply = server.client.chat.completions.create(model="golden_tiny", messages=HELLO)
    assert reply.choices[0].message.content == alone(tiny, HELLO, chat=True)[0]
