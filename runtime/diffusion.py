"""Block diffusion on a prefix cache, equal to the uncached reference.

A new block of MASK tokens is appended to the sequence and denoised in steps:
each step predicts every still-masked position and commits the confident ones.
Under the global block grid a query sees its whole block, so the committed
tokens of the last, partial global block see the MASK tokens after them and
change with every step. Only whole global blocks before the new block are
therefore frozen in the cache; each step recomputes the partial tail together
with the block, and trims the cache back to the frozen blocks.
"""

from typing import Iterator

import mlx.core as mx

from .ar import finished
from .forward import cache_length, forward, prefill, rollback
from .sampling import Sampling, adjust_logits, choose, filtered_logprobs, seen_tokens
from .settings import Settings
from .stats import Stats, Step


def denoise(
    logits: mx.array, seen, positions: list[int], sampling: Sampling, threshold: float, mask_id: int
) -> tuple[list[int], list[bool]]:
    """Predictions and commit flags of the masked positions from their logits [n, vocab].

    The confidence of a prediction is its float32 probability (MASK excluded);
    positions at or above ``threshold`` commit, and always the most confident one.
    """
    adjusted = adjust_logits(logits, seen, sampling, mask_id)
    tokens = choose(adjusted, sampling, positions)
    logprobs = adjusted if sampling.greedy else filtered_logprobs(adjusted, sampling)
    probs = mx.softmax(logprobs, axis=-1, precise=True)
    confidence = mx.take_along_axis(probs, tokens[:, None], axis=-1)[:, 0]
    best = mx.arange(len(positions)) == mx.argmax(confidence)
    commit = (confidence >= threshold) | best
    return tokens.tolist(), commit.tolist()


def decode_diffusion(
    model, cache: list, seq: list[int], sampling: Sampling, settings: Settings, stats: Stats
) -> Iterator[Step]:
    if finished(seq, 0, settings, stats):
        yield Step([], stats)
        return
    grid, mask_id = settings.block_len, model.args.mask_token_id
    prefill(model, cache, seq[cache_length(cache) : len(seq) // grid * grid], grid)
    stats.prefilled()
    while True:
        start = len(seq)
        block = [mask_id] * min(grid, settings.max_tokens - stats.generated)
        final = 0
        while final < len(block):
            frozen = cache_length(cache)
            tail = seq[frozen:start] + block
            logits = forward(model, cache, tail, grid)
            stats.forwards += 1
            rollback(cache, start // grid * grid)
            masked = [i for i, t in enumerate(block) if t == mask_id]
            committed = [t for t in block if t != mask_id]
            seen = seen_tokens(sampling, seq[:start] + committed, model.args.vocab_size)
            rows = logits[mx.array([start - frozen + i for i in masked])]
            positions = [start + i for i in masked]
            tokens, commit = denoise(rows, seen, positions, sampling, settings.threshold, mask_id)
            for i, token, flag in zip(masked, tokens, commit):
                if flag:
                    block[i] = token
            new = []
            while final < len(block) and block[final] != mask_id:
                new.append(block[final])
                final += 1
            new = settings.through_stop(new)
            seq.extend(new)
            stats.rounds += 1
            stats.emitted(len(new))
            done = finished(seq, stats.generated, settings, stats)
            yield Step(new, stats)
            if done:
                return
