"""What the HTTP server costs and what its prefix cache saves.

For each mode, the same requests are run three ways, alternating so that noise
from other work on the machine hits them alike: by the runtime directly in this
process, through the server one at a time, and through the server all at once
(streamed). The server is the installed ``dhara-mlx serve`` in its own process,
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


def direct(tiny, texts: list[str], mode: str, max_tokens: int) -> tuple[float, int]:
    """(seconds, tokens) of the requests run by the runtime, one after another."""
    start, tokens = time.perf_counter(), 0
    for text in texts:
        chunks = list(stream_text(*tiny, text, chat=False, mode=mode, max_tokens=max_tokens))
        tokens += chunks[-1].stats.generated
    return time.perf_counter() - start, tokens


def sequential(url: str, texts: list[str], mode: str, max_tokens: int) -> tuple[float, int]:
    """(seconds, tokens) of the requests sent to the server one after another."""
    start, tokens = time.perf_counter(), 0
    with httpx.Client(base_url=url, timeout=600) as http:
        for text in texts:
            body = {"prompt": text, "mode": mode, "max_tokens": max_tokens}
            tokens += http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
    return time.perf_counter() - start, tokens


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
    requests: int = typer.Option(32, help="requests per mode"),
    max_tokens: int = typer.Option(32, help="tokens per request"),
    rounds: int = typer.Option(3, help="alternating rounds"),
    turns: int = typer.Option(8, help="turns of the chat replay"),
):
    tiny = mlx_lm.load(model)
    texts = prompts(requests)
    rows = {mode: {"direct": [], "sequential": [], "concurrent": []} for mode in MODES}
    first_times, tokens = {}, {}
    with server_process(model, max_tokens) as url:
        for mode in MODES:  # warm-up
            direct(tiny, texts[:2], mode, max_tokens)
            sequential(url, texts[:2], mode, max_tokens)
        for _ in range(rounds):
            for mode in MODES:
                seconds, tokens[mode] = direct(tiny, texts, mode, max_tokens)
                rows[mode]["direct"].append(seconds)
                rows[mode]["sequential"].append(sequential(url, texts, mode, max_tokens)[0])
                wall, first, _ = concurrent(url, texts, mode, max_tokens)
                rows[mode]["concurrent"].append(wall)
                first_times.setdefault(mode, []).extend(first)

    system = "You are a careful assistant who answers briefly. " * 30
    replay = {}
    for cached in (True, False):
        with server_process(
            model, max_tokens, "--prefix-cache" if cached else "--no-prefix-cache"
        ) as url:
            chat_replay(url, system, 2, max_tokens)  # warm-up
            replay[cached] = min(chat_replay(url, system, turns, max_tokens) for _ in range(rounds))

    typer.echo(f"model {model}; {requests} requests x {max_tokens} tokens; median of {rounds}")
    typer.echo(
        f"{'mode':10}{'tokens':>8}{'direct tok/s':>14}{'server seq':>12}{'server all':>12}"
        f"{'seq/direct':>12}{'all/direct':>12}{'p50 first ms':>14}"
    )
    for mode in MODES:
        d, s, c = (statistics.median(rows[mode][k]) for k in ("direct", "sequential", "concurrent"))
        p50 = 1e3 * statistics.median(first_times[mode])
        typer.echo(
            f"{mode:10}{tokens[mode]:8}{tokens[mode] / d:14.0f}{tokens[mode] / s:12.0f}"
            f"{tokens[mode] / c:12.0f}{s / d:12.2f}{c / d:12.2f}{p50:14.0f}"
        )
    (with_cache, cached_tokens), (without, _) = replay[True], replay[False]
    typer.echo(
        f"chat replay, {turns} turns, long system message: {with_cache:.2f} s with the prefix "
        f"cache ({cached_tokens} prompt tokens reused), {without:.2f} s without; "
        f"ratio {with_cache / without:.2f}"
    )


if __name__ == "__main__":
    typer.run(main)
