"""The Anthropic Messages API (``POST /v1/messages``), driven by the official ``anthropic`` client.

The same in-process server as tests/test_serve.py: every answer is compared with the
OpenAI chat endpoint and with the runtime run alone for the same conversation.
"""

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import anthropic
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
MODES = ["ar", "diffusion", "spec"]
HELLO = [{"role": "user", "content": "Hello"}]
SYSTEM = "You are a terse assistant."
# system + multi-turn, text blocks and strings mixed
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story"}],
    },
]
# the same conversation as the OpenAI path (and the chat template) sees it
TEMPLATE = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a story"},
]
WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
OPENAI_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": WEATHER["input_schema"],
    },
}


@contextmanager
def serving(load, api_key=KEY, **worker_options):
    worker = Worker(load, **worker_options).start()
    config = ServerConfig("golden_tiny", api_key=api_key, max_tokens=12, max_context=CONTEXT)
    try:
        with background_server(create_app(worker, config)) as url:
            yield SimpleNamespace(
                url=url,
                worker=worker,
                client=anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60),
                openai=openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60),
            )
    finally:
        worker.close()


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return mlx_lm.load(str(golden_dir))


@pytest.fixture(scope="module")
def server(golden_dir):
    with serving(lambda: mlx_lm.load(str(golden_dir))) as running:
        yield running


def alone(tiny, messages, *, mode="spec", max_tokens=12, tools=None, **options):
    """(text, finish_reason, stats) of the runtime alone, chat template applied."""
    model, tokenizer = tiny
    chunks = list(
        stream_text(
            model,
            tokenizer,
            messages,
            chat=True,
            tools=tools,
            mode=mode,
            max_tokens=max_tokens,
            **options,
        )
    )
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].stats


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def streamed(client, **request):
    """(final message, event types) of a streamed request."""
    with client.messages.stream(**{"model": "golden_tiny", **request}) as stream:
        kinds = [event.type for event in stream]
        return stream.get_final_message(), kinds


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_the_same_greedy_text_as_chat_completions(server, tiny, mode, stream):
    request = dict(
        model="golden_tiny",
        max_tokens=12,
        system=SYSTEM,
        messages=CONVERSATION,
        extra_body={"temperature": 0, "mode": mode, "block_len": 8},
    )
    if stream:
        message, kinds = streamed(server.client, **request)
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert "content_block_start" in kinds and "message_delta" in kinds
    else:
        message = server.client.messages.create(**request)
    chat = server.openai.chat.completions.create(
        model="golden_tiny",
        messages=TEMPLATE,
        max_tokens=12,
        extra_body={"mode": mode, "block_len": 8},
    )
    expected, finish, stats = alone(tiny, TEMPLATE, mode=mode, block_len=8)
    assert text_of(message) == chat.choices[0].message.content == expected
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.type == "message" and message.model == "golden_tiny"
    assert (finish, message.stop_reason, message.stop_sequence) == ("length", "max_tokens", None)
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert chat.usage.prompt_tokens == len(encode_prompt(tiny[1], TEMPLATE, chat=True))
    assert usage.output_tokens == stats.generated == 12


def test_system_as_text_blocks_is_the_system_string(server):
    as_string = server.client.messages.count_tokens(
        model="golden_tiny", system=SYSTEM, messages=CONVERSATION
    )
    blocks = [{"type": "text", "text": "You are a "}, {"type": "text", "text": "terse assistant."}]
    as_blocks = server.client.messages.count_tokens(
        model="golden_tiny", system=blocks, messages=CONVERSATION
    )
    assert as_string.input_tokens == as_blocks.input_tokens


def test_count_tokens_is_the_rendered_prompt(server, tiny):
    counted = server.client.messages.count_tokens(
        model="golden_tiny", system=SYSTEM, messages=CONVERSATION
    )
    assert counted.input_tokens == len(encode_prompt(tiny[1], TEMPLATE, chat=True))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_give_stop_sequence(server, tiny, stream):
    full = alone(tiny, HELLO, max_tokens=16)[0]
    stop = full[6:9]
    request = dict(
        model="golden_tiny", max_tokens=16, messages=HELLO, stop_sequences=["never-seen", stop]
    )
    if stream:
        message, _ = streamed(server.client, **request)
    else:
        message = server.client.messages.create(**request)
    assert text_of(message) == full[: full.find(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_gives_max_tokens(server, stream):
    request = dict(model="golden_tiny", max_tokens=3, messages=HELLO, stop_sequences=["never"])
    if stream:
        message, _ = streamed(server.client, **request)
    else:
        message = server.client.messages.create(**request)
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)


def test_max_tokens_past_the_context_is_cut_to_it(server):
    message = server.client.messages.create(
        model="golden_tiny", max_tokens=32000, messages=HELLO, extra_body={"mode": "ar"}
    )
    usage = message.usage
    assert message.stop_reason == "max_tokens"
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.output_tokens == CONTEXT


def test_tool_results_reach_the_template(server, tiny):
    messages = HELLO + [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}
            ],
        },
    ]
    message = server.client.messages.create(
        model="golden_tiny", max_tokens=4, messages=messages, tools=[WEATHER]
    )
    # what the OpenAI path renders for the same turns (tests/test_serve.py)
    call = {
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    rendered = [
        HELLO[0],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny, 21 C"},
    ]
    prompt = encode_prompt(tiny[1], rendered, chat=True, tools=[OPENAI_WEATHER])
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(prompt)
    text = tiny[1].decode(prompt)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in text
    assert '"name": "get_weather"' in text.split("<tools>\n")[1]  # the tool is declared
    assert text_of(message) == alone(tiny, rendered, tools=[OPENAI_WEATHER], max_tokens=4)[0]


@pytest.fixture
def scripted(golden_dir, scripted_tool_call):
    """A server whose text is a scripted Hermes tool call (``scripted_tool_call``)."""
    with serving(lambda: mlx_lm.load(str(golden_dir))) as running:
        running.seen = scripted_tool_call
        yield running


def test_a_generated_tool_call_is_a_tool_use_block(scripted):
    client = scripted.client
    message = client.messages.create(
        model="golden_tiny", max_tokens=12, messages=HELLO, tools=[WEATHER]
    )
    assert scripted.seen["tools"] == [OPENAI_WEATHER] and scripted.seen["chat"] is True
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    text, use = message.content
    assert (text.type, text.text) == ("text", "Let me check.")
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert use.id.startswith("toolu_")

    final, kinds = streamed(client, max_tokens=12, messages=HELLO, tools=[WEATHER])
    assert final.stop_reason == "tool_use"
    assert [block.type for block in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Let me check. "
    assert (final.content[1].name, final.content[1].input) == ("get_weather", {"city": "Paris"})
    assert kinds.count("content_block_start") == 2 and kinds.count("content_block_stop") == 2

    with httpx.stream(
        "POST",
        f"{scripted.url}/v1/messages",
        headers={"x-api-key": KEY},
        json={"max_tokens": 12, "messages": HELLO, "tools": [WEATHER], "stream": True},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    events = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert events == [d["type"] for d in data]
    assert events[:2] == ["message_start", "ping"] and events[-2:] == [
        "message_delta",
        "message_stop",
    ]
    deltas = [d["delta"] for d in data if d["type"] == "content_block_delta"]
    assert {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'} in deltas
    assert data[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}

    # tool_choice none leaves the tools out; without tools the text stays text (end_turn)
    plain = client.messages.create(
        model="golden_tiny",
        max_tokens=12,
        messages=HELLO,
        tools=[WEATHER],
        tool_choice={"type": "none"},
    )
    assert scripted.seen["tools"] is None
    assert plain.stop_reason == "end_turn" and "<tool_call>" in text_of(plain)


def post_raw(server, body) -> httpx.Response:
    """POST ``body`` (bytes as they are, anything else as JSON) to /v1/messages."""
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(
        f"{server.url}/v1/messages",
        content=content,
        headers={"x-api-key": KEY, "content-type": "application/json"},
        timeout=60,
    )


def test_the_api_key_is_required(server):
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(
            f"{server.url}/v1/messages",
            json={"max_tokens": 2, "messages": HELLO},
            headers=headers,
            timeout=60,
        )
        assert response.status_code == 401
        assert error_of(response)["type"] == "authentication_error"
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="golden_tiny", max_tokens=2, messages=HELLO)
    bearer = httpx.post(
        f"{server.url}/v1/messages",
        json={"max_tokens": 2, "messages": HELLO},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert bearer.status_code == 200 and bearer.json()["usage"]["output_tokens"] == 2


def test_no_key_needed_when_the_server_has_none(golden_dir):
    with serving(lambda: mlx_lm.load(str(golden_dir)), api_key=None) as running:
        response = httpx.post(
            f"{running.url}/v1/messages", json={"max_tokens": 2, "messages": HELLO}, timeout=60
        )
    assert response.status_code == 200 and response.json()["type"] == "message"


GOOD = {"model": "golden_tiny", "max_tokens": 4, "messages": HELLO}


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [',
        [1, 2],
        {"model": "golden_tiny", "messages": HELLO},  # max_tokens is required
        {**GOOD, "max_tokens": 0},
        {**GOOD, "messages": []},
        {**GOOD, "messages": [{"role": "system", "content": "x"}]},
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {**GOOD, "messages": HELLO + [{"role": "assistant", "content": "Once"}]},
        {**GOOD, "mode": "turbo"},
        {**GOOD, "k": 1},
        {**GOOD, "temperature": -1},
        {**GOOD, "stop_sequences": [""]},
        {**GOOD, "tools": [{"name": "x"}]},  # no input_schema
        {**GOOD, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {**GOOD, "messages": [{"role": "user", "content": "word " * 1200}]},
    ],
)
def test_bad_requests_get_a_400_in_anthropic_shape(server, body):
    response = post_raw(server, body)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"


def test_the_client_raises_its_bad_request_error(server):
    with pytest.raises(anthropic.BadRequestError) as info:
        server.client.messages.create(
            model="golden_tiny", max_tokens=4, messages=HELLO, extra_body={"mode": "turbo"}
        )
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "mode" in info.value.body["error"]["message"]


def test_mode_extras_and_sampling_fields(server, tiny):
    options = dict(temperature=0.9, top_p=0.95, top_k=40, seed=7, repetition_penalty=1.1)
    extras = {"mode": "diffusion", "block_len": 8, "threshold": 0.9, "seed": 7}
    extras["repetition_penalty"] = 1.1
    message = server.client.messages.create(
        model="golden_tiny",
        max_tokens=10,
        messages=HELLO,
        extra_body={"temperature": 0.9, "top_p": 0.95, "top_k": 40, **extras},
    )
    expected = alone(
        tiny, HELLO, mode="diffusion", max_tokens=10, block_len=8, threshold=0.9, **options
    )
    assert text_of(message) == expected[0]


def test_top_p_zero_is_greedy(server, tiny):
    """As on the OpenAI routes, top_p 0 keeps only the likeliest token, whatever the temperature."""
    message = server.client.messages.create(
        model="golden_tiny",
        max_tokens=10,
        messages=HELLO,
        extra_body={"temperature": 1.5, "top_p": 0.0, "mode": "ar", "seed": 3},
    )
    assert text_of(message) == alone(tiny, HELLO, mode="ar", max_tokens=10)[0]


def test_a_full_queue_is_a_rate_limit_error(golden_dir, monkeypatch):
    """One batch slot, no queue, the step held: a second request is a 429 in Anthropic's shape."""
    go = threading.Event()
    step = engine_module.Engine.step

    def held(engine):
        go.wait(timeout=30)
        return step(engine)

    monkeypatch.setattr(engine_module.Engine, "step", held)
    load = lambda: mlx_lm.load(str(golden_dir))  # noqa: E731
    with serving(load, max_batch=1, max_queue=0) as running:

        async def two():
            client = anthropic.AsyncAnthropic(
                base_url=running.url, api_key=KEY, max_retries=0, timeout=60
            )
            async with client:
                first = asyncio.create_task(
                    client.messages.create(model="golden_tiny", max_tokens=3, messages=HELLO)
                )
                deadline = time.monotonic() + 10
                while running.worker.running < 1:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                try:
                    with pytest.raises(anthropic.RateLimitError) as info:
                        await client.messages.create(
                            model="golden_tiny", max_tokens=3, messages=HELLO
                        )
                finally:
                    go.set()
                return info.value, await first

        error, first = asyncio.run(two())
    assert error.body["error"]["type"] == "rate_limit_error"
    assert error.response.headers["retry-after"] == "1"
    assert first.stop_reason == "max_tokens"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=12)}),
    st.fixed_dictionaries(
        {
            "type": st.just("tool_use"),
            "id": st.text(max_size=4),
            "name": st.text(max_size=6),
            "input": st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("tool_result"),
            "tool_use_id": st.text(max_size=4),
            "content": st.text(max_size=12),
        },
        optional={"is_error": st.booleans()},
    ),
)
turns = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": st.text(max_size=20) | st.lists(blocks, max_size=3),
        }
    ),
    min_size=1,
    max_size=3,
)
fields = {
    "model": st.text(max_size=8),
    "system": st.text(max_size=12)
    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)})),
    "stop_sequences": st.lists(st.text(max_size=3), max_size=3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 400),
    "stream": st.booleans(),
    "tools": st.just([WEATHER]),
    "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "none"}, {"type": "any"}]),
    "mode": st.sampled_from(MODES + ["bogus"]),
    "block_len": st.integers(1, 40),
    "seed": st.integers(-(2**64), 2**65),
}


@st.composite
def bodies(draw):
    """Mostly well-formed requests with a field or two replaced by any JSON; or junk."""
    kind = draw(st.sampled_from(["request", "request", "request", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "json":
        return draw(json_values)
    required = {"messages": turns, "max_tokens": st.integers(-1, 6)}
    body = draw(st.fixed_dictionaries(required, optional=fields))
    for name in draw(st.lists(st.sampled_from([*required, *fields]), max_size=2)):
        body[name] = draw(json_values)
    return body


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies())
def test_fuzzed_bodies_never_get_a_5xx(server, body):
    response = post_raw(server, body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error_of(response)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("event: ")]
        assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
    else:
        assert response.json()["type"] == "message"


def test_the_server_is_still_up_and_right_after_all_that(server, tiny):
    message = server.client.messages.create(model="golden_tiny", max_tokens=12, messages=HELLO)
    assert text_of(message) == alone(tiny, HELLO)[0]


def test_a_failure_mid_stream_is_an_error_event(golden_dir, monkeypatch):
    step, calls = engine_module.Engine.step, []

    def failing(engine):
        calls.append(1)
        if len(calls) > 3:  # after the first text has gone out
            raise RuntimeError("boom")
        return step(engine)

    monkeypatch.setattr(engine_module.Engine, "step", failing)
    with serving(lambda: mlx_lm.load(str(golden_dir))) as running:
        body = {"max_tokens": 50, "messages": HELLO, "stream": True, "mode": "ar"}
        with httpx.stream(
            "POST", f"{running.url}/v1/messages", headers={"x-api-key": KEY}, json=body
        ) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        calls.clear()
        with pytest.raises(anthropic.APIStatusError) as info:
            with running.client.messages.stream(
                model="golden_tiny", max_tokens=50, messages=HELLO, extra_body={"mode": "ar"}
            ) as stream:
                for _ in stream:
                    pass
        assert running.worker.alive
    assert "boom" in str(info.value) and not isinstance(info.value, anthropic.InternalServerError)
    assert lines[-2] == "event: error"
    error = json.loads(lines[-1][6:])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "boom" in error["error"]["message"]
