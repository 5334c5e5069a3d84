"""dhara's decode step and cache against mlx-lm's llama of the same widths (issue 12).

Every figure is a ratio to llama built in this one process (random float32
weights, the same hidden, heads, KV heads, intermediate and vocabulary):

- ``step``: one batch-1 decode forward through mlx-lm's caches, the two models in
  lockstep, the host's graph build timed apart from the evaluation (on Apple
  GPUs the build decides a small model's tokens/s), and the whole step;
- ``batch``: mlx-lm's ``BatchGenerator`` (what ``mlx_lm.server`` runs) at each
  ``--batch`` size, aggregate tokens/s, the two models taking turns;
- ``memory``: cache bytes per token after a prefill of each ``--lengths``, from
  a one-layer model of the same widths (bytes per layer and token do not depend
  on the depth), reported for the full depth;
- ``prefill``: one cached forward of ``--prefill`` tokens;
- ``spec``: the cost of one self-speculation round of the runtime (draft and
  verify; random weights accept almost nothing, so every round does the same work);
- ``parts``: the evaluation of one batched decode forward (the largest ``--batch``)
  of dhara, of dhara without its soft-cap or canon sites, and of llama;
- ``gpu_graph`` (alone): the graph build of ``step`` with ``mx.fast``'s RMSNorm, RoPE
  and attention each standing in as one node, as on a GPU, where each is one kernel
  (the CPU backend builds a dozen ops for each): the host work per step on Apple
  GPUs, measured here. Only the build is timed (the stand-ins compute nothing),
  and the graph's nodes are counted.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/bench_step.py --sections step,prefill,spec,memory
    python benchmarks/bench_step.py --sections batch --layers 8 --batch 8,32
    python benchmarks/bench_step.py --real --sections step,batch,prefill,spec
    python benchmarks/bench_step.py --sections gpu_graph

``--real`` runs the same sections on SmolLM2-135M-Instruct grafted into dhara
(the ``real`` extra) against mlx-lm's llama on its own weights: the real shape,
with dhara's Canon sites present (zero taps) as a graft has them.
"""

import copy
import io
import re
import statistics
import time

import mlx.core as mx
import typer
from bench_batch import timed_batch_generator  # this folder is on the path
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from optiq_dhara import model as dhara
from optiq_dhara.runtime import decode
from optiq_dhara.runtime.bench import cast

SECTIONS = ("step", "batch", "memory", "prefill", "spec", "parts", "gpu_graph")


def build_pair(layers: int, vocab: int = 49155, **dhara_changes) -> dict:
    """dhara and llama at dhara-250m's widths, ``layers`` deep, random float32 weights
    (``dhara_changes``: other dhara config values)."""
    common = dict(
        hidden_size=768,
        num_hidden_layers=layers,
        intermediate_size=2176,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        rope_theta=8_000_000.0,
        tie_word_embeddings=True,
    )
    mx.random.seed(0)
    models = {
        "dhara": dhara.Model(dhara.ModelArgs(mask_token_id=vocab - 1, **common, **dhara_changes)),
        "llama": llama.Model(llama.ModelArgs(model_type="llama", **common)),
    }
    for model in models.values():
        cast(model, mx.float32)  # as mlx-lm's convert: RoPE buffers kept
    return models


def build_real() -> dict:
    """SmolLM2-135M-Instruct (the ``real`` extra's GGUF) grafted into dhara, float32, and
    mlx-lm's llama on the same dequantized weights: the real shape and real weights."""
    import tempfile
    from pathlib import Path

    from mlx_lm.utils import load_model

    from optiq_dhara.convert.gguf import read_gguf
    from optiq_dhara.convert.graft import graft
    from optiq_dhara.convert.real import smollm2_gguf

    gguf = smollm2_gguf()
    out = Path(tempfile.mkdtemp()) / "smollm2-dhara"
    graft(str(gguf), out, dtype="float32")
    grafted, _ = load_model(out)
    source = read_gguf(gguf)
    reference = llama.Model(llama.ModelArgs.from_dict(source.config))
    reference.load_weights(list(source.weights.items()), strict=True)
    models = {"dhara": grafted, "llama": reference}
    for model in models.values():
        cast(model, mx.float32)  # as mlx-lm's convert: RoPE buffers kept
    return models


def prompt(vocab: int, length: int, rows: int = 1, seed: int = 0) -> mx.array:
    return mx.random.randint(0, vocab - 1, (rows, length), key=mx.random.key(seed))


