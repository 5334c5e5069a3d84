"""The text layer: ChatML prompts, streaming that never leaks a stop string or MASK, tool calls."""

import json

import mlx.core as mx
import pytest
from mlx_lm.utils import load_tokenizer

from optiq_dhara.runtime import PrefixCache, generate_ids, parse_tool_calls, stream_text
from optiq_dhara.runtime.text import encode_prompt

MODES = [("ar", {}), ("spec", {"k": 4}), ("diffusion", {"block_len": 8})]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    return load_tokenizer(golden_dir)


def full_text(chunks) -> str:
    return "".join(chunk.text for chunk in chunks)


def test_chatml_prompt(tokenizer):
    ids = encode_prompt(tokenizer, "hi", chat=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tokenizer.get_vocab()["<|im_start|>"]  # special tokens are single ids


def test_a_tokenizer_without_template_gets_chatml(golden_dir):
    bare = load_tokenizer(golden_dir)
    bare._tokenizer.chat_template = None
    ids = encode_prompt(bare, "hi", chat=True)
    assert bare.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_with_system_history_and_tools(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
            ],
        },
        {"role": "tool", "content": "rain"},
    ]
    text = tokenizer.decode(encode_prompt(tokenizer, messages, chat=True, tools=TOOLS))
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call one or more functions.")
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>\n" in text
    assert (
        "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    ) in text


def test_plain_prompt_needs_no_template(tokenizer):
    assert encode_prompt(tokenizer, "hello", chat=False) == tokenizer.encode("hello")
    with pytest.raises(ValueError, match="need chat=True"):
        encode_prompt(tokenizer, [{"role": "user", "content": "x"}], chat=False)
    with pytest.raises(ValueError, match="messages is empty"):
        encode_prompt(tokenizer, [], chat=True)


@pytest.mark.parametrize("mode, extra", MODES)
def test_streamed_text_is_the_decoded_tokens(golden_model, tokenizer, mode, extra):
    chunks = list(
        stream_text(
            golden_model, tokenizer, "hi there", chat=True, mode=mode, max_tokens=24, **extra
        )
    )
    ids = generate_ids(
        golden_model,
        encode_prompt(tokenizer, "hi there", chat=True),
        mode=mode,
        max_tokens=24,
        **extra,
    )
    assert full_text(chunks) == tokenizer.decode(ids)
    assert [t for c in chunks for t in c.tokens] == ids
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


@pytest.mark.parametrize("mode, extra", MODES)
@pytest.mark.parametrize("start, size", [(3, 1), (6, 3), (10, 5)])
def test_stop_strings_are_never_emitted(golden_model, tokenizer, mode, extra, start, size):
    kwargs = dict(chat=True, mode=mode, max_tokens=24, **extra)
    full = full_text(stream_text(golden_model, tokenizer, "hi there", **kwargs))
    stop = full[start : start + size]
    chunks = list(
        stream_text(golden_model, tokenizer, "hi there", stop=["never-there", stop], **kwargs)
    )
    assert full_text(chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == chunks[-1].stats.finish_reason == "stop"
    so_far = ""
    for chunk in chunks:
        so_far += chunk.text
        assert stop not in so_far


def test_stop_token_text_is_not_emitted(golden_model, tokenizer):
    prompt = encode_prompt(tokenizer, "hi there", chat=True)
    ids = generate_ids(golden_model, prompt, max_tokens=24)
    stop_id = ids[5]
    chunks = list(
        stream_text(
            golden_model, tokenizer, "hi there", chat=True, max_tokens=24, stop_ids=[stop_id]
        )
    )
    first = ids.index(stop_id)
    assert full_text(chunks) == tokenizer.decode(ids[:first])
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize("mode, extra", MODES)
def test_chat_turns_reuse_the_prefix_cache(golden_model, tokenizer, mode, extra):
    cache = PrefixCache()
    kwargs = dict(chat=True, mode=mode, max_tokens=12, **extra)
    history = [{"role": "user", "content": "hi there"}]
    first = full_text(stream_text(golden_model, tokenizer, history, prefix_cache=cache, **kwargs))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "and?"}]
    chunks = list(stream_text(golden_model, tokenizer, history, prefix_cache=cache, **kwargs))
    assert full_text(chunks) == full_text(stream_text(golden_model, tokenizer, history, **kwargs))
    first_prompt = len(encode_prompt(tokenizer, history[:1], chat=True))
    reusable = first_prompt - 1 if mode != "diffusion" else (first_prompt - 1) // 8 * 8
    assert chunks[-1].stats.reused_tokens >= reusable


class MaskLover:
    def __init__(self, model):
        self.model, self.args = model, model.args

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, inputs, cache=None, mask=None):
        logits = self.model(inputs, cache=cache, mask=mask)
        return logits + 1000.0 * (mx.arange(logits.shape[-1]) == self.args.mask_token_id)


@pytest.mark.parametrize("mode, extra", MODES)
def test_mask_never_reaches_the_text(golden_model, tokenizer, mode, extra):
    chunks = stream_text(
        MaskLover(golden_model), tokenizer, "hi", chat=True, mode=mode, max_tokens=16, **extra
    )
    assert "<|mask|>" not in full_text(chunks)


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Just text.", "Just text.", []),
        (
            'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}'
            "\n</tool_call>",
            "Let me check.",
            [{"name": "weather", "arguments": {"city": "Oslo"}}],
        ),
        (
            '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "b"}</tool_call>',
            "",
            [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}],
        ),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        (
            '<tool_call>{"arguments": {}}</tool_call>',
            '<tool_call>{"arguments": {}}</tool_call>',
            [],
        ),
        ('<tool_call>{"name": "a"', '<tool_call>{"name": "a"', []),
    ],
)
def test_parse_tool_calls(text, content, calls):
    assert parse_tool_calls(text) == (content, calls)
