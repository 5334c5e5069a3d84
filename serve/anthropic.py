"""The Anthropic Messages API (``POST /v1/messages``) on the same Worker as the OpenAI routes.

Requests are validated by the models below, turned into the chat-template
messages and tools the OpenAI chat endpoint uses (Hermes tools: ``tool_use``
blocks become assistant ``tool_calls``, ``tool_result`` blocks ``tool``
messages), tokenized, checked and queued by the app's own helpers
(``_API._prompt_ids``, ``_API._budget``, ``Worker.stream``), so a conversation
gets the text the chat completions endpoint gives for it. Only the shapes
differ: a ``message`` object, or the Anthropic SSE event sequence, and errors as
``{"type": "error", "error": {"type", "message"}}``. The API key is read from
``x-api-key`` (or ``Authorization: Bearer``).
"""

import json
import uuid
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import BlockStep
from .errors import invalid
from .responses import ToolCallStream, tool_result
from .schemas import Mode

# Anthropic error types by HTTP status (other 4xx: invalid_request_error, 5xx: api_error)
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations, ... are ignored


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Optional[Union[str, list[TextBlock]]] = None
    is_error: bool = False

    def text(self) -> str:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(b.text for b in content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Lenient):
    """An earlier turn's thinking, sent back by a client: not rendered (dhara does not think)."""

    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[
    Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock], Field(discriminator="type")
]


class Message(_Lenient):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class ToolDefinition(_Lenient):
    type: Optional[Literal["custom"]] = None  # server tools (web search, bash, ...) are refused
    name: str = Field(min_length=1)
    description: Optional[str] = None
    input_schema: dict[str, Any]

    def template_tool(self) -> dict:
        """The tool as the OpenAI path hands it to the chat template."""
        function = {"name": self.name, "description": self.description}
        function["parameters"] = self.input_schema
        return {
            "type": "function",
            "function": {k: v for k, v in function.items() if v is not None},
        }


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None


class MessagesRequest(_Lenient):
    model: Optional[str] = None  # not checked: the server has one model
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: Optional[Union[str, list[TextBlock]]] = None
    stop_sequences: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=16
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: greedy, as on the OpenAI routes
    top_k: int = Field(0, ge=0)
    stream: bool = False
    tools: Optional[list[ToolDefinition]] = None
    tool_choice: Optional[ToolChoice] = None
    # dhara extras, as in the OpenAI requests
    mode: Optional[Mode] = None
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    block_len: Optional[int] = Field(None, ge=1, le=1024)  # None: the model's
    steps: Optional[int] = Field(None, ge=1, le=1024)  # arcLM: denoising steps per block
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    k: int = Field(8, ge=2, le=256)

    def template_tools(self) -> Optional[list[dict]]:
        """The tools for the chat template; None without tools or with tool_choice none."""
        if not self.tools or (self.tool_choice and self.tool_choice.type == "none"):
            return None
        return [tool.template_tool() for tool in self.tools]

    def template_messages(self) -> list[dict]:
        """The conversation as the chat template reads it (the OpenAI path's dicts)."""
        out: list[dict] = []
        system = self.system
        if isinstance(system, list):
            system = "".join(block.text for block in system)
        if system:
            out.append({"role": "system", "content": system})
        for message in self.messages:
            out.extend(_template(message))
        if self.messages[-1].role == "assistant":
            raise invalid(
                "A final assistant message (a prefill to continue) is not supported; "
                "end the conversation with a user message.",
                "messages",
            )
        return out


def _template(message: Message) -> list[dict]:
    """One Anthropic message as chat-template messages: text joined, tool_use blocks as
    tool calls of the assistant turn, each tool_result a ``tool`` message."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    out: list[dict] = []
    text: list[str] = []
    calls: list[dict] = []

    def flush() -> None:
        if text or calls or message.role == "assistant":
            turn: dict[str, Any] = {"role": message.role, "content": "".join(text) or None}
            if calls:
                turn["tool_calls"] = list(calls)
            elif turn["content"] is None:
                turn["content"] = ""
            out.append(turn)
        text.clear()
        calls.clear()

    for block in message.content:
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise invalid("tool_use blocks belong to assistant messages.", "messages")
            function = {"name": block.name, "arguments": block.input}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise invalid("tool_result blocks belong to user messages.", "messages")
            if text:
                flush()
            out.append({"role": "tool", "content": block.text()})
    if text or calls or not out:
        flush()
    return out


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _json(data: dict) -> str:
    """ASCII JSON: a lone surrogate the model wrote in a tool call's JSON stays encodable."""
    return json.dumps(data)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {_json(data)}\n\n"


def _tool_uses(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls (from ``tool_result``) as Anthropic tool_use blocks."""
    blocks = []
    for call in calls:
        arguments = call["function"]["arguments"]
        try:
            value = json.loads(arguments)
        except ValueError:
            value = arguments
        blocks.append(
            {
                "type": "tool_use",
                "id": _new_id("toolu"),
                "name": call["function"]["name"],
                "input": value if isinstance(value, dict) else {"arguments": value},
            }
        )
    return blocks


class _Run:
    """What one request's shaping needs to know: its stop sequences, the tokenizer, the
    prompt size; accumulates the generated tokens to tell a stop sequence from end_turn."""

    def __init__(self, body: MessagesRequest, tokenizer, prompt_tokens: int, model: str):
        self.body, self.tokenizer, self.prompt_tokens = body, tokenizer, prompt_tokens
        self.id, self.model = _new_id("msg"), body.model or model
        self.tokens: list[int] = []
        self.text = ""
        self.last: Any = None

    def add(self, chunk) -> None:
        self.tokens += chunk.tokens
        self.text += chunk.text
        self.last = chunk

    def stop(self, tool_uses: list) -> tuple[str, Optional[str]]:
        """stop_reason and stop_sequence."""
        if tool_uses:
            return "tool_use", None
        reason = self.last.finish_reason if self.last is not None else None
        if reason == "length":
            return "max_tokens", None
        sequence = self._stop_sequence() if self.body.stop_sequences else None
        return ("stop_sequence", sequence) if sequence else ("end_turn", None)

    def _stop_sequence(self) -> Optional[str]:
        """The stop sequence that ended the text: the runtime cut the text before it, so it
        is in the decoded tokens just after the text (an end-of-turn token is no text)."""
        size = len(self.tokenizer)
        decoded = self.tokenizer.decode(
            [t for t in self.tokens if t < size], skip_special_tokens=True
        )
        after = decoded[len(self.text) :] if decoded.startswith(self.text) else decoded
        hits = [(after.find(s), i) for i, s in enumerate(self.body.stop_sequences) if s in after]
        return self.body.stop_sequences[min(hits)[1]] if hits else None

    def usage(self) -> dict:
        reused = self.last.stats.reused_tokens if self.last is not None else 0
        return {
            "input_tokens": self.prompt_tokens - reused,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": reused,
            "output_tokens": self.last.stats.generated if self.last is not None else 0,
        }

    def message(self, content: list, stop_reason, stop_sequence, usage: dict) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }


class Messages:
    """The /v1/messages handlers over the app's ``_API`` (its key check, helpers, Worker)."""

    def __init__(self, api):
        self.api = api

    async def _prompt(self, request: Request, schema) -> tuple[MessagesRequest, list[int]]:
        """The request, read by the app's ``_read``, and its prompt's token ids."""
        from .app import _read  # not at the top: app.py imports this module

        body = await _read(request, schema)
        if not isinstance(body, MessagesRequest):  # count_tokens: no max_tokens
            body = MessagesRequest(max_tokens=1, **body.model_dump(exclude_none=True))
        ids = await self.api._prompt_ids(body.template_messages(), True, body.template_tools())
        return body, ids

    async def count_tokens(self, request: Request) -> Response:
        """``POST /v1/messages/count_tokens``: the prompt's size as the template renders it."""
        _, ids = await self._prompt(request, _CountRequest)
        return JSONResponse({"input_tokens": len(ids)})

    async def create(self, request: Request) -> Response:
        from .app import _unless_gone

        body, ids = await self._prompt(request, MessagesRequest)
        api = self.api
        prompt_tokens = len(ids)
        api._budget(None, prompt_tokens, "messages")  # the prompt fits the context
        room = api.config.max_context - prompt_tokens
        tools = body.template_tools()
        max_tokens = min(body.max_tokens, room)  # clients ask for more than a context holds
        chunks = api.worker.stream(
            ids, **api.decoding_options(body, max_tokens, body.stop_sequences)
        )
        run = _Run(body, api.worker.tokenizer, prompt_tokens, api.config.model_id)
        if not body.stream:
            whole = await _unless_gone(request, _whole(run, chunks, bool(tools)))
            return Response(_json(whole), media_type="application/json")
        first = await _unless_gone(request, anext(chunks, None))
        events = _events(run, first, chunks, bool(tools))
        return StreamingResponse(events, media_type="text/event-stream")


class _CountRequest(_Lenient):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    system: Optional[Union[str, list[TextBlock]]] = None
    tools: Optional[list[ToolDefinition]] = None
    tool_choice: Optional[ToolChoice] = None


async def _whole(run: _Run, chunks, tools: bool) -> dict:
    async for chunk in chunks:
        if not isinstance(chunk, BlockStep):
            run.add(chunk)
    text, calls = tool_result(run.text) if tools else (run.text, [])
    uses = _tool_uses(calls)
    content = ([{"type": "text", "text": text}] if text else []) + uses
    return run.message(content, *run.stop(uses), run.usage())


async def _events(run: _Run, first, chunks: AsyncIterator, tools: bool) -> AsyncIterator[str]:
    """message_start, ping, a text block's deltas, tool_use blocks, message_delta, message_stop."""
    held = ToolCallStream() if tools else None
    index = 0
    text_open = False

    def text_delta(text: str) -> list[str]:
        nonlocal text_open
        out = []
        if not text_open:
            text_open = True
            block = {"type": "text", "text": ""}
            out.append(_event("content_block_start", _start(index, block)))
        delta = {"type": "text_delta", "text": text}
        out.append(_event("content_block_delta", _delta(index, delta)))
        return out

    try:
        if first is not None and not isinstance(first, BlockStep):
            run.last = first  # its stats: reused prompt tokens
        usage = {**run.usage(), "output_tokens": 0}
        yield _event(
            "message_start",
            {"type": "message_start", "message": run.message([], None, None, usage)},
        )
        yield _event("ping", {"type": "ping"})
        run.last = None
        pending = first
        while pending is not None:
            if not isinstance(pending, BlockStep):
                run.add(pending)
                text = held.feed(pending.text) if held else pending.text
                for event in text_delta(text) if text else []:
                    yield event
            pending = await anext(chunks, None)
        content, calls = held.finish() if held else ("", [])
        if content:
            for event in text_delta(content):
                yield event
        if text_open:
            yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        uses = _tool_uses(calls)
        for use in uses:
            yield _event("content_block_start", _start(index, {**use, "input": {}}))
            delta = {"type": "input_json_delta", "partial_json": json.dumps(use["input"])}
            yield _event("content_block_delta", _delta(index, delta))
            yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        reason, sequence = run.stop(uses)
        yield _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"output_tokens": run.usage()["output_tokens"]},
            },
        )
        yield _event("message_stop", {"type": "message_stop"})
    except Exception as exc:  # headers are out: report in the stream
        kind = "invalid_request_error" if isinstance(exc, ValueError) else "api_error"
        yield _event("error", _error_body(kind, f"{type(exc).__name__}: {exc}"))
    finally:
        await chunks.aclose()