def step_times(models: dict, context: int, steps: int) -> dict:
    """Per model: lists of graph-build, warm graph-build and evaluation seconds of one
    decode step.

    The warm build is the same step built again at once, on a copy of the cache
    (and thrown away): here the evaluation runs on the CPU that builds the graphs
    and evicts its caches, so the first build after it pays for cold caches, which
    a build on a machine whose GPU evaluates does not.
    """
    state = {}
    for name, model in models.items():
        cache = make_prompt_cache(model)
        token = mx.argmax(model(prompt(model.args.vocab_size, context), cache=cache)[:, -1], -1)
        mx.eval(token, [c.state for c in cache])
        state[name] = (cache, token)
    times = {name: ([], [], []) for name in models}
    for _ in range(steps):
        for name, model in models.items():
            cache, token = state[name]
            spare = copy.deepcopy(cache)
            start = time.perf_counter()
            new = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
            built = time.perf_counter()
            mx.argmax(model(token[:, None], cache=spare)[:, -1], axis=-1)
            rebuilt = time.perf_counter()
            mx.eval(new)
            times[name][0].append(built - start)
            times[name][1].append(rebuilt - built)
            times[name][2].append(time.perf_counter() - rebuilt)
            state[name] = (cache, new)
    return times


def section_step(models: dict, context: int, steps: int, rounds: int) -> None:
    step_times(models, context, 3)  # warm-up: compile and allocate once
    typer.echo(
        f"\n## decode step, batch 1, {context} tokens of context, {rounds} rounds of "
        f"{steps} steps in lockstep (medians; ratios: median and range over rounds)"
    )
    typer.echo("| model | build ms | warm build ms | eval ms | step ms |")
    typer.echo("|---|---:|---:|---:|---:|")
    columns = ("build", "warm build", "eval", "step")
    per_round = []
    for turn in range(rounds):
        order = list(models) if turn % 2 == 0 else list(models)[::-1]
        times = step_times({name: models[name] for name in order}, context, steps)
        medians = {}
        for name, (build, warm, evaluation) in times.items():
            total = [b + e for b, e in zip(build, evaluation)]
            medians[name] = [statistics.median(x) * 1e3 for x in (build, warm, evaluation, total)]
        per_round.append(medians)
    for name in models:
        cells = [statistics.median(r[name][i] for r in per_round) for i in range(len(columns))]
        typer.echo(f"| {name} | " + " | ".join(f"{m:.2f}" for m in cells) + " |")
    ratios = [sorted(r["dhara"][i] / r["llama"][i] for r in per_round) for i in range(len(columns))]
    parts = [
        f"{what} {statistics.median(xs):.3f} ({xs[0]:.3f}-{xs[-1]:.3f})"
        for what, xs in zip(columns, ratios)
    ]
    typer.echo("dhara / llama: " + ", ".join(parts))


