"""dhara against mlx-lm's own llama of the same dimensions.

Batch-1 decode time per token, prefill tokens/s and peak memory, both models
built in this one process from random weights in float32. Runs alternate
between the two models so that noise from other work on the machine hits both
alike; the ratio dhara / llama is the number to read.

    python benchmarks/bench_model.py --shape small
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/bench_model.py --shape 250m
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import typer
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


def decode_seconds(model: nn.Module, context: int, steps: int) -> float:
    """Median seconds per decoded token after a ``context``-token prompt."""
    cache = make_prompt_cache(model)
    prompt = mx.random.randint(0, model.args.vocab_size, (1, context))
    token = mx.argmax(model(prompt, cache=cache)[:, -1], axis=-1)
    mx.eval(token)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        times.append(time.perf_counter() - start)
    return min(times)


def prefill_seconds(model: nn.Module, length: int) -> float:
    """Seconds for one cached forward over ``length`` tokens."""
    cache = make_prompt_cache(model)
    prompt = mx.random.randint(0, model.args.vocab_size, (1, length))
    mx.eval(prompt)
    start = time.perf_counter()
    mx.eval(model(prompt, cache=cache)[:, -1])
    return time.perf_counter() - start


def peak_bytes(run: Callable[[], float]) -> int:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    run()
    return mx.get_peak_memory()


def canon_bytes_per_token(args: dhara.ModelArgs, itemsize: int) -> tuple[int, int]:
    """(canon history, KV) bytes per token, all layers, as the cache stores them."""
    q = args.num_attention_heads * args.head_dim
    kv = args.num_key_value_heads * args.head_dim
    widths = {"A": args.hidden_size, "B": q + 2 * kv, "C": args.hidden_size}
    widths["D"] = args.intermediate_size
    canon = sum(widths[site] for site in args.canon_set)
    layers = args.num_hidden_layers
    return layers * canon * itemsize, layers * 2 * kv * itemsize


def main(
    shape: str = typer.Option("small", help=f"one of {', '.join(SHAPES)}"),
    rounds: int = typer.Option(3, help="alternating rounds per model"),
    steps: int = typer.Option(32, help="decode steps per round"),
    context: int = typer.Option(64, help="prompt tokens before decoding"),
    prefill: int = typer.Option(512, help="prefill length"),
):
    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    models = build_pair(SHAPES[shape])
    decode = {name: [] for name in models}
    fill = {name: [] for name in models}
    for name, model in models.items():  # warm-up: compile and allocate once
        decode_seconds(model, context, 2)
    for _ in range(rounds):
        for name, model in models.items():
            decode[name].append(decode_seconds(model, context, steps))
            fill[name].append(prefill_seconds(model, prefill))
    peaks = {
        name: peak_bytes(lambda m=model: decode_seconds(m, prefill, 4))
        for name, model in models.items()
    }
    typer.echo(f"shape {shape}: {SHAPES[shape]}, float32, default device {mx.default_device()}")
    typer.echo(f"{'model':8}{'decode ms/token':>18}{'prefill tok/s':>16}{'peak MB':>10}")
    for name in models:
        ms = 1e3 * statistics.median(decode[name])
        tps = prefill / statistics.median(fill[name])
        typer.echo(f"{name:8}{ms:18.2f}{tps:16.0f}{peaks[name] / 1e6:10.0f}")
    ratio = statistics.median(decode["dhara"]) / statistics.median(decode["llama"])
    fill_ratio = statistics.median(fill["dhara"]) / statistics.median(fill["llama"])
    typer.echo(f"decode time ratio dhara/llama: {ratio:.3f}")
    typer.echo(f"prefill time ratio dhara/llama: {fill_ratio:.3f}")
    canon, kv = canon_bytes_per_token(models["dhara"].args, 4)
    typer.echo(
        f"cache bytes per token (float32): canon history {canon}, KV {kv}, "
        f"canon/KV {canon / kv:.2f}"
    )


if __name__ == "__main__":
    typer.run(main)
