"""The server against hostile and careless clients: body size and read time, Host and
Content-Type checks, input that used to crash it, a fuzz of bodies, and shutdown.

The real server on a loopback port with the golden tiny model, as in test_serve.py.
"""

import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import mlx_lm
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import HELLO, WEATHER, bodies, error_of

from optiq_dhara.serve.app import ServerConfig, background_server, create_app
from optiq_dhara.serve.engine import ShuttingDown, Worker
from optiq_dhara.serve.limits import allowed_hosts, host_name

KEY = "hardening-key"
JSON = {"Content-Type": "application/json"}
LIMIT = 1 << 20  # the body limit of these servers: 1 MiB


@pytest.fixture(scope="module")
def load(golden_dir):
    return lambda: mlx_lm.load(str(golden_dir))


def serve(load, **config):
    """A worker and server (keyless unless api_key is given), as a context manager."""

    class Running:
        def __enter__(self):
            self.engine = Worker(load).start()
            options = dict(max_tokens=4, max_context=1024, max_body_bytes=LIMIT, body_timeout=1.0)
            options.update(config)
            self.server = background_server(
                create_app(self.engine, ServerConfig("tiny", **options))
            )
            url = self.server.__enter__()
            return SimpleNamespace(url=url, engine=self.engine)

        def __exit__(self, *exc):
            self.server.__exit__(*exc)
            self.engine.close()

    return Running()


@pytest.fixture(scope="module")
def keyless(load):
    with serve(load) as running:
        yield running


@pytest.fixture(scope="module")
def keyed(load):
    with serve(load, api_key=KEY) as running:
        yield running


def post(url, body, headers=JSON, **options):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url, content=content, headers=headers, timeout=60, **options)


def test_a_huge_body_is_refused_while_health_answers(keyless):
    """20 MB: a 413 from Content-Length alone; /health answers meanwhile, within 2 s."""
    huge = json.dumps({"prompt": "word " * 4_000_000}).encode()
    assert len(huge) > 20_000_000
    result = {}

    def send():
        try:
            result["response"] = post(f"{keyless.url}/v1/completions", huge)
        except httpx.HTTPError as exc:  # the server may close before the client is done writing
            result["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    started = time.monotonic()
    health = httpx.get(f"{keyless.url}/health", timeout=2)
    assert health.status_code == 200 and time.monotonic() - started < 2
    sender.join(30)
    assert not sender.is_alive()
    assert "response" in result, result.get("error")
    assert result["response"].status_code == 413
    assert error_of(result["response"])["code"] == "request_too_large"


def test_a_body_without_length_is_counted_as_it_comes(keyless):
    def pieces():
        for _ in range(64):
            yield b" " * 65536  # 4 MiB in all, no Content-Length (chunked)

    response = httpx.post(
        f"{keyless.url}/v1/completions", content=pieces(), headers=JSON, timeout=30
    )
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    assert httpx.get(f"{keyless.url}/health").status_code == 200


def test_a_body_just_under_the_limit_is_read(keyless):
    body = json.dumps({"prompt": "x", "pad": " " * (LIMIT - 100)})
    response = post(f"{keyless.url}/v1/completions", body)
    assert response.status_code == 200, response.text


def test_a_slow_body_gets_408(keyless):
    host, port = keyless.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt": '
        )
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - started < 5
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_slow_headers_are_cut_off_and_connections_are_capped(load):
    engine = Worker(load).start()
    app = create_app(engine, ServerConfig("tiny", max_tokens=2, max_context=1024))
    try:
        with background_server(app, max_connections=3, header_timeout=0.5) as url:
            host, port = url.removeprefix("http://").split(":")
            slow = socket.create_connection((host, int(port)), timeout=10)
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
            idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
            busy = httpx.get(f"{url}/health", timeout=10)  # 4 connections open, cap 3
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert error_of(busy)["code"] == "too_many_connections"
            started = time.monotonic()
            assert slow.recv(100) == b""  # closed by the server
            assert time.monotonic() - started < 2
            for sock in [slow, *idle]:
                sock.close()
            time.sleep(0.1)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        engine.close()


def test_without_a_key_only_local_hosts_are_answered(keyless, keyed):
    for path in ("/health", "/v1/models"):
        response = httpx.get(f"{keyless.url}{path}", headers={"Host": "evil.example:8080"})
        assert response.status_code == 403
        assert error_of(response)["code"] == "host_not_allowed"
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80", "LOCALHOST"):
        assert httpx.get(f"{keyless.url}/health", headers={"Host": host}).status_code == 200
    # with a key the key is the defence: any Host is answered
    headers = {"Host": "evil.example", "Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed.url}/v1/models", headers=headers).status_code == 200


