"""Whether streaming text slows down as the reply grows.

Feeds one-token steps (the README and the text module, tokenized by the trained
fixture's tokenizer and repeated) to the old method, which decodes the whole
reply again at every step, and to ``TextStream``. Prints the median rate of the
first and the last steps; a ratio near 1 means the work per step does not grow.
No model runs: this is the text layer alone. With ``--model`` it also streams a
long reply end to end (``stream_text``, AR, greedy) and compares the token rate
of its first and last tokens, which also counts the model's growing attention.

    python benchmarks/bench_text.py
    python benchmarks/bench_text.py --model tests/fixtures/golden_tiny
"""

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import typer
from mlx_lm.utils import load_tokenizer

from optiq_dhara.runtime import Stats, Step, stream_text
from optiq_dhara.runtime.text import TextStream, stop_token_ids

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "dhara_tiny_trained"
STOP = ["</answer>"]  # never in the text: searched at every step, never found


def old_stream(tokenizer) -> Callable[[Step], str]:
    """The method before ``TextStream``: decode every token so far, then look for stops."""
    stop_ids = stop_token_ids(tokenizer)
    tokens: list[int] = []
    sent = 0

    def held_back(text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in STOP:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return held

    def feed(step: Step) -> str:
        nonlocal sent
        tokens.extend(t for t in step.tokens if t not in stop_ids)
        text = tokenizer.decode(tokens)
        hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in STOP) if i >= 0]
        if hits:
            end = min(hits)
        elif step.stats.finish_reason:
            end = len(text)
        else:
            end = len(text) - held_back(text)
        piece, sent = text[sent:end], max(sent, end)
        return piece

    return feed


def new_stream(tokenizer) -> Callable[[Step], str]:
    stream = TextStream(tokenizer, stop=STOP)

    def feed(step: Step) -> str:
        chunk = stream.feed(step)
        return chunk.text if chunk else ""

    return feed


def step_seconds(make: Callable, tokenizer, ids: list[int]) -> tuple[list[float], str]:
    """Seconds of each one-token step (the last one ends the run), and the text streamed."""
    feed, seconds, text = make(tokenizer), [], ""
    for i, token in enumerate(ids):
        step = Step([token], Stats("ar", finish_reason="length" if i == len(ids) - 1 else None))
        start = time.perf_counter()
        text += feed(step)
        seconds.append(time.perf_counter() - start)
    return seconds, text


def end_to_end(model_path: Path, steps: int, window: int, rounds: int) -> None:
    """Tokens/s of the first and the last ``window`` tokens of a long streamed reply
    (after a warm-up run; the median over ``rounds`` replies)."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_path))

    def token_times() -> list[float]:
        times, start = [], time.perf_counter()
        for chunk in stream_text(model, tokenizer, "def main():", chat=False, max_tokens=steps):
            times += [time.perf_counter() - start] * len(chunk.tokens)
        return times

    token_times()
    runs = [token_times() for _ in range(rounds)]
    if min(len(t) for t in runs) < 2 * window + 1:
        raise SystemExit("a reply ended before 2 x window tokens; use another model")
    first = statistics.median(window / (t[window] - t[0]) for t in runs)
    last = statistics.median(window / (t[-1] - t[-window - 1]) for t in runs)
    typer.echo(
        f"{model_path.name}: {len(runs[0])} streamed tokens, median of {rounds}; first {window}: "
        f"{first:.0f} tok/s, last {window}: {last:.0f} tok/s, last/first {last / first:.2f}"
    )


def main(
    steps: int = 1200,
    window: int = 200,
    rounds: int = 15,
    model: Path = typer.Option(None, help="Also stream a reply of --steps tokens end to end."),
) -> None:
    tokenizer = load_tokenizer(TOKENIZER)
    source = (ROOT / "README.md").read_text() + (ROOT / "runtime" / "text.py").read_text()
    ids = tokenizer.encode(source, add_special_tokens=False)
    ids = (ids * (steps // len(ids) + 1))[:steps]
    methods = {"old decode": old_stream, "TextStream": new_stream}
    runs = {name: [] for name in methods}
    for _ in range(rounds):  # alternating, so that noise from other work hits both alike
        for name, make in methods.items():
            runs[name].append(step_seconds(make, tokenizer, ids))
    if len({text for done in runs.values() for _, text in done}) != 1:
        raise SystemExit("the two methods streamed different text")
    typer.echo(
        f"{steps} one-token steps ({len(tokenizer.decode(ids))} characters), {rounds} rounds"
    )
    typer.echo(f"{'method':12}{'first steps/s':>15}{'last steps/s':>15}{'last/first':>12}")
    for name, done in runs.items():
        first = statistics.median(window / sum(s[:window]) for s, _ in done)
        last = statistics.median(window / sum(s[-window:]) for s, _ in done)
        typer.echo(f"{name:12}{first:15.0f}{last:15.0f}{last / first:12.2f}")
    if model is not None:
        end_to_end(model, steps, window, rounds)


if __name__ == "__main__":
    typer.run(main)
