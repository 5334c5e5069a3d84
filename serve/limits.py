"""What every request passes before a route sees it: the Host, the Content-Type and the body.

``Guard`` is ASGI middleware in front of the whole app:

- **Host allow-list** (only when the server has no API key): a request whose Host
  header is not one of ``allowed_hosts`` gets a 403. A key-less server on
  127.0.0.1 is otherwise reachable from any web page the user opens, through
  DNS rebinding (the page's own name made to resolve to 127.0.0.1); such a
  request carries the attacker's name as its Host. ``*`` allows every Host.
- **JSON only** for ``POST /v1/*``: a Content-Type other than ``application/json``
  is a 415, so a cross-origin page cannot send a "simple" ``text/plain`` POST
  (one a browser sends without a CORS preflight).
- **Body limits** for ``POST``: a ``Content-Length`` over ``max_body_bytes`` is a
  413 before a byte of the body is read; otherwise the body is read in pieces,
  counted as they come (a 413 as soon as it passes the limit), within
  ``body_timeout`` seconds in all (else a 408). After a 413 the rest of the body
  (up to DRAIN_BYTES) is read and dropped, never kept, so the client reads the
  answer rather than a reset connection. The body read is then handed to
  the app, which parses it in a thread, so a large or slow body blocks neither
  the event loop nor the other requests.

Every refusal is in the API's error shape: OpenAI's, or Anthropic's on
``/v1/messages``.
"""

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional

MiB = 1 << 20
DEFAULT_MAX_BODY_BYTES = 8 * MiB
DEFAULT_BODY_TIMEOUT = 30.0  # seconds a client has to send its whole body
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
# A refused body of at most DRAIN_BYTES is read on and thrown away (never kept) after the
# 413 has gone out, within the body timeout: a client still sending it then reads the
# 413 instead of a reset connection. A larger one has its connection closed at once.
DRAIN_BYTES = 64 * MiB


@dataclass(frozen=True)
class Limits:
    """The request limits; ``allowed_hosts`` None: no Host check (the server has a key)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    allowed_hosts: Optional[frozenset] = None


def allowed_hosts(bound: Optional[str], extra: Iterable[str] = ()) -> frozenset:
    """The Host names a key-less server answers: the local names, the bound host, ``extra``."""
    hosts = {h.lower() for h in LOCAL_HOSTS}
    for host in [bound or "", *extra]:
        host = host.strip().lower()
        if host:
            hosts.add(host)
            if ":" in host and not host.startswith("["):  # a bare IPv6 address
                hosts.add(f"[{host}]")
    return frozenset(hosts)


def host_name(header: str) -> str:
    """The name of a Host header, without its port: ``[::1]:8080`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def error_body(path: str, status: int, message: str, type: str, code: Optional[str]) -> dict:
    """The error in the shape of the API ``path`` belongs to."""
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": type, "message": message}}
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


class _Refused(Exception):
    def __init__(self, status: int, message: str, type: str, code: Optional[str]):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.drain = False  # read the rest of the body, up to DRAIN_BYTES, after answering


class Guard:
    """ASGI middleware: Host allow-list, JSON-only /v1 POSTs and the body limits."""

    def __init__(self, app: Any, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_headers(scope)
            if scope["method"] == "POST":
                body = await self._read_body(scope, receive)
                receive = _replay(body, receive)
        except _Refused as refused:
            drain = receive if refused.drain else None
            return await _answer(scope, send, refused, drain, self.limits.body_timeout)
        await self.app(scope, receive, send)

    def _check_headers(self, scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        hosts = self.limits.allowed_hosts
        if hosts is not None and "*" not in hosts:
            name = host_name(headers.get("host", ""))
            if name not in hosts:
                raise _Refused(
                    403,
                    f"Host {name or '(none)'!r} is not allowed: a server without an API key "
                    "answers only its own names (add more with --allowed-hosts, or set "
                    "--api-key).",
                    "permission_error",
                    "host_not_allowed",
                )
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise _Refused(
                    415,
                    f"Content-Type {media or '(none)'!r} is not accepted: send the body as "
                    "JSON with 'Content-Type: application/json'.",
                    "invalid_request_error",
                    "unsupported_media_type",
                )

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = _Refused(
            413,
            f"The request body is larger than this server's limit of {limit} bytes.",
            "invalid_request_error"
            if not scope["path"].startswith("/v1/messages")
            else "request_too_large",
            "request_too_large",
        )
        too_large.drain = True
        for key, value in scope["headers"]:
            if key.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    continue  # the HTTP server refuses a malformed length itself
                if length > limit:
                    too_large.drain = length <= DRAIN_BYTES
                    raise too_large
        pieces: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Refused(400, "The client disconnected.", "invalid_request_error", None)
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                pieces.append(chunk)
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise _Refused(
                408,
                f"The request body did not arrive within {self.limits.body_timeout:g} seconds.",
                "invalid_request_error",
                "request_timeout",
            ) from None
        return b"".join(pieces)


def _capped(app, protocol, cap: int):
    async def capped(scope, receive, send):
        if scope["type"] == "http" and (
            len(protocol.connections) > cap or len(protocol.tasks) > cap
        ):
            busy = _Refused(
                503,
                f"The server has its maximum of {cap} connections open; retry shortly.",
                "overloaded_error" if scope["path"].startswith("/v1/messages") else "server_error",
                "too_many_connections",
            )
            return await _answer(scope, send, busy)
        return await app(scope, receive, send)

    return capped


def _replay(body: bytes, receive):
    """A ``receive`` that gives the body read already, then what the client does next."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(
    scope, send, refused: _Refused, drain=None, timeout: float = DEFAULT_BODY_TIMEOUT
) -> None:
    """Send the error; with ``drain`` (the request's receive), read and drop the rest of the
    body, up to DRAIN_BYTES within ``timeout`` seconds, before the response ends."""
    body = json.dumps(
        error_body(scope["path"], refused.status, refused.message, refused.type, refused.code)
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if refused.status in (408, 413):
        headers.append((b"connection", b"close"))
    if refused.status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": drain is not None})
    if drain is None:
        return

    async def drop() -> None:
        size = 0
        while size <= DRAIN_BYTES:
            message = await drain()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drop(), timeout)
    except asyncio.TimeoutError:
        pass
    await send({"type": "http.response.body", "body": b""})


def h11_protocol(header_timeout: float, max_connections: Optional[int] = None) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers take
    more than ``header_timeout`` seconds (counted from the connection, or from the first
    byte of a keep-alive connection's next request): a client that sends its headers a
    byte at a time (slowloris) holds no connection for long. A request that arrives
    while more than ``max_connections`` connections are open (or requests running) gets
    a 503 in the API's error shape, with Retry-After (uvicorn's own cap answers in text).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.limit_concurrency = None  # capped here instead
            if max_connections is not None:
                self.app = _capped(self.app, self, max_connections)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()
            elif self._header_timer is None and self.conn.trailing_data[0]:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol
