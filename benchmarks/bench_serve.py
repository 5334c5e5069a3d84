"""What the HTTP server costs and what its prefix cache saves.

For each mode, each request is run by the runtime directly in this process and
then through the server alone, alternating request by request so that noise from
other work on the machine hits both alike; then all of them are streamed to the
server at once. The server is the installed ``dhara-mlx serve`` in its own process,
as it is deployed. Then a multi-turn chat with a long system message is replayed
against a server with and without its prefix cache. Ratios are the numbers to
read; with a tiny model they show the server's own overhead.

    python benchmarks/bench_serve.py --model tests/fixtures/golden_tiny
"""

import asyncio
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlx_lm
import openai
import typer

from optiq_dhara.runtime import stream_text

MODES = ("ar", "diffusion", "spec")


def prompts(count: int) -> list[str]:
    return [
        f"Request {i}: tell me something about the number {i * 37 % 101}." for i in range(count)
    ]


@contextmanager
def server_process(model: str, max_tokens: int, *flags: str):
    """``dhara-mlx serve`` on a free loopback port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [Path(sys.executable).parent / "dhara-mlx", "serve", "-m", model, "--port", str(port)]
    command += ["--max-tokens", str(max_tokens), "--max-context", "65536", "--log-level", "warning"]
    process = subprocess.Popen([*command, *flags], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(f"{url}/health").raise_for_status()
                break
            except httpx.TransportError:
                if process.poll() is not None:
                    raise RuntimeError("dhara-mlx serve exited") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait()


def direct(tiny, text: str, mode: str, max_tokens: int) -> float:
    """Seconds of one request run by the runtime in this process."""
    start = time.perf_counter()
    list(stream_text(*tiny, text, chat=False, mode=mode, max_tokens=max_tokens))
    return time.perf_counter() - start


def sequential(http: httpx.Client, text: str, mode: str, max_tokens: int) -> float:
    """Seconds of one request sent to the server alone."""
    start = time.perf_counter()
    body = {"prompt": text, "mode": mode, "max_tokens": max_tokens}
    http.post("/v1/completions", json=body).raise_for_status()
    return time.perf_counter() - start


async def _one_stream(client, text: str, mode: str, max_tokens: int, t0: float):
    stream = await client.completions.create(
        model="bench", prompt=text, max_tokens=max_tokens, stream=True, extra_body={"mode": mode}
    )
    first = None
    async for chunk in stream:
        if first is None and chunk.choices[0].text:
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


def concurrent(url: str, texts: list[str], mode: str, max_tokens: int):
    """(wall seconds, first-text times, finish times) of all requests streamed at once."""

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
        async with client:
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(_one_stream(client, text, mode, max_tokens, t0) for text in texts)
            )
            return time.perf_counter() - t0, [r[0] for r in results], [r[1] for r in results]

    return asyncio.run(run())


def chat_replay(url: str, system: str, turns: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, cached prompt tokens) of a multi-turn chat, each turn resending the history."""
    messages = [{"role": "system", "content": system}]
    start, cached = time.perf_counter(), 0
    with httpx.Client(base_url=url, timeout=600) as http:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Question {turn}: and then?"})
            body = {"messages": messages, "max_tokens": max_tokens, "mode": "spec"}
            reply = http.post("/v1/chat/completions", json=body).json()
            cached += reply["usage"]["prompt_tokens_details"]["cached_tokens"]
            messages.append(reply["choices"][0]["message"])
    return time.perf_counter() - start, cached


def main(
    model: str = typer.Option("tests/fixtures/golden_tiny", help="model directory"),
    requests: int = typer.Option(16, help="requests per mode"),
    max_tokens: int = typer.Option(32, help="tokens per request"),
    rounds: int = typer.Option(3, help="alternating rounds"),
    turns: int = typer.Option(8, help="turns of the chat replay"),
):
    tiny = mlx_lm.load(model)
    texts = prompts(requests)
    alone = {mode: [] for mode in MODES}  # (direct, server) seconds of each request
    together = {mode: [] for mode in MODES}  # all-at-once wall / sum of direct, per round
    first = {mode: [] for mode in MODES}
    with server_process(model, max_tokens) as url, httpx.Client(base_url=url, timeout=600) as http:
        for mode in MODES:  # warm-up
            direct(tiny, texts[0], mode, max_tokens)
            sequential(http, texts[0], mode, max_tokens)
        for _ in range(rounds):
            for mode in MODES:
                pairs = [
                    (direct(tiny, t, mode, max_tokens), sequential(http, t, mode, max_tokens))
                    for t in texts
                ]
                alone[mode] += pairs
                wall, first_times, _ = concurrent(url, texts, mode, max_tokens)
                together[mode].append(wall / sum(d for d, _ in pairs))
                first[mode] += first_times

    system = "You are a careful assistant who answers briefly. " * 30
    replay = {}
    for cached in (True, False):
        flag = "--prefix-cache" if cached else "--no-prefix-cache"
        with server_process(model, max_tokens, flag) as url:
            chat_replay(url, system, 2, max_tokens)  # warm-up
            replay[cached] = min(chat_replay(url, system, turns, max_tokens) for _ in range(rounds))

    typer.echo(f"model {model}; {requests} requests x {max_tokens} tokens x {rounds} rounds")
    typer.echo(
        f"{'mode':10}{'direct ms':>11}{'server ms':>11}{'server/direct':>15}"
        f"{'all at once/direct':>20}{'p50 first ms (all at once)':>28}"
    )
    for mode in MODES:
        d = statistics.median(p[0] for p in alone[mode])
        s = statistics.median(p[1] for p in alone[mode])
        ratio = statistics.median(p[1] / p[0] for p in alone[mode])
        typer.echo(
            f"{mode:10}{1e3 * d:11.1f}{1e3 * s:11.1f}{ratio:15.2f}"
            f"{statistics.median(together[mode]):20.2f}{1e3 * statistics.median(first[mode]):28.0f}"
        )
    (with_cache, cached_tokens), (without, _) = replay[True], replay[False]
    typer.echo(
        f"chat replay, {turns} turns, long system message: {with_cache:.2f} s with the prefix "
        f"cache ({cached_tokens} prompt tokens reused), {without:.2f} s without; "
        f"ratio {with_cache / without:.2f}"
    )


if __name__ == "__main__":
    typer.run(main)
