"""Aggregate decoding throughput of the batched engine at 1, 8 and 32 concurrent requests.

Every mode runs ``concurrency`` requests at once through ``generate_batch`` (the
engine the server drives) and reports generated tokens over wall time, prefill
included, and the ratio to the same mode at batch 1. The AR anchor is mlx-lm's
``BatchGenerator`` on its llama of the same widths and depth (random weights),
run on the same prompts in the same process. With ``--repeats R`` the runs take
turns R times and each keeps its fastest (for a shared, noisy machine).
``--bare`` also times one decode forward alone (no sampling, no engine) of
dhara on the engine's cache and of llama on its own, in lockstep, graph build
and evaluation apart: what the model itself costs at each batch size.

    python benchmarks/bench_batch.py --model tests/fixtures/dhara_tiny_trained
    python benchmarks/bench_batch.py --shape 250m --layers 8
"""

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import typer
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama

import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)
from optiq_dhara.runtime import generate_batch
from optiq_dhara.runtime.bench import make_prompt, random_model

MODES = ("ar", "spec", "diffusion")


def llama_like(model, seed: int = 0) -> llama.Model:
    """mlx-lm's llama with dhara's widths, depth and vocabulary (random weights)."""
    a = model.args
    mx.random.seed(seed)
    twin = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=a.hidden_size,
            num_hidden_layers=a.num_hidden_layers,
            intermediate_size=a.intermediate_size,
            num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_key_value_heads,
            head_dim=a.head_dim,
            rms_norm_eps=a.rms_norm_eps,
            vocab_size=a.vocab_size,
            rope_theta=a.rope_theta,
            tie_word_embeddings=True,
        )
    )
    dtype = model.model.embed_tokens.weight.dtype
    twin.update(tree_unflatten([(k, v.astype(dtype)) for k, v in tree_flatten(twin.parameters())]))
    mx.eval(twin.parameters())
    return twin


def timed_engine(model, prompts, mode: str, max_tokens: int, **options) -> tuple[int, float]:
    start = time.perf_counter()
    outputs = generate_batch(model, prompts, mode=mode, max_tokens=max_tokens, **options)
    return sum(len(o) for o in outputs), time.perf_counter() - start


def timed_batch_generator(twin, prompts, max_tokens: int) -> tuple[int, float]:
    """Tokens generated and seconds taken by mlx-lm's BatchGenerator on any mlx-lm model."""
    start = time.perf_counter()
    generator = BatchGenerator(twin, max_tokens=max_tokens, completion_batch_size=len(prompts))
    generator.insert(prompts, [max_tokens] * len(prompts))
    generated = 0
    while responses := generator.next_generated():
        generated += len(responses)
    generator.close()
    return generated, time.perf_counter() - start


def bare_step(model, twin, rows: int, context: int, steps: int = 20) -> dict:
    """Median ms to build and to evaluate one batched decode forward, dhara vs llama."""
    from mlx_lm.models.cache import make_prompt_cache

    from optiq_dhara.runtime.engine import run_rows
    from optiq_dhara.slot_cache import SlotCache

    cache = SlotCache(model, rows)
    run_rows(model, cache, mx.array([[3] * context] * rows), [context] * rows, [1] * rows)
    cache.commit([context] * rows)
    llama_cache = make_prompt_cache(twin)
    twin(mx.array([[3] * context] * rows), cache=llama_cache)
    mx.eval(cache.state(), [c.state for c in llama_cache])
    tokens = mx.array([[5]] * rows)

    def dhara_forward():
        hidden = run_rows(model, cache, tokens, [1] * rows, [1] * rows)
        cache.commit([n + 1 for n in cache.lengths])
        return model.head(hidden[:, -1])

    times = {name: ([], []) for name in ("dhara", "llama")}
    for _ in range(steps):
        for name, forward in (
            ("dhara", dhara_forward),
            ("llama", lambda: twin(tokens, cache=llama_cache)[:, -1]),
        ):
            start = time.perf_counter()
            logits = forward()
            built = time.perf_counter()
            mx.eval(logits)
            times[name][0].append(built - start)
            times[name][1].append(time.perf_counter() - built)
    return {
        f"{name}_{part}_ms": statistics.median(xs[i]) * 1000
        for name, xs in times.items()
        for i, part in enumerate(("build", "eval"))
    }


