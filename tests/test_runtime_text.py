"""The text layer: ChatML prompts, streaming that never leaks a stop string or MASK, tool calls."""

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
from mlx_lm.utils import load_tokenizer

from optiq_dhara.runtime import (
    PrefixCache,
    Stats,
    Step,
    generate_ids,
    parse_tool_calls,
    stream_text,
)
from optiq_dhara.runtime import text as text_module
from optiq_dhara.runtime.text import TextStream, encode_prompt, streaming_detokenizer

MODES = [("ar", {}), ("spec", {"k": 4}), ("diffusion", {"block_len": 8})]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
TRAINED = Path(__file__).parent / "fixtures" / "dhara_tiny_trained"
CODE = "class Record:\n\n    def __init__(self, name, value=None):\n        self.name = name"


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    return load_tokenizer(golden_dir)


@pytest.fixture(scope="module")
def trained():
    return mlx_lm.load(str(TRAINED))


def full_text(chunks) -> str:
    return "".join(chunk.text for chunk in chunks)


def steps_of(ids: list[int], size: int = 1, finish: str = "length") -> list[Step]:
    """Synthetic decoding steps of ``size`` tokens; the last one ends the run."""
    starts = range(0, len(ids), size)
    return [
        Step(ids[i : i + size], Stats("ar", finish_reason=finish if i == starts[-1] else None))
        for i in starts
    ]


def fed(stream: TextStream, steps) -> list:
    """The chunks ``stream`` returns for ``steps``, up to the one that ends the text."""
    chunks = []
    for step in steps:
        chunk = stream.feed(step)
        if chunk is not None:
            chunks.append(chunk)
        if stream.finished:
            break
    return chunks


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
    assert full_text(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
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


@pytest.mark.parametrize("mode, extra", MODES)
@pytest.mark.parametrize("prompt, chat", [(CODE, False), ("Write a function that adds.", True)])
def test_trained_model_streams_the_decoded_tokens(trained, mode, extra, prompt, chat):
    model, tokenizer = trained
    kwargs = dict(mode=mode, max_tokens=64, **extra)
    chunks = list(stream_text(model, tokenizer, prompt, chat=chat, **kwargs))
    stops = TextStream(tokenizer).stop_ids
    ids = generate_ids(model, encode_prompt(tokenizer, prompt, chat=chat), stop_ids=stops, **kwargs)
    text = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
    assert len(chunks) > 4 and len(text) > 40
    assert full_text(chunks) == text
    assert [t for c in chunks for t in c.tokens] == ids
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason in ("stop", "length")


def test_special_tokens_are_never_text(trained):
    _, tokenizer = trained
    vocab = tokenizer.get_vocab()
    specials = [vocab[t] for t in ("<|im_start|>", "<|endoftext|>", "<|mask|>", "<|im_end|>")]
    ids = tokenizer.encode("a b", add_special_tokens=False)
    chunks = fed(TextStream(tokenizer), steps_of(specials[:3] + ids + specials[3:]))
    assert full_text(chunks) == "a b"
    assert chunks[-1].tokens[-1] == specials[3]


def test_the_first_space_is_kept(trained):
    _, tokenizer = trained
    ids = tokenizer.encode("  indented, then words", add_special_tokens=False)
    assert full_text(fed(TextStream(tokenizer), steps_of(ids))) == tokenizer.decode(ids)


@pytest.mark.parametrize("size", [1, 3])
def test_characters_split_across_tokens_are_never_halved(trained, size):
    _, tokenizer = trained
    text = "a🙂é€ b😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(tokenizer.encode("🙂", add_special_tokens=False)) == 4  # a byte a token
    chunks = fed(TextStream(tokenizer), steps_of(ids, size))
    assert full_text(chunks) == text
    assert all("\ufffd" not in c.text for c in chunks)
    halves = TextStream(tokenizer)
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    assert [halves.feed(step) for step in steps_of(emoji)[:3]] == [None] * 3


@pytest.mark.parametrize("size", [1, 2, 3])
def test_stop_strings_across_steps_are_cut(trained, size):
    _, tokenizer = trained
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["o thr", "never"])
    steps = steps_of(ids, size)
    chunks = fed(stream, steps)
    so_far = ""
    for chunk in chunks:
        so_far += chunk.text
        assert "one tw".startswith(so_far)
    assert so_far == "one tw"
    assert chunks[-1].finish_reason == chunks[-1].stats.finish_reason == "stop"
    assert stream.finished and stream.stopped_by_string
    assert sum(len(c.tokens) for c in chunks) < len(ids)  # the run was ended early
    with pytest.raises(RuntimeError, match="feed no more steps"):
        stream.feed(steps[-1])


def test_a_stop_prefix_that_goes_on_is_released(trained):
    _, tokenizer = trained
    ids = tokenizer.encode("help hello", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["hello!"])
    chunks = fed(stream, steps_of(ids))
    assert full_text(chunks) == "help hello"
    assert chunks[-1].finish_reason == "length" and not stream.stopped_by_string


def test_the_work_per_step_does_not_grow(trained, monkeypatch):
    _, tokenizer = trained
    decoded, examined = [], []
    decode, held_back = tokenizer._tokenizer.decode, text_module.held_back
    monkeypatch.setattr(
        tokenizer._tokenizer, "decode", lambda ids, **kw: decoded.append(ids) or decode(ids, **kw)
    )
    monkeypatch.setattr(
        text_module,
        "held_back",
        lambda text, stops: examined.append(text) or held_back(text, stops),
    )
    ids = tokenizer.encode(CODE, add_special_tokens=False) * 40
    chunks = fed(TextStream(tokenizer, stop=["<end of answer>"]), steps_of(ids))
    assert full_text(chunks) == decode(ids)
    assert sum(len(d) for d in decoded) <= len(ids)  # not the whole text again at every step
    assert max(len(text) for text in examined) <= len("<end of answer>") + 8


def test_a_plain_hf_tokenizer_gets_the_same_text(trained):
    _, tokenizer = trained
    plain = tokenizer._tokenizer
    assert isinstance(streaming_detokenizer(plain), BPEStreamingDetokenizer)
    ids = tokenizer.encode(" x = '🙂'\n" + CODE, add_special_tokens=False)
    chunks = fed(TextStream(plain, stop=["name ="]), steps_of(ids, 2))
    assert full_text(chunks) == tokenizer.decode(ids).split("name =")[0]


class MaskLover:
    def __init__(self, model):
        self.golden, self.args, self.model = model, model.args, model.model

    def head(self, hidden):
        logits = self.golden.head(hidden)
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
            (
                'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}'
                "\n</tool_call>"
            ),
            "Let me check.",
            [{"name": "weather", "arguments": {"city": "Oslo"}}],
        ),
        (
            (
                '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
                '<tool_call>{"name": "b"}</tool_call>'
            ),
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
