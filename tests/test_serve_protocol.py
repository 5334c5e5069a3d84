"""The server's protocol pieces without a server: request models, tool calls, response shapes."""

import json

import pytest
from pydantic import ValidationError

from optiq_dhara.runtime import parse_tool_calls
from optiq_dhara.serve.errors import from_validation
from optiq_dhara.serve.responses import Completion, ToolCallStream, openai_tool_calls, sse
from optiq_dhara.serve.schemas import ChatCompletionRequest, CompletionRequest

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_tool_calls_splits_hermes_blocks_from_content():
    content, calls = parse_tool_calls(f"Let me look.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}")
    assert content == "Let me look."
    assert calls == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
    ]


@pytest.mark.parametrize(
    "text",
    [
        "no call here",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f"}',  # never closed
    ],
)
def test_parse_tool_calls_leaves_what_is_not_a_call_in_the_content(text):
    content, calls = parse_tool_calls(text)
    assert calls == []
    assert content == text.strip()


def test_openai_tool_calls_serialize_arguments_as_json_text():
    calls = openai_tool_calls(
        [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": "{}"}]
    )
    assert [c["function"] for c in calls] == [
        {"name": "f", "arguments": '{"x": 1}'},
        {"name": "g", "arguments": "{}"},
    ]
    assert [c["index"] for c in calls] == [0, 1]
    assert all(c["id"].startswith("call-") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize("cut", range(1, len(CALL)))
def test_tool_call_stream_never_lets_a_tag_out_as_content(cut):
    stream = ToolCallStream()
    text = "Sure. " + CALL
    pieces = [text[:cut], text[cut:]]
    emitted = "".join(stream.feed(piece) for piece in pieces)
    content, calls = stream.finish()
    assert "<" not in emitted
    assert emitted + content == "Sure. "
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_tool_call_stream_releases_a_false_alarm():
    stream = ToolCallStream()
    assert stream.feed("a <tool") == "a "
    assert stream.feed("box> b") == "<toolbox> b"
    assert stream.finish() == ("", [])


def test_stop_accepts_string_list_or_null():
    assert CompletionRequest(prompt="x", stop="END").stop == ["END"]
    assert CompletionRequest(prompt="x", stop=["a", "b"]).stop == ["a", "b"]
    assert CompletionRequest(prompt="x", stop=None).stop == []
    assert CompletionRequest(prompt="x").stop == []


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"mode": "turbo"}, "mode"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": -1, "echo": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"k": 1}, "k"),
        ({"block_len": 0}, "block_len"),
        ({"threshold": 1.5}, "threshold"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop.0"),
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_bad_fields_are_named_in_the_error(fields, param):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(prompt="x", **fields)
    error = from_validation(info.value)
    assert error.status == 400 and error.param == param
    assert param in error.message


def test_chat_messages_become_template_dicts():
    request = ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": '{"x": 1}'}}],
            },
            {"role": "tool", "tool_call_id": "1", "content": "42"},
        ],
        max_completion_tokens=5,
    )
    messages = [m.template_dict() for m in request.messages]
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1] == {"role": "user", "content": "ab"}
    assert messages[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert messages[3] == {"role": "tool", "content": "42"}
    assert request.token_limit == 5


def test_tool_choice_none_keeps_tools_out_of_the_prompt():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert request.template_tools() == [tool]
    request = request.model_copy(update={"tool_choice": "none"})
    assert request.template_tools() is None


def test_response_shapes():
    chat, text = Completion(True, "m"), Completion(False, "m")
    assert chat.chunk(role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.chunk("hi")["object"] == "chat.completion.chunk"
    assert chat.chunk(finish_reason="length")["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert text.chunk("hi")["choices"][0]["text"] == "hi"
    assert text.chunk("hi")["object"] == "text_completion"
    counts = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    whole = chat.whole(
        "", "tool_calls", counts, openai_tool_calls([{"name": "f", "arguments": {}}])
    )
    message = whole["choices"][0]["message"]
    assert message["content"] is None and "index" not in message["tool_calls"][0]
    assert whole["usage"] == counts and whole["id"].startswith("chatcmpl-")
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n' and sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(sse(whole)[len("data: ") :]) == whole