def graph_nodes(array: mx.array) -> int:
    """Operations in the graph that computes ``array`` (a fused compiled kernel is one)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, array)
    labels = re.findall(r'label\s*=\s*"([^"]*)"', dot.getvalue())
    return sum(not label[:1].isdigit() for label in labels)


def section_gpu_graph(layers: int, context: int, steps: int, rounds: int) -> None:
    """``step``'s graph build with RMSNorm, RoPE and attention as one node each (the GPU's
    structure); must run before anything is compiled, so it runs alone."""

    def one_node(x, *args, **kwargs):
        return mx.stop_gradient(x)

    for name in ("rms_norm", "rope", "scaled_dot_product_attention"):
        setattr(mx.fast, name, one_node)
    models = build_pair(layers)
    nodes = {}
    for name, model in models.items():
        cache = make_prompt_cache(model)
        token = mx.argmax(model(prompt(model.args.vocab_size, context), cache=cache)[:, -1], -1)
        for _ in range(4):  # past the prefill's pieces of the canon history
            mx.eval(token)
            token = mx.argmax(model(token[:, None], cache=cache)[:, -1], -1)
        nodes[name] = graph_nodes(token)
    step_times(models, context, 3)  # warm-up: compile and allocate once
    per_round = []
    for turn in range(rounds):
        order = list(models) if turn % 2 == 0 else list(models)[::-1]
        times = step_times({name: models[name] for name in order}, context, steps)
        per_round.append(
            {name: [statistics.median(t) * 1e3 for t in times[name][:2]] for name in models}
        )
    typer.echo(
        f"\n## decode step graph as a GPU builds it (fast ops one node each), batch 1, "
        f"{rounds} rounds of {steps} steps"
    )
    typer.echo("| model | graph nodes | build ms | warm build ms |")
    typer.echo("|---|---:|---:|---:|")
    for name in models:
        cells = [statistics.median(r[name][i] for r in per_round) for i in range(2)]
        typer.echo(f"| {name} | {nodes[name]} | {cells[0]:.2f} | {cells[1]:.2f} |")
    ratios = [sorted(r["dhara"][i] / r["llama"][i] for r in per_round) for i in range(2)]
    parts = [
        f"{what} {statistics.median(xs):.3f} ({xs[0]:.3f}-{xs[-1]:.3f})"
        for what, xs in zip(("build", "warm build"), ratios)
    ]
    typer.echo(f"dhara / llama: nodes {nodes['dhara'] / nodes['llama']:.3f}, " + ", ".join(parts))


def section_batch(models: dict, sizes: list, prompt_len: int, max_tokens: int, repeats: int):
    typer.echo(
        f"\n## BatchGenerator, {prompt_len}-token prompts, {max_tokens} tokens each, "
        f"best of {repeats}"
    )
    typer.echo("| batch | dhara tok/s | llama tok/s | dhara / llama |")
    typer.echo("|---:|---:|---:|---:|")
    vocab = models["dhara"].args.vocab_size
    for size in sizes:
        prompts = prompt(vocab, prompt_len, size, seed=size).tolist()
        best = {name: 0.0 for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                generated, seconds = timed_batch_generator(model, prompts, max_tokens)
                best[name] = max(best[name], generated / seconds)
        ratio = best["dhara"] / best["llama"]
        typer.echo(f"| {size} | {best['dhara']:.1f} | {best['llama']:.1f} | {ratio:.3f} |")


def section_memory(lengths: list, layers: int, chunk: int = 512) -> None:
    one = build_pair(1, vocab=512)
    typer.echo(f"\n## cache bytes per token after a prefill, float32, {layers} layers")
    typer.echo("| tokens | dhara bytes/token | llama (KV) bytes/token | dhara / KV |")
    typer.echo("|---:|---:|---:|---:|")
    for length in lengths:
        nbytes = {}
        for name, model in one.items():
            cache = make_prompt_cache(model)
            ids = prompt(512, length)
            for start in range(0, length, chunk):
                model(ids[:, start : start + chunk], cache=cache)
                mx.eval([c.state for c in cache])
            nbytes[name] = sum(c.nbytes for c in cache) * layers / length
            del cache
            mx.clear_cache()
        ratio = nbytes["dhara"] / nbytes["llama"]
        typer.echo(f"| {length} | {nbytes['dhara']:.0f} | {nbytes['llama']:.0f} | {ratio:.3f} |")


def section_prefill(models: dict, length: int, rounds: int) -> None:
    times = {name: [] for name in models}
    for _ in range(rounds + 1):
        for name, model in models.items():
            cache = make_prompt_cache(model)
            ids = prompt(model.args.vocab_size, length)
            mx.eval(ids)
            start = time.perf_counter()
            mx.eval(model(ids, cache=cache)[:, -1], [c.state for c in cache])
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    typer.echo(f"\n## prefill of {length} tokens, median of {rounds}")
    for name, seconds in medians.items():
        typer.echo(f"{name}: {length / seconds:.1f} tok/s")
    typer.echo(f"dhara / llama time: {medians['dhara'] / medians['llama']:.3f}")


def section_spec(model, draft: int, rounds: int, context: int) -> None:
    ids = prompt(model.args.vocab_size, context)[0].tolist()
    options = dict(mode="spec", k=draft, max_tokens=rounds, stop_ids=())
    list(decode(model, ids, **{**options, "max_tokens": 4}))  # warm-up
    stats = list(decode(model, ids, **options))[-1].stats
    per_round = stats.decode_seconds / max(stats.rounds - 1, 1)
    typer.echo(
        f"\n## self-speculation round, k = {draft}, {context}-token prompt: "
        f"{per_round * 1e3:.1f} ms per round ({stats.rounds} rounds, "
        f"{stats.tokens_per_round:.2f} tokens per round)"
    )


def section_parts(layers: int, rows: int, steps: int = 10) -> None:
    """Evaluation of one batched decode forward (merged ``BatchKVCache``, prompts of
    58-64 tokens) of dhara, of dhara without its soft-cap, without its canon sites,
    without both and QK-norm, and of llama: where dhara's extra time goes."""
    from mlx_lm.generate import _merge_caches

    variants = {
        "dhara": {},
        "no soft-cap": {"use_logit_softcap": False},
        "no canon": {"canon_set": ""},
        "neither, no QK-norm": {"canon_set": "", "use_logit_softcap": False, "use_qk_norm": False},
    }
    models = {name: build_pair(layers, **changes)["dhara"] for name, changes in variants.items()}
    models["llama"] = build_pair(layers)["llama"]
    lengths = [64 - i % 7 for i in range(rows)]
    state = {}
    for name, model in models.items():
        caches = []
        for i, length in enumerate(lengths):
            cache = make_prompt_cache(model)
            model(mx.array([[3 + i] * length]), cache=cache)
            caches.append(cache)
        state[name] = _merge_caches(caches)
        mx.eval([c.state for c in state[name]])
    token = mx.array([[5]] * rows)
    times = {name: [] for name in models}
    for step in range(steps + 2):
        for name, model in models.items():
            logits = model(token, cache=state[name])[:, -1]
            start = time.perf_counter()
            mx.eval(mx.argmax(logits, axis=-1))
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["llama"])
    typer.echo(f"\n## parts of a batched decode forward, {rows} rows, {layers} layers")
    typer.echo("| model | eval ms | / llama |")
    typer.echo("|---|---:|---:|")
    for name, xs in times.items():
        typer.echo(
            f"| {name} | {statistics.median(xs) * 1e3:.2f} | {statistics.median(xs) / reference:.3f} |"
        )


