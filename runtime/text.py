"""Text in, text out: chat template, stop tokens and strings, Hermes tool calls.

Text is released only when it is final: never a stop string or the text after
it, never half of a multi-byte character, never the text of a stop token.
"""

import json
import re
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from ..train.tokenizer import CHATML_TEMPLATE
from .decode import decode
from .stats import Stats

Prompt = Union[str, Sequence[dict]]
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
CHAT_END = "<|im_end|>"


@dataclass
class TextChunk:
    """New final text, the tokens of the step that produced it, and the stats so far.

    ``finish_reason`` is set on the last chunk only: "stop" (a stop token or
    string) or "length".
    """

    text: str
    tokens: list[int]
    stats: Stats
    finish_reason: Optional[str] = None


def encode_prompt(tokenizer, prompt: Prompt, *, chat: bool, tools=None) -> list[int]:
    """Token ids of a plain prompt, or of chat messages rendered by the chat template.

    A string with ``chat`` is one user message. The tokenizer's own template is
    used; a tokenizer without one gets ChatML.
    """
    if not chat:
        if not isinstance(prompt, str) or tools:
            raise ValueError("chat messages and tools need chat=True; a plain prompt is a string.")
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages:
        raise ValueError("messages is empty; give at least one chat message.")
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False, chat_template=template
    )
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence ids and ``<|im_end|>``."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    chat_end = tokenizer.get_vocab().get(CHAT_END)
    if chat_end is not None:
        ids.add(chat_end)
    return ids


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string or a character."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


def stream_text(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    tools: Optional[list[dict]] = None,
    stop: Sequence[str] = (),
    chat: bool,
    **decode_kwargs,
) -> Iterator[TextChunk]:
    """Generate text after ``prompt``; keyword arguments as ``decode``.

    Decoding stops at the tokenizer's stop tokens (and any ``stop_ids`` given),
    and at the first of the ``stop`` strings, which is not part of the text.
    """
    stops = [s for s in stop if s]
    stop_ids = stop_token_ids(tokenizer) | set(decode_kwargs.pop("stop_ids", ()))
    ids = encode_prompt(tokenizer, prompt, chat=chat, tools=tools)
    steps = decode(model, ids, stop_ids=stop_ids, **decode_kwargs)
    tokens: list[int] = []
    sent = 0
    with closing(steps):
        for step in steps:
            tokens += [t for t in step.tokens if t not in stop_ids]
            text = tokenizer.decode(tokens)
            hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
            if hits:
                step.stats.finish_reason = "stop"
                end = min(hits)
            elif step.stats.finish_reason:
                end = len(text)
            else:
                end = len(text) - held_back(text, stops)
            reason = step.stats.finish_reason
            if reason:  # hand the state to the prefix cache before the caller sees the end
                steps.close()
            yield TextChunk(text[sent:end], step.tokens, step.stats, reason)
            if reason:
                return
            sent = max(sent, end)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split Hermes ``<tool_call>{json}</tool_call>`` blocks from the content.

    Returns the content without the calls (stripped) and the calls as
    ``{"name": str, "arguments": dict | str}``. A block that is not JSON with a
    name stays in the content.
    """
    calls = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return match.group(0)
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        return ""

    content = TOOL_CALL.sub(take, text)
    return content.strip(), calls
