"""The OpenAI-compatible HTTP API over a Worker: routes, API key, limits and errors.

Everything a request can get wrong is answered with a 4xx before the request
reaches the batch: the body is parsed by the pydantic models, the prompt is
tokenized (in a thread) to check it against the context, and the runtime checks
the arguments before the job is queued; a streamed request also waits for its
first chunk before the 200 goes out. A full queue is a 429 with Retry-After.
Any other failure is a 500 with an error body; the server itself keeps running.
A client that disconnects, while its answer is being made or waited for,
cancels its job.

``GET /`` is the playground page (``static/``, no key needed: the page asks for
the key when the server has one); its requests go to the guarded /v1 routes and
use the ``dhara`` streaming extension (``dhara_stats``, ``dhara_blocks``).
"""

import asyncio
import json
import logging
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional, Sequence, Union

from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from optiq_dhara.runtime.prefix_cache import DEFAULT_BYTES
from optiq_dhara.runtime.settings import default_mode, require_mode
from optiq_dhara.runtime.stats import Stats
from optiq_dhara.runtime.text import encode_prompt

from .anthropic import routes as anthropic_routes
from .engine import BlockStep, QueueFull, ShuttingDown, Worker
from .errors import APIError, from_validation, invalid, server_error
from .limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    Guard,
    Limits,
    allowed_hosts,
    h11_protocol,
)
from .responses import (
    Completion,
    ToolCallStream,
    chat_logprobs,
    generated_text_logprobs,
    sse,
    text_logprobs,
    tool_result,
    usage,
)
from .schemas import ChatCompletionRequest, CompletionRequest, DecodeRequest, Mode

log = logging.getLogger("optiq_dhara.serve")

Handler = Callable[[Request], Awaitable[Response]]
RETRY_AFTER = 1  # seconds a client told 429 should wait; a batch slot frees every few steps
MAX_DEPTH = 64  # deepest nesting of a request body (a chat template recurses into tool schemas)
STATIC = Path(__file__).parent / "static"  # the playground page


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass(frozen=True)
class ServerConfig:
    """What the server is started with; a request may override ``mode`` and ``max_tokens``.

    ``mode`` None is the model's default: spec, or ar for a model without a MASK token.
    """

    model_id: str
    mode: Optional[Mode] = None
    api_key: Optional[str] = None
    max_tokens: int = 512
    max_context: int = 8192
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    host: Optional[str] = (
        None  # the address served: one of the Host names a key-less server answers
    )
    allowed_hosts: tuple[str, ...] = ()  # more Host names a key-less server answers ('*': any)

    def limits(self) -> Limits:
        """The request limits (serve/limits.py); the Host check only without an API key."""
        hosts = None if self.api_key else allowed_hosts(self.host, self.allowed_hosts)
        return Limits(self.max_body_bytes, self.body_timeout, hosts)


def create_app(worker: Worker, config: ServerConfig) -> Starlette:
    """The Starlette app serving ``worker`` (already started)."""
    api = _API(worker, config)
    routes = [
        Route("/", api.page, methods=["GET"]),
        Route("/playground.json", api.playground, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.guarded(api.models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.guarded(api.model), methods=["GET"]),
        Route("/v1/chat/completions", api.guarded(api.chat), methods=["POST"]),
        Route("/v1/completions", api.guarded(api.completions), methods=["POST"]),
        *anthropic_routes(api),  # POST /v1/messages (serve/anthropic.py)
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error},
        middleware=[Middleware(Guard, limits=config.limits())],
    )


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Unknown paths and wrong methods, in the OpenAI error shape."""
    return APIError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"
    ).response()


async def _read(request: Request, schema: type[BaseModel]) -> Any:
    """The body as ``schema``, parsed and validated in a thread (it may be megabytes); the
    Guard middleware has read it already, within the size and time limits."""
    raw = await request.body()
    return await asyncio.to_thread(_parse, raw, schema)


def _parse(raw: bytes, schema: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw)
        # a lone surrogate ("\\ud800") is valid JSON but no text: the tokenizer cannot take it
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(
            f"The request body has a string that is not valid Unicode ({exc.reason}: "
            f"{exc.object[exc.start : exc.end]!r}); send UTF-8 text.",
            code="invalid_json",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise invalid(
            f"The request body is not valid JSON ({exc}); send a JSON object.", code="invalid_json"
        ) from None
    if _depth(data) > MAX_DEPTH:
        raise invalid(
            f"The request body is nested more than {MAX_DEPTH} levels deep.", code="invalid_json"
        )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


def _depth(data: Any) -> int:
    """How deeply lists and objects nest in ``data`` (without recursion)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth)
            todo.extend((item, depth + 1) for item in value)
    return deepest


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, awaitable: Awaitable) -> Any:
    """The result of ``awaitable``, or _ClientGone if the client leaves first; then
    ``awaitable`` is cancelled, which ends the request's stream and so its job."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})
    if work.cancelled():
        raise _ClientGone()
    return work.result()


def _busy(exc: QueueFull) -> Response:
    """429 in OpenAI's rate-limit shape, with Retry-After."""
    response = APIError(429, str(exc), type="requests", code="rate_limit_exceeded").response()
    response.headers["Retry-After"] = str(RETRY_AFTER)
    return response


