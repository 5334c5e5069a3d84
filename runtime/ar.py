"""Autoregressive decoding: one token per causal forward."""

from typing import Iterator

import mlx.core as mx

from .forward import cache_length, forward, prefill
from .sampling import Sampling, adjust_logits, choose, seen_tokens
from .settings import Settings
from .stats import Stats, Step


def next_token(model, logits: mx.array, seq: list[int], sampling: Sampling) -> int:
    """The AR token at position ``len(seq)`` from the logits [vocab] that predict it."""
    args = model.args
    seen = seen_tokens(sampling, seq, args.vocab_size)
    adjusted = adjust_logits(logits[None], seen, sampling, args.mask_token_id)
    return choose(adjusted, sampling, [len(seq)]).item()


def finished(seq: list[int], generated: int, settings: Settings, stats: Stats) -> bool:
    """Set ``stats.finish_reason`` and say so when the last token ends the run."""
    if generated and seq[-1] in settings.stop_ids:
        stats.finish_reason = "stop"
    elif generated >= settings.max_tokens:
        stats.finish_reason = "length"
    return stats.finish_reason is not None


def prefill_causal(model, cache: list, seq: list[int], stats: Stats) -> mx.array:
    """Feed the uncached prompt; the logits [vocab] that predict the first new token."""
    prefill(model, cache, seq[cache_length(cache) : -1])
    logits = forward(model, cache, seq[-1:])[-1]
    stats.forwards += 1
    mx.eval(logits)
    stats.prefilled()
    return logits


def decode_ar(
    model, cache: list, seq: list[int], sampling: Sampling, settings: Settings, stats: Stats
) -> Iterator[Step]:
    if finished(seq, 0, settings, stats):
        yield Step([], stats)
        return
    logits = prefill_causal(model, cache, seq, stats)
    while True:
        token = next_token(model, logits, seq, sampling)
        seq.append(token)
        stats.rounds += 1
        stats.emitted(1)
        done = finished(seq, stats.generated, settings, stats)
        yield Step([token], stats)
        if done:
            return
        logits = forward(model, cache, [token])[-1]
        stats.forwards += 1