def main(
    sections: str = typer.Option(",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}"),
    layers: int = typer.Option(32, help="depth of both models (the 250m has 32)"),
    context: int = typer.Option(64, help="tokens of context before the timed decode steps"),
    steps: int = typer.Option(32, help="decode steps per model, in lockstep"),
    batch: str = typer.Option("8,32", help="BatchGenerator batch sizes"),
    prompt_len: int = typer.Option(64, help="prompt tokens per request in the batch section"),
    max_tokens: int = typer.Option(32, help="tokens per request in the batch section"),
    repeats: int = typer.Option(2, help="BatchGenerator runs per model and size (best kept)"),
    lengths: str = typer.Option("2048,4096,16384,32768", help="memory section prefill lengths"),
    prefill: int = typer.Option(512, help="prefill section length"),
    rounds: int = typer.Option(16, help="spec section rounds (and prefill section repeats / 4)"),
    draft: int = typer.Option(4, help="spec section draft length k"),
    step_rounds: int = typer.Option(5, help="step section rounds (fresh caches each)"),
    real: bool = typer.Option(
        False,
        help="SmolLM2-135M grafted (the real extra) against mlx-lm's llama on its weights, "
        "instead of random weights at dhara-250m's widths (step, batch, prefill, spec)",
    ),
):
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise typer.BadParameter(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if "gpu_graph" in chosen:
        if len(chosen) > 1 or real:
            raise typer.BadParameter("gpu_graph replaces mx.fast's ops, so it runs alone")
        section_gpu_graph(layers, context, steps, step_rounds)
        return
    if real:
        if set(chosen) & {"memory", "parts"}:
            raise typer.BadParameter("--real runs the step, batch, prefill and spec sections")
        typer.echo(f"SmolLM2-135M grafted, real weights, float32, {mx.default_device()}")
        models = build_real()
    else:
        typer.echo(f"dhara-250m widths, {layers} layers, float32, {mx.default_device()}")
        models = build_pair(layers) if set(chosen) - {"memory", "parts"} else {}
    if "step" in chosen:
        section_step(models, context, steps, step_rounds)
    if "batch" in chosen:
        sizes = [int(s) for s in batch.split(",")]
        section_batch(models, sizes, prompt_len, max_tokens, repeats)
    if "prefill" in chosen:
        section_prefill(models, prefill, max(rounds // 4, 1))
    if "spec" in chosen:
        section_spec(models["dhara"], draft, rounds, context)
    if "parts" in chosen:
        section_parts(layers, max(int(b) for b in batch.split(",")))
    if "memory" in chosen:
        section_memory([int(n) for n in lengths.split(",")], layers)


if __name__ == "__main__":
    typer.run(main)