def main(
    model_path: Optional[Path] = typer.Option(None, "--model", help="A dhara checkpoint."),
    shape: str = typer.Option("250m", help="Without --model: a random dhara of this shape."),
    layers: Optional[int] = typer.Option(None, help="Override the depth of the random shape."),
    concurrency: str = typer.Option("1,8,32", help="Requests at once, comma-separated."),
    prompt_len: int = typer.Option(64, help="Prompt tokens of each request."),
    max_tokens: int = typer.Option(64, help="Tokens generated by each request."),
    block_len: int = typer.Option(32),
    threshold: float = typer.Option(0.5),
    k: int = typer.Option(8),
    repeats: int = typer.Option(1, help="Runs of each, taking turns; the fastest is kept."),
    bare: bool = typer.Option(False, help="Also time a bare decode forward, dhara vs llama."),
    throughput: bool = typer.Option(True, help="Time the engine and BatchGenerator runs."),
    output: Optional[Path] = typer.Option(None, help="Also write the rows as JSON here."),
) -> None:
    if model_path is not None:
        from mlx_lm import load

        model, tokenizer = load(str(model_path))
        text = (
            "class Record:\n\n    def __init__(self, name, value=None):\n        self.name = name\n"
        )
        text_ids = tokenizer.encode(text * 8)
        name = model_path.name
    else:
        overrides = {} if layers is None else {"num_hidden_layers": layers}
        if shape != "250m":
            raise typer.BadParameter(f"unknown shape {shape!r}; only '250m' is built in.")
        model, text_ids = random_model(**overrides), None
        name = f"dhara-250m shape, {model.args.num_hidden_layers} layers, random"
    twin = llama_like(model)
    counts = [int(c) for c in concurrency.split(",")]
    options = dict(block_len=block_len, threshold=threshold, k=k)
    rows = []
    warm = [make_prompt(model, prompt_len, 0, text_ids)] * 2
    for mode in MODES:
        timed_engine(model, warm, mode, 4, **options)
    timed_batch_generator(twin, warm, 4)
    for count in counts if throughput else []:
        prompts = [
            make_prompt(model, prompt_len, seed, text_ids[seed:] if text_ids else None)
            for seed in range(count)
        ]
        best: dict[str, tuple[int, float]] = {}
        for _ in range(repeats):
            runs = {"llama": timed_batch_generator(twin, prompts, max_tokens)}
            for mode in MODES:
                runs[mode] = timed_engine(model, prompts, mode, max_tokens, **options)
            for run, (tokens, seconds) in runs.items():
                if run not in best or seconds < best[run][1]:
                    best[run] = (tokens, seconds)
        llama_tokens, llama_seconds = best["llama"]
        for mode in MODES:
            tokens, seconds = best[mode]
            rows.append(
                dict(
                    model=name,
                    mode=mode,
                    concurrency=count,
                    tokens=tokens,
                    seconds=seconds,
                    tokens_per_second=tokens / seconds,
                    llama_tokens_per_second=llama_tokens / llama_seconds,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    base = {r["mode"]: r["tokens_per_second"] for r in rows if r["concurrency"] == counts[0]}
    print(f"\n{name}; prompt {prompt_len}, {max_tokens} tokens each")
    if rows:
        print("| mode | requests | tok/s | vs first | llama BatchGenerator tok/s | dhara / llama |")
        print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["tokens_per_second"] / r["llama_tokens_per_second"]
        print(
            f"| {r['mode']} | {r['concurrency']} | {r['tokens_per_second']:.1f} | "
            f"{r['tokens_per_second'] / base[r['mode']]:.2f}x | "
            f"{r['llama_tokens_per_second']:.1f} | {ratio:.2f} |"
        )
    if bare:
        print(
            "\n| requests | dhara build ms | dhara eval ms | llama build ms | llama eval ms | eval dhara / llama |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        for count in counts:
            t = bare_step(model, twin, count, prompt_len)
            ratio = t["dhara_eval_ms"] / t["llama_eval_ms"]
            print(
                f"| {count} | {t['dhara_build_ms']:.2f} | {t['dhara_eval_ms']:.2f} | "
                f"{t['llama_build_ms']:.2f} | {t['llama_eval_ms']:.2f} | {ratio:.2f} |"
            )
    if output:
        output.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    typer.run(main)
