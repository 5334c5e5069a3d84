"""Decoding speed of each mode, as ``dhara-mlx bench`` prints it.

What an inference engineer reads (after gpt-fast): tokens/s, tokens per forward,
accepted drafts per round, time to first token, peak memory, and the weight
bandwidth implied by the speed (model bytes x tokens/s). Also the cached block
diffusion against the uncached reference semantics, which re-runs the whole
sequence at every step.
"""

import random
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..masks import block_causal_mask
from ..model import Model, ModelArgs
from .decode import decode
from .diffusion import denoise
from .sampling import Sampling
from .settings import default_block_len, require_mode


@dataclass
class BenchRow:
    model: str
    mode: str
    prompt_tokens: int
    generated: int
    tokens_per_second: float
    tokens_per_forward: float
    accepted_per_round: float
    first_token_seconds: float
    peak_memory_gb: float
    bandwidth_gb_s: float


@dataclass
class ReferenceRow:
    """Cached diffusion vs the uncached reference, same prompt, same output."""

    model: str
    prompt_tokens: int
    generated: int
    cached_seconds: float
    uncached_seconds: float
    same_output: bool

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.cached_seconds


def random_model(dtype: mx.Dtype = mx.float32, seed: int = 0, **overrides) -> Model:
    """A randomly initialised dhara (dhara-250m's shape unless ``overrides`` say otherwise)."""
    mx.random.seed(seed)
    model = Model(ModelArgs(**overrides))
    cast(model, dtype)
    return model


def cast(model, dtype: mx.Dtype) -> None:
    """Cast ``model``'s parameters as mlx-lm's convert casts them: only those its
    ``cast_predicate`` allows (dhara keeps its float32 RoPE buffers, shared by the
    layers, as they are), then evaluate them."""
    keep = getattr(model, "cast_predicate", lambda _: True)
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in params if keep(k)]))
    mx.eval(model.parameters())


def model_bytes(model) -> int:
    return sum(value.nbytes for _, value in tree_flatten(model.parameters()))


def make_prompt(model, length: int, seed: int = 0, text_ids: Optional[list[int]] = None):
    """The first ``length`` ids of ``text_ids`` (repeated as needed), or random ids
    of the vocabulary (MASK excluded) when there is no text."""
    if text_ids:
        return [text_ids[i % len(text_ids)] for i in range(length)]
    rng = random.Random(seed)
    choices = [i for i in range(model.args.vocab_size) if i != model.args.mask_token_id]
    return [rng.choice(choices) for _ in range(length)]


def bench_mode(
    model, name: str, prompt: list[int], mode: str, max_tokens: int, **kwargs
) -> BenchRow:
    """Decode once and report the run's stats."""
    mx.reset_peak_memory()
    steps = list(decode(model, prompt, mode=mode, max_tokens=max_tokens, **kwargs))
    stats = steps[-1].stats
    return BenchRow(
        model=name,
        mode=mode,
        prompt_tokens=len(prompt),
        generated=stats.generated,
        tokens_per_second=stats.tokens_per_second,
        tokens_per_forward=stats.tokens_per_forward,
        accepted_per_round=stats.accepted_per_round,
        first_token_seconds=stats.time_to_first_token or 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        bandwidth_gb_s=model_bytes(model) * stats.tokens_per_second / 1e9,
    )


def uncached_diffusion(
    model, prompt: Sequence[int], *, max_tokens: int, block_len: int, threshold: float
) -> list[int]:
    """Greedy block diffusion by its definition: every step runs the whole sequence,
    every block is whole (the last one too) and the output is cut to ``max_tokens``."""
    mask_id, sampling = model.args.mask_token_id, Sampling()
    seq = list(prompt)
    while len(seq) - len(prompt) < max_tokens:
        start = len(seq)
        seq += [mask_id] * block_len
        while mask_id in seq[start:]:
            logits = model(mx.array([seq]), mask=block_causal_mask(len(seq), block_len))[0]
            masked = [p for p in range(start, len(seq)) if seq[p] == mask_id]
            rows = logits[mx.array(masked)]
            tokens, commit = denoise(rows, None, masked, sampling, threshold, mask_id)
            for position, token, flag in zip(masked, tokens, commit):
                if flag:
                    seq[position] = token
    return seq[len(prompt) : len(prompt) + max_tokens]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_reference(
    model, name: str, prompt: list[int], max_tokens: int, block_len: int, threshold: float
) -> ReferenceRow:
    settings = dict(max_tokens=max_tokens, block_len=block_len, threshold=threshold)
    cached, cached_seconds = timed(
        lambda: [t for s in decode(model, prompt, mode="diffusion", **settings) for t in s.tokens]
    )
    uncached, uncached_seconds = timed(uncached_diffusion, model, prompt, **settings)
    return ReferenceRow(
        name, len(prompt), len(cached), cached_seconds, uncached_seconds, cached == uncached
    )