def test_allowed_hosts_extend_the_list():
    hosts = allowed_hosts("0.0.0.0", ["box.lan", "fe80::1"])
    assert {"localhost", "127.0.0.1", "[::1]", "0.0.0.0", "box.lan", "[fe80::1]"} <= hosts
    assert host_name("[::1]:8080") == "[::1]" and host_name("Box.LAN:80") == "box.lan"
    assert host_name("::1") == "::1"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_json_bodies_are_taken(keyless, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = post(f"{keyless.url}/v1/completions", {"prompt": "x"}, headers=headers)
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"
    ok = post(
        f"{keyless.url}/v1/completions",
        {"prompt": "x"},
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_a_lone_surrogate_is_a_400(keyless):
    for path, body in [
        ("/v1/completions", '{"prompt": "a\\ud800b"}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ]:
        response = post(f"{keyless.url}{path}", body)
        assert response.status_code == 400, response.text
        assert error_of(response)["code"] == "invalid_json"


def test_a_300_deep_tool_schema_is_a_400(keyless):
    schema: dict = {"type": "string"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"x": schema}}
    tool = {"type": "function", "function": {"name": "deep", "parameters": schema}}
    body = {"messages": HELLO, "tools": [tool]}
    response = post(f"{keyless.url}/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"
    ok = post(f"{keyless.url}/v1/chat/completions", {"messages": HELLO, "tools": [WEATHER]})
    assert ok.status_code == 200


def _paths(url) -> list[str]:
    paths = ["/v1/chat/completions", "/v1/completions"]
    probe = httpx.post(f"{url}/v1/messages", content=b"{}", headers=JSON, timeout=30)
    if probe.status_code != 404:  # the Anthropic API, when the server has it
        paths.append("/v1/messages")
    return paths


@pytest.fixture(scope="module")
def fuzz_paths(keyless):
    return _paths(keyless.url)


anthropic = st.fixed_dictionaries(
    {
        "model": st.just("tiny"),
        "max_tokens": st.integers(-1, 6),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant", "system"]),
                    "content": st.text(max_size=12),
                }
            ),
            max_size=3,
        ),
    },
    optional={
        "system": st.text(max_size=10),
        "stream": st.booleans(),
        "stop_sequences": st.lists(st.text(max_size=3), max_size=2),
    },
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_300_fuzzed_bodies_never_get_a_5xx(keyless, fuzz_paths, data):
    path = data.draw(st.sampled_from(fuzz_paths))
    body = data.draw(anthropic | bodies() if path == "/v1/messages" else bodies())
    response = post(f"{keyless.url}{path}", body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "error" in response.json()


def test_the_server_is_up_after_the_fuzz(keyless):
    assert httpx.get(f"{keyless.url}/health").json()["status"] == "ok"
    assert post(f"{keyless.url}/v1/chat/completions", {"messages": HELLO}).status_code == 200


def test_close_with_a_deadline_ends_running_requests(load, monkeypatch):
    """A request that would run for long gets an error when close's deadline passes."""
    import optiq_dhara.serve.engine as engine_module

    step = engine_module.Engine.step

    def slow(engine):
        time.sleep(0.05)
        return step(engine)

    monkeypatch.setattr(engine_module.Engine, "step", slow)
    with serve(load, max_tokens=900) as running:
        results = {}

        def stream():
            with httpx.stream(
                "POST",
                f"{running.url}/v1/completions",
                json={"prompt": "Once", "max_tokens": 900, "stream": True, "mode": "ar"},
                timeout=60,
            ) as reply:
                results["status"] = reply.status_code
                results["lines"] = [line for line in reply.iter_lines() if line]

        client = threading.Thread(target=stream)
        client.start()
        deadline = time.monotonic() + 10
        while running.engine.running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        assert running.engine.close(timeout=0.5)
        assert time.monotonic() - started < 2
        client.join(10)
        assert results["status"] == 200
        assert '"error"' in results["lines"][-1]
        assert "shutting down" in results["lines"][-1]
        assert not running.engine.alive
        # a request after the close gets a 503 in the error shape, not a 500
        late = post(f"{running.url}/v1/completions", {"prompt": "x"})
        assert late.status_code == 503 and error_of(late)["type"] == "server_error"
    assert issubclass(ShuttingDown, RuntimeError)


RUN_SERVER = """
import sys, time, mlx_lm
import optiq_dhara.serve.engine as engine_module
from optiq_dhara.serve.app import run_server

step = engine_module.Engine.step


def slow(engine):
    time.sleep(0.05)
    return step(engine)


engine_module.Engine.step = slow
run_server(lambda: mlx_lm.load(sys.argv[1]), model_id="tiny", port=int(sys.argv[2]),
           max_context=2048, shutdown_timeout=1.0, log_level="warning")
"""


def test_ctrl_c_stops_the_server_within_its_deadline(golden_dir, tmp_path):
    """run_server on SIGINT: the running stream gets an error chunk, the process exits."""
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    script = tmp_path / "serve.py"
    script.write_text(RUN_SERVER)
    process = subprocess.Popen(
        [sys.executable, str(script), str(golden_dir), str(port)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        body = {"prompt": "Once", "max_tokens": 1500, "stream": True, "mode": "ar"}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is running
            process.send_signal(signal.SIGINT)
            started = time.monotonic()
            rest = [line for line in lines if line]
        assert process.wait(timeout=10) in (0, -signal.SIGINT)  # uvicorn re-raises the signal
        assert time.monotonic() - started < 5
        assert '"error"' in rest[-1] and "shutting down" in rest[-1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
