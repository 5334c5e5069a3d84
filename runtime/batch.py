"""Batched AR: several prompts of different lengths decoded together.

Prompts are left-padded into one batch cache (mlx-lm's ``BatchKVCache`` for the
KV and for the canon store, which masks the padding out of the convs). Each
row samples with the key of its own (seed, position), so a row's tokens are the
ones its prompt gets alone.
"""

from typing import Iterable, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from ..cache import DharaCache
from .forward import PREFILL_STEP
from .sampling import Sampling, adjust_logits, choose, presence
from .settings import check_prompt


def batch_cache(model, left_padding: list[int]) -> list[DharaCache]:
    return [
        DharaCache(BatchKVCache(left_padding), BatchKVCache(left_padding)) for _ in model.layers
    ]


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    stop_ids: Iterable[int] = (),
) -> list[list[int]]:
    """The generated ids of each prompt, each as ``generate_ids(mode="ar")`` gives them."""
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt.")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}.")
    sampling = Sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    sampling.validate()
    sampling = sampling.with_seed()
    args, stops = model.args, frozenset(int(t) for t in stop_ids)
    rows = [check_prompt(p, args.vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]
    width = max(len(row) for row in rows)
    padding = [width - len(row) for row in rows]
    padded = mx.array([[0] * pad + row for pad, row in zip(padding, rows)])
    cache = batch_cache(model, padding)
    for start in range(0, width - 1, PREFILL_STEP):
        model(padded[:, start : min(start + PREFILL_STEP, width - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    inputs = padded[:, -1:]
    outputs: list[list[int]] = [[] for _ in rows]
    running = [max_tokens > 0] * len(rows)
    while any(running):
        logits = model(inputs, cache=cache)[:, -1]
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = mx.stack([presence(r + o, args.vocab_size) for r, o in zip(rows, outputs)])
        positions = [len(r) + len(o) for r, o in zip(rows, outputs)]
        tokens = choose(
            adjust_logits(logits, seen, sampling, args.mask_token_id), sampling, positions
        )
        for i, token in enumerate(tokens.tolist()):
            if running[i]:
                outputs[i].append(token)
                running[i] = token not in stops and len(outputs[i]) < max_tokens
        inputs = tokens[:, None]
    return outputs