def _finish_reason(last: Any, tool_calls: list) -> str:
    if tool_calls:
        return "tool_calls"
    return (last.finish_reason if last is not None else None) or "stop"


def _usage(last: Any, prompt_tokens: int) -> dict:
    if last is None:
        return usage(prompt_tokens, 0)
    return usage(prompt_tokens, last.stats.generated, last.stats.reused_tokens)


def dhara_stats(stats: Stats) -> dict:
    """The run's stats so far, as the ``dhara`` extension sends them (``dhara_stats``)."""
    first = stats.first_token_seconds
    return {
        "mode": stats.mode,
        "prompt_tokens": stats.prompt_tokens,
        "reused_tokens": stats.reused_tokens,
        "generated": stats.generated,
        "forwards": stats.forwards,
        "rounds": stats.rounds,
        "accepted_drafts": stats.accepted_drafts,
        "tokens_per_forward": round(stats.tokens_per_forward, 4),
        "accepted_per_round": round(stats.accepted_per_round, 4),
        "tokens_per_second": round(stats.tokens_per_second, 2),
        "first_token_seconds": None if first is None else round(first, 4),
    }


def _with_dhara(chunk: dict, stats: Optional[Stats], block: Optional[BlockStep] = None) -> dict:
    """``chunk`` with the ``dhara`` extension: the stats (when asked for) and a diffusion block."""
    extension = dhara_stats(stats) if stats is not None else {}
    if block is not None:
        extension["block"] = {
            "start": block.start,
            "step": block.step,
            "ids": block.ids,
            "tokens": block.tokens,
            "committed": block.committed,
        }
    if extension:
        chunk["dhara"] = extension
    return chunk