def run_bench(
    model,
    name: str,
    *,
    prompt_lengths: Iterable[int] = (16, 512),
    modes: Iterable[str] = ("ar", "diffusion", "spec"),
    max_tokens: int = 16,
    block_len: Optional[int] = None,
    threshold: float = 0.5,
    k: int = 8,
    reference: bool = True,
    seed: int = 0,
    text_ids: Optional[list[int]] = None,
    repeats: int = 1,
    progress=None,
) -> tuple[list[BenchRow], Optional[ReferenceRow]]:
    """Every mode at every prompt length (after one short warm-up run each),
    and the uncached diffusion reference at the longest prompt.

    Prompts are cut from ``text_ids`` when given, else random ids. With
    ``repeats`` > 1 the modes take turns and each keeps its fastest run, which
    is what a shared, noisy machine measures best. A mode the model lacks (diffusion
    and spec, and the reference, without a MASK token) is refused before any run.
    """
    lengths, modes = sorted(prompt_lengths), list(modes)
    for mode in modes + (["diffusion"] if reference else []):
        require_mode(model.args, mode)
    block_len = block_len or default_block_len(model.args)
    options = dict(block_len=block_len, threshold=threshold, k=k)
    rows = []
    for mode in modes:
        bench_mode(model, name, make_prompt(model, 4, seed, text_ids), mode, 2, **options)
    for length in lengths:
        prompt = make_prompt(model, length, seed, text_ids)
        best: dict[str, BenchRow] = {}
        for _ in range(repeats):
            for mode in modes:
                row = bench_mode(model, name, prompt, mode, max_tokens, **options)
                if mode not in best or row.tokens_per_second > best[mode].tokens_per_second:
                    best[mode] = row
        for mode in modes:
            rows.append(best[mode])
            if progress:
                progress(rows[-1])
    ref = None
    if reference:
        prompt = make_prompt(model, lengths[-1], seed, text_ids)
        ref = bench_reference(model, name, prompt, max_tokens, block_len, threshold)
    return rows, ref


def format_results(rows: list[BenchRow], ref: Optional[ReferenceRow]) -> str:
    """A Markdown table of the rows, and the reference comparison under it."""
    header = (
        "model",
        "mode",
        "prompt",
        "tokens",
        "tok/s",
        "tok/forward",
        "drafts/round",
        "first token (s)",
        "peak mem (GB)",
        "GB/s",
    )
    lines = ["| " + " | ".join(header) + " |", "|---|---" + "|---:" * (len(header) - 2) + "|"]
    for r in rows:
        cells = (
            r.model,
            r.mode,
            r.prompt_tokens,
            r.generated,
            f"{r.tokens_per_second:.2f}",
            f"{r.tokens_per_forward:.2f}",
            f"{r.accepted_per_round:.2f}",
            f"{r.first_token_seconds:.3f}",
            f"{r.peak_memory_gb:.2f}",
            f"{r.bandwidth_gb_s:.2f}",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if ref is not None:
        lines += [
            "",
            f"block diffusion at a {ref.prompt_tokens}-token prompt, {ref.generated} tokens: "
            f"cached {ref.cached_seconds:.2f} s, uncached reference {ref.uncached_seconds:.2f} s, "
            f"speedup {ref.speedup:.1f}x, same output: {ref.same_output}",
        ]
    return "\n".join(lines)


def as_dicts(rows: list[BenchRow], ref: Optional[ReferenceRow]) -> dict:
    out = {"rows": [asdict(r) for r in rows]}
    if ref is not None:
        out["reference"] = {**asdict(ref), "speedup": ref.speedup}
    return out
