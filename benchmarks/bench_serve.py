"""What the HTTP server costs, what continuous batching gains, what its prefix cache saves.

For each mode, each request is run by the runtime directly in this process and
then through the server alone, alternating request by request so that noise from
other work on the machine hits both alike; then all of them are streamed to the
server at once. The server is the installed ``dhara-mlx serve`` in its own process,
as it is deployed. Then N AR requests (``--concurrency``, default 1, 8 and 32) are
streamed all at once and the same N one after another, alternating round by
round: aggregate tokens/s of each and their ratio (the batching gain), and time
to first text at the highest N. Then a multi-turn chat with a long system
message is replayed against a server with and without its prefix cache. Ratios
are the numbers to read.

    python benchmarks/bench_serve.py --model tests/fixtures/dhara_tiny_trained
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


def code_prompts(count: int) -> list[str]:
    """Distinct prompts of the kind the trained fixture writes long answers to."""
    return [f"class Record{i}:\n\n    def __init__(self, name, value=None):" for i in range(count)]


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


async def _timed_stream(client, text: str, max_tokens: int, t0: float) -> tuple[float, int]:
    """(seconds from ``t0`` to the first text, completion tokens) of one streamed AR request."""
    stream = await client.completions.create(
        model="bench",
        prompt=text,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mode": "ar"},
    )
    first, tokens = None, 0
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - t0), tokens


def batch_or_queue(url: str, texts: list[str], max_tokens: int, together: bool):
    """(wall seconds, completion tokens, first-text times) of ``texts`` streamed all at
    once, or one after another (each first-text time from the start of all)."""

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
        async with client:
            t0 = time.perf_counter()
            if together:
                results = await asyncio.gather(
                    *(_timed_stream(client, text, max_tokens, t0) for text in texts)
                )
            else:
                results = [await _timed_stream(client, text, max_tokens, t0) for text in texts]
            return time.perf_counter() - t0, sum(r[1] for r in results), [r[0] for r in results]

    return asyncio.run(run())


def concurrency(url: str, levels: list[int], max_tokens: int, rounds: int):
    """Per level: medians of (sequential tok/s, concurrent tok/s, concurrent / sequential),
    and the first-text times of all concurrent rounds."""
    rates = {n: {True: [], False: []} for n in levels}
    first = {n: [] for n in levels}
    batch_or_queue(url, code_prompts(max(levels)), max_tokens, True)  # warm-up
    for _ in range(rounds):
        for n in levels:
            texts = code_prompts(n)
            for together in (False, True):
                wall, tokens, first_times = batch_or_queue(url, texts, max_tokens, together)
                rates[n][together].append(tokens / wall)
                if together:
                    first[n] += first_times
    table = {}
    for n in levels:
        sequential = statistics.median(rates[n][False])
        together = statistics.median(rates[n][True])
        table[n] = (sequential, together, together / sequential)
    return table, first


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method; the value itself for one sample)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


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
    model: str = typer.Option("tests/fixtures/dhara_tiny_trained", help="model directory"),
    requests: int = typer.Option(16, help="requests per mode"),
    max_tokens: int = typer.Option(32, help="tokens per request"),
    rounds: int = typer.Option(3, help="alternating rounds"),
    turns: int = typer.Option(8, help="turns of the chat replay"),
    concurrency_levels: str = typer.Option(
        "1,8,32", "--concurrency", help="numbers of simultaneous AR requests, comma-separated"
    ),
):
    levels = [int(n) for n in concurrency_levels.split(",")]
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
        batching, batch_first = concurrency(url, levels, max_tokens, rounds)

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
    typer.echo(f"AR, N requests at once vs one after another ({max_tokens} tokens each)")
    typer.echo(f"{'N':>4}{'one by one tok/s':>18}{'at once tok/s':>15}{'at once / one by one':>22}")
    for n, (one_by_one, at_once, ratio) in batching.items():
        typer.echo(f"{n:4d}{one_by_one:18.1f}{at_once:15.1f}{ratio:22.2f}")
    widest = max(levels)
    typer.echo(
        f"first text, {widest} at once: p50 {1e3 * percentile(batch_first[widest], 50):.0f} ms, "
        f"p95 {1e3 * percentile(batch_first[widest], 95):.0f} ms"
    )
    (with_cache, cached_tokens), (without, _) = replay[True], replay[False]
    typer.echo(
        f"chat replay, {turns} turns, long system message: {with_cache:.2f} s with the prefix "
        f"cache ({cached_tokens} prompt tokens reused), {without:.2f} s without; "
        f"ratio {with_cache / without:.2f}"
    )


if __name__ == "__main__":
    typer.run(main)