def _start(index: int, block: dict) -> dict:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _delta(index: int, delta: dict) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _as_anthropic_error(response: Response) -> Response:
    """An error response of the app (OpenAI's shape) in Anthropic's, same status and headers."""
    status = response.status_code
    if status < 400 or status == 499:
        return response
    try:
        message = json.loads(response.body)["error"]["message"]
    except (ValueError, KeyError, TypeError, AttributeError):
        message = f"HTTP {status}"
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if status == 401:
        message = "Invalid API key; send it in the x-api-key header (or Authorization: Bearer)."
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return JSONResponse(_error_body(kind, message), status_code=status, headers=headers)


def _with_bearer(request: Request) -> Request:
    """``request`` with its ``x-api-key`` as ``Authorization: Bearer``, which the app checks."""
    key = request.headers.get("x-api-key")
    if key is None:
        return request
    headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"authorization"]
    headers.append((b"authorization", b"Bearer " + key.encode("latin-1")))
    return Request({**request.scope, "headers": headers}, request.receive)


def routes(api) -> list[Route]:
    """The Anthropic routes over the app's ``_API``: its guard (API key, errors), in
    Anthropic's error shape."""
    messages = Messages(api)

    def guarded(handler):
        inner = api.guarded(handler)

        async def endpoint(request: Request) -> Response:
            return _as_anthropic_error(await inner(_with_bearer(request)))

        return endpoint

    return [
        Route("/v1/messages", guarded(messages.create), methods=["POST"]),
        Route("/v1/messages/count_tokens", guarded(messages.count_tokens), methods=["POST"]),
    ]