class _API:
    def __init__(self, worker: Worker, config: ServerConfig):
        self.worker, self.config = worker, config

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the API key, with every exception turned into an error body."""

        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except APIError as exc:
                return exc.response()
            except QueueFull as exc:
                return _busy(exc)
            except ShuttingDown as exc:
                return APIError(503, str(exc), type="server_error").response()
            except _ClientGone:
                return Response(status_code=499)  # nobody reads it
            except ValueError as exc:  # the runtime refused an argument
                return invalid(str(exc)).response()
            except Exception as exc:
                log.exception("request failed: %s %s", request.method, request.url.path)
                return server_error(exc).response()

        return endpoint

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(
                401,
                "Incorrect API key provided; send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    async def health(self, request: Request) -> Response:
        if not self.worker.alive:
            return APIError(503, "The model worker is not running.", type="server_error").response()
        return JSONResponse(
            {
                "status": "ok",
                "model": self.config.model_id,
                "queued": self.worker.pending,
                "running": self.worker.running,
                "requests": self.worker.counts,
            }
        )

    async def page(self, request: Request) -> Response:
        """The playground (open without a key: it holds no data; its requests need one)."""
        return FileResponse(STATIC / "index.html")

    async def playground(self, request: Request) -> Response:
        """What the page needs before its first request: the model, its modes, the limits,
        and whether the /v1 routes want a key."""
        args = self.worker.model.args
        return JSONResponse(
            {
                "model": self.config.model_id,
                "modes": list(args.modes),
                "mode": self.config.mode or default_mode(args),
                "api_key_required": bool(self.config.api_key),
                "max_tokens": self.config.max_tokens,
                "max_context": self.config.max_context,
            }
        )

    def _model_object(self) -> dict:
        return {
            "id": self.config.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "optiq-dhara",
            "modes": list(self.worker.model.args.modes),  # diffusion and spec need MASK
        }

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}`` (models.retrieve): the served model, else a 404."""
        model_id = request.path_params["model_id"]
        if model_id != self.config.model_id:
            raise APIError(
                404,
                f"The model '{model_id}' does not exist; this server serves "
                f"'{self.config.model_id}'.",
                code="model_not_found",
            )
        return JSONResponse(self._model_object())

    async def chat(self, request: Request) -> Response:
        body: ChatCompletionRequest = await _read(request, ChatCompletionRequest)
        messages = [message.template_dict() for message in body.messages]
        reply = Completion(True, self.config.model_id)
        return await self._respond(request, body, [messages], reply, body.template_tools())

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await _read(request, CompletionRequest)
        reply = Completion(False, self.config.model_id)
        if body.echo:
            return await self._score(request, body, reply)
        if body.max_tokens == 0:
            raise invalid("max_tokens 0 needs echo: true (prompt scoring).", "max_tokens")
        return await self._respond(request, body, body.prompts, reply, None)

    async def _score(self, request: Request, body: CompletionRequest, reply: Completion):
        """echo: each prompt's tokens back, with their log-probabilities when ``logprobs``
        is set (a causal forward of the prompt on the worker thread), and with
        max_tokens 1 the greedy next token after them."""
        if body.stream:
            raise invalid("echo is not supported with stream.", "stream")
        if body.max_tokens not in (0, 1):
            raise invalid(
                "echo is supported only for prompt scoring: max_tokens 0 or 1.", "max_tokens"
            )
        if body.n != 1:
            raise invalid("echo (prompt scoring) supports only n 1.", "n")
        extra = body.max_tokens == 1
        top = body.logprobs or 0
        choices, prompt_total, completion_total = [], 0, 0
        for index, prompt in enumerate(body.prompts):
            ids = await self._prompt_ids(prompt, False, None)
            if not ids:
                raise invalid("The prompt has no tokens; nothing to score.", "prompt")
            if len(ids) + extra > self.config.max_context:
                raise invalid(
                    f"This model's maximum context length is {self.config.max_context} "
                    f"tokens, and the prompt has {len(ids)}; shorten the prompt.",
                    "prompt",
                    "context_length_exceeded",
                )
            scored = await _unless_gone(request, self.worker.call(_prompt_scorer(ids, top, extra)))
            choice = await asyncio.to_thread(
                _score_choice, self.worker, ids, scored, body.logprobs is not None
            )
            choice["index"] = index
            choices.append(choice)
            prompt_total += len(ids)
            completion_total += int(extra)
        whole = reply.whole("", "length", usage(prompt_total, completion_total))
        whole["choices"] = choices
        return JSONResponse(whole)

    async def _prompt_ids(
        self, prompt: Union[str, list[int], list[dict]], chat: bool, tools
    ) -> list[int]:
        """The prompt's token ids, encoded in a thread (a long chat template takes a while);
        token ids are taken as they are (the worker checks them against the vocabulary)."""
        if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt) and prompt:
            return list(prompt)
        tokenizer = self.worker.tokenizer
        try:
            return await asyncio.to_thread(encode_prompt, tokenizer, prompt, chat=chat, tools=tools)
        except TemplateError as exc:
            raise invalid(f"The chat template rejected the messages: {exc}", "messages") from None
        except RecursionError:
            raise invalid("The chat template cannot render messages or tools this deep.") from None

    def _budget(self, requested: Optional[int], prompt_tokens: int, prompt_field: str) -> int:
        """max_tokens for the run: the request's, or the server default, within the context."""
        limit = self.config.max_context
        room = limit - prompt_tokens
        if room < 1:
            raise invalid(
                f"This model's maximum context length is {limit} tokens, and the prompt has "
                f"{prompt_tokens}; shorten the prompt.",
                prompt_field,
                "context_length_exceeded",
            )
        if requested is None:
            return min(self.config.max_tokens, room)
        if requested > room:
            raise invalid(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_tokens} and max_tokens asks for {requested} more. Lower max_tokens "
                "or shorten the prompt.",
                "max_tokens",
                "context_length_exceeded",
            )
        return requested

    def decoding_options(
        self, body: Any, max_tokens: int, stop: Sequence[str], **extra: Any
    ) -> dict:
        """A request body's decoding options for ``Worker.stream``, the same for every API
        (the mode defaults to the server's, then to the model's), with an API's ``extra``."""
        greedy = body.top_p == 0  # top_p 0 keeps only the top token: greedy
        return dict(
            mode=body.mode or self.config.mode or default_mode(self.worker.model.args),
            max_tokens=max_tokens,
            temperature=0.0 if greedy else body.temperature,
            top_p=1.0 if greedy else body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=tuple(stop),
            block_len=body.block_len,
            threshold=body.threshold,
            k=body.k,
            steps=body.steps,
            **extra,
        )

    async def _respond(
        self,
        request: Request,
        body: DecodeRequest,
        prompts: Sequence[Union[str, list[int], list[dict]]],
        reply: Completion,
        tools: Optional[list[dict]],
    ) -> Response:
        """Decode each prompt ``n`` times, one row each (choice i*n + copy), streamed or
        collected."""
        field = "messages" if reply.chat else "prompt"
        prepared = []
        for prompt in prompts:
            prompt_ids = await self._prompt_ids(prompt, reply.chat, tools)
            budget = self._budget(body.token_limit, len(prompt_ids), field)
            prepared.append((prompt_ids, budget))
        openai = dict(
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=body.bias,
            logprobs=body.top_logprobs_count,
        )
        runs = []  # (prompt tokens, chunks) of each choice
        for prompt_ids, budget in prepared:
            for copy in range(body.n):
                options = self.decoding_options(body, budget, body.stop, **openai)
                if body.seed is not None and copy:  # n seeded rows differ, reproducibly
                    options["seed"] = (body.seed + copy) % 2**64
                blocks = body.dhara_blocks and body.stream
                runs.append(
                    (len(prompt_ids), self.worker.stream(prompt_ids, blocks=blocks, **options))
                )
        view = _View(reply, bool(tools), body.dhara_stats, body.top_logprobs_count is not None)
        if not body.stream:
            collected = [
                self._collect(view, chunks, prompt_tokens) for prompt_tokens, chunks in runs
            ]
            wholes = await _unless_gone(request, asyncio.gather(*collected))
            return JSONResponse(_merge(wholes))
        try:  # every row's first chunk before the 200: a refused request gets its 4xx
            firsts = await _unless_gone(
                request, asyncio.gather(*(anext(chunks, None) for _, chunks in runs))
            )
        except BaseException:
            await asyncio.gather(*(chunks.aclose() for _, chunks in runs))
            raise
        streams = [(first, chunks) for first, (_, chunks) in zip(firsts, runs)]
        prompt_tokens = sum(count for count, _ in runs)
        events = self._events(view, streams, prompt_tokens, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _collect(self, view: "_View", chunks, prompt_tokens: int) -> dict:
        text, last, entries = "", None, []
        async for chunk in chunks:
            text, last = text + chunk.text, chunk
            entries += chunk.logprobs or []
        content, calls = tool_result(text) if view.tools else (text, [])
        logprobs = view.logprobs(entries, self.worker.piece) if view.with_logprobs else None
        whole = view.reply.whole(
            content, _finish_reason(last, calls), _usage(last, prompt_tokens), calls, logprobs
        )
        return _with_dhara(whole, last.stats if view.stats and last is not None else None)

    async def _events(
        self,
        view: "_View",
        streams: list[tuple[Any, AsyncIterator[Any]]],
        prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The SSE stream of every choice, interleaved as their rows make text: a chunk
        per final piece of text, tool calls, each choice's finish, usage, [DONE].

        With ``view.stats`` each chunk but the chat role and usage chunks carries the
        run's stats so far (``dhara``); a BlockStep (``dhara_blocks``) is a chunk without
        text whose ``dhara.block`` is the diffusion block after that step.
        """
        reply, piece = view.reply, self.worker.piece
        held = [ToolCallStream() if view.tools else None for _ in streams]
        last: list[Any] = [None] * len(streams)
        generated = 0

        def extended(index: int, chunk: dict, block: Optional[BlockStep] = None) -> str:
            source = block or last[index]
            return sse(_with_dhara(chunk, source.stats if view.stats and source else None, block))

        try:
            if reply.chat:
                for index in range(len(streams)):
                    yield sse(reply.chunk(role=True, index=index))
            async for index, item in _interleaved(streams):
                if isinstance(item, BlockStep):
                    yield extended(index, reply.chunk(index=index), item)
                elif item is not None:
                    last[index] = item
                    text = held[index].feed(item.text) if held[index] else item.text
                    logprobs = None
                    if view.with_logprobs and item.logprobs:
                        logprobs = view.logprobs(item.logprobs, piece)
                    if text or logprobs:
                        yield extended(index, reply.chunk(text, logprobs=logprobs, index=index))
                    continue
                else:  # the choice's text ended
                    content, calls = held[index].finish() if held[index] else ("", [])
                    if content:
                        yield extended(index, reply.chunk(content, index=index))
                    if calls:
                        yield extended(index, reply.chunk(tool_calls=calls, index=index))
                    reason = _finish_reason(last[index], calls)
                    yield extended(index, reply.chunk(finish_reason=reason, index=index))
                    generated += last[index].stats.generated if last[index] else 0
            if include_usage:
                cached = sum(chunk.stats.reused_tokens for chunk in last if chunk is not None)
                yield sse(reply.usage_chunk(usage(prompt_tokens, generated, cached)))
            yield sse("[DONE]")
        except ShuttingDown as exc:  # close()'s deadline passed
            yield sse(APIError(503, str(exc), type="server_error").body())
        except Exception as exc:  # headers are out: report in the stream
            log.exception("stream failed")
            error = invalid(str(exc)) if isinstance(exc, ValueError) else server_error(exc)
            yield sse(error.body())


@dataclass(frozen=True)
class _View:
    """How a request's rows become OpenAI objects: chat or text, tool calls parsed,
    the dhara stats extension, generated-token logprobs."""

    reply: Completion
    tools: bool
    stats: bool
    with_logprobs: bool

    def logprobs(self, entries: list, piece: Callable[[int], str]) -> dict:
        if self.reply.chat:
            return chat_logprobs(entries, piece)
        return generated_text_logprobs(entries, piece)


async def _interleaved(
    streams: list[tuple[Any, AsyncIterator[Any]]],
) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from every stream as items arrive (each stream's first item is
    given), and (index, None) when stream ``index`` ends; a stream's error is raised.
    Every stream is closed at the end (so rows left unread are cancelled)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: Any, chunks: AsyncIterator[Any]) -> None:
        try:
            item = first
            while item is not None:
                await queue.put((index, item))
                item = await anext(chunks, None)
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [
        asyncio.ensure_future(pump(i, first, chunks)) for i, (first, chunks) in enumerate(streams)
    ]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            open_streams -= item is None
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(chunks.aclose() for _, chunks in streams), return_exceptions=True)


def _merge(wholes: list[dict]) -> dict:
    """One response from the whole responses of each row: choices in order, usage summed
    over the rows."""
    merged = wholes[0]
    if len(wholes) == 1:
        return merged
    choices, completion, prompt, cached = [], 0, 0, 0
    for index, whole in enumerate(wholes):
        choice = whole["choices"][0]
        choice["index"] = index
        choices.append(choice)
        counts = whole["usage"]
        completion += counts["completion_tokens"]
        prompt += counts["prompt_tokens"]
        cached += counts["prompt_tokens_details"]["cached_tokens"]
    merged["choices"] = choices
    merged["usage"] = usage(prompt, completion, cached)
    return merged


def _prompt_scorer(ids: list[int], top: int, extra: bool) -> Callable[[Any, Any], dict]:
    """The worker-thread function scoring ``ids``: a causal forward of the prompt (as
    ``dhara-mlx eval --mode ar`` scores, full-vocabulary softmax), each token's
    log-probability given the ones before, the ``top`` likeliest tokens at each
    position, and with ``extra`` the greedy next token after the prompt."""

    def score(model: Any, tokenizer: Any) -> dict:
        import mlx.core as mx

        if len(ids) < 2 and not extra:  # one token: nothing before it to score it by
            return {"targets": [], "picked": [], "top": None}
        logits = model(mx.array([ids]))[0].astype(mx.float32)
        if not extra:
            logits = logits[:-1]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = list(ids[1:])
        if extra:
            nxt = mx.argmax(logprobs[-1]).item()
            targets.append(nxt)
        picked = mx.take_along_axis(logprobs, mx.array(targets)[:, None], axis=-1)[:, 0]
        result = {"targets": targets, "picked": picked.tolist(), "top": None}
        if top and targets:
            idx = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[:, :top]
            vals = mx.take_along_axis(logprobs, idx, axis=-1)
            result["top"] = (idx.tolist(), vals.tolist())
        return result

    return score


def _score_choice(worker: Any, ids: list[int], scored: dict, with_logprobs: bool) -> dict:
    """A completions choice echoing the prompt (and the greedy next token, if scored),
    with OpenAI's legacy ``logprobs`` object when asked for."""
    tokens = list(ids) + scored["targets"][len(ids) - 1 :]
    text = worker.tokenizer.decode(tokens)
    logprobs = None
    if with_logprobs:
        top = scored["top"]
        tops = [None] + (
            [list(zip(row_ids, row_values)) for row_ids, row_values in zip(*top)]
            if top is not None
            else [[] for _ in scored["targets"]]
        )
        tops = [None if t is None else sorted(t, key=lambda pair: -pair[1]) for t in tops]
        logprobs = text_logprobs(tokens, [None, *scored["picked"]], tops, worker.piece)
    finish = "length" if len(tokens) > len(ids) else "stop"
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}


# uvicorn's own limits (run_server): an idle keep-alive connection is closed after
# KEEP_ALIVE seconds; a request line plus headers may be at most MAX_HEADER_BYTES, sent
# within HEADER_TIMEOUT seconds.
KEEP_ALIVE = 5
MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 10.0  # seconds running requests get when the server is stopped


def uvicorn_config(
    app: Starlette,
    max_connections: Optional[int] = None,
    header_timeout: float = HEADER_TIMEOUT,
    **options,
):
    """The uvicorn Config with the server's limits: beyond ``max_connections`` open
    connections a request gets a 503; idle connections close after KEEP_ALIVE seconds,
    and connections whose headers take over ``header_timeout`` seconds are closed."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=h11_protocol(header_timeout, max_connections),
        timeout_keep_alive=KEEP_ALIVE,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        **options,
    )


@contextmanager
def background_server(
    app: Starlette,
    host: str = "127.0.0.1",
    max_connections: Optional[int] = None,
    header_timeout: float = HEADER_TIMEOUT,
) -> Iterator[str]:
    """Serve ``app`` with uvicorn from a thread on a free port; yields the base URL.

    For embedding the server in another program (a notebook, a test, a benchmark).
    """
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(
        uvicorn_config(app, max_connections, header_timeout, log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on {host}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def run_server(
    load: Callable[[], tuple[Any, Any]],
    *,
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    mode: Optional[Mode] = None,
    api_key: Optional[str] = None,
    max_tokens: int = 512,
    max_context: Optional[int] = None,
    max_batch: int = 32,
    max_queue: Optional[int] = None,
    prompt_cache_bytes: int = DEFAULT_BYTES,
    log_level: str = "info",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: Optional[int] = None,
    allowed_hosts: tuple[str, ...] = (),
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
) -> None:
    """Load the model on the worker and serve it with uvicorn until interrupted.

    The context defaults to the model's ``max_position_embeddings``, else 8192;
    ``mode`` to spec, or ar for a model without a MASK token (a ``mode`` the
    model lacks is refused before serving); ``max_queue`` to 4 x ``max_batch``;
    ``prompt_cache_bytes`` 0 turns the prefix cache off. A line on stderr says
    which modes the model has. The request limits (body size and read time,
    connections, Host names without a key) are described in docs/serving.md; on
    Ctrl-C the running requests get ``shutdown_timeout`` seconds, then an error.
    """

    worker = Worker(
        load, max_batch=max_batch, max_queue=max_queue, prompt_cache_bytes=prompt_cache_bytes
    ).start()
    try:
        args = worker.model.args
        if mode is not None:
            require_mode(args, mode)
        context = max_context or args.max_position_embeddings or 8192
    except BaseException:
        worker.close()
        raise
    print(
        f"serving {model_id}: modes {', '.join(args.modes)}; requests without a mode "
        f"decode in {mode or default_mode(args)}",
        file=sys.stderr,
        flush=True,
    )
    config = ServerConfig(
        model_id,
        mode,
        api_key,
        max_tokens,
        context,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
        host=host,
        allowed_hosts=tuple(allowed_hosts),
    )
    options = uvicorn_config(
        create_app(worker, config),
        max_connections,
        header_timeout,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=2 * shutdown_timeout + 1,
    )
    try:
        _stopping_server(options, worker, shutdown_timeout).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a clean exit
        pass
    finally:
        worker.close(shutdown_timeout)


def _stopping_server(config: Any, worker: Worker, shutdown_timeout: float) -> Any:
    """A uvicorn Server that, when stopping, also stops ``worker`` with a deadline: the
    requests still running after ``shutdown_timeout`` seconds end with an error (an
    error chunk for a stream, a 503 otherwise), so their connections end and the
    server exits (uvicorn's own graceful-shutdown timeout is the backstop)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            closing = asyncio.get_running_loop().run_in_executor(
                None, worker.close, shutdown_timeout
            )
            try:
                await super().shutdown(sockets)
            finally:
                await closing

    return Server(config)
