"""The OpenAI response objects: chat and text completions, whole or as SSE chunks.

Plain dicts in the exact shapes of the OpenAI API, so the official client parses
them; ``ToolCallStream`` holds back streamed text from the first ``<tool_call>``
tag on, so a stream carries tool calls as ``tool_calls`` deltas, never as content.
"""

import json
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from optiq_dhara.runtime import parse_tool_calls
from optiq_dhara.runtime.sampling import TokenLogprob

TOOL_CALL_TAG = "<tool_call>"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: Any) -> str:
    """One server-sent event carrying ``data`` (a dict as JSON, or a literal like [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """Token counts; ``cached_tokens`` is the prompt prefix reused from an earlier request."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def openai_tool_calls(calls: list[dict], first_index: int = 0) -> list[dict]:
    """Parsed Hermes calls ``{"name", "arguments"}`` as OpenAI ``tool_calls`` entries."""
    return [
        {
            "index": first_index + i,
            "id": new_id("call"),
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": (
                    call["arguments"]
                    if isinstance(call["arguments"], str)
                    else json.dumps(call["arguments"], ensure_ascii=False)
                ),
            },
        }
        for i, call in enumerate(calls)
    ]


class Completion:
    """The fixed fields of one response: id, creation time, model, object type."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model

    def _envelope(self, chunk: bool, choices: list[dict], **extra) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else ""
        )
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def chunk(
        self,
        text: str = "",
        finish_reason: Optional[str] = None,
        *,
        role: bool = False,
        tool_calls: Optional[list[dict]] = None,
        logprobs: Optional[dict] = None,
        index: int = 0,
    ) -> dict:
        """A streamed piece of choice ``index``: new text (or tool calls) with its
        ``logprobs`` object (``chat_logprobs``/``text_logprobs``), and the finish
        reason on the last one."""
        if not self.chat:
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            return self._envelope(True, [choice])
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text or role:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return self._envelope(True, [choice])

    def usage_chunk(self, counts: dict) -> dict:
        """The extra last chunk that ``stream_options.include_usage`` asks for."""
        return self._envelope(True, [], usage=counts)

    def whole(
        self,
        text: str,
        finish_reason: str,
        counts: dict,
        tool_calls: Optional[list[dict]] = None,
        logprobs: Optional[dict] = None,
    ) -> dict:
        """The non-streamed response."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message["content"] = text or None
                message["tool_calls"] = [
                    {key: value for key, value in call.items() if key != "index"}
                    for call in tool_calls
                ]
            choice = {"index": 0, "message": message, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason}
        choice["logprobs"] = logprobs
        return self._envelope(False, [choice], usage=counts)


def _token(token: int, logprob: float, piece: Callable[[int], str]) -> dict:
    text = piece(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], piece: Callable[[int], str]) -> dict:
    """A chat choice's ``logprobs`` object for generated tokens; ``piece`` gives a
    token's text."""
    content = [
        {
            **_token(entry.token, entry.logprob, piece),
            "top_logprobs": [_token(token, value, piece) for token, value in entry.top],
        }
        for entry in entries
    ]
    return {"content": content, "refusal": None}


def text_logprobs(
    tokens: Sequence[int],
    logprobs: Sequence[Optional[float]],
    tops: Sequence[Optional[Sequence[tuple[int, float]]]],
    piece: Callable[[int], str],
    offset: int = 0,
) -> dict:
    """A text completion's legacy ``logprobs`` object: each token's text, its
    log-probability and its likeliest alternatives (None where there is nothing to
    score, as for a prompt's first token), and where its text starts (from ``offset``)."""
    pieces = [piece(token) for token in tokens]
    offsets = []
    for text in pieces:
        offsets.append(offset)
        offset += len(text)
    top_logprobs: list[Optional[dict]] = []
    for top in tops:
        entry: Optional[dict] = None
        if top is not None:
            entry = {}
            for token, value in top:  # likeliest first; tokens of one text keep the first
                entry.setdefault(piece(token), value)
        top_logprobs.append(entry)
    return {
        "tokens": pieces,
        "token_logprobs": list(logprobs),
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def generated_text_logprobs(
    entries: Sequence[TokenLogprob], piece: Callable[[int], str], offset: int = 0
) -> dict:
    """``text_logprobs`` of generated tokens."""
    return text_logprobs(
        [e.token for e in entries],
        [e.logprob for e in entries],
        [e.top for e in entries],
        piece,
        offset,
    )


def tool_result(text: str) -> tuple[str, list[dict]]:
    """Content and OpenAI tool calls of a whole generated text."""
    content, calls = parse_tool_calls(text)
    return content, openai_tool_calls(calls)


class ToolCallStream:
    """Passes streamed text through until a ``<tool_call>`` tag starts, then holds it.

    A tail that could be the start of the tag is held until the next piece
    decides it; ``finish`` parses what was held into content and tool calls.
    """

    def __init__(self):
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` that is certainly content."""
        self._held += text
        at = self._held.find(TOOL_CALL_TAG)
        if at < 0:
            at = len(self._held) - _tag_prefix_length(self._held)
        out, self._held = self._held[:at], self._held[at:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """Content and OpenAI tool calls of the held text."""
        return tool_result(self._held)


def _tag_prefix_length(text: str) -> int:
    """Length of the longest end of ``text`` that begins the tool-call tag."""
    for size in range(min(len(text), len(TOOL_CALL_TAG) - 1), 0, -1):
        if text.endswith(TOOL_CALL_TAG[:size]):
            return size
    return 0
