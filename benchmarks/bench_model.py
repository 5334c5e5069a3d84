"""dhara against mlx-lm's own llama of the same dimensions.

Batch-1 decode time per token, prefill tokens/s and peak memory, both models
built in this one process from random weights in float32. The two models decode
in lockstep, one step each in turn, so that other work on the machine slows
both alike; the ratio dhara / llama is the number to read.

    python benchmarks/bench_model.py --shape small
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/bench_model.py --shape 250m
"""

import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import typer
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from optiq_dhara import model as dhara


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


SHAPES = {
    "250m": Shape(768, 32, 12, 4, 2176, 49155),
    "small": Shape(256, 8, 4, 2, 704, 4096),
}


def build_pair(shape: Shape) -> dict[str, nn.Module]:
    """A dhara model and a llama with the same dimensions, random float32 weights."""
    common = dict(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        rms_norm_eps=1e-6,
        rope_theta=8_000_000.0,
        tie_word_embeddings=True,
    )
    models = {
        "dhara": dhara.Model(dhara.ModelArgs(mask_token_id=0, **common)),
        "llama": llama.Model(llama.ModelArgs(model_type="llama", **common)),
    }
    for model in models.values():
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    return models


def decode_in_lockstep(models: dict[str, nn.Module], context: int, steps: int) -> dict[str, list]:
    """Seconds of each decode step of each model after a ``context``-token prompt."""
    state = {}
    for name, model in models.items():
        cache = make_prompt_cache(model)
        prompt = mx.random.randint(0, model.args.vocab_size, (1, context), key=mx.random.key(0))
        token = mx.argmax(model(prompt, cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        state[name] = (cache, token)
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            cache, token = state[name]
            start = time.perf_counter()
            token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(token)
            times[name].append(time.perf_counter() - start)
            state[name] = (cache, token)
    return times


def prefill_seconds(model: nn.Module, length: int) -> float:
    """Seconds for one cached forward over ``length`` tokens."""
    cache = make_prompt_cache(model)
    prompt = mx.random.randint(0, model.args.vocab_size, (1, length), key=mx.random.key(1))
    mx.eval(prompt)
    start = time.perf_counter()
    mx.eval(model(prompt, cache=cache)[:, -1])
    return time.perf_counter() - start


def peak_bytes(model: nn.Module, length: int, steps: int) -> int:
    """Peak memory of a ``length``-token prefill and ``steps`` decode steps (weights included)."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    decode_in_lockstep({"model": model}, length, steps)
    return mx.get_peak_memory()


def main(
    shape: str = typer.Option("small", help=f"one of {', '.join(SHAPES)}"),
    steps: int = typer.Option(64, help="decode steps per model, in lockstep"),
    context: int = typer.Option(64, help="prompt tokens before decoding"),
    prefill: int = typer.Option(512, help="prefill length"),
    rounds: int = typer.Option(3, help="prefill measurements per model, alternating"),
):
    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    models = build_pair(SHAPES[shape])
    decode_in_lockstep(models, context, 2)  # warm-up: compile and allocate once
    decode = decode_in_lockstep(models, context, steps)
    fill = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            fill[name].append(prefill_seconds(model, prefill))
    peaks = {name: peak_bytes(model, prefill, 4) for name, model in models.items()}
    weights = {
        name: sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        for name, model in models.items()
    }

    typer.echo(f"shape {shape}: {SHAPES[shape]}, float32, {mx.default_device()}")
    header = ("decode ms/token", 18), ("prefill tok/s", 16), ("peak MB", 10), ("weights MB", 12)
    typer.echo(f"{'model':8}" + "".join(f"{title:>{width}}" for title, width in header))
    for name in models:
        ms = 1e3 * statistics.median(decode[name])
        tps = prefill / statistics.median(fill[name])
        peak, size = peaks[name] / 1e6, weights[name] / 1e6
        typer.echo(f"{name:8}{ms:18.2f}{tps:16.0f}{peak:10.0f}{size:12.0f}")
    paired = [d / ll for d, ll in zip(decode["dhara"], decode["llama"])]
    ratio = statistics.median(decode["dhara"]) / statistics.median(decode["llama"])
    typer.echo(
        f"decode time dhara/llama: {ratio:.3f} "
        f"(median of paired steps {statistics.median(paired):.3f})"
    )
    fill_ratio = statistics.median(fill["dhara"]) / statistics.median(fill["llama"])
    typer.echo(f"prefill time dhara/llama: {fill_ratio:.3f}")
    typer.echo("cache bytes per token: benchmarks/bench_step.py --sections memory")


if __name__ == "__main__":
    typer.run(main)
